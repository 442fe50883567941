"""Plan quality: autopar's plan vs Megatron-LM's hand-tuned configuration, same cost model.

Run: ``.venv/bin/python -m benchmarks.plan_quality`` (writes
``benchmarks/results/plan_quality.{json,md}``). For every row of Megatron-LM's weak-scaling
table (Narayanan et al., SC'21, Table 1: model, GPU count, batch on DGX A100 80GB), both plans
come from the public path on the model Megatron-LM ran (``benchmarks.published.megatron``: the
zoo GPT of that shape with its 2021 unfused attention, captured on ``meta``): the published
configuration is ``autopar.plan(..., fix=row.fix())`` (its tp and pp, interleaved 1F1B, microbatch
1, full recomputation, every choice pinned), autopar's is ``autopar.plan`` with nothing pinned;
both are priced by the same estimate with the same options (``MEGATRON_2021``: Megatron-LM 2021
code's overlaps). The published TFLOP/s column shows how well that cost model matches the measured
runs of Megatron's configuration (``benchmarks/cost_model_megatron.py``). The speed-up is a
prediction, not a measurement: no GPU cluster ran autopar's plans. ``plan_s`` is autopar's
end-to-end planning time on this machine (capture, intra-op ILP per tp, search).
"""

from __future__ import annotations

import time
from typing import Any

import autopar
from autopar.cost_models import MEGATRON_2021
from autopar.plan_api import plan_search
from benchmarks.common import environment, write_results
from benchmarks.published.megatron import PAPER, WEAK_SCALING, WeakScalingRow, megatron_2021_model, row_plan


def _describe(plan: Any) -> str:
    par, sched = plan.parallelism, plan.schedule
    modes = "/".join(sorted({s.recompute for s in plan.stages}))
    return (f"dp{par.dp} tp{par.tp} pp{par.pp} {sched.name}(v{sched.virtual_stages}) "
            f"b{sched.microbatch_size} zero{plan.zero} recompute {modes}")


def compare(row: WeakScalingRow) -> dict[str, Any]:
    model = megatron_2021_model(row.model)
    theirs = row_plan(row, model=model)
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    start = time.perf_counter()
    result = plan_search(model, inputs, cluster=row.cluster(), global_batch_size=row.global_batch_size,
                         options=MEGATRON_2021, time_limit_s=120)
    seconds = time.perf_counter() - start
    pinned, ours = theirs.predicted, result.plan.predicted
    assert pinned.step_time_s is not None and ours.step_time_s is not None
    return {
        "model": row.model, "gpus": row.num_gpus, "global_batch": row.global_batch_size,
        "megatron_plan": _describe(theirs), "megatron_step_s": round(pinned.step_time_s, 3),
        "megatron_tflops": round(pinned.tflops_per_device or 0.0, 1),
        "published_tflops": row.published_tflops_per_gpu,
        "autopar_plan": _describe(result.plan), "autopar_step_s": round(ours.step_time_s, 3),
        "autopar_tflops": round(ours.tflops_per_device or 0.0, 1),
        "speedup": round(pinned.step_time_s / ours.step_time_s, 3),
        "at_least_as_fast": ours.step_time_s <= pinned.step_time_s * (1 + 1e-9),
        "plan_s": round(seconds, 2), "exact": result.exact,
    }


def main() -> None:
    env = environment()
    rows = [compare(row) for row in WEAK_SCALING]
    keys = ["model", "gpus", "global_batch", "megatron_plan", "megatron_step_s", "published_tflops",
            "autopar_plan", "autopar_step_s", "speedup", "at_least_as_fast", "plan_s", "exact"]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    wins = sum(r["at_least_as_fast"] for r in rows)
    markdown = "\n\n".join([
        "# Plan quality: autopar vs Megatron-LM's published configurations",
        f"Source: {PAPER}. Both plans from `autopar.plan` on Megatron-LM 2021's model (the zoo GPT shape, "
        "unfused attention, captured on meta), Megatron's with every choice pinned (`fix=`), autopar's "
        f"searched; both priced by the same estimate with Megatron-LM 2021 options. Environment: {env}.",
        "\n".join(table),
        f"autopar's plan is predicted at least as fast on {wins} of {len(rows)} rows. Predictions only: "
        "autopar's plans were not run on a GPU cluster. `published_tflops` is Megatron's measured figure "
        "for its own configuration (the cost model's agreement with it: `cost_model_megatron.md`). "
        "`plan_s`: autopar's planning time here, capture and intra-op ILP included.",
    ])
    write_results("plan_quality", {"environment": env, "source": PAPER, "rows": rows,
                                   "summary": {"at_least_as_fast": wins, "rows": len(rows)}}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
