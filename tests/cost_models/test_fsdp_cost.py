"""Known answers of the FSDP model (``cost_models.fsdp``) and the published rows within the tolerance
that ``benchmarks/cost_model_fsdp.py`` reports."""

from __future__ import annotations

import pytest

from autopar.cluster import ClusterSpec
from autopar.cost_models.comm import Group, all_gather_time_s, reduce_scatter_time_s
from autopar.cost_models.fsdp import Traffic, Unit, dp_step_times, in_flight_bytes, microbatch_time_s
from benchmarks.cost_model_fsdp import TOLERANCE
from benchmarks.published.fsdp import ROWS, validate

CLUSTER = ClusterSpec.parse("16x8xH100")
GROUP = Group(size=128, num_nodes=16)
LAYER_BYTES = 436e6  # one Llama-3-8B layer in bf16


def _step(compute_s: float, *, layers: int = 8, group: Group = GROUP, microbatches: int = 1, zero: int = 3,
          **kw: object):
    units = [Unit(param_bytes=LAYER_BYTES, forward_s=compute_s, backward_s=2 * compute_s)] * layers
    root = Unit(param_bytes=LAYER_BYTES)
    return dp_step_times(root, units, zero=zero, group=group, cluster=CLUSTER, num_microbatches=microbatches,
                         **kw)


def test_large_compute_hides_all_but_the_first_gathers_and_last_reduce_scatters() -> None:
    gather = all_gather_time_s(LAYER_BYTES, group=GROUP, cluster=CLUSTER)
    scatter = reduce_scatter_time_s(LAYER_BYTES, group=GROUP, cluster=CLUSTER)
    times = _step(1.0)
    # root gather, first layer gather, the last layer's re-gather at backward start; its and the root's
    # reduce-scatter after the last backward
    assert times.exposed_s == pytest.approx(3 * gather + 2 * scatter)
    assert times.gather_s == pytest.approx(17 * gather) and times.reduce_s == pytest.approx(9 * scatter)


def test_a_tiny_per_gpu_batch_exposes_almost_all_the_traffic() -> None:
    times = _step(1e-6)
    assert times.exposed_s > 0.99 * (times.gather_s + times.reduce_s)
    big, small = _step(0.01), _step(0.001)
    assert big.exposed_s / big.total_s < small.exposed_s / small.total_s


def test_the_latency_term_grows_with_the_group() -> None:
    tiny = 1e3  # bytes: latency-bound
    sizes = [Group(size=n * 8, num_nodes=n) for n in (2, 16, 64)]
    times = [all_gather_time_s(tiny, group=g, cluster=CLUSTER) for g in sizes]
    assert times[0] < times[1] < times[2]
    assert times[2] - times[1] == pytest.approx(48 * CLUSTER.inter_node.latency_s, rel=1e-3)


def test_gradient_accumulation_gathers_every_microbatch_and_defers_reduction_under_pipelining() -> None:
    one, four = _step(1e-6), _step(1e-6, microbatches=4)
    assert four.gather_s == pytest.approx(4 * one.gather_s)
    assert four.reduce_s == pytest.approx(4 * one.reduce_s)
    deferred = _step(1e-6, microbatches=4, pipelined=True)
    assert deferred.reduce_s == pytest.approx(one.reduce_s) and deferred.total_s < four.total_s
    assert deferred.gather_s == pytest.approx(four.gather_s)  # ZeRO-3 regathers every microbatch


def test_deeper_prefetch_never_hurts_and_one_rank_has_nothing_to_hide() -> None:
    units = [Unit(param_bytes=LAYER_BYTES, forward_s=1e-3, backward_s=2e-3)] * 4
    timing = dict(gather_s=[2e-3] * 4, reduce_s=[1e-3] * 4, root_gather_s=0.0, root_reduce_s=0.0,
                  traffic=Traffic(gather_forward=True, gather_backward=True, reduce=True))
    depth1 = microbatch_time_s(Unit(param_bytes=0.0), units, **timing)
    depth2 = microbatch_time_s(Unit(param_bytes=0.0), units, prefetch_depth=2, **timing)
    assert depth2.total_s <= depth1.total_s
    assert _step(1e-3, group=Group(size=1)).exposed_s == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="prefetch_depth"):
        microbatch_time_s(Unit(param_bytes=0.0), units, prefetch_depth=0, **timing)


def test_in_flight_memory_is_the_root_two_units_and_one_gradient() -> None:
    weights, grads = in_flight_bytes(100.0, [10.0, 30.0, 20.0, 5.0])
    assert weights == 100.0 + 50.0  # the largest two consecutive units (30 + 20)
    assert grads == 100.0 + 30.0
    assert in_flight_bytes(0.0, [10.0, 30.0, 20.0], prefetch_depth=2)[0] == 60.0


def test_published_rows_within_the_reported_tolerance() -> None:
    results = validate(ROWS)
    assert len(results) == len(ROWS) >= 8
    for result in results:
        assert abs(result.error) <= TOLERANCE, (result.row.model, result.row.num_gpus, result.error)
        assert 0 < result.breakdown["dp_comm"] < 0.1 * result.step_time_s  # FSDP hidden at these batches
