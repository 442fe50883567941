"""``autopar sweep --suite NAME [--out DIR]``: run a named benchmark sweep from a source checkout.

Data flow: the suite name → a child ``python -m benchmarks.run --suite NAME`` started in the
checkout that holds ``benchmarks/`` (found from the current folder upwards) → CSV, JSONL, Markdown
and plots under ``--out`` (default ``benchmarks/results/sweeps``), one row per case. The package
never imports ``benchmarks`` (it is not installed with autopar, and the layer contract forbids the
arrow): this command only launches it, and says so when no checkout is found.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a named benchmark suite (from a source checkout)")
    p.add_argument("--suite", required=True,
                   help="planner-scaling, plan-quality, runtime-cpu, passes, kernels or smoke")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/sweeps)")
    p.set_defaults(run=run)


def checkout_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` that holds ``benchmarks/run.py``."""
    for folder in (start, *start.parents):
        if (folder / "benchmarks" / "run.py").is_file():
            return folder
    raise ValueError(f"no benchmarks/run.py in {start} or above: the benchmark sweeps live in autopar's "
                     "source checkout; run `autopar sweep` inside it (or `python -m benchmarks.run` there)")


def run(args: argparse.Namespace, console: Console) -> int:
    root = checkout_root(Path.cwd().resolve())
    command = [sys.executable, "-m", "benchmarks.run", "--suite", args.suite]
    if args.out is not None:
        command += ["--out", str(args.out.resolve())]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    child = subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": path}, check=False,
                           stderr=subprocess.PIPE, text=True)
    sys.stderr.write(child.stderr)  # the driver's one-line errors, relayed as they were
    return child.returncode
