"""Where a training run's numbers go: ``OUT/metrics.jsonl``, ``OUT/metrics.csv``, TensorBoard (when
``torch.utils.tensorboard`` imports) and the terminal.

Data flow: the training loop (``autopar.train.loop``) → :meth:`MetricsLog.write` once per step (one
JSON object per line: ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``,
``mfu``, ``memory_bytes``, ``step_s`` measured and ``predicted_step_s``; ``eval_loss`` on evaluation
steps) and :meth:`MetricsLog.line` every log interval (one line under a rich progress bar). Only
rank 0 writes. A resumed run first drops the rows after the checkpoint it resumed from
(:meth:`MetricsLog.keep_until`, files rewritten atomically), so the files hold one row per step.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

COLUMNS = ("step", "loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "memory_bytes",
           "step_s", "predicted_step_s", "elapsed_s")
JSONL, CSV = "metrics.jsonl", "metrics.csv"


class MetricsLog:
    """Rank 0's metric files and terminal output (a no-op object on other ranks)."""

    def __init__(self, out: Path, *, enabled: bool, total_steps: int | None,
                 console: Console | None = None) -> None:
        self.out, self.enabled = out, enabled
        self.console = console or Console(highlight=False)
        self._board: Any = None
        self._progress: Progress | None = None
        self._task: Any = None
        self.total_steps = total_steps

    def keep_until(self, step: int) -> None:
        """Drop rows after ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not (self.out / JSONL).exists():
            return
        rows = [row for row in read_rows(self.out / JSONL) if row.get("step", 0) <= step]
        _write_atomic(self.out / JSONL, "".join(json.dumps(row) + "\n" for row in rows))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        _write_atomic(self.out / CSV, text.getvalue())

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / CSV).exists():
            _write_atomic(self.out / CSV, ",".join(COLUMNS) + "\n")
        with contextlib.suppress(ImportError, ModuleNotFoundError):
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self.out / "tensorboard"))
        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.total_steps, completed=step)

    def write(self, row: dict[str, Any]) -> None:
        """Append one step's row to the JSONL and CSV files (and TensorBoard)."""
        if not self.enabled:
            return
        row = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        with open(self.out / JSONL, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")
        with open(self.out / CSV, "a", encoding="utf-8", newline="") as file:
            csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore").writerow(row)
        if self._board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._board.add_scalar(key, value, row["step"])
        if self._progress is not None:
            self._progress.update(self._task, completed=row["step"])

    def line(self, text: str) -> None:
        if self.enabled:
            console = self._progress.console if self._progress is not None else self.console
            console.print(text, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._board is not None:
            self._board.close()
            self._board = None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a metrics file (none if it does not exist); a cut-off last line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def step_line(row: dict[str, Any], total: int | None) -> str:
    """One terminal line for a step's row."""
    parts = [f"step {row['step']}" + (f"/{total}" if total else ""), f"loss {row['loss']:.4f}"]
    if "eval_loss" in row:
        parts.append(f"held-out {row['eval_loss']:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    if row.get("grad_norm") is not None:
        parts.append(f"|g| {row['grad_norm']:.3f}")
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if row.get("predicted_step_s") is not None:
        parts.append(f"step {1e3 * row['step_s']:.0f} ms (predicted {1e3 * row['predicted_step_s']:.0f})")
    parts.append(f"mem {row['memory_bytes'] / 2**20:,.0f} MiB")
    return " · ".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)
