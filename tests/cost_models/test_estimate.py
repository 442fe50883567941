"""Estimate API: breakdown sums to the step, derived metrics, options, Plans from capture."""

from __future__ import annotations

import dataclasses

import pytest

import autopar
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import (
    CostOptions,
    ModelProfile,
    estimate,
    estimate_plan,
    megatron_plan,
    simulate_plan,
    stage_costs,
)
from autopar.cost_models.megatron import megatron_profile
from autopar.plans import BREAKDOWN_KEYS, Plan
from autopar.plans.pinned import plan_from_fix


def _plans() -> list[tuple[Plan, ModelProfile]]:
    profile = megatron_profile("megatron-39b")
    plans = [megatron_plan("megatron-39b", num_gpus=512, tp=8, pp=2, global_batch_size=1536)]
    variants = (("gpipe", "none", 1), ("1f1b", "selective", 2), ("zero_bubble", "full", 3))
    for schedule, recompute, zero in variants:
        plans.append(megatron_plan("megatron-39b", num_gpus=64, tp=4, pp=4, global_batch_size=64,
                                   schedule=schedule, recompute=recompute))
        plans[-1] = dataclasses.replace(plans[-1], zero=zero)
    return [(plan, profile) for plan in plans]


@pytest.mark.parametrize("index", range(4))
def test_breakdown_sums_to_the_step_time(index: int) -> None:
    plan, profile = _plans()[index]
    predicted = estimate(plan, profile)
    breakdown = predicted.breakdown_dict()
    assert set(breakdown) == set(BREAKDOWN_KEYS)
    assert sum(breakdown.values()) == pytest.approx(predicted.step_time_s, rel=1e-12)
    assert breakdown["tp_comm"] > 0 and breakdown["pp_comm"] > 0 and breakdown["bubble"] > 0
    assert predicted.tokens_per_s == pytest.approx(plan.global_batch_size * 2048 / predicted.step_time_s)
    assert len(predicted.peak_memory_bytes) == plan.world_size
    assert (breakdown["recompute"] > 0) == (plan.stages[0].recompute != "none")


def test_tflops_and_mfu() -> None:
    plan, profile = _plans()[0]
    predicted = estimate(plan, profile)
    c = profile.layers[0]
    n, h, s, v = profile.num_layers, c.hidden_size, c.seq_len, profile.vocab_size
    batch = plan.global_batch_size
    hardware = 96 * batch * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))
    model = 72 * batch * s * n * h * h * (1 + s / (6 * h) + v / (12 * n * h))
    step = predicted.step_time_s
    assert predicted.tflops_per_device == pytest.approx(hardware / (512 * step) / 1e12)
    assert predicted.mfu == pytest.approx(model / (512 * 312e12 * step))


def test_options_move_the_right_terms() -> None:
    plan, profile = _plans()[0]
    base = estimate(plan, profile, options=CostOptions(dp_overlap=0.0)).breakdown_dict()
    overlapped = estimate(plan, profile, options=CostOptions(tp_overlap=1.0, dp_overlap=1.0)).breakdown_dict()
    assert overlapped["tp_comm"] < base["tp_comm"]
    # ZeRO-1: the per-layer forward gathers hide behind compute (the reductions follow the last
    # backward under the runtime's pipelining either way)
    zero1 = dataclasses.replace(plan, zero=1)
    assert (estimate(zero1, profile, options=CostOptions(dp_overlap=1.0)).breakdown_dict()["dp_comm"]
            < estimate(zero1, profile, options=CostOptions(dp_overlap=0.0)).breakdown_dict()["dp_comm"])
    assert overlapped["compute"] == base["compute"]
    plain = estimate(plan, profile, options=CostOptions(p2p_scatter_gather=False)).breakdown_dict()
    assert plain["pp_comm"] > base["pp_comm"]
    with pytest.raises(ValueError, match="tp_overlap"):
        CostOptions(tp_overlap=2.0)


def test_more_microbatches_shrink_the_bubble() -> None:
    profile = megatron_profile("megatron-39b")
    few = megatron_plan("megatron-39b", num_gpus=64, tp=8, pp=8, global_batch_size=8, schedule="1f1b")
    many = megatron_plan("megatron-39b", num_gpus=64, tp=8, pp=8, global_batch_size=64, schedule="1f1b")
    fraction = [estimate(p, profile).breakdown_dict()["bubble"] / estimate(p, profile).step_time_s
                for p in (few, many)]
    assert fraction[0] > 3 * fraction[1]


def test_simulated_timeline_matches_the_pipeline_part() -> None:
    plan, profile = _plans()[1]
    predicted = estimate(plan, profile)
    pipeline = predicted.step_time_s - sum(predicted.breakdown_dict()[k] for k in ("dp_comm", "optimizer"))
    timeline = simulate_plan(plan, profile)
    assert timeline.num_ranks == plan.parallelism.pp
    assert timeline.total_s == pytest.approx(pipeline, rel=0.05)


def test_estimate_plan_fills_predicted_and_round_trips() -> None:
    plan, profile = _plans()[0]
    estimated = estimate_plan(plan, profile)
    assert estimated.predicted == estimate(plan, profile)
    assert Plan.from_json(estimated.to_json()) == estimated


def test_captured_model_on_local_processes() -> None:
    model = autopar.models.build("gpt-tiny", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=2)
    profile = ModelProfile.from_captured(autopar.capture(model, inputs), batch_size=2)
    plan = plan_from_fix("gpt-tiny", graph_fingerprint="x", num_layers=2,
                         cluster=ClusterSpec.parse("local:4"), fix=Fix(pp=2, dp=2, microbatch_size=1),
                         global_batch_size=8, seq_len=32)
    predicted = estimate(plan, profile)
    assert predicted.step_time_s > 0 and predicted.breakdown_dict()["tp_comm"] == 0
    assert len(stage_costs(plan, profile)) == 2


def test_mismatched_profile_is_refused() -> None:
    plan, _ = _plans()[0]
    with pytest.raises(ValueError, match="profile has"):
        estimate(plan, megatron_profile("megatron-76b"))
    longer = ModelProfile.gpt(autopar.models.get_config("megatron-39b", seq_len=4096))
    with pytest.raises(ValueError, match="seq_len"):
        estimate(plan, longer)
