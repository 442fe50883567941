"""Cost model vs measurement on this CPU: predicted and measured step time of runtime plans.

Run: ``.venv/bin/python -m benchmarks.cost_model_cpu`` (writes
``benchmarks/results/cost_model_cpu.json`` and ``.md``). It first runs ``autopar calibrate``
(``--profile PATH`` reuses a profile instead), then for every case on 2 and 4 local gloo ranks:

* **measured**: ``autopar.compile(gpt, "local:N", fix=...).step`` inside ``spawn``, one thread per
  rank; the median over ``--steps`` steps after ``--warmup``, each step timed on its slowest rank;
* **predicted**: ``cost_models.estimate(plan, ModelProfile.from_captured(...))`` for the very Plan
  the runtime executed, with ``CostOptions(local_profile=profile)``: the local-cluster model
  (``cost_models/local/step.py``) priced from the calibration's single-operation measurements.
  Nothing is fitted to the step times measured here.

Other users share this machine, so each case is timed in ``--rounds`` rounds, each after waiting
for other processes to leave the cores quiet (``/proc`` CPU accounting); the best round is kept
and the cores others used during it are recorded. ``--measured RESULTS.json`` re-predicts saved
measurements (the results embed the executed Plans) without running them; ``--predict-only`` does
so for the committed results and prints the table (``--write`` also rewrites the results).

The model is a zoo GPT (8 layers, hidden 256, 8 heads, vocabulary 4096, sequence 128), global
batch 16, AdamW. Reported per case: predicted s, measured s, error %; overall the median |error|
and the Spearman rank correlation of predicted vs measured. Timings here, never in tests.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import autopar
from autopar.calibration.ops import cpu_seconds, others_busy_cores
from autopar.capture import capture
from autopar.cost_models import CostOptions, ModelProfile, estimate
from autopar.cost_models.local.profile import LocalProfile, load_profile
from autopar.plans import Plan, Predicted
from autopar.runtime import spawn
from benchmarks.common import RESULTS, dp_and_pp_cases, slowest_rank_times_s, with_recompute
from benchmarks.common import environment as common_environment

MODEL = dict(num_layers=8, hidden_size=256, num_heads=8, vocab_size=4096, seq_len=128)
GLOBAL_BATCH = 16
NUM_MICROBATCHES = 4
TARGET_MEDIAN_ERROR_PCT = 15.0


def plan_cases(world: int) -> list[tuple[str, dict[str, Any]]]:
    """(case name, fix) on ``world`` ranks: data, pipeline and tensor parallelism and their mixes."""
    dp, zero3, gpipe, one_f1b, interleaved = dp_and_pp_cases(
        world, schedules=("gpipe", "1f1b", "interleaved"), num_microbatches=NUM_MICROBATCHES)
    cases = [dp, zero3, with_recompute(dp, "full"), gpipe, one_f1b, interleaved,
             with_recompute(one_f1b, "full")]
    if world == 2:
        return [*cases, ("tp", {"tp": 2})]
    half, micro = world // 2, {"schedule": "1f1b", "num_microbatches": NUM_MICROBATCHES}
    return [*cases, ("pp×dp 1f1b", {"pp": 2, "dp": half, **micro}), ("tp×dp", {"tp": 2, "dp": half}),
            ("tp×pp 1f1b", {"tp": 2, "pp": half, **micro})]


def _build() -> torch.nn.Module:
    torch.manual_seed(0)
    return autopar.models.build("gpt", **MODEL)


def wait_until_quiet(pids: list[int], max_busy_cores: float, timeout_s: float) -> float:
    """Poll 1-s windows until other processes keep fewer than ``max_busy_cores`` busy."""
    deadline = time.monotonic() + timeout_s
    while True:
        since = cpu_seconds(pids)
        time.sleep(1.0)
        busy = others_busy_cores(since, pids) or 0.0
        if busy < max_busy_cores or time.monotonic() > deadline:
            return busy


def _bench_case(world: int, name: str, fix: dict[str, Any], options: dict[str, Any], pids: list[int]
                ) -> dict[str, Any]:
    model = _build()
    inputs, targets = autopar.models.example_batch(model, GLOBAL_BATCH, seed=1)
    compiled = autopar.compile(model, f"local:{world}", fix=fix)
    slowest_rank_times_s(lambda: compiled.step(inputs, targets), options["warmup"])
    quiet = torch.zeros(1, dtype=torch.float64)
    if dist.get_rank() == 0:  # the other ranks wait, idle, in the broadcast
        quiet[0] = wait_until_quiet(pids, options["quiet_cores"], options["quiet_timeout_s"])
    dist.broadcast(quiet, src=0)
    since = cpu_seconds(pids) if dist.get_rank() == 0 else None
    times = slowest_rank_times_s(lambda: compiled.step(inputs, targets), options["steps"])
    during = others_busy_cores(since, pids) or 0.0
    return {"world_size": world, "case": name, "fix": fix, "times_s": times,
            "others_busy_cores_before": round(float(quiet[0]), 2),
            "others_busy_cores_during": round(during, 2),
            "plan": compiled.plan.to_json()}


def bench_rank(rank: int, world: int, out: str, options: dict[str, Any]) -> None:
    """One rank: ``rounds`` passes over the cases of ``world`` ranks (alternating order), each
    timed once other users leave the cores quiet; per case the round with the lowest median is
    kept. Rank 0 writes times and executed Plans as JSON."""
    cases = [(name, fix) for name, fix in plan_cases(world) if options["only"] in name]
    pids: list[int] = [0] * world
    dist.all_gather_object(pids, os.getpid())
    kept: dict[str, dict[str, Any]] = {}
    medians: dict[str, list[float]] = {name: [] for name, _ in cases}
    for round_index in range(options["rounds"]):
        for name, fix in cases if round_index % 2 == 0 else cases[::-1]:
            row = _bench_case(world, name, fix, options, pids)
            median = statistics.median(row["times_s"])
            medians[name].append(round(median, 4))
            if name not in kept or median < statistics.median(kept[name]["times_s"]):
                kept[name] = row
            if rank == 0:
                print(f"  {world} ranks  round {round_index}  {name:22s} {median:.3f} s  other load "
                      f"{row['others_busy_cores_before']:.2f} → {row['others_busy_cores_during']:.2f} cores",
                      flush=True)
            gc.collect()
            dist.barrier()
    if rank == 0:
        rows = [kept[name] | {"round_medians_s": medians[name]} for name, _ in cases]
        Path(out).write_text(json.dumps(rows))


@functools.cache
def model_profile(microbatch_size: int) -> ModelProfile:
    """The cost model's view of the benchmark GPT, captured at the plan's microbatch (its
    parameters' dtype, fp32)."""
    model = _build()
    inputs, _ = autopar.models.example_batch(model, microbatch_size, seed=1)
    return ModelProfile.from_captured(capture(model, (inputs,)), batch_size=microbatch_size)


def predict(plan: Plan, profile: LocalProfile) -> Predicted:
    """``estimate`` for ``plan`` on its local cluster, priced from ``profile``."""
    return estimate(plan, model_profile(plan.schedule.microbatch_size),
                    options=CostOptions(local_profile=profile))


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else 0.0


def result_row(raw: dict[str, Any], profile: LocalProfile) -> dict[str, Any]:
    plan = Plan.from_json(raw["plan"])
    predicted = predict(plan, profile)
    measured = statistics.median(raw["times_s"])
    par, sched = plan.parallelism, plan.schedule
    return {
        "world_size": raw["world_size"], "case": raw["case"], "dp": par.dp, "tp": par.tp, "pp": par.pp,
        "schedule": sched.name, "num_microbatches": sched.num_microbatches,
        "microbatch_size": sched.microbatch_size, "zero": plan.zero,
        "recompute": plan.stages[0].recompute, "predicted_s": round(predicted.step_time_s, 4),
        "measured_s": round(measured, 4), "measured_min_s": round(min(raw["times_s"]), 4),
        "measured_max_s": round(max(raw["times_s"]), 4),
        "error_pct": round(100 * (predicted.step_time_s / measured - 1), 1),
        "predicted_breakdown_s": {k: round(v, 4) for k, v in dict(predicted.breakdown).items()},
        "num_steps": len(raw["times_s"]), "round_medians_s": raw["round_medians_s"],
        "others_busy_cores_before": raw["others_busy_cores_before"],
        "others_busy_cores_during": raw["others_busy_cores_during"], "fix": raw["fix"],
        "times_s": [round(t, 4) for t in raw["times_s"]], "plan": json.loads(raw["plan"]),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and mean |error|, the rank correlation of predicted vs measured, and whether the
    plan measured fastest is predicted fastest."""
    errors = [abs(r["error_pct"]) for r in rows]
    fastest = min(rows, key=lambda r: r["measured_s"])
    predicted_fastest = min(rows, key=lambda r: r["predicted_s"])
    return {"num_cases": len(rows), "median_abs_error_pct": round(statistics.median(errors), 1),
            "mean_abs_error_pct": round(statistics.fmean(errors), 1),
            "max_abs_error_pct": round(max(errors), 1),
            "spearman_rank_correlation": round(spearman([r["predicted_s"] for r in rows],
                                                        [r["measured_s"] for r in rows]), 3),
            "measured_fastest": f"{fastest['world_size']} ranks {fastest['case']}",
            "predicted_fastest": f"{predicted_fastest['world_size']} ranks {predicted_fastest['case']}",
            "target_median_abs_error_pct": TARGET_MEDIAN_ERROR_PCT}


def environment(profile: LocalProfile, profile_path: str) -> dict[str, Any]:
    return common_environment() | {
            "threads_per_rank": 1, "model": MODEL, "global_batch": GLOBAL_BATCH, "profile_path": profile_path,
            "profile_created": profile.created, "profile_quick": profile.quick,
            "profile": profile.to_dict()}  # all of it: `--measured` re-predicts from this file alone


def _markdown(rows: list[dict[str, Any]], env: dict[str, Any], stats: dict[str, Any]) -> str:
    predicted_at = env.get("predicted_at_commit", env["autopar_commit"])
    lines = [
        f"# cost model vs measured step time on CPU ({env['cores']} cores, torch {env['torch']}, "
        f"measured at commit {env['autopar_commit']}, predicted at {predicted_at})", "",
        f"Command: `.venv/bin/python -m benchmarks.cost_model_cpu`. GPT {env['model']}, global batch "
        f"{env['global_batch']}, AdamW, gloo, one thread per rank. Measured = median over "
        f"{env['num_steps']} steps (after {env['warmup_steps']} warm-up) of the slowest rank. Predicted = "
        "`estimate(plan, ModelProfile.from_captured(...), options=CostOptions(local_profile=profile))` "
        "for the executed Plan: the local-cluster model (`cost_models/local/step.py`) priced from the "
        f"single-operation measurements of `autopar calibrate` (profile of {env['profile_created']}, "
        f"{env['profile_note']}); nothing is fitted to these step times.", "",
        f"Other users share this machine: each case is timed in {env['rounds']} rounds, each after "
        f"waiting (≤ {env['quiet_timeout_s']:g} s) for other processes to use < {env['quiet_cores']} cores; "
        "the round with the lowest median is kept. `others` = cores other processes used during it.", "",
        f"**Median |error| {stats['median_abs_error_pct']} %** (target ≤ {TARGET_MEDIAN_ERROR_PCT:g} %), "
        f"mean {stats['mean_abs_error_pct']} %, max {stats['max_abs_error_pct']} %, **Spearman rank "
        f"correlation {stats['spearman_rank_correlation']}** over {stats['num_cases']} plans. Fastest "
        f"measured: {stats['measured_fastest']}; fastest predicted: {stats['predicted_fastest']}.", "",
        "| ranks | case | dp×tp×pp | schedule | microbatches × size | zero | recompute | predicted s "
        "| measured s | error % | largest predicted parts (s) | others |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = sorted(r["predicted_breakdown_s"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {r['world_size']} | {r['case']} | {r['dp']}×{r['tp']}×{r['pp']} | {r['schedule']} | "
                     f"{r['num_microbatches']} × {r['microbatch_size']} | {r['zero']} | {r['recompute']} | "
                     f"{r['predicted_s']:.3f} | {r['measured_s']:.3f} | {r['error_pct']:+.1f} | "
                     f"{', '.join(f'{k} {v:.3f}' for k, v in parts)} | {r['others_busy_cores_during']:.2f} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    stats = summary(rows)
    payload = {"environment": env, "summary": stats, "rows": rows}
    (RESULTS / "cost_model_cpu.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "cost_model_cpu.md").write_text(_markdown(rows, env, stats))


def _profile(args: argparse.Namespace, previous: dict[str, Any] | None) -> tuple[LocalProfile, str]:
    """The profile to predict with: ``--profile``, else the one the ``--measured`` results embed
    (if this autopar still reads its version), else the default profile, else a fresh calibration."""
    if args.profile:
        profile = load_profile(args.profile)
        assert profile is not None
        return profile, args.profile
    if previous is not None:
        env = previous["environment"]
        try:
            return LocalProfile.from_dict(env["profile"]), env["profile_path"]
        except ValueError as error:
            print(f"the results' profile is not usable ({error}); using the default profile")
        default = load_profile()
        if default is not None:
            return default, "default profile"
    from autopar.calibration import calibrate, other_load_warning

    profile, path = calibrate(out=os.path.join(tempfile.gettempdir(), "autopar-bench-profile.json"),
                              nproc=max(args.worlds), quick=args.quick_calibration)
    warning = other_load_warning(profile)
    if warning:
        print(f"warning: {warning}")
    return profile, str(path)


def _note(profile: LocalProfile) -> str:
    others = profile.measurements.get("environment", {}).get("others_busy_cores", {})
    load = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in others.items() if v is not None)
    return f"cores other processes kept busy while calibrating: {load or 'unknown'}"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the cases; the best is kept")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="before timing, wait until other processes use fewer cores than this")
    parser.add_argument("--quiet-timeout", type=float, default=60.0, help="longest such wait, seconds")
    parser.add_argument("--profile", default="", help="use this calibration profile instead of calibrating")
    parser.add_argument("--quick-calibration", action="store_true")
    parser.add_argument("--only", default="", help="run only cases whose name contains this (no write)")
    parser.add_argument("--measured", default="",
                        help="re-predict the step times measured in this results JSON instead of measuring")
    parser.add_argument("--predict-only", action="store_true",
                        help="re-predict the committed results' measurements and print them (no write)")
    parser.add_argument("--write", action="store_true", help="with --predict-only: rewrite the results")
    parser.add_argument("--note", default="", help="provenance to record with the results (e.g. how the "
                        "profile was made)")
    args = parser.parse_args()
    if args.predict_only and not args.measured:
        args.measured = str(RESULTS / "cost_model_cpu.json")
    return args


def main() -> None:
    args = _arguments()
    from benchmarks import cost_model_cpu  # spawned ranks import the body by its module name

    options = {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "only": args.only,
               "quiet_cores": args.quiet_cores, "quiet_timeout_s": args.quiet_timeout}
    previous = json.loads(Path(args.measured).read_text()) if args.measured else None
    if previous is None:
        wait_until_quiet([], args.quiet_cores, 10 * args.quiet_timeout)
    profile, profile_path = _profile(args, previous)
    env = environment(profile, profile_path) | {
        "num_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
        "quiet_cores": args.quiet_cores, "quiet_timeout_s": args.quiet_timeout,
        "profile_note": _note(profile) + (f"; {args.note}" if args.note else "")}
    raw: list[dict[str, Any]] = []
    if previous is not None:  # the cost model or the profile changed: predict the same measurements again
        raw = [row | {"plan": json.dumps(row["plan"])} for row in previous["rows"]
               if args.only in row["case"]]
        env["predicted_at_commit"] = env["autopar_commit"]
        env |= {k: previous["environment"][k] for k in ("num_steps", "warmup_steps", "rounds", "quiet_cores",
                                                         "quiet_timeout_s", "autopar_commit")}
    for world in [] if previous is not None else args.worlds:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "rows.json")
            spawn(cost_model_cpu.bench_rank, world, out, options, timeout_s=600)
            raw += json.loads(Path(out).read_text())
    rows = [result_row(r, profile) for r in raw]
    if args.only or (args.predict_only and not args.write):
        print(_markdown(rows, env, summary(rows)))
        return
    write(rows, env)
    print((RESULTS / "cost_model_cpu.md").read_text())


if __name__ == "__main__":
    main()
