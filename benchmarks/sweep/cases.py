"""Named benchmark suites: each a tuple of :class:`Case` built from the existing benchmark scripts.

Data flow: :func:`suite` names → cases (plain, JSON-able params) → ``driver.run_suite`` calls
:func:`run_case`, which dispatches on ``case.kind`` to one function of ``benchmarks/*.py`` and
returns one flat row. Only the cheap, analytic kinds run in ``smoke`` (no process spawning).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DEPTHS = (12, 24, 48, 96, 128)
NODES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WORLD_SIZES = (2, 4)
DEPTH_MODEL = dict(hidden_size=4096, num_heads=32, seq_len=2048, vocab_size=51200)


@dataclass(frozen=True, kw_only=True)
class Case:
    """One row of a suite: ``kind`` picks the runner, ``params`` are its JSON-able arguments;
    a case with ``skip_reason`` is recorded as skipped instead of run."""

    suite: str
    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None


def _no_gpu() -> str | None:
    return None if torch.cuda.is_available() else "no GPU: torch.cuda.is_available() is False"


def _planner_depth(suite: str, layers: int, nodes: int, batch: int) -> Case:
    return Case(suite=suite, name=f"depth-{layers}l-{nodes * 8}gpu", kind="planner",
                params={"axis": "depth", "model": "gpt", "num_layers": layers, "nodes": nodes,
                        "global_batch": batch})


def _planner_gpus(suite: str, nodes: int) -> Case:
    return Case(suite=suite, name=f"gpus-gpt3-175b-{nodes * 8}gpu", kind="planner",
                params={"axis": "gpus", "model": "gpt3-175b", "nodes": nodes, "global_batch": 1536})


def _quality(suite: str, model: str) -> Case:
    return Case(suite=suite, name=f"quality-{model}", kind="plan-quality", params={"model": model})


def _kernel(suite: str, seq: int, head_dim: int, causal: bool, impl: str) -> Case:
    return Case(suite=suite, name=f"attention-{impl}-d{head_dim}-s{seq}-{'causal' if causal else 'full'}",
                kind="kernel", params={"implementation": impl, "seq": seq, "head_dim": head_dim,
                                       "causal": causal}, skip_reason=_no_gpu())


def _planner_scaling() -> tuple[Case, ...]:
    return (tuple(_planner_depth("planner-scaling", d, 32, 512) for d in DEPTHS)
            + tuple(_planner_gpus("planner-scaling", n) for n in NODES))


def _plan_quality() -> tuple[Case, ...]:
    from benchmarks.published.megatron import WEAK_SCALING
    return tuple(_quality("plan-quality", row.model) for row in WEAK_SCALING)


def _runtime_cpu() -> tuple[Case, ...]:
    timing = {"rounds": 2, "warmup": 2, "steps": 6}
    return (tuple(Case(suite="runtime-cpu", name=f"local-{w}", kind="runtime",
                       params={"world_size": w, **timing}) for w in WORLD_SIZES)
            + tuple(Case(suite="runtime-cpu", name=f"hand-local-{w}", kind="hand",
                         params={"world_size": w, **timing}) for w in (1, *WORLD_SIZES)))


KEEP_RATIOS = (0.75, 0.5, 0.25)


MOE_CASES = ((4, 2), (8, 1), (8, 2), (16, 2))  # (experts, top-k)


def _passes() -> tuple[Case, ...]:
    """Random-LTD keep ratios against step time and FLOPs (benchmarks/random_ltd.py's model), and
    MoE expert counts and top-k against the dense model (benchmarks/moe.py's model)."""
    ltd = tuple(Case(suite="passes", name=f"random-ltd-keep-{r}", kind="random-ltd",
                     params={"keep_ratio": r, "warmup": 2, "rounds": 3, "steps": 3}) for r in KEEP_RATIOS)
    moe = tuple(Case(suite="passes", name=f"moe-{e}-experts-top{k}", kind="moe",
                     params={"num_experts": e, "top_k": k, "warmup": 2, "rounds": 3, "steps": 2})
                for e, k in MOE_CASES)
    return ltd + moe


def _kernels() -> tuple[Case, ...]:
    from benchmarks.kernels.attention import IMPLEMENTATIONS
    return tuple(_kernel("kernels", seq, d, causal, impl) for d in (64, 128) for causal in (False, True)
                 for seq in (512, 1024, 2048, 4096, 8192, 16384) for impl in IMPLEMENTATIONS)


def _smoke() -> tuple[Case, ...]:
    return (_planner_depth("smoke", 12, 1, 64), _quality("smoke", "megatron-1.7b"),
            Case(suite="smoke", name="plan-gpt-tiny-local-2", kind="plan-local",
                 params={"model": "gpt-tiny", "world_size": 2, "global_batch": 8}),
            Case(suite="smoke", name="random-ltd-keep-0.5", kind="random-ltd",
                 params={"keep_ratio": 0.5, "warmup": 1, "rounds": 1, "steps": 1}),
            _kernel("smoke", 512, 64, True, "autopar"))


SUITES: dict[str, Callable[[], tuple[Case, ...]]] = {
    "planner-scaling": _planner_scaling, "plan-quality": _plan_quality, "runtime-cpu": _runtime_cpu,
    "kernels": _kernels, "passes": _passes, "smoke": _smoke,
}


def suite(name: str) -> tuple[Case, ...]:
    """The cases of suite ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[name]()


def _run_planner(p: dict[str, Any]) -> dict[str, Any]:
    from autopar.cost_models import ModelProfile
    from autopar.models import get_config
    from benchmarks.planner_speed import analytic
    if p["model"] == "gpt":
        config = get_config("gpt", num_layers=p["num_layers"], **DEPTH_MODEL)
        profile = ModelProfile.gpt(config, name=f"gpt-{p['num_layers']}l")
    else:
        profile = ModelProfile.gpt(get_config(p["model"]), name=p["model"])
    return analytic(profile, p["nodes"], p["global_batch"])


def _run_quality(p: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.plan_quality import compare
    from benchmarks.published.megatron import WEAK_SCALING
    return compare(next(row for row in WEAK_SCALING if row.model == p["model"]))


def _run_plan_local(p: dict[str, Any]) -> dict[str, Any]:
    import autopar
    from autopar.plan_api import plan_search
    model = autopar.models.build(p["model"])
    inputs, _ = autopar.models.example_batch(model, p["global_batch"], seed=1)
    start = time.perf_counter()
    plan = plan_search(model, inputs, cluster=f"local:{p['world_size']}",
                       global_batch_size=p["global_batch"]).plan
    par = plan.parallelism
    search_s = round(time.perf_counter() - start, 3)
    return {"model": p["model"], "world_size": p["world_size"], "search_s": search_s,
            "plan": f"dp{par.dp} tp{par.tp} pp{par.pp} {plan.schedule.name}",
            "step_s": round(plan.predicted.step_time_s, 6)}


def _run_runtime(p: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.planner_local import run_world
    rows, skipped = run_world(p["world_size"], {k: p[k] for k in ("rounds", "warmup", "steps")})
    chosen = next(r for r in rows if r["chosen"])
    fastest = min(rows, key=lambda r: r["measured_s"])
    return {"world_size": p["world_size"], "plan": chosen["plan"], "predicted_step_s": chosen["predicted_s"],
            "measured_step_s": chosen["measured_s"], "fastest_plan": fastest["plan"],
            "fastest_step_s": fastest["measured_s"], "vs_fastest_pct": chosen["measured_vs_fastest_pct"],
            "candidates": rows, "not_planned": skipped}


def _run_random_ltd(p: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.random_ltd import bench_step_time
    row = bench_step_time(p["warmup"], p["rounds"], p["steps"], keep_ratio=p["keep_ratio"])
    keys = ("kept_ratio", "baseline_step_s", "random_ltd_step_s", "measured_saving",
            "predicted_saving_estimate", "predicted_saving_flops", "flops_per_step_baseline",
            "flops_per_step_random_ltd")
    return {key: row[key] for key in keys}


def _run_moe(p: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.moe import moe_vs_dense

    return moe_vs_dense(num_experts=p["num_experts"], top_k=p["top_k"], warmup=p["warmup"],
                        rounds=p["rounds"], steps=p["steps"])


def _run_hand(p: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.sweep.hand_plans import compare_hand_plans
    rows = compare_hand_plans(p["world_size"], {k: p[k] for k in ("rounds", "warmup", "steps")})
    mine = rows[0]
    hands = rows[1:]
    best = min(hands, key=lambda r: r["measured_s"]) if hands else None
    return {"world_size": p["world_size"], "plan": mine["plan"], "predicted_step_s": mine["predicted_s"],
            "measured_step_s": mine["measured_s"], "best_hand_choice": best["choice"] if best else None,
            "best_hand_step_s": best["measured_s"] if best else None,
            "vs_best_hand_pct": (round(100 * (mine["measured_s"] / best["measured_s"] - 1), 1)
                                 if best else None),
            "choices": rows}


def _run_kernel(p: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.kernels.attention import bench_case
    return bench_case(p["implementation"], seq=p["seq"], head_dim=p["head_dim"], causal=p["causal"],
                      tokens=16384, hidden=2048, dtype=torch.bfloat16)


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "planner": _run_planner, "plan-quality": _run_quality, "plan-local": _run_plan_local,
    "runtime": _run_runtime, "kernel": _run_kernel, "random-ltd": _run_random_ltd, "moe": _run_moe,
    "hand": _run_hand,
}


def run_case(case: Case) -> dict[str, Any]:
    """Run one case and return its result row (the runner's fields, units in their names)."""
    return RUNNERS[case.kind](case.params)
