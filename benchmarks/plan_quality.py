"""Plan quality: autopar's plan vs Megatron-LM's hand-tuned configuration, same cost model.

Run: ``.venv/bin/python -m benchmarks.plan_quality`` (writes
``benchmarks/results/plan_quality.{json,md}``). For every row of Megatron-LM's weak-scaling
table (Narayanan et al., SC'21, Table 1: model, GPU count, batch on DGX A100 80GB) the
published configuration (``cost_models.megatron.megatron_plan``: its tp and pp, interleaved
1F1B, microbatch 1, full recomputation) and autopar's searched plan are both predicted by the
same cost model with the same options (``MEGATRON_2021``: Megatron-LM 2021 code's overlaps and
unfused attention). The published TFLOP/s column shows how well that cost model matches the
measured runs of Megatron's configuration (``benchmarks/cost_model_megatron.py``). The speed-up
is a prediction, not a measurement: no GPU cluster ran autopar's plans.
"""

from __future__ import annotations

import time
from typing import Any

from autopar.cluster import ClusterSpec
from autopar.cost_models import MEGATRON_2021, estimate, megatron_plan, megatron_profile
from autopar.cost_models.megatron import PAPER, WEAK_SCALING, WeakScalingRow
from autopar.planner import PlanContext, search
from benchmarks.common import environment, write_results


def _describe(plan: Any) -> str:
    par, sched = plan.parallelism, plan.schedule
    modes = "/".join(sorted({s.recompute for s in plan.stages}))
    return (f"dp{par.dp} tp{par.tp} pp{par.pp} {sched.name}(v{sched.virtual_stages}) "
            f"b{sched.microbatch_size} zero{plan.zero} recompute {modes}")


def compare(row: WeakScalingRow) -> dict[str, Any]:
    profile = megatron_profile(row.model)
    theirs = megatron_plan(row.model, num_gpus=row.num_gpus, tp=row.tp, pp=row.pp,
                           global_batch_size=row.global_batch_size)
    theirs_predicted = estimate(theirs, profile, options=MEGATRON_2021)
    cluster = ClusterSpec.parse(f"{row.num_gpus // 8}x8xA100-80GB")
    ctx = PlanContext(model=row.model, graph_fingerprint="analytic", cluster=cluster,
                      global_batch_size=row.global_batch_size, seq_len=profile.seq_len,
                      num_layers=profile.num_layers)
    start = time.perf_counter()
    result = search(profile, ctx, options=MEGATRON_2021, time_limit_s=120)
    seconds = time.perf_counter() - start
    ours = result.plan.predicted
    return {
        "model": row.model, "gpus": row.num_gpus, "global_batch": row.global_batch_size,
        "megatron_plan": _describe(theirs), "megatron_step_s": round(theirs_predicted.step_time_s, 3),
        "megatron_tflops": round(theirs_predicted.tflops_per_device, 1),
        "published_tflops": row.published_tflops_per_gpu,
        "autopar_plan": _describe(result.plan), "autopar_step_s": round(ours.step_time_s, 3),
        "autopar_tflops": round(ours.tflops_per_device, 1),
        "speedup": round(theirs_predicted.step_time_s / ours.step_time_s, 3),
        "at_least_as_fast": ours.step_time_s <= theirs_predicted.step_time_s * (1 + 1e-9),
        "search_s": round(seconds, 2), "exact": result.exact,
    }


def main() -> None:
    env = environment()
    rows = [compare(row) for row in WEAK_SCALING]
    keys = ["model", "gpus", "global_batch", "megatron_plan", "megatron_step_s", "published_tflops",
            "autopar_plan", "autopar_step_s", "speedup", "at_least_as_fast", "search_s", "exact"]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    wins = sum(r["at_least_as_fast"] for r in rows)
    markdown = "\n\n".join([
        "# Plan quality: autopar vs Megatron-LM's published configurations",
        f"Source: {PAPER}. Both predicted by autopar's cost model with Megatron-LM 2021 options. "
        f"Environment: {env}.",
        "\n".join(table),
        f"autopar's plan is predicted at least as fast on {wins} of {len(rows)} rows. Predictions only: "
        "autopar's plans were not run on a GPU cluster. `published_tflops` is Megatron's measured figure "
        "for its own configuration (the cost model's agreement with it: `cost_model_megatron.md`).",
    ])
    write_results("plan_quality", {"environment": env, "source": PAPER, "rows": rows,
                                   "summary": {"at_least_as_fast": wins, "rows": len(rows)}}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
