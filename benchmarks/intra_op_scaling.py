"""Intra-op ILP scaling: solve time against graph size, with and without tied layers.

Run: ``.venv/bin/python -m benchmarks.intra_op_scaling`` (writes
``benchmarks/results/intra_op_scaling.json`` and ``.md``). Two suites, one row per case:

* ``gpt_depth`` — the zoo GPT at GPT-2-small width (h 768, 12 heads, V 50304, batch 8 × 1024
  tokens) with 2…96 layers, captured on ``meta``, tp = 4 on 1×8 A100-80GB; repeated layers
  tied (the default) and untied.
* ``synthetic`` — a torch-free problem of N groups × 4 strategies, a chain plus one random
  back edge per group (within 20), dense random resharding matrices (zero diagonal), no
  tying: the shape ARCHITECTURE decision 3 measured, for each OR-Tools backend.

Timings are wall-clock on a shared machine (other agents run concurrently), so they are
approximate; the load average is recorded. Timing belongs here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import torch

from autopar import models
from autopar.capture import capture
from autopar.cluster import ClusterSpec
from autopar.planner.intra_op import IntraOpOptions, intra_op_problem, solve_intra_op
from autopar.planner.intra_op.ilp import solve_sharding_ilp
from autopar.planner.intra_op.problem import EdgeCost, ShardingProblem
from benchmarks.common import environment, write_results

GPT_LAYERS = (2, 8, 24, 48, 96)
SYNTHETIC = ((250, "highs"), (500, "highs"), (1000, "highs"), (2000, "highs"), (1000, "scip"),
             (1000, "cp_sat"))
TIME_LIMIT_S = 120.0


def synthetic_problem(num_groups: int, num_strategies: int = 4, *, seed: int = 0) -> ShardingProblem:
    rng = random.Random(seed)
    k = num_strategies

    def matrix() -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(0.0 if i == j else rng.uniform(0.2, 2.0) * 1e-5 for j in range(k))
                     for i in range(k))

    edges = tuple(EdgeCost(u=u, v=v, cost_s=matrix()) for v in range(1, num_groups)
                  for u in sorted({v - 1, rng.randrange(max(0, v - 20), v)}))
    zeros = tuple((0.0,) * k for _ in range(num_groups))
    return ShardingProblem(
        names=tuple(f"n{i}" for i in range(num_groups)),
        strategies=(tuple(f"s{j}" for j in range(k)),) * num_groups,
        compute_s=tuple(tuple(rng.uniform(0, 1e-5) for _ in range(k)) for _ in range(num_groups)),
        communication_s=zeros, resharding_s=zeros, memory_bytes=zeros, edges=edges)


def gpt_rows(layers: tuple[int, ...]) -> list[dict[str, Any]]:
    cluster = ClusterSpec.parse("1x8xA100-80GB")
    rows = []
    for num_layers in layers:
        model = models.build("gpt", num_layers=num_layers, hidden_size=768, num_heads=12, vocab_size=50304,
                             seq_len=1024, device="meta")
        ids = torch.empty(8, 1024, dtype=torch.long, device="meta")
        start = time.perf_counter()
        gm = capture(model, (ids,)).graph_module
        capture_s = time.perf_counter() - start
        for tie in (True, False):
            start = time.perf_counter()
            intra_op_problem(gm, tp=4, cluster=cluster, tie_layers=tie)
            build_s = time.perf_counter() - start
            plan = solve_intra_op(gm, tp=4, cluster=cluster,
                                  options=IntraOpOptions(tie_layers=tie, time_limit_s=TIME_LIMIT_S))
            rows.append({
                "suite": "gpt_depth", "case": f"gpt h768 L{num_layers} tp4 {'tied' if tie else 'untied'}",
                "graph_nodes": len(gm.graph.nodes), "groups": plan.num_groups,
                "strategy_variables": plan.num_strategy_variables, "edge_variables": plan.num_edge_variables,
                "constraints": plan.num_constraints, "backend": plan.backend, "status": plan.status,
                "gap": plan.gap, "capture_s": round(capture_s, 3), "build_s": round(build_s, 3),
                "solve_s": round(plan.solve_time_s, 3), "objective_s": plan.objective_s})
    return rows


def synthetic_rows(cases: tuple[tuple[int, str], ...]) -> list[dict[str, Any]]:
    rows = []
    for num_groups, backend in cases:
        problem = synthetic_problem(num_groups)
        solution = solve_sharding_ilp(problem, backend=backend, time_limit_s=TIME_LIMIT_S)  # type: ignore[arg-type]
        rows.append({
            "suite": "synthetic", "case": f"{num_groups} × 4, {len(problem.edges)} edges",
            "graph_nodes": num_groups, "groups": num_groups,
            "strategy_variables": solution.num_strategy_variables,
            "edge_variables": solution.num_edge_variables, "constraints": solution.num_constraints,
            "backend": backend, "status": solution.status, "gap": solution.gap, "capture_s": None,
            "build_s": None, "solve_s": round(solution.solve_time_s, 3),
            "objective_s": solution.breakdown.objective_s})
    return rows


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    columns = ("suite", "case", "graph_nodes", "groups", "strategy_variables", "edge_variables",
               "constraints", "backend", "status", "gap", "build_s", "solve_s", "objective_s")
    lines = [f"# intra-op ILP scaling ({env['cores']} cores, torch {env['torch']}, commit "
             f"{env['autopar_commit']}, load average {env['load_average']})", "",
             "Wall-clock seconds on a machine shared with other agents: approximate. `solve_s` includes "
             "building the OR-Tools model; `build_s` is the graph → arrays step.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else ("" if row[c] is None else str(row[c]))
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases only")
    args = parser.parse_args()
    layers = GPT_LAYERS[:2] if args.quick else GPT_LAYERS
    cases = SYNTHETIC[:2] if args.quick else SYNTHETIC
    rows = gpt_rows(layers) + synthetic_rows(cases)
    env = {**environment(), "load_average": round(os.getloadavg()[0], 2)}
    _, md_path = write_results("intra_op_scaling", {"environment": env, "rows": rows}, markdown(rows, env))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
