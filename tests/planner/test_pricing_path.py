"""One pricing path: a configuration pinned through ``autopar.plan(..., fix=...)`` on a captured model
is priced exactly as its Plan built without a model (``megatron_plan``) on the analytic profile
(``megatron_profile``), for every row of Megatron-LM's published table (``benchmarks.published``).

Both sides end in ``cost_models.estimate`` with ``MEGATRON_2021``; they differ only in how the Plan
and the profile are made (search with every choice pinned and a capture on ``meta``, vs
``plan_from_fix`` and the closed-form GPT profile), so they must agree to rounding — 0.1 % is the
issue's bound, far above the float noise seen (0).
"""

from __future__ import annotations

import pytest

import autopar
from benchmarks.published.megatron import WEAK_SCALING, analytic_predicted, megatron_2021_model, row_plan

TOLERANCE = 1e-3


def _check_same(plan: autopar.Plan, reference: autopar.plans.Predicted) -> None:
    got = plan.predicted
    assert got.step_time_s == pytest.approx(reference.step_time_s, rel=TOLERANCE)
    assert max(got.peak_memory_bytes) == pytest.approx(max(reference.peak_memory_bytes), rel=TOLERANCE)
    assert got.breakdown_dict() == pytest.approx(reference.breakdown_dict(), rel=TOLERANCE, abs=1e-9)


@pytest.mark.parametrize("row", WEAK_SCALING, ids=[row.model for row in WEAK_SCALING])
def test_every_published_row_is_priced_the_same_by_both_paths(row) -> None:
    plan = row_plan(row)  # autopar.plan on Megatron-LM 2021's model (unfused attention), all pinned
    fix = row.fix()
    assert (plan.parallelism.dp, plan.parallelism.tp, plan.parallelism.pp) == (fix.dp, fix.tp, fix.pp)
    assert (plan.schedule.name, plan.schedule.virtual_stages) == (fix.schedule, fix.virtual_stages)
    assert {stage.recompute for stage in plan.stages} == {"full"} and plan.zero == 0
    _check_same(plan, analytic_predicted(row))


@pytest.mark.parametrize("name", ["megatron-1.7b", "megatron-39b"])
def test_the_zoo_model_as_it_runs_is_priced_with_fused_attention(name: str) -> None:
    """The zoo GPT calls ``scaled_dot_product_attention``: the same pins price fused attention, as
    the analytic profile does when told so (and faster than the unfused 2021 code)."""
    row = next(r for r in WEAK_SCALING if r.model == name)
    zoo = row_plan(row, model=autopar.models.build(name, device="meta"))
    _check_same(zoo, analytic_predicted(row, fused_attention=True))
    assert zoo.predicted.step_time_s < analytic_predicted(row).step_time_s


def test_a_pinned_1f1b_without_pipelining_is_kept() -> None:
    """pp = 1 with 1F1B pinned is plain gradient accumulation (one microbatch alive), not GPipe."""
    row = WEAK_SCALING[0]
    model = megatron_2021_model(row.model)
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    pinned = dict(row.fix().pinned())
    one_f_one_b = autopar.plan(model, inputs, cluster=row.cluster(), global_batch_size=row.global_batch_size,
                               fix=pinned, options=autopar.cost_models.MEGATRON_2021)
    gpipe = autopar.plan(model, inputs, cluster=row.cluster(), global_batch_size=row.global_batch_size,
                         fix={**pinned, "schedule": "gpipe"}, options=autopar.cost_models.MEGATRON_2021)
    assert (one_f_one_b.schedule.name, gpipe.schedule.name) == ("1f1b", "gpipe")
    assert one_f_one_b.predicted.step_time_s == pytest.approx(gpipe.predicted.step_time_s)
    assert max(one_f_one_b.predicted.peak_memory_bytes) < max(gpipe.predicted.peak_memory_bytes)
