"""Run one named suite: resumable, one row per case, CSV + JSONL + Markdown + plots.

Data flow: ``cases.suite(name)`` → for each case not already done in ``<out>/<suite>.jsonl``,
``cases.run_case`` (timed; an exception becomes a row with ``status="error"``) → after every
case the files ``<out>/<suite>.{jsonl,csv,md}`` are rewritten atomically in case order, so an
interrupted sweep resumes where it stopped → the suite's plots (PNG and SVG) at the end.
Rows with ``status="ok"`` count as done; skipped and failed cases are tried again on a rerun.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from benchmarks.common import RESULTS, _atomic_write, environment
from benchmarks.sweep import plots
from benchmarks.sweep.cases import Case, run_case, suite

DEFAULT_OUT = RESULTS / "sweeps"
LEAD = ("case", "status", "elapsed_s")


@dataclass(frozen=True, kw_only=True)
class SweepSummary:
    """What one invocation did: cases run now, found done already, skipped; files written."""

    suite: str
    ran: int
    resumed: int
    skipped: int
    failed: int
    files: tuple[Path, ...]


def sweep_environment() -> dict[str, Any]:
    """``benchmarks.common.environment`` plus the Triton version and the device name."""
    env = environment()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                     else f"cpu ({platform.processor() or platform.machine()})")
    return env


def load_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an existing JSONL file by case name (empty when the file does not exist)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["case"]: row for row in rows}


def _scalar(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    keys = dict.fromkeys(LEAD)
    for row in rows:
        keys.update(dict.fromkeys(k for k in row if k not in ("environment", "params", "suite")))
    return list(keys)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _scalar(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def to_markdown(name: str, rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    keys = [k for k in _columns(rows) if all(isinstance(r.get(k), (str, int, float, bool, type(None)))
                                               for r in rows)]
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|")  # noqa: E731
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    return "\n\n".join([
        f"# Sweep `{name}`",
        f"Regenerate: `python -m benchmarks.run --suite {name}` (resumable: delete the files to rerun all). "
        f"Cases: {len(rows)} ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} failed).",
        f"Environment of this invocation: {env}. Each JSONL row keeps the environment it ran in.",
        "\n".join(table),
    ]) + "\n"


def _execute(case: Case, env: dict[str, Any]) -> dict[str, Any]:
    head = {"case": case.name, "suite": case.suite, "params": case.params, "environment": env}
    if case.skip_reason is not None:
        return {**head, "status": "skipped", "elapsed_s": 0.0, "reason": case.skip_reason}
    start = time.perf_counter()
    try:
        result = run_case(case)
        status: dict[str, Any] = {"status": "ok"}
    except Exception as error:  # a failing case is recorded, the sweep goes on
        result, status = {}, {"status": "error", "error": f"{type(error).__name__}: {error}"}
    return {**head, **status, "elapsed_s": round(time.perf_counter() - start, 3), **result}


def _write(out: Path, name: str, rows: list[dict[str, Any]], env: dict[str, Any]) -> tuple[Path, ...]:
    paths = tuple(out / f"{name}.{ext}" for ext in ("jsonl", "csv", "md"))
    _atomic_write(paths[0], "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    _atomic_write(paths[1], to_csv(rows))
    _atomic_write(paths[2], to_markdown(name, rows, env))
    return paths


def run_suite(name: str, *, out: Path = DEFAULT_OUT, show_progress: bool = True) -> SweepSummary:
    """Run suite ``name`` into ``out``, skipping cases already done there."""
    cases = suite(name)
    out = Path(out)
    env = sweep_environment()
    done = {k: r for k, r in load_rows(out / f"{name}.jsonl").items() if r.get("status") == "ok"}
    rows: dict[str, dict[str, Any]] = {c.name: done[c.name] for c in cases if c.name in done}
    todo = [c for c in cases if c.name not in done]
    files: tuple[Path, ...] = ()
    with Progress(disable=not show_progress, transient=False) as progress:
        task = progress.add_task(f"sweep {name}", total=len(cases), completed=len(cases) - len(todo))
        for case in todo:
            progress.update(task, description=f"{name}: {case.name}")
            rows[case.name] = _execute(case, env)
            ordered = [rows[c.name] for c in cases if c.name in rows]
            files = _write(out, name, ordered, env)
            progress.advance(task)
    ordered = [rows[c.name] for c in cases if c.name in rows]
    if not todo:
        files = _write(out, name, ordered, env)
    files += plots.draw(name, ordered, out)
    count = lambda status: sum(r["status"] == status for r in ordered)  # noqa: E731
    return SweepSummary(suite=name, ran=len(todo) - count("skipped"), resumed=len(cases) - len(todo),
                        skipped=count("skipped"), failed=count("error"), files=files)
