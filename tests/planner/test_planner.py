"""The planner's search: known answers, exactness against brute force, pins, infeasibility."""

import dataclasses
import itertools

import pytest

import autopar
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import ModelProfile, pipeline_time, stage_costs
from autopar.cost_models.memory import peak_memory_bytes
from autopar.lower import profile_of
from autopar.models import get_config
from autopar.planner import InfeasiblePlanError, PlanContext, search
from autopar.planner.build_plan import build_plan
from autopar.planner.inter_op import solve_split
from autopar.planner.probes import Prober
from autopar.planner.space import Config


def _context(profile: ModelProfile, cluster: ClusterSpec, batch: int) -> PlanContext:
    return PlanContext(model=profile.name, graph_fingerprint="analytic", cluster=cluster,
                       global_batch_size=batch, seq_len=profile.seq_len, num_layers=profile.num_layers)


def _profile(fused_attention: bool = True, **overrides) -> ModelProfile:
    return ModelProfile.gpt(get_config("gpt", **overrides), name="gpt-test", fused_attention=fused_attention)


def _tight(memory_gib: float) -> tuple[ModelProfile, PlanContext]:
    """7 layers of h 4096 unfused attention on 3 GPUs of ``memory_gib``: at 32 GiB and below some
    stage needs recomputation (the memory model's numbers, checked by hand)."""
    profile = _profile(fused_attention=False, num_layers=7, hidden_size=4096, num_heads=32, seq_len=2048,
                       vocab_size=32000)
    base = ClusterSpec.parse("1x3xA100-80GB")
    device = dataclasses.replace(base.device, memory_bytes=int(memory_gib * 2**30))
    cluster = dataclasses.replace(base, device=device)
    return profile, _context(profile, cluster, 48)


def _plan(name: str, cluster: str, batch: int, **kwargs) -> autopar.Plan:
    model = autopar.models.build(name, device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    return autopar.plan(model, inputs, cluster=cluster, global_batch_size=batch, **kwargs)


def test_pure_data_parallelism_when_the_model_fits():
    plan = _plan("gpt2", "1x8xA100-80GB", 64)
    assert (plan.parallelism.dp, plan.parallelism.tp, plan.parallelism.pp) == (8, 1, 1)
    assert plan.alternatives and all(a.predicted_step_time_s is None or
                                     a.predicted_step_time_s >= plan.predicted.step_time_s
                                     for a in plan.alternatives)
    assert "+" in plan.alternatives[0].reason and "%" in plan.alternatives[0].reason


def test_balanced_split_of_a_uniform_stack():
    profile = _profile(num_layers=24, hidden_size=2048, num_heads=16, seq_len=1024, vocab_size=128)
    ctx = _context(profile, ClusterSpec.parse("1x4xA100-80GB"), 64)
    result = search(profile, ctx, fix=Fix(pp=4, tp=1, schedule="1f1b", microbatch_size=1))
    assert [s.layers for s in result.plan.stages] == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert result.exact


def test_the_lm_head_stage_gets_fewer_layers():
    profile = _profile(num_layers=24, hidden_size=2048, num_heads=16, seq_len=1024, vocab_size=256_000)
    ctx = _context(profile, ClusterSpec.parse("1x4xA100-80GB"), 64)
    plan = search(profile, ctx, fix=Fix(pp=4, tp=1, schedule="1f1b", microbatch_size=1)).plan
    sizes = [s.layers[1] - s.layers[0] for s in plan.stages]
    assert sum(sizes) == 24 and sizes[-1] < min(sizes[:-1])


def _brute_force(profile, ctx, config, modes=("none", "selective", "full")):
    """The smallest pipeline time over every contiguous split and recomputation choice that fits."""
    best = None
    num_layers, p = profile.num_layers, config.pp
    for cuts in itertools.combinations(range(1, num_layers), p - 1):
        ends = (0, *cuts, num_layers)
        split = [(ends[k], ends[k + 1]) for k in range(p)]
        for choice in itertools.product(modes, repeat=p):
            plan = build_plan(ctx, config, split, choice)
            if max(peak_memory_bytes(plan, profile)) > ctx.cluster.device.memory_bytes:
                continue
            times = [c.times() for c in stage_costs(plan, profile)]
            total = pipeline_time(times, schedule=config.schedule, pp=p,
                                  num_microbatches=config.num_microbatches).total_s
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("memory_gib", [80, 32, 28, 24, 12])
def test_the_split_solver_agrees_with_exhaustive_search(schedule, memory_gib):
    profile, ctx = _tight(memory_gib)
    config = Config(dp=1, tp=1, pp=3, schedule=schedule, virtual_stages=1, microbatch_size=4,
                    num_microbatches=12, zero=0)
    expected = _brute_force(profile, ctx, config)
    split = solve_split(Prober(profile, ctx, autopar.cost_models.CostOptions()).stage_model(config),
                        num_stages=3, num_microbatches=12, schedule=schedule)
    if expected is None:
        assert split is None
        return
    assert split is not None and split.exact
    assert split.pipeline_s == pytest.approx(expected, rel=1e-9)
    plan = build_plan(ctx, config, split.layers, split.recompute)
    times = [c.times() for c in stage_costs(plan, profile)]
    total = pipeline_time(times, schedule=schedule, pp=3, num_microbatches=12).total_s
    assert total == pytest.approx(expected)


def test_memory_pressure_turns_on_recomputation_where_needed():
    relaxed = search(*_tight(80), fix=Fix(pp=3, schedule="1f1b", microbatch_size=4)).plan
    assert {s.recompute for s in relaxed.stages} == {"none"}
    profile, ctx = _tight(24)
    plan = search(profile, ctx, fix=Fix(pp=3, schedule="1f1b", microbatch_size=4)).plan
    assert {s.recompute for s in plan.stages} - {"none"}, "24 GiB needs recomputation somewhere"
    assert "none" in {s.recompute for s in plan.stages}, "but not everywhere"
    assert max(plan.predicted.peak_memory_bytes) <= ctx.cluster.device.memory_bytes
    assert plan.predicted.step_time_s > relaxed.predicted.step_time_s


def test_pins_are_kept_and_the_rest_is_searched():
    fix = {"tp": 8, "pp": 4, "schedule": "interleaved", "microbatch_size": 1}
    plan = _plan("gpt3-13b", "4x8xA100-80GB", 128, fix=fix)
    assert (plan.parallelism.tp, plan.parallelism.pp, plan.parallelism.dp) == (8, 4, 1)
    assert plan.schedule.name == "interleaved" and plan.schedule.microbatch_size == 1
    assert plan.schedule.virtual_stages >= 2 and len(plan.stages) == 4 * plan.schedule.virtual_stages


def test_single_device_chooses_microbatch_and_recomputation_to_fit():
    plan = _plan("gpt3-1.3b", "1xA100-80GB", 64)
    assert plan.world_size == 1 and plan.schedule.name == "gpipe"
    assert max(plan.predicted.peak_memory_bytes) <= 80 * 2**30
    # the whole batch at once would need far more than 80 GiB of activations
    assert plan.schedule.microbatch_size < 64 or plan.stages[0].recompute != "none"


def test_nothing_fits_names_the_binding_constraint_and_remedies():
    with pytest.raises(InfeasiblePlanError) as info:
        _plan("gpt3-175b", "1x8xA100-80GB", 8)
    message = str(info.value)
    assert "stage" in message and "GiB on A100-80GB" in message and "optimizer" in message
    assert "Remedies:" in message and "more devices" in message
    assert isinstance(info.value, ValueError)


def test_bad_pins_fail_before_searching():
    with pytest.raises(ValueError, match="≠ world size 8"):
        _plan("gpt2", "1x8xA100-80GB", 64, fix={"tp": 3})
    with pytest.raises(ValueError, match="time_limit_s"):
        search(_profile(num_layers=2), _context(_profile(num_layers=2), ClusterSpec.parse("1xA100-80GB"), 8),
               time_limit_s=0)


def test_the_same_inputs_give_byte_identical_plans():
    first = _plan("gpt3-1.3b", "2x8xA100-80GB", 256)
    second = _plan("gpt3-1.3b", "2x8xA100-80GB", 256)
    assert first.to_json() == second.to_json()


def test_progress_is_reported():
    seen = []
    profile = _profile(num_layers=4, hidden_size=512, num_heads=8, seq_len=256, vocab_size=1024)
    search(profile, _context(profile, ClusterSpec.parse("1x4xA100-80GB"), 16),
           progress=lambda done, total, best: seen.append((done, total, best)))
    assert seen and seen[-1][0] <= seen[-1][1] and seen[-1][2] is not None


def test_token_dropping_moves_the_stage_split():
    model = autopar.models.build("gpt", num_layers=12, hidden_size=2048, num_heads=16, seq_len=2048,
                                 vocab_size=50304, device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    fix = {"pp": 2, "tp": 1, "schedule": "1f1b", "microbatch_size": 1}
    plain = autopar.plan(model, inputs, cluster="1x4xA100-80GB", global_batch_size=32, fix=fix)
    ltd = autopar.plan(model, inputs, cluster="1x4xA100-80GB", global_batch_size=32, fix=fix,
                       passes=[autopar.passes.RandomLTD(min_tokens=256, num_steps=1000)])
    assert [s.layers for s in plain.stages] != [s.layers for s in ltd.stages]
    # the cheaper middle layers let the first stage take more of them
    assert ltd.stages[0].layers[1] > plain.stages[0].layers[1]
    assert ltd.predicted.step_time_s < plain.predicted.step_time_s
    assert [p.name for p in ltd.passes] == ["random_ltd"]
    # memory is checked at full length (the end of the schedule), not at the schedule's average
    full = profile_of(autopar.capture(model, inputs), ClusterSpec.parse("1x4xA100-80GB"))
    assert ltd.predicted.peak_memory_bytes == peak_memory_bytes(ltd, full)
