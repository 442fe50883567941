"""Shared plumbing of the benchmark scripts: the environment record, atomic result files, the
cases and step timing of the CPU runs on local gloo ranks, and the loss-curve figures.

Data flow: each ``benchmarks/*.py`` measures or predicts, then calls :func:`write_results`
with its rows and a Markdown summary; the files land in ``benchmarks/results/`` (committed)
with :func:`environment` (commit, versions, cores) so every number says where it came from.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

RESULTS = Path(__file__).parent / "results"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
    return done.stdout.strip()


def environment(*, mark_uncommitted: bool = False) -> dict[str, Any]:
    """autopar commit, torch and Python versions, machine and core count. With ``mark_uncommitted``,
    the commit ends in "+uncommitted" when tracked files differ from it."""
    commit = _git("rev-parse", "--short", "HEAD")
    if mark_uncommitted and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+uncommitted"
    return {"autopar_commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cores": os.cpu_count()}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (sorted keys) and ``results/<name>.md`` atomically."""
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    _atomic_write(json_path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    _atomic_write(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (fewer at the start), one per value."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def dp_and_pp_cases(world: int, *, schedules: Sequence[str],
                    num_microbatches: int) -> list[tuple[str, dict[str, Any]]]:
    """(case name, fix) on ``world`` ranks: "dp", "dp zero3", then "pp <schedule>" for each schedule."""
    pipeline = {"pp": world, "num_microbatches": num_microbatches}
    return [("dp", {"dp": world}), ("dp zero3", {"dp": world, "zero": 3}),
            *[(f"pp {s}", {**pipeline, "schedule": s}) for s in schedules]]


def with_recompute(case: tuple[str, dict[str, Any]], recompute: str) -> tuple[str, dict[str, Any]]:
    """The case with ``recompute`` in its fix; " +recompute" ends its name when that is "full"."""
    name, fix = case
    return f"{name}{' +recompute' if recompute == 'full' else ''}", {**fix, "recompute": recompute}


def slowest_rank_times_s(step: Callable[[], Any], num_steps: int) -> list[float]:
    """Each of ``num_steps`` calls of ``step`` timed, as the slowest rank's time (a max all-reduce
    after the timed calls, so it adds no synchronisation between them)."""
    mine = []
    for _ in range(num_steps):
        start = time.perf_counter()
        step()
        mine.append(time.perf_counter() - start)
    times = torch.tensor(mine, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times.tolist()


def curve_figure(num_axes: int, *, width_in: float) -> tuple[Any, Any]:
    """``(fig, axes)``: ``num_axes`` plots in a row, 4.5 in tall, drawn without a display (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, num_axes, figsize=(width_in, 4.5))


def save_figure(fig: Any, axes: Any, *, title: str, name: str) -> None:
    """A grid and an upper-right legend on each of ``axes``, ``title`` over them, then
    ``results/<name>.png`` and ``.svg`` (120 dpi); closes the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    for suffix in ("png", "svg"):
        fig.savefig(RESULTS / f"{name}.{suffix}", dpi=120)
    plt.close(fig)
