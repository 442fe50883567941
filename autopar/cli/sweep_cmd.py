"""``autopar sweep --suite NAME [--out DIR]``: run a named benchmark sweep from a source checkout.

Data flow: the suite name → ``benchmarks.sweep.driver.run_suite`` (imported lazily: ``benchmarks/``
is not installed with autopar, so this command runs from the repository root) → CSV, JSONL,
Markdown and plots under ``--out`` (default ``benchmarks/results/sweeps``), one row per case.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from rich.console import Console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a named benchmark suite (from the repository root)")
    p.add_argument("--suite", required=True,
                   help="planner-scaling, plan-quality, runtime-cpu, passes, kernels or smoke")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/sweeps)")
    p.set_defaults(run=run)


def _driver() -> ModuleType:
    root = Path.cwd()
    if (root / "benchmarks" / "sweep").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module("benchmarks.sweep.driver")
    except ModuleNotFoundError as error:
        raise ValueError("the benchmark sweeps live in the source checkout's benchmarks/ folder, which is "
                         f"not importable here ({error}); run `autopar sweep` from the repository root"
                         ) from None


def run(args: argparse.Namespace, console: Console) -> int:
    driver = _driver()
    out = args.out if args.out is not None else driver.DEFAULT_OUT
    summary = driver.run_suite(args.suite, out=out)
    console.print(f"{summary.suite}: ran {summary.ran}, already done {summary.resumed}, "
                  f"skipped {summary.skipped}, failed {summary.failed}")
    for path in summary.files:
        console.print(f"  {path}")
    return 1 if summary.failed else 0
