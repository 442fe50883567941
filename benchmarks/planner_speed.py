"""Planning speed: how long autopar's full search takes on this machine, and how it grows.

Run: ``.venv/bin/python -m benchmarks.planner_speed`` (writes
``benchmarks/results/planner_speed.{json,md}``). Cases:

* the headline targets: GPT-3 175B on 1,024 A100 (batch 1536) and a 1T model on 3,072 A100
  (batch 3072), each through ``autopar.plan_search`` on a meta-device model (capture included,
  reported separately) — targets: under 10 s and under 30 s;
* growth with depth: GPT (h 4096, 32 heads, s 2048) with 12 … 128 layers on 256 A100;
* growth with cluster size: GPT-3 175B on 8 … 4,096 A100 (8 and 16 cannot hold it: the time
  to prove that is reported).

``--before-after OLD [NEW …] --rounds 2`` compares source trees on this machine (e.g. a
``git worktree`` of an older commit): GPT-3 175B on 1,024 A100 planned by each tree in its own
process, back to back, ``rounds`` times — analytic profile (search only) and meta-device model
(capture + search through ``plan_search``), wall-clock and CPU seconds (CPU seconds are steadier on
a shared machine) — and appends the table to ``results/planner_speed.md`` under the given
``--title``. Sections of that file whose title starts with "issue" survive a full rerun.

The sweeps plan from analytic profiles (``ModelProfile.gpt``), so they time the search alone.
"Exact" means the search proved its answer optimal over its space (no time-limit cut, every
split solved exactly): the optimality gap is then 0. Alpa needed ~40 min for a 39B model on
64 GPUs (its paper, §8.4); timings here are wall-clock on a 2-core machine that may be shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import autopar
from autopar.cluster import ClusterSpec
from autopar.cost_models import ModelProfile
from autopar.models import get_config
from autopar.plan_api import plan_search
from autopar.planner import InfeasiblePlanError, PlanContext, search
from benchmarks.common import environment, write_results

TARGETS = (("gpt3-175b", 128, 1536, 10.0), ("megatron-1t", 384, 3072, 30.0))


def _row(name: str, nodes: int, batch: int, result: Any, seconds: float, **extra: Any) -> dict[str, Any]:
    row = {"model": name, "gpus": nodes * 8, "global_batch": batch, "search_s": round(seconds, 3), **extra}
    if result is None:
        return {**row, "plan": "infeasible (InfeasiblePlanError)", "configs": None}
    p = result.plan
    return {**row, "configs": result.configs_total, "evaluated": result.configs_evaluated,
            "exact": result.exact, "gap": 0.0 if result.exact else None,
            "plan": f"dp{p.parallelism.dp} tp{p.parallelism.tp} pp{p.parallelism.pp} {p.schedule.name}"
                    f"(v{p.schedule.virtual_stages}) b{p.schedule.microbatch_size} zero{p.zero}",
            "step_s": round(p.predicted.step_time_s, 4), "mfu": round(p.predicted.mfu, 4)}


def headline(name: str, nodes: int, batch: int, target_s: float) -> dict[str, Any]:
    model = autopar.models.build(name, device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    start = time.perf_counter()
    captured = autopar.capture(model, inputs)
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    result = plan_search(model, inputs, cluster=f"{nodes}x8xA100-80GB", global_batch_size=batch,
                         time_limit_s=120)
    total_s = time.perf_counter() - start
    return _row(name, nodes, batch, result, total_s, capture_s=round(capture_s, 3), target_s=target_s,
                met=total_s < target_s, layers=len(captured.layers))


def analytic(profile: ModelProfile, nodes: int, batch: int) -> dict[str, Any]:
    cluster = ClusterSpec.parse(f"{nodes}x8xA100-80GB" if nodes >= 1 else "1x8xA100-80GB")
    ctx = PlanContext(model=profile.name, graph_fingerprint="analytic", cluster=cluster,
                      global_batch_size=batch, seq_len=profile.seq_len, num_layers=profile.num_layers)
    start = time.perf_counter()
    try:
        result = search(profile, ctx, time_limit_s=120)
    except InfeasiblePlanError:
        result = None
    return _row(profile.name, nodes, batch, result, time.perf_counter() - start, layers=profile.num_layers)


def depth_sweep(depths: tuple[int, ...]) -> list[dict[str, Any]]:
    return [analytic(ModelProfile.gpt(get_config("gpt", num_layers=d, hidden_size=4096, num_heads=32,
                                                 seq_len=2048, vocab_size=51200), name=f"gpt-{d}l"), 32, 512)
            for d in depths]


def gpu_sweep(nodes: tuple[int, ...]) -> list[dict[str, Any]]:
    profile = ModelProfile.gpt(get_config("gpt3-175b"), name="gpt3-175b")
    return [analytic(profile, n, 1536) for n in nodes]


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


_MEASURE = """
import json, sys, time
root, mode = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import autopar
from autopar.cluster import ClusterSpec
from autopar.cost_models import ModelProfile
from autopar.models import get_config
from autopar.plan_api import plan_search
from autopar.planner import PlanContext, search
assert autopar.__file__.startswith(root), autopar.__file__
if mode == "analytic":
    profile = ModelProfile.gpt(get_config("gpt3-175b"), name="gpt3-175b")
    ctx = PlanContext(model="gpt3-175b", graph_fingerprint="analytic",
                      cluster=ClusterSpec.parse("128x8xA100-80GB"), global_batch_size=1536,
                      seq_len=profile.seq_len, num_layers=profile.num_layers)
    wall, cpu = time.perf_counter(), time.process_time()
    result = search(profile, ctx, time_limit_s=600)
else:
    model = autopar.models.build("gpt3-175b", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    wall, cpu = time.perf_counter(), time.process_time()
    result = plan_search(model, inputs, cluster="128x8xA100-80GB", global_batch_size=1536, time_limit_s=600)
p = result.plan
print(json.dumps({"mode": mode, "wall_s": round(time.perf_counter() - wall, 2),
                  "cpu_s": round(time.process_time() - cpu, 2), "configs": result.configs_total,
                  "evaluated": result.configs_evaluated, "step_s": round(p.predicted.step_time_s, 4),
                  "plan": f"dp{p.parallelism.dp} tp{p.parallelism.tp} pp{p.parallelism.pp} {p.schedule.name} "
                          f"zero{p.zero}"}))
"""


def before_after(roots: list[str], rounds: int) -> list[dict[str, Any]]:
    """GPT-3 175B on 1,024 A100 planned by each source tree in ``roots`` (module docstring)."""
    rows = []
    for number in range(1, rounds + 1):
        for root in roots:
            for mode in ("analytic", "capture+search"):
                out = subprocess.run([sys.executable, "-c", _MEASURE, str(Path(root).resolve()), mode],
                                     capture_output=True, text=True, check=True, cwd="/")
                rows.append({"round": number, "tree": root, **json.loads(out.stdout.splitlines()[-1])})
                print(rows[-1], flush=True)
    return rows


def _kept_sections(path: Path) -> str:
    """The "## issue …" sections of an earlier results file (kept by a full rerun)."""
    if not path.exists():
        return ""
    parts = path.read_text().split("\n## ")
    return "".join("\n\n## " + part.rstrip() for part in parts[1:] if part.startswith("issue"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="headline cases only")
    parser.add_argument("--before-after", nargs="+", metavar="TREE", help="source trees to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--title", default="issue: before/after")
    args = parser.parse_args()
    env = environment()
    results = Path(__file__).parent / "results" / "planner_speed.md"
    if args.before_after:
        rows = before_after(args.before_after, args.rounds)
        keys = ["round", "tree", "mode", "wall_s", "cpu_s", "configs", "evaluated", "plan", "step_s"]
        table = _table(rows, keys)
        with results.open("a") as out:
            command = f"--before-after {' '.join(args.before_after)} --rounds {args.rounds}"
            out.write(f"\n## {args.title}\n\nEnvironment: {env}. Command: `python -m "
                      f"benchmarks.planner_speed {command}`.\n\n{table}\n")
        print(table)
        return
    heads = [headline(*case) for case in TARGETS]
    depth = [] if args.quick else depth_sweep((12, 24, 48, 96, 128))
    gpus = [] if args.quick else gpu_sweep((1, 2, 8, 16, 32, 64, 128, 256, 512))
    keys = ["model", "gpus", "global_batch", "layers", "search_s", "configs", "evaluated", "exact", "plan",
            "step_s", "mfu"]
    markdown = "\n\n".join([
        "# Planning speed (full search, this machine)",
        f"Environment: {env}. Timings are wall-clock on a shared 2-core machine.",
        "## Headline targets (capture + search through `autopar.plan_search`)",
        _table(heads, ["model", "gpus", "global_batch", "capture_s", "search_s", "target_s", "met", "configs",
                       "evaluated", "exact", "plan", "step_s", "mfu"]),
        "## Growth with depth (GPT h4096, 256 A100, batch 512; analytic profile, search only)",
        _table(depth, keys),
        "## Growth with cluster size (GPT-3 175B, batch 1536; analytic profile, search only)",
        _table(gpus, keys),
        "`exact`: the search proved optimality over its space (gap 0). Alpa: ~40 min for 39B on 64 GPUs.",
    ]) + _kept_sections(results)
    payload = {"environment": env, "headline": heads, "depth": depth, "gpus": gpus}
    write_results("planner_speed", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
