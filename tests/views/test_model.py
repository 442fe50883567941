"""The view model: profile recovery, per-stage numbers, memory rows and the timeline."""

import dataclasses

import pytest
from view_plans import MODEL, rich_plan, zoo_plan

from autopar.cluster import ClusterSpec
from autopar.cost_models import ModelProfile, estimate, plan_memory, simulate_plan
from autopar.models import get_config
from autopar.plans import Plan, Predicted
from autopar.views import build_view
from autopar.views.model import approximate_stage_times
from autopar.views.profile import recover_profile


def test_zoo_plan_recovers_the_profile_that_reproduces_its_prediction():
    plan = rich_plan()
    view = build_view(plan)
    assert view.exact and "reproduces" in view.source and "bf16" in view.source
    assert estimate(plan, view.profile).step_time_s == pytest.approx(plan.predicted.step_time_s)
    profile = ModelProfile.gpt(get_config(MODEL), name=MODEL, dtype="bf16")
    assert view.timeline.total_s == pytest.approx(simulate_plan(plan, profile).total_s)
    memory = plan_memory(plan, profile)
    for row in view.memory:
        assert row.total_bytes == pytest.approx(memory[row.devices[0]].total_bytes, rel=1e-9)
        assert dict(row.parts).keys() == {"model states", "activations", "logits", "reserve"}
    assert sorted(d for row in view.memory for d in row.devices) == list(range(plan.world_size))
    assert [s.recompute for s in view.stages] == ["none", "full"]
    assert view.stages[1].times.recompute_s > 0 == view.stages[0].times.recompute_s
    assert all(s.params_per_device > 0 for s in view.stages)


@pytest.mark.parametrize("change, reason", [
    (lambda p: dataclasses.replace(p, model="MyNet"), "not a zoo name"),
    (lambda p: dataclasses.replace(p, predicted=dataclasses.replace(
        p.predicted, step_time_s=p.predicted.step_time_s * 2)), "no longer reproduces"),
    (lambda p: dataclasses.replace(p, predicted=Predicted()), "no predicted step time"),
])
def test_views_fall_back_to_the_plans_own_numbers(change, reason):
    plan = change(rich_plan())
    view = build_view(plan)
    assert not view.exact and reason in view.source
    if plan.predicted.peak_memory_bytes is None:
        assert view.memory == () and view.timeline is None
        return
    assert [dict(r.parts) for r in view.memory] == [{"peak": r.total_bytes} for r in view.memory]
    assert {r.total_bytes for r in view.memory} == set(map(float, plan.predicted.peak_memory_bytes))
    assert view.timeline is not None and view.timeline.num_ranks == plan.parallelism.pp


def test_approximate_stage_times_share_the_breakdown_by_layers():
    plan = zoo_plan(pp=4, tp=1, num_gpus=16)
    approx = approximate_stage_times(plan)
    parts, m = plan.predicted.breakdown_dict(), plan.schedule.num_microbatches
    per_rank = approx[0].forward_s + approx[0].backward_s + approx[0].backward_weight_s
    assert m * per_rank == pytest.approx(parts["compute"] + parts["tp_comm"], rel=1e-9)
    assert approx[0].send_backward_s == 0 and approx[-1].send_forward_s == 0


def test_interleaved_and_single_device_plans():
    view = build_view(zoo_plan(schedule="interleaved", virtual_stages=3))
    assert len(view.stages) == 6 and [s.rank for s in view.stages] == [0, 1, 0, 1, 0, 1]
    assert {s.chunk for s in view.stages} == {0, 1, 2} and view.exact
    bare = Plan.single_device("tiny", graph_fingerprint="x", cluster=ClusterSpec.parse("local:1"),
                              global_batch_size=2,
                              num_layers=3)
    view = build_view(bare)
    assert view.timeline is None and view.memory == () and view.stages[0].times is None


def test_recovery_never_loads_files_or_user_code(tmp_path):
    plan = dataclasses.replace(rich_plan(), model="os:system")
    assert recover_profile(plan).profile is None
    plan = dataclasses.replace(rich_plan(), model=str(tmp_path / "config.json"))
    assert recover_profile(plan).profile is None
