"""The ``runtime-cpu`` suite's comparison: autopar's plan against common hand-written choices.

Data flow: ``cases`` (kind ``hand``) → :func:`compare_hand_plans` (world size) → the planner's
plan and the hand choices on ``benchmarks/planner_local.py``'s GPT and batch: pure data
parallelism, a pipeline with an equal layer split (1F1B, 4 microbatches) and Megatron-LM's
"tensor parallelism inside, pipeline across" (tp 2, pp the rest, equal split). Hand plans are
built by ``autopar.plans.pinned.plan_from_fix`` (its documented defaults: equal split, no
recomputation, ZeRO 0) with Megatron's shardings, predicted by the same cost model, and all of
them measured the same way (``planner_local._rank`` in spawned gloo processes). One rank runs
the model in-process (``autopar.compile(model, "local:1")``): no plan to choose.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import autopar
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models.estimate import estimate_plan
from autopar.lower import profile_of, with_fingerprint
from autopar.plan_api import plan_search
from autopar.plans import Plan, graph_fingerprint
from autopar.plans.megatron import megatron_shardings
from autopar.plans.pinned import plan_from_fix
from autopar.runtime.launch import spawn
from benchmarks.planner_local import GLOBAL_BATCH, _describe, _model, _rank


def _hand_fixes(world: int) -> dict[str, dict[str, Any]]:
    fixes = {"pure data parallel": {"dp": world}}
    if world > 1:
        fixes["pipeline, equal split"] = {"pp": world, "schedule": "1f1b", "num_microbatches": 4}
        pp = world // 2
        fixes["Megatron: tp inside, pp across"] = {"tp": 2, "pp": pp, "dp": 1, "num_microbatches": 4,
                                                   **({"schedule": "1f1b"} if pp > 1 else {})}
    return fixes


def hand_plan(fix: dict[str, Any], world: int) -> Plan:
    """``fix`` as a pinned Plan with Megatron's shardings, predicted and fingerprinted."""
    model, inputs, _ = _model()
    pins = Fix.from_dict(fix)
    cluster = ClusterSpec.parse(f"local:{world}")
    captured = autopar.capture(model, inputs)
    tp, pp = pins.tp or 1, pins.pp or 1
    plan = plan_from_fix(captured.model_name, graph_fingerprint=graph_fingerprint(captured.graph_module),
                         num_layers=len(captured.layers), cluster=cluster, fix=pins,
                         global_batch_size=GLOBAL_BATCH, seq_len=inputs.shape[1],
                         shardings=megatron_shardings(captured.graph_module, tp, vocab_parallel=pp == 1))
    return with_fingerprint(estimate_plan(plan, profile_of(captured, cluster)), model, inputs)


def _single_process(options: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, inputs, targets = _model()
    compiled = autopar.compile(model, "local:1")
    times = []
    for index in range(options["warmup"] + options["rounds"] * options["steps"]):
        start = time.perf_counter()
        compiled.step(inputs, targets)
        if index >= options["warmup"]:
            times.append(time.perf_counter() - start)
    plan = Plan.single_device("gpt", graph_fingerprint="single", cluster=ClusterSpec.parse("local:1"),
                              global_batch_size=GLOBAL_BATCH, seq_len=inputs.shape[1],
                              num_layers=len(compiled.captured.layers))
    predicted = estimate_plan(plan, profile_of(compiled.captured)).predicted.step_time_s
    return {"world_size": 1, "choice": "single process", "plan": _describe(plan),
            "predicted_s": round(predicted, 4), "measured_s": round(statistics.median(times), 4)}


def compare_hand_plans(world: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (choice, plan, predicted, measured) for autopar's plan and each hand choice."""
    if world == 1:
        return [_single_process(options)]
    model, inputs, _ = _model()
    chosen = plan_search(model, inputs, cluster=f"local:{world}", global_batch_size=GLOBAL_BATCH).plan
    plans = {"autopar": with_fingerprint(chosen, model, inputs)}
    plans |= {name: hand_plan(fix, world) for name, fix in _hand_fixes(world).items()}
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "times.json")
        spawn(_rank, world, [p.to_json() for p in plans.values()], out, options, timeout_s=1800)
        measured = json.loads(Path(out).read_text())
    return [{"world_size": world, "choice": name, "plan": _describe(plan),
             "predicted_s": round(plan.predicted.step_time_s, 4), "measured_s": round(m, 4)}
            for (name, plan), m in zip(plans.items(), measured, strict=True)]
