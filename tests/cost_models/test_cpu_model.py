"""The local-cluster model: measured-rate tables, the shared-cores simulation, CPU layer times, and
``estimate`` choosing it (with the calibrated profile, or placeholders without one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import autopar
from autopar.calibration.fits import compute_shares, cpu_rates
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import CostOptions, ModelProfile, estimate, simulate, stage_costs
from autopar.cost_models.local.compute import DTENSOR_TP, transformer_layer_part
from autopar.cost_models.local.profile import LinkFit, LocalProfile, ProcessShare, save_profile
from autopar.cost_models.local.rates import MMAP_THRESHOLD_ELEMENTS, CpuRates, OpTable
from autopar.cost_models.local.shared_cores import simulate_shared
from autopar.cost_models.megatron import megatron_plan, megatron_profile
from autopar.cost_models.schedule import StageTimes
from autopar.plans import BREAKDOWN_KEYS
from autopar.plans.pinned import plan_from_fix

NS = 1e-9


def _rates(**changes: object) -> CpuRates:
    """Round numbers: a flat 100 GFLOP/s linear curve, 1 ns per element forward and backward."""
    table = OpTable(points=((1e3, NS, 2 * NS), (1e6, NS, 2 * NS)))
    collectives = tuple((kind, n, size, 1e-4 + size / 1e9) for kind in ("all_reduce", "all_gather",
                                                                         "reduce_scatter", "p2p")
                        for n in (2, 4) for size in (1e3, 1e6))
    base = dataclasses.replace(
        CpuRates.placeholders(2), linear_peak_flops_per_s=100e9, linear_tile_dim=0.0,
        flash_attention=((128.0, 32.0, 50e9, 40e9),), math_attention_s_per_score=(2 * NS, 6 * NS),
        elementwise=dict.fromkeys(CpuRates.placeholders(2).elementwise, table),
        activation_reread_s_per_byte=0.0,
        op_overhead_s=0.0, collectives=collectives, shares=((1, 1.0, 1.0), (2, 1.0, 1.0)))
    return dataclasses.replace(base, **changes)


def test_op_table_interpolates_in_log_size_and_clamps() -> None:
    table = OpTable(points=((1e6, 4 * NS, 10 * NS), (1e4, 2 * NS, 6 * NS)))
    assert table.points[0][0] == 1e4  # sorted
    assert table.seconds(1e4) == pytest.approx((2e-5, 4e-5))
    assert table.seconds(1e5) == pytest.approx((3 * NS * 1e5, 5 * NS * 1e5))  # halfway in log size
    assert table.seconds(1e8) == pytest.approx((4 * NS * 1e8, 6 * NS * 1e8))  # clamped, not extrapolated
    assert table.seconds(0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        OpTable(points=((1e4, -1.0, 1.0),))


def test_op_table_does_not_interpolate_across_the_mmap_threshold() -> None:
    """Beyond glibc's mmap threshold every output is new memory: a step, not a slope in log size."""
    at = float(MMAP_THRESHOLD_ELEMENTS)
    table = OpTable(points=((at / 2, 1 * NS, 2 * NS), (at, 3 * NS, 7 * NS), (2 * at, 3 * NS, 8 * NS)))
    assert table.seconds(at) == pytest.approx((3 * NS * at, 4 * NS * at))
    below = 0.75 * at  # priced from the points below the threshold only
    assert table.seconds(below) == pytest.approx((1 * NS * below, 1 * NS * below))
    assert table.seconds(1.5 * at)[0] == pytest.approx(3 * NS * 1.5 * at)
    below_only = OpTable(points=((at / 4, 1 * NS, 2 * NS), (at / 2, 2 * NS, 4 * NS)))
    # no point beyond the threshold: clamped to the last one, as before
    assert below_only.seconds(4 * at) == pytest.approx((2 * NS * 4 * at, 2 * NS * 4 * at))


def test_collectives_are_measured_points_joined_by_lines() -> None:
    rates = _rates()
    assert rates.collective_time_s("all_reduce", 1e3, 2) == pytest.approx(1e-4 + 1e-6)
    assert rates.collective_time_s("all_reduce", 5e5, 2) == pytest.approx(1e-4 + 5e-4)  # between points
    assert rates.collective_time_s("all_reduce", 1e7, 2) == pytest.approx(1e-4 + 1e-2)  # last segment's slope
    assert rates.collective_time_s("all_reduce", 10, 2) == pytest.approx(1e-4 + 1e-6)  # latency floor
    assert rates.collective_time_s("all_gather", 1e6, 8) == rates.collective_time_s("all_gather", 1e6, 4)
    assert rates.collective_time_s("all_reduce", 1e6, 1) == 0.0
    shared = _rates(shares=((1, 1.0, 1.0), (2, 0.8, 0.5)))
    measured = shared.collective_time_s("p2p", 1e6, 2)
    assert shared.collective_work_s("p2p", 1e6, 2) == pytest.approx(0.8 * measured)
    assert shared.collective_work_s("p2p", 1e6, 2, memory_bound=True) == pytest.approx(0.5 * measured)


def test_shares_interpolate_and_divide_the_cores_beyond_the_measured_counts() -> None:
    rates = _rates(shares=((1, 1.0, 1.0), (2, 0.9, 0.8), (4, 0.45, 0.3)))
    assert rates.share(1) == (1.0, 1.0) and rates.share(2) == (0.9, 0.8)
    assert rates.share(3) == pytest.approx((0.675, 0.55))
    assert rates.share(8) == pytest.approx((0.225, 0.15))
    rows = [{"num_processes": n, "layers_per_cpu_s": [10.0 * f] * n, "copy_bytes_per_s": [5.0 * c] * n}
            for n, f, c in ((1, 1.0, 1.0), (2, 0.9, 0.8), (4, 0.9, 0.3))]
    shares = compute_shares(rows, num_cores=2)
    assert [n for n, _, _ in shares] == [1, 2, 4]
    assert [x for _, *pair in shares for x in pair] == pytest.approx([1.0, 1.0, 0.9, 0.8, 0.45, 0.3])


def test_rates_round_trip_and_refuse_other_keys() -> None:
    rates = _rates()
    assert CpuRates.from_dict(rates.to_dict()) == rates
    with pytest.raises(ValueError, match=r"missing \['source'\]"):
        CpuRates.from_dict({k: v for k, v in rates.to_dict().items() if k != "source"})


@pytest.mark.parametrize("schedule, pp, v", [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved", 2, 2),
                                             ("zero_bubble", 3, 1)])
def test_without_sharing_the_simulation_is_the_plain_timeline(schedule: str, pp: int, v: int) -> None:
    stages = [StageTimes(forward_s=1.0 + 0.1 * k, backward_s=2.0, backward_weight_s=0.5, send_forward_s=0.05,
                         send_backward_s=0.05 * (k > 0)) for k in range(pp * v)]
    stages[-1] = dataclasses.replace(stages[-1], send_forward_s=0.0)
    plain = simulate(stages, schedule=schedule, pp=pp, num_microbatches=4, virtual_stages=v)
    shared = simulate_shared(stages, schedule=schedule, pp=pp, num_microbatches=4, virtual_stages=v)
    assert shared.total_s == pytest.approx(plain.total_s, rel=1e-9)
    assert shared.busy_s[shared.critical_rank] <= shared.total_s


def test_shared_cores_spread_the_work_and_fill_pipeline_bubbles() -> None:
    def cores(k: float) -> float:
        return min(1.0, 2 / k)

    one = [StageTimes(forward_s=1.0, backward_s=2.0)]
    dp = simulate_shared(one, schedule="gpipe", pp=1, num_microbatches=2, tails=[1.0], weights=[4],
                         rate=cores)
    assert dp.total_s == pytest.approx(7.0 * 2)  # 4 processes on 2 cores: twice as long
    stages = [StageTimes(forward_s=1.0, backward_s=2.0) for _ in range(4)]
    solo = simulate_shared(stages, schedule="1f1b", pp=4, num_microbatches=4)
    shared = simulate_shared(stages, schedule="1f1b", pp=4, num_microbatches=4, rate=cores)
    work = sum(shared.work_s)
    assert work / 2 <= shared.total_s < 2 * solo.total_s  # idle ranks leave their cores to the others
    assert solo.total_s == pytest.approx(12 + 3 * 3)  # m·W + (p−1)·W


def test_blocked_waits_leave_their_cores_to_the_other_processes() -> None:
    def cores(k: float) -> float:
        return min(1.0, 2 / k)

    one = [StageTimes(forward_s=0.5, backward_s=0.5)]  # one unit of work, a quarter of it blocked
    kwargs = {"schedule": "gpipe", "pp": 1, "num_microbatches": 1, "rate": cores}
    assert simulate_shared(one, weights=[4], **kwargs).total_s == pytest.approx(2.0)
    assert simulate_shared(one, weights=[4], blocked=[0.0], **kwargs).total_s == pytest.approx(2.0)
    # 4 processes on 2 cores, each blocked 0.25 / rate(4) = 0.5 s: computing 2.667 on average, at 0.75
    # each, so 0.75 / 0.75 + 0.5 = 1.5 s (2 s if a blocked process kept its core)
    assert simulate_shared(one, weights=[4], blocked=[0.25], **kwargs).total_s == pytest.approx(1.5, rel=1e-6)
    # no more processes than cores: nobody gains a core from a blocked one
    assert simulate_shared(one, weights=[2], blocked=[0.25], **kwargs).total_s == pytest.approx(1.0)


def test_cpu_layer_is_a_sum_of_measured_operations() -> None:
    rates = _rates()
    layer = ModelProfile.gpt(autopar.models.get_config("gpt", num_layers=2, hidden_size=256, num_heads=8,
                                                       vocab_size=512, seq_len=128)).layers[0]
    b, h, s, f = 2, 256, 128, 1024
    tokens = b * s
    part = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=1, bytes_per_element=4)
    linear = 6 * tokens * (h * 3 * h + h * h + 2 * h * f) / 100e9
    attention = 3.5 * (4 * b * s * s * h * 0.5) / 40e9
    elementwise = 2 * NS * (2 * tokens * h + 2 * tokens * h + tokens * f + tokens * h)
    times = part.times
    assert times.forward_s + times.backward_s == pytest.approx(linear + attention + elementwise)
    assert times.backward_weight_s == pytest.approx(linear / 3) and part.tp.forward_s == 0
    full = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=1, bytes_per_element=4,
                                  recompute="full")
    assert full.times.recompute_s == pytest.approx(times.forward_s)
    tp = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=2, bytes_per_element=4)
    sbh = tokens * h * 4
    forward = 2 * (1e-4 + sbh / 1e9) + (1e-4 + 3 * sbh / 1e9)
    assert tp.tp.forward_s == pytest.approx(forward)  # two all-reduces, the QKV all-gather
    dispatch = DTENSOR_TP.dispatches_per_layer * rates.dtensor_dispatch_s
    assert tp.times.forward_s + tp.times.backward_s > dispatch


def _local_plan(fix: Fix, world: int = 4):
    config = autopar.models.get_config("gpt", num_layers=4, hidden_size=128, num_heads=4, vocab_size=512,
                                       seq_len=64)
    profile = ModelProfile.gpt(config, dtype="fp32")
    cluster = ClusterSpec.parse(f"local:{world}")
    plan = plan_from_fix("gpt", graph_fingerprint="x", num_layers=4, cluster=cluster, fix=fix,
                         global_batch_size=16, seq_len=64)
    return plan, profile


def _local_profile(rates: CpuRates) -> LocalProfile:
    return LocalProfile(
        hostname="h", created="2026-01-01T00:00:00+00:00", num_cores=2, torch_version="2.x", quick=True,
        calibration_time_s=1.0, peak_flops_per_s={"fp32": 1e11}, best_matmul_flops_per_s={"fp32": 1e11},
        matmul_tile_dim=1.0, matmul_curve_peak_flops_per_s=1e11, memory_bandwidth_bytes_per_s=1e10,
        elementwise_bandwidth_bytes_per_s=1e10, op_overhead_s=1e-6, attention_flops_per_s=4e10,
        optimizer_time_s_per_param=3e-9, shares=(ProcessShare(num_processes=1, matmul_fraction=1.0,
                                                              copy_fraction=1.0),),
        links=(LinkFit(num_ranks=2, bandwidth_bytes_per_s=1e9, latency_s=1e-4, rms_relative_error=0.0),),
        cpu=rates, measurements={})


def test_estimate_prices_local_clusters_from_the_profile(tmp_path: Path) -> None:
    plan, profile = _local_plan(Fix(pp=2, dp=2, microbatch_size=2))
    assumed = estimate(plan, profile)  # no profile in the (empty) cache: the quick built-in measurement
    breakdown = assumed.breakdown_dict()
    assert set(breakdown) == set(BREAKDOWN_KEYS)
    assert sum(breakdown.values()) == pytest.approx(assumed.step_time_s, rel=1e-9)
    assert breakdown["dp_comm"] > 0 and breakdown["pp_comm"] > 0 and breakdown["tp_comm"] == 0
    fast = _local_profile(_rates())
    given = estimate(plan, profile, options=CostOptions(local_profile=fast))
    assert assumed.options.local_rates.startswith("quick built-in measurement") and given != assumed
    save_profile(fast)  # the default path, in this test's cache folder
    assert estimate(plan, profile) == given
    assert len(stage_costs(plan, profile)) == 2
    gpu_plan = megatron_plan("megatron-39b", num_gpus=64, tp=4, pp=4, global_batch_size=64)
    gpu_profile = megatron_profile("megatron-39b")
    assert estimate(gpu_plan, gpu_profile, options=CostOptions(local_profile=fast)) == estimate(gpu_plan,
                                                                                                 gpu_profile)


def test_more_processes_than_cores_share_them() -> None:
    rates = _rates(shares=((1, 1.0, 1.0), (2, 1.0, 1.0)))  # beyond 2 processes: 2 cores shared
    options = CostOptions(local_profile=_local_profile(rates))
    plan2, profile = _local_plan(Fix(dp=2, microbatch_size=8), world=2)
    plan4, _ = _local_plan(Fix(dp=4, microbatch_size=4), world=4)
    two, four = estimate(plan2, profile, options=options), estimate(plan4, profile, options=options)
    assert four.breakdown_dict()["compute"] == pytest.approx(two.breakdown_dict()["compute"], rel=0.05)
    pipe, _ = _local_plan(Fix(pp=4, num_microbatches=4, schedule="1f1b"), world=4)
    alone = dataclasses.replace(rates, shares=((1, 1.0, 1.0), (4, 1.0, 1.0)))  # as if there were 4 cores
    shared = estimate(pipe, profile, options=options).step_time_s
    four_cores = CostOptions(local_profile=_local_profile(alone))
    assert shared > estimate(pipe, profile, options=four_cores).step_time_s


def test_cpu_rates_fit_known_per_parameter_and_per_step_costs() -> None:
    def tensors(numel: int, count: int) -> dict:
        return {"tensor_numel": numel, "num_tensors": count, "time_s": count * (numel * 3e-9 + 20e-6)}

    ops = [{"op": op, "elements": n, "forward_s": n * NS, "train_s": 3 * n * NS}
           for op in CpuRates.placeholders(1).elementwise for n in (1e4, 1e6)]
    single = {
        "linear": [{"m": m, "k": k, "n": n, "time_s": 6e-11 * m * k * n * (1 + 8 * (1 / m + 1 / k + 1 / n))}
                   for m, k, n in ((256, 256, 1024), (1024, 512, 512), (4096, 128, 512))],
        "attention": [{"seq": 128, "head_dim": 32, "forward_flops_per_s": 5e10, "train_flops_per_s": 4e10}],
        "math_attention": [{"scores": 1e6, "forward_s": 2e-3, "train_s": 6e-3}], "ops": ops,
        "copy": {"bytes": 1e9, "time_s": 0.1}, "training_op_overhead_s": 5e-6, "transformer_layer": [],
        "optimizer": {"large_tensors": tensors(2**18, 32), "small_tensors": tensors(4096, 256)}}
    group = {"shares": [{"num_processes": 1, "layers_per_cpu_s": [4.0], "copy_bytes_per_s": [8.0]}],
             "dtensor": {"dispatch_s": 3e-5, "optimizer_s_per_tensor": 1e-4, "optimizer_s_per_param": 1.5e-9},
             "collectives": [],
             "runtime": {"step_s_by_microbatches": {"2": 0.005 + 2 * 0.001, "6": 0.005 + 6 * 0.001}}}
    rates = cpu_rates(single, group, num_cores=2, source="test")
    # AdamW through DTensor pays per tensor and per element beyond the plain loop
    extra = rates.optimizer_s(1e6, 10, dtensor=True) - rates.optimizer_s(1e6, 10, dtensor=False)
    assert extra == pytest.approx(10 * 1e-4 + 1e6 * 1.5e-9)
    assert rates.linear_peak_flops_per_s == pytest.approx(100e9)
    assert rates.linear_tile_dim == pytest.approx(8.0)
    assert rates.optimizer_s_per_param == pytest.approx(3e-9)
    assert rates.optimizer_s_per_tensor == pytest.approx(2e-5)
    assert rates.runtime_step_s == pytest.approx(0.005) and rates.runtime_microbatch_s == pytest.approx(0.001)
    assert rates.elementwise_s("gelu", 1e5) == pytest.approx((1e5 * NS, 2e5 * NS))
    assert rates.math_attention_s(1e6) == pytest.approx((2e-3, 4e-3))


@pytest.mark.parametrize("shape", [dict(hidden_size=128, num_heads=4, seq_len=64),
                                   dict(hidden_size=96, num_heads=3, seq_len=32)])
def test_saved_layer_bytes_are_what_the_block_saves(shape) -> None:
    """The CPU memory model's per-layer count equals the tensors a zoo GPT block saves for backward
    (``saved_tensors_hooks``, parameters left out, each storage once) within 1 %."""
    import torch

    from autopar.capture import capture
    from autopar.cost_models.local.memory import saved_layer_bytes

    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=2, vocab_size=256, **shape)
    batch = 3
    inputs, _ = autopar.models.example_batch(model, batch, seed=1)
    profile = ModelProfile.from_captured(capture(model, (inputs,)), batch_size=batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(batch, shape["seq_len"], shape["hidden_size"], requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.blocks[0](x)
    predicted = saved_layer_bytes(profile.layers[0], microbatch_size=batch, tp=1,
                                  fused_attention=profile.fused_attention, bytes_per_element=4)
    assert predicted == pytest.approx(sum(saved.values()), rel=0.01)


def test_sequence_parallel_layer_collectives_as_counted() -> None:
    """tp2 + SP: two reduce-scatters (gloo runs each as an all-reduce of the whole buffer) and two
    all-gathers of b·s·h plus the QKV output's all-gather forward; backward two reduce-scatters, four
    all-gathers and the four LayerNorm parameters' partial gradients (h elements each)."""
    rates = _rates()
    layer = ModelProfile.gpt(autopar.models.get_config("gpt", num_layers=2, hidden_size=256, num_heads=8,
                                                       vocab_size=512, seq_len=128)).layers[0]
    b, h, s = 2, 256, 128
    sbh = b * s * h * 4

    def one(size: float) -> float:
        return 1e-4 + size / 1e9

    sp = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=2, bytes_per_element=4,
                                sequence_parallel=True)
    assert sp.tp.forward_s == pytest.approx(4 * one(sbh) + one(3 * sbh))
    assert sp.tp.backward_s == pytest.approx(6 * one(sbh) + 4 * one(h * 4))
    plain = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=2, bytes_per_element=4)
    norms = 2 * NS * (2 * b * s * h + 2 * b * s * h) / 2  # LayerNorms and residual adds on half the tokens
    assert plain.times.forward_s + plain.times.backward_s - (sp.times.forward_s + sp.times.backward_s) \
        == pytest.approx(norms)


def test_ring_attention_blocks_and_transfers() -> None:
    """cp2, causal: the own step over s/cp tokens and half a block from the other rank (1.5 blocks of
    (s/cp)² scores at the math-attention rate, their forward again in the backward, which recomputes
    the scores), merged (3 elementwise passes); the K/V block
    (2·b·(s/cp)·h) sent once forward, again backward with the fp32 dK/dV at each of the 2 steps."""
    from autopar.cost_models.context_parallel import sequence_shard_layer

    rates = _rates()
    full = ModelProfile.gpt(autopar.models.get_config("gpt", num_layers=2, hidden_size=256, num_heads=8,
                                                      vocab_size=512, seq_len=128)).layers[0]
    layer, b, h, local = sequence_shard_layer(full, 2), 2, 256, 64
    part = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=1, bytes_per_element=4, cp=2)
    flat = transformer_layer_part(dataclasses.replace(layer, seq_len=local), rates=rates, microbatch_size=b,
                                  tp=1, bytes_per_element=4, fused_attention=False)
    scores = b * 8 * local * local
    ring = 1.5 * scores * (2 * NS + 4 * NS + 2 * NS) + 3 * b * local * h * NS
    assert part.times.forward_s + part.times.backward_s - (flat.times.forward_s + flat.times.backward_s) \
        == pytest.approx(ring - scores * 6 * NS)
    kv = 1e-4 + 2 * b * local * h * 4 / 1e9
    assert part.cp.forward_s == pytest.approx(kv) and part.cp.backward_s == pytest.approx(kv + 2 * kv)
    full_part = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=1, bytes_per_element=4, cp=2,
                                       recompute="full")
    assert full_part.cp.recompute_s == pytest.approx(kv)


@pytest.mark.parametrize("fix, parameters, gradients, activations", [
    # MEASURED with report() on 2 gloo ranks (zoo GPT 4 × 128, 4 heads, V 1024, s 64, batch 8, fp32)
    (Fix(tp=2), 1_888_256, 2_415_616, 19_440_200),
    (Fix(tp=2, sequence_parallel=True), 1_888_256, 2_415_616, 18_242_120),
    (Fix(cp=2), 3_730_432, 3_730_432, 11_311_368),
    (Fix(dp=2, zero=1), 1_865_216, 1_865_216, 10_787_400),
    (Fix(dp=2, zero=3), 1_865_216, 1_865_216, None),
])
def test_local_memory_matches_the_measured_twin(fix, parameters, gradients, activations) -> None:
    from autopar.cost_models.memory import plan_memory

    config = autopar.models.get_config("gpt", num_layers=4, hidden_size=128, num_heads=4, vocab_size=1024,
                                       seq_len=64)
    profile = ModelProfile.gpt(config, dtype="fp32")
    plan = plan_from_fix("gpt", graph_fingerprint="x", num_layers=4, cluster=ClusterSpec.parse("local:2"),
                         fix=fix, global_batch_size=8, seq_len=64, shardings=_megatron_shardings(fix))
    memory = plan_memory(plan, profile)[0]
    assert memory.weights_bytes == pytest.approx(parameters, rel=0.01)
    assert memory.gradients_bytes == pytest.approx(gradients, rel=0.01)
    assert memory.optimizer_bytes == pytest.approx(2 * parameters, rel=0.01)
    if activations is not None:
        assert memory.activations_bytes + memory.logits_bytes == pytest.approx(activations, rel=0.05)


def _megatron_shardings(fix: Fix) -> tuple:
    from autopar.plans import Sharding

    if not fix.tp:
        return ()
    layers = [Sharding(node=f"blocks_{i}_{name}", strategy=strategy) for i in range(4)
              for name, strategy in (("attn_qkv", "colwise"), ("attn_proj", "rowwise"), ("mlp_fc", "colwise"),
                                     ("mlp_proj", "rowwise"))]
    return (Sharding(node="wte", strategy="vocab"), *layers, Sharding(node="lm_head", strategy="colwise"))
