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
    CostOptions,
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
from autopar.cost_models.fsdp import in_flight_bytes
from autopar.cost_models.moe import expert_matmuls
from autopar.cost_models.stages import expert_groups
from autopar.lower import profile_of
from autopar.models import get_config
from autopar.passes import MoE, PassContext, run_passes
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
    ep = cost.comm_of("ep")
    assert ep.forward_s == pytest.approx(2 * 2 * one_s, rel=1e-5)  # 2 MoE layers × dispatch + combine
    assert ep.backward_s == ep.forward_s and ep.recompute_s == 0.0
    predicted = estimate(plan, profile)
    assert predicted.breakdown_dict()["ep_comm"] == pytest.approx(4 * 2 * one_s, rel=1e-5)
    recomputed = stage_costs(_plan("1x8xA100-80GB", 16, dp=8, ep=8, recompute="full"), profile)[0]
    ep = recomputed.comm_of("ep")
    assert ep.recompute_s == ep.forward_s  # the recomputed forward exchanges again


def test_all_to_all_across_nodes_uses_both_links():
    profile, plan = _moe(num_experts=16), _plan("2x8xA100-80GB", 32, dp=16, ep=16)
    groups = expert_groups(plan, plan.stages[0].devices)
    assert groups == (tuple(range(16)), (0,))
    imbalance = load_imbalance(tokens=1024, num_experts=16, top_k=2, capacity_factor=1.25, ep=16)
    size_bytes = imbalance * 1024 * 2 * 1024 * 2
    inside, across = 7 / 16 * size_bytes / 230e9, 8 / 16 * size_bytes / 22.5e9  # NVLink, HDR InfiniBand
    one_s = max(inside, across) + 15 * 10e-6
    assert stage_costs(plan, profile)[0].comm_of("ep").forward_s == pytest.approx(2 * 2 * one_s, rel=1e-9)


def test_expert_states_are_divided_by_ep_and_never_sharded_by_zero():
    """As the runtime holds them: E/ep experts per device with their gradients and Adam states, 16
    bytes per parameter whatever the ZeRO stage; ZeRO shards the dense states only."""
    profile = _moe()
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    states = {ep: plan_memory(_plan("1x8xA100-80GB", 16, dp=8, ep=ep), profile)[0].model_states_bytes
              for ep in (1, 2, 8)}
    for ep in (2, 8):  # 16 bytes per parameter, zero 0
        assert states[1] - states[ep] == pytest.approx(16 * experts * (1 - 1 / ep))
    dense = profile.param_count - experts
    part = plan_memory(_plan("1x8xA100-80GB", 16, dp=8, ep=4, zero=1), profile)[0]
    assert part.model_states_bytes == pytest.approx(4 * dense + 12 * dense / 8 + 16 * experts / 4)
    assert (part.weights_bytes, part.gradients_bytes, part.optimizer_bytes) == pytest.approx(
        (2 * dense + 2 * experts / 4, 2 * dense + 2 * experts / 4, 12 * dense / 8 + 12 * experts / 4))


def test_zero3_does_not_shrink_expert_memory():
    """ZeRO-3 divides the dense states by dp and leaves every expert byte where it was."""
    profile = _moe()
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    dense = profile.param_count - experts  # routers included: dense, data-parallel
    # ZeRO-3 also holds unsharded dense units in flight (``fsdp``): the same bytes whatever ep
    layers = [2 * (layer.param_count - (layer.moe.expert_params_total if layer.moe else 0))
              for layer in profile.layers]
    weights, grads = in_flight_bytes(2 * dense - sum(layers), layers)
    for ep in (1, 2, 8):
        by_zero = {zero: plan_memory(_plan("1x8xA100-80GB", 16, dp=8, ep=ep, zero=zero), profile)[0]
                   for zero in (0, 3)}
        assert by_zero[3].model_states_bytes == pytest.approx(
            16 * dense / 8 + 16 * experts / ep + weights + grads)
        assert by_zero[0].model_states_bytes - by_zero[3].model_states_bytes == pytest.approx(
            16 * dense * (1 - 1 / 8) - weights - grads)
        assert by_zero[3].weights_bytes == pytest.approx(2 * dense / 8 + 2 * experts / ep + weights)


def test_tensor_parallel_ranks_hold_the_whole_moe_layer():
    """tp > 1 with ep > 1: dense parameters ÷ t, the E/ep experts and the routers whole on each tp rank."""
    profile = _moe()
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    routers = sum(layer.moe.router_param_count for layer in profile.layers if layer.moe)
    rest = profile.param_count - experts - routers
    plan = _plan("1x8xA100-80GB", 16, dp=4, tp=2, ep=4)
    assert plan_memory(plan, profile)[0].model_states_bytes == pytest.approx(
        16 * (rest / 2 + routers + experts / 4))
    assert expert_groups(plan, plan.stages[0].devices) == ((0, 2, 4, 6), (0,))  # tp coordinate 0's group
    cost = stage_costs(plan, profile)[0]
    assert cost.comm_of("ep").forward_s > 0 and cost.expert_params_per_device == experts / 4
    assert cost.params_per_device == pytest.approx(rest / 2 + routers + experts / 4)


def test_gradient_sync_splits_dense_over_dp_and_experts_over_dp_over_ep():
    profile = _moe()
    cluster = ClusterSpec.parse("1x8xA100-80GB")
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    dense = profile.param_count - experts

    def sync(params: float, ranks: int, zero: int = 0, microbatches: int = 1) -> float:
        return dp_sync_time_s(params, bytes_per_element=2, zero=zero, group=Group(size=ranks),
                              cluster=cluster, num_microbatches=microbatches)

    for ep in (1, 2, 8):  # the whole-model rule (dp_overlap 0); per layer (the runtime's pipelining
        # reduces after the last backward) nothing hides and each layer's all-reduce pays its latency
        plan = _plan("1x8xA100-80GB", 16, dp=8, ep=ep)
        predicted = estimate(plan, profile, options=CostOptions(dp_overlap=0.0))
        expected = sync(dense, 8) + sync(experts / ep, 8 // ep)
        assert predicted.breakdown_dict()["dp_comm"] == pytest.approx(expected)
        per_layer = estimate(plan, profile).breakdown_dict()["dp_comm"] - sync(experts / ep, 8 // ep)
        assert per_layer >= sync(dense, 8) * (1 - 1e-9)
    # ZeRO-3 gathers the dense weights every microbatch, layer by layer behind compute (``fsdp``): some
    # but not all of that traffic is exposed; the experts are all-reduced once, as at ZeRO 0
    plan = _plan("1x8xA100-80GB", 32, dp=8, ep=2, zero=3, microbatch_size=2)
    assert plan.schedule.num_microbatches == 2
    dense_exposed = estimate(plan, profile).breakdown_dict()["dp_comm"] - sync(experts / 2, 4)
    assert 0 < dense_exposed < sync(dense, 8, zero=3, microbatches=2)


def test_expert_gradient_all_reduce_is_not_overlapped_with_backward():
    """The runtime reduces expert gradients after the last backward, and under its pipelining the dense
    gradients too (``fsdp``: ``perform_reduce_grad``): per layer or whole, none of it hides."""
    profile = _moe()
    cluster = ClusterSpec.parse("1x8xA100-80GB")
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    plan = _plan("1x8xA100-80GB", 16, dp=8, ep=2)
    hidden = estimate(plan, profile, options=CostOptions(dp_overlap=1.0)).breakdown_dict()["dp_comm"]
    whole = estimate(plan, profile, options=CostOptions(dp_overlap=0.0)).breakdown_dict()["dp_comm"]
    expert_sync = dp_sync_time_s(experts / 2, bytes_per_element=2, zero=0, group=Group(size=4),
                                 cluster=cluster)
    dense_sync = dp_sync_time_s(profile.param_count - experts, bytes_per_element=2, zero=0,
                                group=Group(size=8), cluster=cluster)
    assert whole == pytest.approx(expert_sync + dense_sync)
    assert hidden >= (expert_sync + dense_sync) * (1 - 1e-9)


def test_ep1_without_moe_predicts_what_it_did_before_expert_parallelism():
    """Values recorded from the cost model before MoE support (bit-for-bit reproduced)."""
    plan = megatron_plan("megatron-1.7b", num_gpus=32, tp=1, pp=1, global_batch_size=512)
    predicted = estimate(plan, megatron_profile("megatron-1.7b"), options=MEGATRON_2021)
    assert predicted.step_time_s == 3.520994062469878
    assert predicted.breakdown_dict()["ep_comm"] == 0.0 and predicted.peak_memory_bytes[0] == 30206371840
    plan = dataclasses.replace(megatron_plan("megatron-3.6b", num_gpus=64, tp=2, pp=1, global_batch_size=512,
                                             schedule="1f1b", recompute="selective"), zero=1)
    whole_model = CostOptions(dp_overlap=0.0)  # the data-parallel rule of that time
    predicted = estimate(plan, megatron_profile("megatron-3.6b"), options=whole_model)
    assert predicted.step_time_s == 3.0787912798670787
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


def _transformed(model, inputs, moe):
    captured = capture(model, inputs)
    gm = run_passes(captured.graph_module, [moe], PassContext(captured=captured))
    return captured, gm


def test_residual_moe_profile_counts_the_dense_branch_and_its_coefficient():
    """Residual-MoE: E experts, the router, the dense MLP kept beside them and Linear(h, 2)."""
    shape = dict(num_layers=2, hidden_size=32, num_heads=4, seq_len=16, vocab_size=128)
    model = autopar.models.build("gpt", **shape)
    inputs = (torch.zeros(2, 16, dtype=torch.long),)
    captured, gm = _transformed(model, inputs, MoE(num_experts=4, residual=True))
    profile = profile_of(captured)
    assert profile.param_count == sum(p.numel() for p in gm.parameters())
    moe = profile.layers[1].moe
    mlp = 2 * 32 * 128 + 128 + 32
    assert (moe.num_experts, moe.top_k, moe.residual, moe.expert_param_count) == (4, 1, True, mlp)
    assert (moe.router_param_count, moe.residual_param_count) == (32 * 4, mlp + 2 * 32 + 2)
    dense = profile_of(capture(autopar.models.build("gpt", **shape), inputs))
    assert profile.layers[1].param_count - dense.layers[1].param_count == 4 * mlp + 32 * 4 + 2 * 32 + 2


@pytest.mark.hf
def test_adopted_mixtral_profile_counts_the_models_own_parameters():
    """HF Mixtral's sparse blocks adopted (layers='existing'): capture already counted all E experts."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=128, max_position_embeddings=64, num_local_experts=4,
        num_experts_per_tok=2))
    real = sum(p.numel() for p in model.parameters())
    captured, gm = _transformed(model, (torch.randint(0, 128, (2, 16)),), MoE(layers="existing"))
    profile = profile_of(captured)
    assert profile.param_count == real == sum(p.numel() for p in gm.parameters())
    for layer in profile.layers:
        moe = layer.moe
        assert (moe.num_experts, moe.top_k, moe.dropless, moe.residual) == (4, 2, True, False)
        counts = (moe.expert_param_count, moe.router_param_count, moe.residual_param_count)
        assert counts == (3 * 32 * 64, 32 * 4, 0)  # gate_up (2f × h) and down (h × f); router h × E
        assert layer.ffn_size == 96  # a gated SwiGLU expert of width f = 64 as a 2-matmul MLP: 1.5 f


def test_local_cpu_model_keeps_experts_out_of_zero():
    """local:N: FSDP2 gathers the dense weights only; expert gradients are all-reduced over dp/ep."""
    from autopar.cost_models.local.rates import CpuRates
    from autopar.cost_models.local.step import _tails, cpu_stage_costs

    shape = dict(num_layers=2, hidden_size=64, num_heads=4, seq_len=32, vocab_size=128)
    dense_profile = ModelProfile.gpt(get_config("gpt", **shape), dtype="fp32")
    profile = moe_profile(dense_profile, num_experts=4, top_k=2)
    experts = sum(layer.moe.expert_params_total for layer in profile.layers if layer.moe)
    rates = CpuRates.placeholders(4)
    plan = plan_from_fix("gpt-moe-test", graph_fingerprint="analytic", num_layers=2,
                         cluster=ClusterSpec.parse("local:4"), fix=Fix(dp=4, ep=2, zero=3),
                         global_batch_size=4, seq_len=32)
    [cost] = cpu_stage_costs(plan, profile, rates)
    dense_bytes = (profile.param_count - experts) * 4
    assert cost.expert_params_per_device == experts / 2
    assert cost.comm_of("dp").forward_s == pytest.approx(rates.collective_work_s("all_gather", dense_bytes, 4)
                                              + rates.copy_s(2 * dense_bytes))
    [(sync, _)] = _tails(plan, profile, rates)
    reduce_scatter = (rates.collective_work_s("reduce_scatter", dense_bytes, 4, memory_bound=True)
                      + rates.copy_s(2 * dense_bytes))
    expert_bytes = experts / 2 * 4
    all_reduce = (rates.collective_work_s("all_reduce", expert_bytes, 2, memory_bound=True)
                  + rates.copy_s(expert_bytes))
    assert sync == pytest.approx(reduce_scatter + all_reduce)


def test_local_cpu_model_prices_the_experts_dispatch_and_small_exchanges():
    """local:N: an MoE layer costs its dense equivalent plus its experts at their own row counts,
    the router and the dispatch; ep > 1 adds the forward's two small all-to-alls (row counts,
    expert ids), so the forward's exchanges cost more than the backward's."""
    from autopar.cost_models.local.compute import MOE_OPS_PER_EXPERT, moe_dispatch_part
    from autopar.cost_models.local.rates import CpuRates
    from autopar.cost_models.local.step import EP_SMALL_ALL_TO_ALLS, cpu_stage_costs

    shape = dict(num_layers=2, hidden_size=64, num_heads=4, seq_len=32, vocab_size=128)
    profile = moe_profile(ModelProfile.gpt(get_config("gpt", **shape), dtype="fp32"), num_experts=4, top_k=2)
    layer = next(layer for layer in profile.layers if layer.moe is not None)
    rates = CpuRates.placeholders(4)
    parts = {ep: moe_dispatch_part(layer, rates=rates, tokens=64, imbalance=1.0, ep=ep, recompute="none")
             for ep in (1, 2, 4)}
    assert all(p.forward_s > 0 and p.backward_s > p.forward_s for p in parts.values())
    ops = MOE_OPS_PER_EXPERT * rates.op_overhead_s  # fewer local experts: fewer per-expert ops
    assert parts[1].forward_s - parts[4].forward_s > 3 * ops / 2
    full = moe_dispatch_part(layer, rates=rates, tokens=64, imbalance=1.0, ep=1, recompute="full")
    assert full.recompute_s == pytest.approx(full.forward_s)
    plan = plan_from_fix("gpt-moe-test", graph_fingerprint="analytic", num_layers=2,
                         cluster=ClusterSpec.parse("local:2"), fix=Fix(dp=2, ep=2),
                         global_batch_size=4, seq_len=32)
    [cost] = cpu_stage_costs(plan, profile, rates)
    exchanges = cost.comm_of("ep")
    small = EP_SMALL_ALL_TO_ALLS * rates.collective_work_s("all_gather", 8 * 2 * 32, 2)
    moe_layers = sum(layer.moe is not None for layer in profile.layers)
    assert exchanges.forward_s - exchanges.backward_s == pytest.approx(moe_layers * small)


def test_dts_gate_is_priced_with_its_sparse_top_k():
    """The DTS gate's dense phase (all E experts per token) is not priced: the profile is top-k's."""
    shape = dict(num_layers=2, hidden_size=32, num_heads=4, seq_len=16, vocab_size=128)
    inputs = (torch.zeros(2, 16, dtype=torch.long),)
    profiles = {gate: profile_of(_transformed(autopar.models.build("gpt", **shape), inputs,
                                              MoE(num_experts=4, top_k=1, gate=gate))[0])
                for gate in ("topk", "dts")}
    dts, topk = profiles["dts"].layers[1], profiles["topk"].layers[1]
    assert (dts.moe.gate, dts.moe.top_k, topk.moe.gate) == ("dts", 1, "topk")
    for field in ("flops_fwd", "flops_bwd", "param_count"):
        assert getattr(dts, field) == getattr(topk, field)
