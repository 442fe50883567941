"""The view model: per-stage numbers, memory rows and the timeline, all from the Plan's stored numbers."""

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
from view_plans import MODEL, rich_plan, version_1, zoo_plan

import autopar
from autopar.cluster import ClusterSpec
from autopar.cost_models import ModelProfile, plan_memory, simulate_plan, stage_costs
from autopar.models import get_config
from autopar.plans import Plan, Predicted
from autopar.views import build_view
from autopar.views.model import APPROXIMATE, approximate_stage_times

VIEWS = Path(autopar.__file__).parent / "views"


def _profile() -> ModelProfile:
    return ModelProfile.gpt(get_config(MODEL), name=MODEL, dtype="bf16")


def test_views_draw_the_cost_models_numbers_stored_in_the_plan():
    plan = Plan.from_json(rich_plan().to_json())  # what a view reads: the JSON only
    view, profile = build_view(plan), _profile()
    assert view.exact and "stored in the plan (bf16 training)" in view.source
    costs = stage_costs(plan, profile)
    assert [s.times for s in view.stages] == [c.times() for c in costs]
    assert [s.params_per_device for s in view.stages] == [c.params_per_device for c in costs]
    assert view.stages[0].prediction.tp_comm_s == pytest.approx(
        costs[0].comm_of("tp").total_s)
    assert view.timeline.total_s == simulate_plan(plan, profile).total_s
    memory = plan_memory(plan, profile)
    for row in view.memory:
        expected = memory[row.devices[0]]
        parts = dict(row.parts)
        assert row.total_bytes == expected.total_bytes
        assert list(parts) == ["weights", "gradients", "optimizer states", "activations", "logits",
                               "reserve"]
        assert parts["weights"] + parts["gradients"] + parts["optimizer states"] == pytest.approx(
            expected.model_states_bytes, rel=1e-12)
        assert parts["activations"] == expected.activations_bytes
    assert sorted(d for row in view.memory for d in row.devices) == list(range(plan.world_size))
    assert [s.recompute for s in view.stages] == ["none", "full"]
    assert view.stages[1].times.recompute_s > 0 == view.stages[0].times.recompute_s
    plain = dataclasses.replace(plan, stages=(plan.stages[0],
                                              dataclasses.replace(plan.stages[1], recompute="none")))
    need = plan_memory(plain, profile)[plan.stages[1].devices[0]].total_bytes
    assert view.stages[1].prediction.memory_without_recompute_bytes == need
    assert view.stages[0].prediction.memory_without_recompute_bytes is None


def test_a_view_rebuilds_no_model(monkeypatch):
    plan = rich_plan()

    def refuse(*args, **kwargs):
        raise AssertionError("a view rebuilt a model")

    for name in ("build", "get_config", "example_batch"):
        monkeypatch.setattr(autopar.models, name, refuse)
    for module, names in (("estimate", ("estimate", "stage_costs")), ("memory", ("plan_memory",))):
        for name in names:
            monkeypatch.setattr(sys.modules[f"autopar.cost_models.{module}"], name, refuse)
    from autopar.views.html import render_html

    view = build_view(plan)
    assert view.exact and "<svg" in render_html(view)


def test_view_modules_import_no_model_capture_or_passes():
    banned = ("autopar.models", "autopar.capture", "autopar.passes", "autopar.plan_api", "autopar.compile",
              "autopar.lower")
    for path in VIEWS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith(banned)], (path.name, names)
    assert not (VIEWS / "profile.py").exists()


@pytest.mark.parametrize("change, reason", [
    (version_1, APPROXIMATE),
    (lambda p: dataclasses.replace(version_1(p), model="MyNet"), APPROXIMATE),
    (lambda p: dataclasses.replace(p, predicted=Predicted()), "the plan stores no predictions"),
])
def test_plans_without_stored_numbers_fall_back_to_their_totals(change, reason):
    plan = Plan.from_json(change(rich_plan()).to_json())
    view = build_view(plan)
    assert not view.exact and view.source == reason
    if plan.predicted.peak_memory_bytes is None:
        assert view.memory == () and view.timeline is None
        return
    assert [dict(r.parts) for r in view.memory] == [{"peak": r.total_bytes} for r in view.memory]
    assert {r.total_bytes for r in view.memory} == set(map(float, plan.predicted.peak_memory_bytes))
    assert view.timeline is not None and view.timeline.num_ranks == plan.parallelism.pp
    assert all(s.prediction is None and s.params_per_device is None for s in view.stages)


def test_a_memory_breakdown_that_misses_the_peaks_shows_the_peaks():
    """The planner prices random-LTD peaks at full length; a breakdown priced otherwise is not drawn."""
    plan = rich_plan()
    peaks = tuple(p + 2**20 for p in plan.predicted.peak_memory_bytes)
    view = build_view(dataclasses.replace(plan, predicted=dataclasses.replace(plan.predicted,
                                                                              peak_memory_bytes=peaks)))
    assert view.exact and "memory bars show each device's peak only" in view.source
    assert {r.total_bytes for r in view.memory} == set(map(float, peaks))


def test_predictions_of_another_layout_are_not_drawn_as_this_plans():
    """A plan whose ``predicted`` came from another plan (edited, or grafted in a test) is drawn from
    its totals, and says why."""
    plan, other = zoo_plan(), zoo_plan(schedule="interleaved", virtual_stages=2)
    view = build_view(dataclasses.replace(plan, predicted=other.predicted))
    assert not view.exact and "the plan's 4 per-stage predictions do not match its 2 stages" in view.source
    assert "memory breakdown does not match its stages" in view.source
    assert all(dict(r.parts).keys() == {"peak"} for r in view.memory)


def test_approximate_stage_times_share_the_breakdown_by_layers():
    plan = version_1(zoo_plan(pp=4, tp=1, num_gpus=16))
    approx = approximate_stage_times(plan)
    parts, m = plan.predicted.breakdown_dict(), plan.schedule.num_microbatches
    per_rank = approx[0].forward_s + approx[0].backward_s + approx[0].backward_weight_s
    assert m * per_rank == pytest.approx(parts["compute"] + parts["tp_comm"], rel=1e-9)
    assert approx[0].send_backward_s == 0 and approx[-1].send_forward_s == 0
    assert [s.times for s in build_view(plan).stages] == approx


def test_interleaved_and_single_device_plans():
    view = build_view(zoo_plan(schedule="interleaved", virtual_stages=3))
    assert len(view.stages) == 6 and [s.rank for s in view.stages] == [0, 1, 0, 1, 0, 1]
    assert {s.chunk for s in view.stages} == {0, 1, 2} and view.exact
    assert len(view.memory) == 2 and [r.stages for r in view.memory] == [(0, 2, 4), (1, 3, 5)]
    bare = Plan.single_device("tiny", graph_fingerprint="x", cluster=ClusterSpec.parse("local:1"),
                              global_batch_size=2,
                              num_layers=3)
    view = build_view(bare)
    assert view.timeline is None and view.memory == () and view.stages[0].times is None


def test_local_cluster_plans_store_the_cpu_models_numbers():
    from autopar.config import Fix
    from autopar.cost_models import estimate_plan
    from autopar.cost_models.local.step import cpu_stage_costs, local_rates
    from autopar.plans.pinned import plan_from_fix

    model = autopar.models.build("gpt-tiny", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=2)
    profile = ModelProfile.from_captured(autopar.capture(model, inputs), batch_size=2)
    plan = plan_from_fix("gpt-tiny", graph_fingerprint="x", num_layers=2,
                         cluster=ClusterSpec.parse("local:4"), fix=Fix(pp=2, dp=2, microbatch_size=1, zero=3),
                         global_batch_size=8, seq_len=32)
    plan = Plan.from_json(estimate_plan(plan, profile).to_json())
    costs = cpu_stage_costs(plan, profile, local_rates(plan))
    view = build_view(plan)
    assert view.exact and [s.times for s in view.stages] == [c.times() for c in costs]
    assert all(s.prediction.dp_comm_s > 0 for s in view.stages)  # ZeRO-3 gathers every microbatch
    assert plan.predicted.dtype == profile.dtype and plan.predicted.options.local_rates
    expected = [float(m.total_bytes) for m in plan_memory(plan, profile)[::2]]  # devices 0–1, 2–3
    assert [r.total_bytes for r in view.memory] == expected
    assert view.timeline.total_s == simulate_plan(plan, profile).total_s
