"""Shared plumbing of the benchmark scripts: the environment record and atomic result files.

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
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, Any]:
    """autopar commit, torch and Python versions, machine and core count."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
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


def save_figure(fig: Any, name: str) -> None:
    """``results/<name>.png`` and ``.svg`` (120 dpi), then close the figure."""
    import matplotlib.pyplot as plt

    for suffix in ("png", "svg"):
        fig.savefig(RESULTS / f"{name}.{suffix}", dpi=120)
    plt.close(fig)
