"""A GPU check, prepared and short: the cost model's predictions beside measurements on one GPU.

Run: ``make gpu-check`` (``.venv/bin/python -m benchmarks.gpu_check``). On one CUDA GPU, within a
global deadline (``--deadline-s``, 450 s: under 8 minutes on an H100), no network, nothing
downloaded, it measures, in this order:

1. ``autopar calibrate --quick --nproc 2``, a subprocess stopped at its time budget;
2. single-GPU plans of zoo GPTs through the public path, ``autopar.compile(model, cluster,
   fix=..., passes=...)`` then ``compiled.report(inputs, targets)``: the predicted and measured step
   time, and memory by category (measured from the CUDA allocator's statistics,
   ``autopar/runtime/measure.py``), across batch sizes (one microbatch on one device),
   recomputation modes, fused Triton attention on and off, bf16 and fp32; ``--steps`` plain steps
   after the report give the spread of the step time;
3. autopar's Triton attention kernel against SDPA's flash backend, forward and forward+backward,
   at a few sequence lengths (``benchmarks/kernels/attention.py``'s ``bench_case``).

Each item runs in try/except: its error is recorded and the next one runs. An item that would
start with less than its minimum left before the deadline is skipped and said so; one that runs past
the deadline is interrupted (SIGALRM). ``results/gpu_check.json`` and ``.md`` are rewritten
atomically after every item, so a run cut short keeps what it measured.

Without a GPU it is a dry run: it prints the items with their settings and exits 0, writing
nothing (``--write-dry-run`` records "not measured (no GPU)" in the results). ``--device cpu
--quick`` runs one tiny configuration through the same code on CPU (memory by torch's MemTracker),
writing to ``--out``: the test suite does that. Timings here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

import autopar
from autopar import fmt
from autopar.hardware import DEVICE_ALIASES, DEVICE_CATALOG
from autopar.runtime.measure import MEMORY_CATEGORIES
from benchmarks.common import RESULTS, environment, write_results

NAME = "gpu_check"
COMMAND = "make gpu-check"
DEADLINE_S = 450.0
CALIBRATION_BUDGET_S = 150.0
KERNEL_SEQS = (1024, 2048, 4096)
KERNEL_SHAPE = dict(head_dim=64, causal=True, tokens=16384, hidden=1024)
TINY_GPT = dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=256)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanRun:
    """One single-device plan: a zoo GPT at ``batch`` × ``seq_len`` (one microbatch)."""

    name: str
    model: str
    batch: int
    seq_len: int
    dtype: Literal["fp32", "bf16"]
    recompute: Literal["none", "selective", "full"] = "none"
    fused_attention: bool = False
    overrides: tuple[tuple[str, int], ...] = ()

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, **dict(self.overrides), "batch": self.batch, "seq_len": self.seq_len,
                "dtype": self.dtype, "recompute": self.recompute, "fused_attention": self.fused_attention}


def gpu_runs() -> list[PlanRun]:
    """The plans a GPU check measures: GPT-2 medium (355M) at 1024 tokens, GPT-2 (124M) at 2048."""
    medium = dict(model="gpt2-medium", seq_len=1024)
    small = dict(model="gpt2", seq_len=2048)
    return [PlanRun(name="medium bf16 b4", batch=4, dtype="bf16", **medium),
            PlanRun(name="medium bf16 b8", batch=8, dtype="bf16", **medium),
            PlanRun(name="medium bf16 b8 selective", batch=8, dtype="bf16", recompute="selective", **medium),
            PlanRun(name="medium bf16 b8 full", batch=8, dtype="bf16", recompute="full", **medium),
            PlanRun(name="medium bf16 b8 fused", batch=8, dtype="bf16", fused_attention=True, **medium),
            PlanRun(name="medium fp32 b4", batch=4, dtype="fp32", **medium),
            PlanRun(name="small bf16 b4 s2048", batch=4, dtype="bf16", **small),
            PlanRun(name="small bf16 b4 s2048 fused", batch=4, dtype="bf16", fused_attention=True, **small)]


def quick_runs() -> list[PlanRun]:
    """One tiny configuration (seconds on a CPU) through the same code."""
    return [PlanRun(name="tiny fp32 b2 fused", model="gpt", batch=2, seq_len=64, dtype="fp32",
                    fused_attention=True, overrides=tuple(TINY_GPT.items()))]


def device_cluster(device_name: str) -> str:
    """The one-device cluster of the catalog entry ``device_name`` names, e.g. "NVIDIA H100 80GB
    HBM3" → "1xH100-80GB": the longest catalog name or alias whose parts all occur in it."""
    names = [n for n in (*DEVICE_CATALOG, *DEVICE_ALIASES) if n != "CPU"]
    found = [n for n in names if all(part in device_name.upper() for part in n.upper().split("-"))]
    if not found:
        raise ValueError(f"GPU {device_name!r} matches no device of autopar's catalog ({', '.join(names)}); "
                         "pass --cluster 1xNAME with the nearest one, or a cluster file")
    return f"1x{max(found, key=len)}"


def measure_plan(run: PlanRun, *, device: str, cluster: str, num_steps: int) -> dict[str, Any]:
    """Compile ``run`` for ``cluster`` and report one measured step beside the plan's predictions,
    then time ``num_steps`` plain steps."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    model = autopar.models.build(run.model, device=device, dtype=dtype, seq_len=run.seq_len,
                                 **dict(run.overrides))
    inputs, targets = autopar.models.example_batch(model, run.batch, seed=1)
    passes = [autopar.passes.FusedAttention()] if run.fused_attention else []
    compiled = autopar.compile(model, cluster, passes=passes,
                               fix={"microbatch_size": run.batch, "recompute": run.recompute})
    rep = compiled.report(inputs, targets)
    times_s = []
    for _ in range(num_steps):
        start = time.perf_counter()
        compiled.step(inputs, targets)  # returns the loss as a float: waits for the device
        times_s.append(time.perf_counter() - start)
    rank, plan = rep.ranks[0], rep.plan
    predicted, measured = rank.predicted, rank.measured
    return {"executed": {"microbatch_size": plan.schedule.microbatch_size,
                         "num_microbatches": plan.schedule.num_microbatches,
                         "recompute": plan.stages[0].recompute, "passes": list(compiled.passes_applied),
                         "priced_dtype": plan.predicted.dtype},
            "predicted_step_s": predicted.step_s, "measured_step_s": measured.step_s,
            "step_error_pct": error_pct(predicted.step_s, measured.step_s),
            "plain_steps_s": [round(t, 5) for t in times_s],
            "measured_phases_s": {"forward": sum(rank.step.forward_s), "backward": sum(rank.step.backward_s),
                                  "optimizer": rank.step.optimizer_s},
            "predicted_breakdown_s": plan.predicted.breakdown_dict(),
            "memory_bytes": {name: {"measured": measured.memory_bytes.get(name),
                                    "predicted": predicted.memory_bytes.get(name),
                                    "error_pct": error_pct(predicted.memory_bytes.get(name),
                                                           measured.memory_bytes.get(name))}
                             for name in MEMORY_CATEGORIES}}


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    """(predicted − measured) / measured in %, one decimal; None without both or a zero measurement."""
    if predicted is None or not measured:
        return None
    return round(100 * (predicted - measured) / measured, 1)


def measure_kernels(seq: int) -> dict[str, Any]:
    """autopar's Triton attention and SDPA-flash at ``seq`` (bf16): ms forward and forward+backward."""
    from benchmarks.kernels.attention import bench_case

    shape = {**KERNEL_SHAPE, "dtype": torch.bfloat16}
    rows = {name: bench_case(name, seq=seq, **shape) for name in ("autopar", "sdpa_flash")}
    return {f"{name}_{mode}_ms": rows[name][f"{mode}_ms"] for name in rows for mode in ("fwd", "fwd+bwd")}


def run_command(command: list[str], *, budget_s: float) -> dict[str, Any]:
    """Run ``command`` in its own process group, stopped (the whole group) after ``budget_s``; its
    exit status, seconds and the last lines of its output."""
    start = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as child:
        try:
            output, _ = child.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the group this call started: calibrate's ranks too
            output, _ = child.communicate()
            return {"status": "stopped", "reason": f"still running after its budget of {budget_s:.0f} s",
                    "elapsed_s": round(time.monotonic() - start, 1), "output_tail": output[-1500:]}
        except BaseException:  # the deadline's alarm, Ctrl-C: leave no rank running
            os.killpg(child.pid, signal.SIGKILL)
            raise
    result = {"returncode": child.returncode, "elapsed_s": round(time.monotonic() - start, 1),
              "output_tail": output[-1500:]}
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {child.returncode}: {output[-300:]}")
    return result


def calibrate_command(out: Path) -> list[str]:
    """``autopar calibrate`` as the venv runs it: quick, two ranks, the profile to ``out``."""
    return [str(Path(sys.executable).with_name("autopar")), "calibrate", "--quick", "--nproc", "2",
            "--out", str(out)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Item:
    """One measurement of the check: ``run()`` returns its numbers; it starts only with at least
    ``min_s`` left before the deadline, and gets at most ``budget_s`` (its own limit)."""

    kind: Literal["calibration", "plan", "kernel"]
    name: str
    settings: dict[str, Any]
    run: Callable[[float], dict[str, Any]]  # called with the seconds it may take
    min_s: float
    budget_s: float = float("inf")


class DeadlineExceeded(Exception):
    """The check's global deadline passed while an item ran."""


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`DeadlineExceeded` in this (main) thread after ``seconds``."""
    def expire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded(f"the global deadline passed after {seconds:.0f} s in this item")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_items(items: list[Item], *, deadline_s: float,
              on_record: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Run ``items`` in order within ``deadline_s``; after each, ``on_record(records so far)``."""
    start, records = time.monotonic(), []
    for item in items:
        left = deadline_s - (time.monotonic() - start)
        record: dict[str, Any] = {"kind": item.kind, "name": item.name, "settings": item.settings}
        if left < item.min_s:
            record |= {"status": "skipped", "reason": f"global deadline: {max(left, 0):.0f} s left of "
                       f"{deadline_s:g} s, this item needs at least {item.min_s:g} s"}
        else:
            began = time.monotonic()
            try:
                with alarm(left):
                    record |= {"status": "ok"} | item.run(min(left, item.budget_s))
            except Exception as error:  # noqa: BLE001 - recorded, and the check goes on
                record |= {"status": "error", "error": f"{type(error).__name__}: {error}"[:1000],
                           "traceback_tail": traceback.format_exc()[-1500:]}
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            record["elapsed_s"] = round(time.monotonic() - began, 1)
        print(f"  {item.kind:11s} {item.name:28s} {record['status']:8s} {_summary(record)}", flush=True)
        records.append(record)
        on_record(records)
    return records


def _summary(record: dict[str, Any]) -> str:
    if record["status"] in ("error", "skipped"):
        return record.get("error") or record["reason"]
    if "measured_step_s" in record:
        return (f"predicted {fmt.seconds(record['predicted_step_s'])}, measured "
                f"{fmt.seconds(record['measured_step_s'])} ({_pct(record['step_error_pct'])} %)")
    return f"{record['elapsed_s']} s"


def items_for(args: argparse.Namespace, profile: Path) -> list[Item]:
    """The check's items for the options ``args`` (GPU, or ``--device cpu --quick``)."""
    cuda = args.device == "cuda"
    cluster = args.cluster or "local:1"
    if cuda and not args.cluster:
        known = torch.cuda.is_available()
        cluster = device_cluster(torch.cuda.get_device_name()) if known else "1x<this GPU>"
    items = []
    if not args.quick:
        command = calibrate_command(profile)
        items.append(Item(kind="calibration", name="autopar calibrate", min_s=30.0,
                          budget_s=args.calibration_s,
                          settings={"command": " ".join(["autopar", *command[1:-1], "<temporary file>"]),
                                    "budget_s": args.calibration_s},
                          run=lambda budget_s: run_command(command, budget_s=budget_s)))
    for run in quick_runs() if args.quick else gpu_runs():
        items.append(Item(kind="plan", name=run.name, min_s=5.0 if args.quick else 20.0,
                          settings=run.settings() | {"cluster": cluster, "device": args.device},
                          run=lambda _, run=run: measure_plan(run, device=args.device, cluster=cluster,
                                                              num_steps=args.steps)))
    if cuda:
        for seq in KERNEL_SEQS:
            items.append(Item(kind="kernel", name=f"attention seq {seq}", min_s=15.0,
                              settings={"seq": seq, **KERNEL_SHAPE, "dtype": "bf16",
                                        "implementations": ["autopar (Triton)", "sdpa_flash"]},
                              run=lambda _, seq=seq: measure_kernels(seq)))
    return items


def _bytes(num_bytes: int | None) -> str:
    return "–" if num_bytes is None else fmt.nbytes(num_bytes)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def _plan_lines(plans: list[dict[str, Any]]) -> list[str]:
    lines = ["## Single-device plans: step time", "",
             "Predicted: the executed Plan's `predicted.step_time_s`; measured: `compiled.report`'s "
             "profiled step (error = predicted / measured − 1); plain steps: the median of the steps "
             "timed after it.", "",
             "| run | model | batch × seq | dtype | recompute asked → ran | fused attention | predicted s "
             "| measured s | error % | plain steps median s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in plans:
        s = r["settings"]
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {s['model']} | {s['batch']} × {s['seq_len']} | {s['dtype']} | "
                         f"{s['recompute']} | {s['fused_attention']} | {r['status']}: "
                         f"{r.get('error') or r.get('reason')} | | | |")
            continue
        ran, plain = r["executed"], r["plain_steps_s"]
        predicted = "–" if r["predicted_step_s"] is None else f"{r['predicted_step_s']:.4f}"
        lines.append(f"| {r['name']} | {s['model']} | {s['batch']} × {s['seq_len']} | {s['dtype']} | "
                     f"{s['recompute']} → {ran['recompute']} | {'fused_attention' in ran['passes']} | "
                     f"{predicted} | {r['measured_step_s']:.4f} | {_pct(r['step_error_pct'])} | "
                     + (f"{statistics.median(plain):.4f} |" if plain else "– |"))
    lines += ["", "## Single-device plans: memory by category", "",
              "Measured: the CUDA allocator's statistics over one step (`autopar/runtime/measure.py`, "
              "`measure_cuda_memory_bytes`; torch's MemTracker on CPU); predicted: the Plan's memory "
              "model. Each cell: measured / predicted (error %).", "",
              "| run | " + " | ".join(MEMORY_CATEGORIES) + " |",
              "|---|" + "---|" * len(MEMORY_CATEGORIES)]
    for r in (r for r in plans if r["status"] == "ok"):
        cells = [f"{_bytes(m['measured'])} / {_bytes(m['predicted'])} ({_pct(m['error_pct'])})"
                 for m in (r["memory_bytes"][c] for c in MEMORY_CATEGORIES)]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def _kernel_lines(kernels: list[dict[str, Any]]) -> list[str]:
    shape = KERNEL_SHAPE
    lines = ["## Attention kernels: autopar's Triton FlashAttention-2 vs SDPA flash", "",
             f"bf16, causal, head dim {shape['head_dim']}, hidden {shape['hidden']}, batch × seq = "
             f"{shape['tokens']} tokens; `triton.testing.do_bench` medians in ms "
             "(ratio = autopar / SDPA).", "",
             "| seq | autopar fwd | SDPA fwd | ratio | autopar fwd+bwd | SDPA fwd+bwd | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in kernels:
        if r["status"] != "ok":
            lines.append(f"| {r['settings']['seq']} | {r['status']}: {r.get('error') or r.get('reason')} "
                         "| | | | | |")
            continue
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            ours, sdpa = r[f"autopar_{mode}_ms"], r[f"sdpa_flash_{mode}_ms"]
            ratio = f"{ours / sdpa:.2f}" if ours and sdpa else "–"
            cells += [f"{ours}" if ours else "OOM", f"{sdpa}" if sdpa else "OOM", ratio]
        lines.append(f"| {r['settings']['seq']} | " + " | ".join(cells) + " |")
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The results as Markdown: status, calibration, plans (time, memory), kernels."""
    env, records = payload["environment"], payload["items"]
    lines = [f"# GPU check ({env['device']}, torch {env['torch']}, commit {env['autopar_commit']}, "
             f"{payload['date']})", "", f"Command: `{payload['command']}`. Status: **{payload['status']}**."]
    if not records:
        planned = [f"- {r['kind']} {r['name']}: {json.dumps(r['settings'])}" for r in payload["planned"]]
        return "\n".join([*lines, "", f"No figure here: nothing was measured. On one GPU, `{COMMAND}` "
                          f"measures these items within {payload['deadline_s']:g} s and rewrites this file:",
                          "", *planned]) + "\n"
    ok = sum(r["status"] == "ok" for r in records)
    lines += ["", f"{ok} of {len(payload['planned'])} items measured in {payload['elapsed_s']:.0f} s "
                  f"(deadline {payload['deadline_s']:g} s)."]
    left = [r for r in payload["planned"] if r["name"] not in {x["name"] for x in records}]
    lines += [f"Not reached: {', '.join(r['name'] for r in left)}." if left else ""]
    calibration = [r for r in records if r["kind"] == "calibration"]
    for r in calibration:
        lines += ["", "## Calibration", "", f"`{r['settings']['command']}`: {r['status']}"
                  + (f", {r.get('error') or r.get('reason')}" if r["status"] != "ok" else "")
                  + f" ({r.get('elapsed_s', 0)} s)."]
    plans = [r for r in records if r["kind"] == "plan"]
    kernels = [r for r in records if r["kind"] == "kernel"]
    return "\n".join([*lines, "", *(_plan_lines(plans) if plans else []), "",
                      *(_kernel_lines(kernels) if kernels else [])]).rstrip("\n") + "\n"


def _environment(device: str) -> dict[str, Any]:
    env = environment(mark_uncommitted=True)
    if device == "cuda" and torch.cuda.is_available():
        env |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                "capability": list(torch.cuda.get_device_capability())}
    else:
        env["device"] = "no GPU" if device == "cuda" else "CPU"
    return env


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="one tiny configuration (for --device cpu)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be measured and exit")
    parser.add_argument("--write-dry-run", action="store_true",
                        help="without a GPU: also record 'not measured (no GPU)' in the results")
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="global deadline, seconds")
    parser.add_argument("--calibration-s", type=float, default=CALIBRATION_BUDGET_S,
                        help="the calibration's own budget, seconds")
    parser.add_argument("--steps", type=int, default=3, help="plain steps timed after each report")
    parser.add_argument("--cluster", default="", help="the one-device cluster to price on (default: this "
                        "GPU's catalog entry, or local:1 on CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of gpu_check.json and .md")
    args = parser.parse_args(argv)
    if args.deadline_s < 0 or args.calibration_s <= 0 or args.steps < 0:
        raise ValueError(f"--deadline-s {args.deadline_s:g}, --calibration-s {args.calibration_s:g} and "
                         f"--steps {args.steps} must be >= 0, > 0 and >= 0")
    return args


def dry_run(args: argparse.Namespace, items: list[Item], payload: dict[str, Any]) -> None:
    """Print the items with their settings; with ``--write-dry-run`` record "not measured"."""
    why = "--dry-run" if args.dry_run else "no GPU"
    payload["status"] = f"not measured ({why})"
    print(f"gpu check: dry run ({why}): nothing measured. On a GPU, `{COMMAND}` measures, within "
          f"{args.deadline_s:g} s:")
    for item in items:
        print(f"  {item.kind:11s} {item.name:28s} {json.dumps(item.settings)}")
    if args.write_dry_run:
        write(payload, args.out)


def measure(args: argparse.Namespace, items: list[Item], payload: dict[str, Any]) -> None:
    """Run the items, rewriting the results after each."""
    start = time.monotonic()

    def record(records: list[dict[str, Any]]) -> None:
        ok = sum(r["status"] == "ok" for r in records)
        status = (f"{len(records)} of {len(items)} items run" if len(records) < len(items)
                  else "measured" if ok == len(items) else f"measured {ok} of {len(items)} items (see below)")
        payload.update(items=records, elapsed_s=round(time.monotonic() - start, 1), status=status)
        write(payload, args.out)

    print(f"gpu check on {payload['environment']['device']}: {len(items)} items, deadline "
          f"{args.deadline_s:g} s", flush=True)
    run_items(items, deadline_s=args.deadline_s, on_record=record)
    print(markdown(payload))


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    given = sys.argv[1:] if argv is None else argv
    command = f"python -m benchmarks.gpu_check {' '.join(given)}" if given else COMMAND
    with tempfile.TemporaryDirectory() as folder:  # the calibration's profile: this check's only
        items = items_for(args, Path(folder) / "profile.json")
        payload = {"command": command, "date": datetime.date.today().isoformat(),
                   "deadline_s": args.deadline_s, "environment": _environment(args.device), "items": [],
                   "planned": [{"kind": i.kind, "name": i.name, "settings": i.settings} for i in items]}
        if args.dry_run or (args.device == "cuda" and not torch.cuda.is_available()):
            dry_run(args, items, payload)
        else:
            measure(args, items, payload)
    return 0


def write(payload: dict[str, Any], out: Path) -> None:
    """``out/gpu_check.json`` and ``.md``, each replaced atomically."""
    # write_results joins RESULTS / stem: an absolute stem stands in place of RESULTS
    stem = NAME if out.resolve() == RESULTS.resolve() else str(out.resolve() / NAME)
    write_results(stem, payload, markdown(payload))


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as error:
        print(f"gpu check: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
