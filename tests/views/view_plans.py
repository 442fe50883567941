"""Hand-made plans for the view tests: a zoo GPT on 16 A100s with predictions from the cost model.

Views must work from any Plan, so the tests do not run the planner: ``cost_models.megatron_plan``
lays out the degrees, ``estimate_plan`` fills ``predicted`` (with the per-stage numbers views
draw), and the rest (alternatives, passes, shardings, hostile names) is added by hand.
:func:`version_1` makes the plan an older autopar would have written: no per-stage predictions.
"""

from __future__ import annotations

import dataclasses

from autopar.cost_models import ModelProfile, estimate_plan, megatron_plan
from autopar.models import get_config
from autopar.plans import Alternative, AppliedPass, Parallelism, Plan, Schedule, Sharding

XSS = "<script>alert(1)</script>"
MODEL = "gpt3-1.3b"


def zoo_plan(*, tp: int = 2, pp: int = 2, schedule: str = "1f1b", recompute: str = "none",
             num_gpus: int = 16, batch: int = 64, virtual_stages: int | None = None) -> Plan:
    plan = megatron_plan(MODEL, num_gpus=num_gpus, tp=tp, pp=pp, global_batch_size=batch, schedule=schedule,
                         recompute=recompute, virtual_stages=virtual_stages)
    return estimate_plan(plan, ModelProfile.gpt(get_config(MODEL), name=MODEL, dtype="bf16"))


def version_1(plan: Plan) -> Plan:
    """``plan`` as a schema-version-1 file stores it: predictions without stages, memory, dtype, options."""
    return dataclasses.replace(plan, predicted=dataclasses.replace(
        plan.predicted, stages=(), memory=(), dtype=None, options=None))


def alternatives(plan: Plan) -> tuple[Alternative, ...]:
    best = plan.predicted.step_time_s or 1.0
    return (
        Alternative(parallelism=Parallelism(dp=8, tp=1, pp=2), schedule=Schedule(
            name="1f1b", microbatch_size=1, num_microbatches=8), predicted_step_time_s=best * 1.1,
            reason=f"dp8 tp1 pp2 1f1b b1×m8 zero0: +{best * 0.1:.3g} s (+10.0 %), mostly more compute"),
        Alternative(parallelism=Parallelism(dp=2, tp=4, pp=2), schedule=Schedule(
            name="gpipe", microbatch_size=2, num_microbatches=16), predicted_step_time_s=best * 1.3,
            reason="more tensor-parallel communication"),
    )


def rich_plan() -> Plan:
    """A plan with everything a view can show: two stages recomputing differently, shardings,
    a pass, alternatives."""
    plan = zoo_plan()
    stages = (plan.stages[0], dataclasses.replace(plan.stages[1], recompute="full"))
    plan = estimate_plan(dataclasses.replace(plan, stages=stages),
                         ModelProfile.gpt(get_config(MODEL), name=MODEL, dtype="bf16"))
    shardings = tuple(Sharding(node=f"blocks_{i}_{name}", strategy=strategy) for i in range(24)
                      for name, strategy in (("attn_qkv", "colwise"), ("attn_proj", "rowwise")))
    return dataclasses.replace(plan, shardings=shardings, alternatives=alternatives(plan),
                               passes=(AppliedPass(name="fused_attention", config={"causal": True}),))


def hostile_plan() -> Plan:
    """Model-derived strings that are HTML, rich markup and DOT syntax at once."""
    plan = rich_plan()
    stages = (dataclasses.replace(plan.stages[0], first_node=XSS, last_node='a"b\\c'), *plan.stages[1:])
    return dataclasses.replace(
        plan, model=XSS, stages=stages, graph_fingerprint="<b>fp</b>",
        shardings=(*plan.shardings, Sharding(node=XSS, strategy="[bold]colwise[/bold]")),
        passes=(AppliedPass(name=XSS, config={"<img src=x onerror=alert(2)>": "</script>"}),),
        alternatives=(dataclasses.replace(plan.alternatives[0], reason=f"{XSS} [red]markup[/red]"),))
