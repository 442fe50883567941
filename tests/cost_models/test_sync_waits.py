"""Collectives as a training step meets them: the measured ``sync_waits`` of ``CpuRates``, the
meetings the CPU layer model counts, and the waits the local step model adds per meeting."""

from __future__ import annotations

import dataclasses
import math

import pytest

import autopar
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import ModelProfile
from autopar.cost_models.local.compute import DTENSOR_SP, DTENSOR_TP, transformer_layer_part
from autopar.cost_models.local.measure import measure_sync_waits_in_processes
from autopar.cost_models.local.rates import CpuRates, OpTable, sync_wait_points
from autopar.cost_models.local.step import cpu_stage_costs
from autopar.cost_models.stages import CommTimes
from autopar.plans.pinned import plan_from_fix

NS = 1e-9


def _rates(**changes: object) -> CpuRates:
    """Gloo as ``1e-4 + size / 1e9`` s for every kind and group; no core sharing."""
    table = OpTable(points=((1e3, NS, 2 * NS), (1e6, NS, 2 * NS)))
    collectives = tuple((kind, n, size, 1e-4 + size / 1e9)
                        for kind in ("all_reduce", "all_gather", "reduce_scatter", "p2p")
                        for n in (2, 4) for size in (1e3, 1e6))
    base = dataclasses.replace(
        CpuRates.placeholders(2), linear_peak_flops_per_s=100e9, linear_tile_dim=0.0,
        elementwise=dict.fromkeys(CpuRates.placeholders(2).elementwise, table), op_overhead_s=0.0,
        collectives=collectives, shares=((1, 1.0, 1.0), (2, 1.0, 1.0), (4, 0.5, 0.5)))
    return dataclasses.replace(base, **changes)


def _table(size: float) -> float:
    return 1e-4 + size / 1e9


def test_the_wait_is_the_measured_time_in_a_loop_beyond_the_priced_collective() -> None:
    points = ((2, 2, 0.01, 1e3, 2e-3), (2, 2, 0.01, 1e6, 5e-3), (2, 2, 0.1, 1e3, 4e-3),
              (2, 2, 0.1, 1e6, 1e-3))
    rates = _rates(sync_waits=points)
    assert rates.sync_wait_s(processes=2, group=2, interval_s=0.01, size_bytes=1e3) == pytest.approx(
        2e-3 - _table(1e3))
    # halfway in log size, then halfway in log interval
    small = (2e-3 - _table(1e3) + 5e-3 - _table(1e6)) / 2
    large = (4e-3 - _table(1e3) + 1e-3 - _table(1e6)) / 2  # a negative point: clamped only at the end
    middle = rates.sync_wait_s(processes=2, group=2, interval_s=math.sqrt(0.01 * 0.1),
                               size_bytes=math.sqrt(1e9))
    assert middle == pytest.approx((small + large) / 2)
    # clamped at the measured ends, never negative, nothing for one rank or without measurements
    assert rates.sync_wait_s(processes=2, group=2, interval_s=10.0, size_bytes=1e3) == pytest.approx(
        4e-3 - _table(1e3))
    assert rates.sync_wait_s(processes=2, group=2, interval_s=10.0, size_bytes=1e9) == 0.0
    assert rates.sync_wait_s(processes=2, group=1, interval_s=0.01, size_bytes=1e3) == 0.0
    assert _rates().sync_wait_s(processes=2, group=2, interval_s=0.01, size_bytes=1e3) == 0.0


def test_the_wait_subtracts_the_collective_as_the_step_model_stretches_it() -> None:
    """Measured with 4 processes busy on 2 cores, a 2-rank all-reduce that the profile measured
    with only its 2 ranks busy is priced at share(2) / share(4) = 2 times its table time."""
    rates = _rates(sync_waits=((4, 2, 0.01, 1e3, 5e-3), (2, 2, 0.01, 1e3, 1e-3)))
    assert rates.sync_wait_s(processes=4, group=2, interval_s=0.01, size_bytes=1e3) == pytest.approx(
        5e-3 - 2 * _table(1e3))
    assert rates.sync_wait_s(processes=2, group=2, interval_s=0.01, size_bytes=1e3) == pytest.approx(
        1e-3 - _table(1e3))
    assert rates.sync_wait_s(processes=3, group=2, interval_s=0.01, size_bytes=1e3) == pytest.approx(
        rates.sync_wait_s(processes=4, group=2, interval_s=0.01, size_bytes=1e3))  # the nearer, the larger


def test_a_profile_saved_before_the_measurement_loads_without_waits() -> None:
    rates = _rates(sync_waits=((2, 2, 0.01, 1e3, 2e-3),))
    assert CpuRates.from_dict(rates.to_dict()) == rates
    old = {k: v for k, v in rates.to_dict().items() if k != "sync_waits"}
    assert CpuRates.from_dict(old).sync_waits == ()
    raw = [{"num_processes": 4, "group_size": 2, "interval_s": 0.03, "size_bytes": 4096, "in_step_s": 0.007,
            "collective_s": 0.002}]
    assert sync_wait_points(raw) == ((4, 2, 0.03, 4096.0, 0.007),)


def test_a_ring_hop_is_priced_from_the_pair_exchanges_where_measured() -> None:
    """``exchange=True`` (a cp Sync): the exchange's measured time in the loop beyond the p2p
    message's table time; a profile without exchange points prices the all-reduce's waits."""
    reduce, pair = ((2, 2, 0.01, 1e3, 2e-3),), ((2, 2, 0.01, 1e3, 6e-3),)
    both = _rates(sync_waits=reduce, exchange_waits=pair)
    assert both.sync_wait_s(processes=2, group=2, interval_s=0.01, size_bytes=1e3,
                            exchange=True) == pytest.approx(6e-3 - _table(1e3))
    assert both.sync_wait_s(processes=2, group=2, interval_s=0.01, size_bytes=1e3) == pytest.approx(
        2e-3 - _table(1e3))
    older = _rates(sync_waits=reduce)
    assert older.sync_wait_s(processes=2, group=2, interval_s=0.01, size_bytes=1e3,
                             exchange=True) == pytest.approx(2e-3 - _table(1e3))
    assert CpuRates.from_dict(both.to_dict()) == both
    assert CpuRates.from_dict({k: v for k, v in both.to_dict().items() if k != "exchange_waits"}
                              ).exchange_waits == ()
    raw = [{"num_processes": 4, "group_size": 2, "interval_s": 0.03, "size_bytes": 4096, "in_step_s": 0.007,
            "collective_s": 0.002, "kind": kind} for kind in ("all_reduce", "p2p")]
    assert sync_wait_points(raw) == sync_wait_points(raw, kind="p2p") == ((4, 2, 0.03, 4096.0, 0.007),)


def test_the_step_model_prices_ring_hops_from_the_exchanges() -> None:
    """cp 2 on 2 ranks: the cp waits grow by the exchange points' excess over the all-reduce's, once
    per hop (4 per layer: forward K/V, backward K/V and the accumulator twice); dp does not change."""
    reduce = tuple((2, 2, interval, size, 0.1) for interval in (1e-3, 10.0) for size in (1e3, 1e7))
    pair = tuple(point[:4] + (0.2,) for point in reduce)  # 0.1 s more per meeting, at every size
    plan, profile = _local_plan(Fix(cp=2, microbatch_size=2), world=2)
    before = cpu_stage_costs(plan, profile, _rates(sync_waits=reduce))[0]
    after = cpu_stage_costs(plan, profile, _rates(sync_waits=reduce, exchange_waits=pair))[0]
    hops = 4 * len(profile.layers)
    assert after.comm["cp"].total_s - before.comm["cp"].total_s == pytest.approx(hops * 0.1, rel=0.01)
    assert after.comm["dp"].total_s == pytest.approx(before.comm["dp"].total_s)


def _layer() -> object:
    return ModelProfile.gpt(autopar.models.get_config("gpt", num_layers=2, hidden_size=256, num_heads=8,
                                                      vocab_size=512, seq_len=128)).layers[0]


def _counts(part: object, axis: str) -> dict[tuple[str, float], float]:
    return {(s.phase, s.size_bytes): s.count for s in part.syncs if s.axis == axis}


def test_a_tensor_parallel_layer_meets_at_each_collective_it_issues() -> None:
    b, s, h = 2, 128, 256
    sbh = b * s * h * 4
    plain = transformer_layer_part(_layer(), rates=_rates(), microbatch_size=b, tp=2, bytes_per_element=4)
    tp = DTENSOR_TP
    assert _counts(plain, "tp") == {("forward", sbh): tp.all_reduces_forward,
                                    ("forward", 3 * sbh): tp.all_gathers_forward,
                                    ("backward", sbh): tp.all_reduces_backward + tp.all_gathers_backward}
    sp = transformer_layer_part(_layer(), rates=_rates(), microbatch_size=b, tp=2, bytes_per_element=4,
                                sequence_parallel=True, recompute="full")
    counts = _counts(sp, "tp")
    assert counts[("forward", sbh)] == DTENSOR_SP.reduce_scatters_forward + DTENSOR_SP.all_gathers_forward
    assert counts[("backward", sbh)] == DTENSOR_SP.reduce_scatters_backward + DTENSOR_SP.all_gathers_backward
    assert counts[("backward", h * 4)] == 4  # the LayerNorms' partial gradients
    assert counts[("recompute", sbh)] == counts[("forward", sbh)]  # the recomputed forward meets again
    alone = transformer_layer_part(_layer(), rates=_rates(), microbatch_size=b, tp=1, bytes_per_element=4)
    assert alone.syncs == ()
    ring = transformer_layer_part(_layer(), rates=_rates(), microbatch_size=b, tp=1, bytes_per_element=4,
                                  cp=4)
    assert sum(c for (phase, _), c in _counts(ring, "cp").items() if phase == "forward") == 3  # cp - 1 hops


def _local_plan(fix: Fix, world: int) -> tuple[object, ModelProfile]:
    config = autopar.models.get_config("gpt", num_layers=4, hidden_size=128, num_heads=4, vocab_size=512,
                                       seq_len=64)
    cluster = ClusterSpec.parse(f"local:{world}")
    plan = plan_from_fix("gpt", graph_fingerprint="x", num_layers=4, cluster=cluster, fix=fix,
                         global_batch_size=16, seq_len=64)
    return plan, ModelProfile.gpt(config, dtype="fp32")


def test_the_step_model_adds_one_measured_wait_per_meeting() -> None:
    """A tp2 stage: its tensor-parallel time grows by each collective's measured wait, once per
    meeting; a plain data-parallel stage (no meeting inside the pipeline) does not change."""
    waits = tuple((2, 2, interval, size, 1.0) for interval in (1e-3, 10.0) for size in (1e3, 1e7))
    with_waits, without = _rates(sync_waits=waits), _rates()
    plan, profile = _local_plan(Fix(tp=2, microbatch_size=2), world=2)
    before, after = cpu_stage_costs(plan, profile, without)[0], cpu_stage_costs(plan, profile, with_waits)[0]
    added = after.comm["tp"].total_s - before.comm["tp"].total_s
    parts = [transformer_layer_part(layer, rates=without, microbatch_size=2, tp=2, bytes_per_element=4)
             for layer in profile.layers]
    meetings = sum(s.count for part in parts for s in part.syncs) + 2  # the embedding's and the head's
    assert meetings == 4 * 7 + 2
    assert added == pytest.approx(meetings * 1.0, rel=0.01)  # 1 s each, less the collective's priced time
    assert after.comm["tp"].forward_s > before.comm["tp"].forward_s
    assert after.send_forward_s == before.send_forward_s == 0.0
    dp_plan, _ = _local_plan(Fix(dp=2, microbatch_size=2), world=2)
    assert cpu_stage_costs(dp_plan, profile, with_waits)[0].comm.get("tp", CommTimes()) == CommTimes()


def test_ring_exchanges_after_compute_are_measured_on_gloo_processes() -> None:
    points = measure_sync_waits_in_processes([2], seconds=1.0, repeats=(1,), kind="p2p")
    assert {(p["num_processes"], p["group_size"], p["kind"]) for p in points} == {(2, 2, "p2p")}
    assert all(p["in_step_s"] > 0 and p["collective_s"] > 0 for p in points)
    assert {p["size_bytes"] for p in points} == {4096, 4 * 2**20}


def test_collectives_after_compute_are_measured_on_gloo_processes() -> None:
    points = measure_sync_waits_in_processes([2], seconds=1.0, repeats=(1, 2))
    assert {(p["num_processes"], p["group_size"]) for p in points} == {(2, 2)}
    assert all(p["in_step_s"] > 0 and p["collective_s"] > 0 and p["interval_s"] > 0 for p in points)
    intervals = sorted({p["interval_s"] for p in points})
    assert len(intervals) in (1, 2) and {p["size_bytes"] for p in points} == {4096, 4 * 2**20}
