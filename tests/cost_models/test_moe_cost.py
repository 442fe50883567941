"""The MoE cost model (``cost_models.moe``): all-to-all, load imbalance, expert memory and sync."""

import dataclasses
import math

import pytest
import torch

import autopar
from autopar.capture import capture
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import (
    MEGATRON_2021,
    ModelProfile,
    estimate,
    load_imbalance,
    megatron_plan,
    megatron_profile,
    moe_profile,
    plan_memory,
    stage_costs,
)
from autopar.cost_models.comm import Group, dp_sync_time_s
from autopar.cost_models.moe import expert_matmuls
from autopar.cost_models.stages import expert_groups
from autopar.models import get_config
from autopar.passes import MoE, PassContext, run_passes
from autopar.planning import profile_of
from autopar.plans.pinned import plan_from_fix

SHAPE = dict(num_layers=4, hidden_size=1024, num_heads=16, seq_len=512, vocab_size=8192)


def _dense() -> ModelProfile:
    return ModelProfile.gpt(get_config("gpt", **SHAPE), name="gpt-moe-test")


def _moe(num_experts: int = 8, top_k: int = 2, capacity_factor: float = 1.25) -> ModelProfile:
    return moe_profile(_dense(), num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)


def _plan(cluster: str, batch: int, **fix):
    return plan_from_fix("gpt-moe-test", graph_fingerprint="analytic", num_layers=SHAPE["num_layers"],
                         cluster=ClusterSpec.parse(cluster), fix=Fix(**fix), global_batch_size=batch,
                         seq_len=SHAPE["seq_len"])


def test_load_imbalance_is_one_without_expert_parallelism_and_capped_by_capacity():
    assert load_imbalance(tokens=1024, num_experts=8, top_k=2, capacity_factor=1.25, ep=1) == 1.0
    # T·k = 2048 assignments, ep = 8: 1 + √(2 ln 8 · (7/8) / 2048) = 1.04215 (by hand)
    assert load_imbalance(tokens=1024, num_experts=8, top_k=2, capacity_factor=1.25, ep=8) == \
        pytest.approx(1.04215, abs=1e-5)
    # few tokens: the tail bound (1.337) exceeds what capacity lets through, E·⌈c·T·k/E⌉/(T·k) = 8·5/32
    assert load_imbalance(tokens=16, num_experts=8, top_k=2, capacity_factor=1.25, ep=8) == 1.25
    assert load_imbalance(tokens=1024, num_experts=8, top_k=2, capacity_factor=0.5, ep=1) == 0.5  # drops
    by_ep = [load_imbalance(tokens=4096, num_experts=64, top_k=1, capacity_factor=2.0, ep=e)
             for e in (1, 2, 8, 64)]
    assert by_ep == sorted(by_ep) and by_ep[0] == 1.0


def test_expert_flops_are_k_times_the_mlp_times_the_imbalance():
    layer = _moe().layers[1]
    tokens, h, f = 2 * 512, 1024, 4096
    for ep in (1, 4):
        matmuls, _ = expert_matmuls(layer, tokens=tokens, ep=ep)
        flops = sum(2 * m * k * n * g for m, k, n, g in matmuls)
        imbalance = load_imbalance(tokens=tokens, num_experts=8, top_k=2, capacity_factor=1.25, ep=ep)
        assert flops == pytest.approx(imbalance * 2 * 4 * tokens * h * f + 2 * tokens * h * 8)
        assert matmuls[0][3] == 8 // ep  # one batched GEMM over the rank's local experts


def test_all_to_all_time_inside_a_node_by_hand():
    profile = _moe()
    plan = _plan("1x8xA100-80GB", 16, dp=8, ep=8)  # b = 2, one microbatch
    cost = stage_costs(plan, profile)[0]
    size_bytes = 1.04215 * (2 * 512) * 2 * 1024 * 2  # imbalance · T · k · h · bf16 bytes
    one_s = 7 / 8 * size_bytes / 230e9 + 7 * 5e-6  # (ep−1)/ep · S/B + (ep−1)α on NVLink (A100)
    assert cost.ep_forward_s == pytest.approx(2 * 2 * one_s, rel=1e-5)  # 2 MoE layers × dispatch + combine
    assert cost.ep_backward_s == cost.ep_forward_s and cost.ep_recompute_s == 0.0
    predicted = estimate(plan, profile)
    assert predicted.breakdown_dict()["ep_comm"] == pytest.approx(4 * 2 * one_s, rel=1e-5)
    recomputed = stage_costs(_plan("1x8xA100-80GB", 16, dp=8, ep=8, recompute="full"), profile)[0]
    assert recomputed.ep_recompute_s == recomputed.ep_forward_s  # the recomputed forward exchanges again


def test_all_to_all_across_nodes_uses_both_links():
    profile, plan = _moe(num_experts=16), _plan("2x8xA100-80GB", 32, dp=16, ep=16)
    groups = expert_groups(plan, plan.stages[0].devices)
    assert groups == (tuple(range(16)), (0,))
    imbalance = load_imbalance(tokens=1024, num_experts=16, top_k=2, capacity_factor=1.25, ep=16)
    size_bytes = imbalance * 1024 * 2 * 1024 * 2
    inside, across = 7 / 16 * size_bytes / 230e9, 8 / 16 * size_bytes / 22.5e9  # NVLink, HDR InfiniBand
    one_s = max(inside, across) + 15 * 10e-6
    assert stage_costs(plan, profile)[0].ep_forward_s == pytest.approx(2 * 2 * one_s, rel=1e-9)


def test_expert_states_are_divided_by_ep_and_sharded_over_dp_over_ep():
    profile = _moe()
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    states = {ep: plan_memory(_plan("1x8xA100-80GB", 16, dp=8, ep=ep), profile)[0].model_states_bytes
              for ep in (1, 2, 8)}
    for ep in (2, 8):  # 16 bytes per parameter, zero 0
        assert states[1] - states[ep] == pytest.approx(16 * experts * (1 - 1 / ep))
    zero1 = {ep: plan_memory(_plan("1x8xA100-80GB", 16, dp=8, ep=ep, zero=1), profile)[0] for ep in (1, 4)}
    dense = profile.param_count - experts
    expected = 4 * dense + 12 * dense / 8 + 4 * experts / 4 + 12 * experts / 4 / 2  # ZeRO-1 over dp/ep = 2
    assert zero1[4].model_states_bytes == pytest.approx(expected)
    part = zero1[4]
    parts = part.weights_bytes + part.gradients_bytes + part.optimizer_bytes
    assert parts == pytest.approx(part.model_states_bytes)


def test_gradient_sync_splits_dense_over_dp_and_experts_over_dp_over_ep():
    profile = _moe()
    cluster = ClusterSpec.parse("1x8xA100-80GB")
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    dense = profile.param_count - experts

    def sync(params: float, ranks: int) -> float:
        return dp_sync_time_s(params, bytes_per_element=2, zero=0, group=Group(size=ranks), cluster=cluster)

    for ep in (1, 2, 8):
        predicted = estimate(_plan("1x8xA100-80GB", 16, dp=8, ep=ep), profile)
        expected = sync(dense, 8) + sync(experts / ep, 8 // ep)
        assert predicted.breakdown_dict()["dp_comm"] == pytest.approx(expected)


def test_ep1_without_moe_predicts_what_it_did_before_expert_parallelism():
    """Values recorded from the cost model before MoE support (bit-for-bit reproduced)."""
    plan = megatron_plan("megatron-1.7b", num_gpus=32, tp=1, pp=1, global_batch_size=512)
    predicted = estimate(plan, megatron_profile("megatron-1.7b"), options=MEGATRON_2021)
    assert predicted.step_time_s == 3.520994062469878
    assert predicted.breakdown_dict()["ep_comm"] == 0.0 and predicted.peak_memory_bytes[0] == 30206371840
    plan = dataclasses.replace(megatron_plan("megatron-3.6b", num_gpus=64, tp=2, pp=1, global_batch_size=512,
                                             schedule="1f1b", recompute="selective"), zero=1)
    assert estimate(plan, megatron_profile("megatron-3.6b")).step_time_s == 3.0787912798670787
    assert moe_profile(_dense(), num_experts=8, top_k=2, layers=()) == _dense()


def test_the_profile_reads_the_moe_pass_annotations():
    """A captured model after ``passes.MoE`` gives the analytic MoE profile, layer for layer."""
    shape = dict(num_layers=4, hidden_size=256, num_heads=4, seq_len=128, vocab_size=512)
    model = autopar.models.build("gpt", device="meta", **shape)
    captured = capture(model, (torch.zeros(2, 128, dtype=torch.long, device="meta"),))
    run_passes(captured.graph_module, [MoE(num_experts=8, top_k=2)], PassContext(captured=captured))
    profile = profile_of(captured)
    config = get_config("gpt", **shape)
    expected = moe_profile(ModelProfile.gpt(config, dtype=profile.dtype), num_experts=8, top_k=2)
    for got, want in zip(profile.layers, expected.layers, strict=True):
        assert (got.moe, got.ffn_size, got.param_count) == (want.moe, want.ffn_size, want.param_count)
        assert (got.flops_fwd, got.flops_bwd) == pytest.approx((want.flops_fwd, want.flops_bwd))
    assert [layer.moe is not None for layer in profile.layers] == [False, True, False, True]
    assert math.isclose(profile.layers[1].moe.capacity_factor, 1.25)
