"""Does the planner pick the fastest plan? Run its candidates on 2 and 4 local processes.

Run: ``.venv/bin/python -m benchmarks.planner_local`` (writes
``benchmarks/results/planner_local.{json,md}``). For ``local:2`` and ``local:4``,
``autopar.plan_api.plan_search`` plans a zoo GPT (8 layers, hidden 256, 8 heads, vocabulary
4096, sequence 128, global batch 16, AdamW); the candidates are its choice and, for every other
dp × tp × pp, the best plan it finds with those degrees pinned. Each candidate runs
``--steps`` training steps after ``--warmup`` through
``autopar.compile(model, "local:N", plan=...)`` in spawned gloo processes (one thread each);
the measured step time is the median over steps of the slowest rank. The planner's choice
"wins" when it is the fastest measured or within ``--noise`` of the fastest.

Other programs may share this machine's 2 cores: each candidate is measured in ``--rounds``
rounds, alternating order, and the best round is kept. Predictions use whatever cost model
is configured for local clusters (the calibrated profile when one is installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import autopar
from autopar.lower import with_fingerprint
from autopar.plan_api import plan_search
from autopar.planner.space import divisors
from autopar.plans import Plan
from autopar.runtime.launch import spawn
from benchmarks.common import environment, write_results

MODEL = dict(num_layers=8, hidden_size=256, num_heads=8, vocab_size=4096, seq_len=128)
GLOBAL_BATCH = 16


def _model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = autopar.models.build("gpt", **MODEL)
    inputs, targets = autopar.models.example_batch(model, GLOBAL_BATCH, seed=1)
    return model, inputs, targets


def _describe(plan: Plan) -> str:
    par, sched = plan.parallelism, plan.schedule
    split = ",".join(str(s.layers[1] - s.layers[0]) for s in plan.stages)
    modes = "/".join(sorted({s.recompute for s in plan.stages}))
    return (f"dp{par.dp} tp{par.tp} pp{par.pp} {sched.name}(v{sched.virtual_stages}) b{sched.microbatch_size}"
            f"×m{sched.num_microbatches} zero{plan.zero} layers[{split}] recompute {modes}")


def _measure(plan: Plan, warmup: int, steps: int) -> float:
    model, inputs, targets = _model()
    compiled = autopar.compile(model, f"local:{plan.world_size}", plan=plan)
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        compiled.step(inputs, targets)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def _rank(rank: int, world: int, plans_json: list[str], out: str, options: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    plans = [Plan.from_json(text) for text in plans_json]
    best: list[float | None] = [None] * len(plans)
    for round_index in range(options["rounds"]):
        order = range(len(plans)) if round_index % 2 == 0 else reversed(range(len(plans)))
        for i in order:
            median = _measure(plans[i], options["warmup"], options["steps"])
            best[i] = median if best[i] is None else min(best[i], median)
            dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(best))


def candidates(world: int) -> tuple[list[Plan], list[str]]:
    """The planner's choice, then its best plan for every other dp × tp × pp (searched with the
    degrees pinned), fingerprinted for the runtime; and the triples it could not plan, why."""
    model, inputs, _ = _model()
    chosen = plan_search(model, inputs, cluster=f"local:{world}", global_batch_size=GLOBAL_BATCH).plan
    plans, skipped = [chosen], []
    for tp in divisors(world):
        for pp in divisors(world // tp):
            dp = world // (tp * pp)
            if (dp, tp, pp) == (chosen.parallelism.dp, chosen.parallelism.tp, chosen.parallelism.pp):
                continue
            try:
                pins = {"dp": dp, "tp": tp, "pp": pp}
                plans.append(plan_search(model, inputs, cluster=f"local:{world}",
                                         global_batch_size=GLOBAL_BATCH, fix=pins).plan)
            except ValueError as error:
                skipped.append(f"dp{dp} tp{tp} pp{pp}: {error}")
    return [with_fingerprint(p, model, inputs) for p in plans], skipped


def run_world(world: int, options: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    plans, skipped = candidates(world)
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "times.json")
        spawn(_rank, world, [p.to_json() for p in plans], out, options, timeout_s=1800)
        measured = json.loads(Path(out).read_text())
    fastest = min(measured)
    rows = [{"world_size": world, "chosen": i == 0, "plan": _describe(p),
             "predicted_s": round(p.predicted.step_time_s, 4), "measured_s": round(m, 4),
             "measured_vs_fastest_pct": round(100 * (m / fastest - 1), 1)}
            for i, (p, m) in enumerate(zip(plans, measured, strict=True))]
    return rows, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--noise", type=float, default=0.05, help="relative margin counted as a tie")
    args = parser.parse_args()
    options = {k: getattr(args, k) for k in ("rounds", "warmup", "steps")}
    rows, skipped = [], []
    for world in (2, 4):
        mine, why = run_world(world, options)
        rows, skipped = rows + mine, skipped + why
    verdicts = {}
    for world in (2, 4):
        mine = [r for r in rows if r["world_size"] == world]
        chosen = next(r for r in mine if r["chosen"])
        verdicts[world] = chosen["measured_vs_fastest_pct"] <= 100 * args.noise
    keys = ["world_size", "chosen", "plan", "predicted_s", "measured_s",
            "measured_vs_fastest_pct"]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    env = environment()
    markdown = "\n\n".join([
        "# Planner's choice vs its other candidates, measured on this machine",
        f"Environment: {env}. Model {MODEL}, global batch {GLOBAL_BATCH}; best of {args.rounds} rounds, "
        f"median of {args.steps} steps after {args.warmup} warm-up.",
        "\n".join(table),
        "Not planned: " + ("; ".join(skipped) or "none"),
        f"Chosen plan fastest measured or within {100 * args.noise:.0f} %: "
        + ", ".join(f"{w} ranks: {'yes' if ok else 'no'}" for w, ok in verdicts.items()),
    ])
    payload = {"environment": env, "rows": rows, "verdicts": verdicts, "skipped": skipped,
               "options": options | {"noise": args.noise}}
    write_results("planner_local", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
