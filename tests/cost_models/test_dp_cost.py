"""Data-parallel traffic per layer at every ZeRO stage (``cost_models.fsdp.dp_step_times``, priced by
``estimate``): the same machinery as ZeRO-3, so a stage that moves more never exposes less,
``dp_overlap = 0`` (Megatron-LM 2021) keeps the whole-model rule, and under autopar's pipelining
runtime the reductions follow the last backward (``perform_reduce_grad``)."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.cluster import ClusterSpec
from autopar.cost_models import CostOptions, estimate
from autopar.cost_models.comm import Group, all_gather_time_s, all_reduce_time_s, reduce_scatter_time_s
from autopar.cost_models.fsdp import Traffic, Unit, dp_step_times, step_traffic
from autopar.cost_models.megatron import MEGATRON_2021, megatron_plan, megatron_profile

CLUSTER = ClusterSpec.parse("4x8xA100-80GB")
GROUP = Group(size=32, num_nodes=4)
LAYER_BYTES = 100e6


def _units(compute_s: float, layers: int = 6) -> tuple[Unit, list[Unit]]:
    return Unit(param_bytes=LAYER_BYTES), [Unit(param_bytes=LAYER_BYTES, forward_s=compute_s,
                                                backward_s=2 * compute_s)] * layers


def _exposed(zero: int, compute_s: float, **kw: object) -> float:
    root, layers = _units(compute_s)
    return dp_step_times(root, layers, zero=zero, group=GROUP, cluster=CLUSTER, **kw).exposed_s


def test_large_compute_hides_all_but_the_last_reductions_and_the_first_gathers() -> None:
    all_reduce = all_reduce_time_s(LAYER_BYTES, group=GROUP, cluster=CLUSTER)
    scatter = reduce_scatter_time_s(LAYER_BYTES, group=GROUP, cluster=CLUSTER)
    gather = all_gather_time_s(LAYER_BYTES, group=GROUP, cluster=CLUSTER)
    # the first layer's and the root's reductions follow the last backward; ZeRO ≥ 1 first gathers the
    # root and the first layer
    assert _exposed(0, 1.0, num_microbatches=1) == pytest.approx(2 * all_reduce)
    assert _exposed(2, 1.0, num_microbatches=1) == pytest.approx(2 * gather + 2 * scatter)


@pytest.mark.parametrize("compute_s", [1e-6, 1e-3, 5e-3, 2e-2, 1.0])
@pytest.mark.parametrize(("microbatches", "pipelined"), [(1, True), (4, True), (4, False)])
def test_more_traffic_never_exposes_less(compute_s: float, microbatches: int, pipelined: bool) -> None:
    exposed = {zero: _exposed(zero, compute_s, num_microbatches=microbatches, pipelined=pipelined)
               for zero in range(4)}
    assert exposed[1] == exposed[2]  # the same collectives (ZeRO-2 only frees gradient memory)
    assert exposed[3] >= exposed[2] * (1 - 1e-12)


def test_pipelining_reduces_once_and_zero2_gathers_once() -> None:
    traffic = dict((t, n) for t, n in step_traffic(zero=2, num_microbatches=4, pipelined=True))
    assert traffic == {Traffic(gather_forward=True): 1, Traffic(): 2,
                       Traffic(reduce=True, reduce_after_backward=True): 1}
    zero3 = step_traffic(zero=3, num_microbatches=4, pipelined=True)
    assert sum(n for t, n in zero3 if t.gather_forward and t.gather_backward) == 4
    assert sum(n for t, n in zero3 if t.reduce) == 1
    assert step_traffic(zero=0, num_microbatches=4, pipelined=False) == [(Traffic(reduce=True), 4)]


PLANS = [  # (model, GPUs, tp, pp, global batch, microbatch size, device)
    ("gpt2", 8, 1, 1, 64, 8, "A100-80GB"),
    ("gpt2", 8, 1, 1, 64, 1, "A100-80GB"),
    ("gpt2-medium", 16, 1, 1, 256, 16, "H100"),
    ("gpt3-6.7b", 64, 2, 1, 256, 1, "H100"),
    ("gpt3-13b", 32, 1, 2, 512, 2, "A100-80GB"),
]


@pytest.mark.parametrize(("name", "gpus", "tp", "pp", "batch", "micro", "device"), PLANS)
def test_zero3_never_exposes_less_than_zero2_on_the_same_plan(name, gpus, tp, pp, batch, micro, device):
    plan = megatron_plan(name, num_gpus=gpus, tp=tp, pp=pp, global_batch_size=batch, microbatch_size=micro,
                         schedule="1f1b", recompute="none", device=device)
    profile = megatron_profile(name, fused_attention=True)

    def dp_s(zero: int, options: CostOptions) -> float:
        predicted = estimate(dataclasses.replace(plan, zero=zero), profile, options=options)
        return dict(predicted.breakdown)["dp_comm"]

    for options in (CostOptions(), CostOptions(dp_overlap=0.5), MEGATRON_2021):
        dp = [dp_s(zero, options) for zero in range(4)]
        assert dp[1] == dp[2] and dp[3] >= dp[2] > 0, (options.dp_overlap, dp)
    # the runtime's pipelining reduces after the last backward: the reductions hide behind nothing
    # (ZeRO-0: the per-layer all-reduces cost at least the whole-model one), ZeRO ≥ 1's forward
    # gathers hide behind the layers before them
    assert dp_s(0, CostOptions()) >= dp_s(0, MEGATRON_2021) * (1 - 1e-12)
    assert dp_s(2, CostOptions()) < dp_s(2, MEGATRON_2021)


def test_half_overlap_is_between_none_and_all() -> None:
    plan = megatron_plan("gpt2", num_gpus=8, tp=1, pp=1, global_batch_size=64, microbatch_size=8,
                         schedule="1f1b", recompute="none")
    profile = megatron_profile("gpt2", fused_attention=True)
    dp = [dict(estimate(plan, profile, options=CostOptions(dp_overlap=f)).breakdown)["dp_comm"]
          for f in (0.0, 0.5, 1.0)]
    assert dp[1] == pytest.approx((dp[0] + dp[2]) / 2)


def test_pipelined_reductions_follow_the_last_backward() -> None:
    """A training loop without pipelining hides each layer's all-reduce behind the backward of the
    layers before it; torch's pipelining (autopar's runtime, pp 1 included) reduces after the last
    backward, so every reduction is exposed."""
    all_reduce = all_reduce_time_s(LAYER_BYTES, group=GROUP, cluster=CLUSTER)
    per_layer = _exposed(0, 1.0, num_microbatches=1, pipelined=False)
    after = _exposed(0, 1.0, num_microbatches=1, pipelined=True)
    assert per_layer == pytest.approx(2 * all_reduce)  # the first layer's and the root's
    assert after == pytest.approx(7 * all_reduce)  # six layers and the root, none hidden
