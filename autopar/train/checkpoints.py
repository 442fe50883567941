"""The training run's checkpoints: ``OUT/checkpoints/step_00000100/``, the last few kept, resumed from
the latest.

Data flow: the training loop every ``checkpoint_interval`` steps → :func:`save`: ``autopar.save``
(DCP; every rank writes its shards into ``<folder>.partial``, which is renamed into place when
complete) with the trainer's own state — step, data loader position, LR schedule, tokens seen,
held-out loss before training, the model spec — as JSON bytes in one uint8 tensor (never pickled)
→ the oldest folders beyond ``keep`` are removed → a later run with the same ``out``: :func:`latest`
finds the newest complete folder and :func:`load` restores the model, optimizer, step counter and
returns the trainer state. A checkpoint that is damaged or was written for another model or data
is refused with one ValueError naming the folder; nothing is deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopar.checkpoint import load as load_checkpoint
from autopar.checkpoint import save as save_checkpoint
from autopar.compile import Compiled

FOLDER = "checkpoints"
STATE_KEY = "trainer"
STATE_FORMAT = 1
_NAME = re.compile(r"^step_(\d{8})$")


def folder(out: Path, step: int) -> Path:
    return out / FOLDER / f"step_{step:08d}"


def complete(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first (``.partial`` folders are not)."""
    root = out / FOLDER
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(out: Path) -> tuple[int, Path] | None:
    found = complete(out)
    return found[-1] if found else None


def save(compiled: Compiled, out: Path, step: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write step ``step``'s checkpoint (collective), then remove all but the ``keep`` newest."""
    path = folder(out, step)
    text = json.dumps({"format": STATE_FORMAT, **state}, sort_keys=True)
    save_checkpoint(compiled, path, extra={STATE_KEY: torch.tensor(list(text.encode()), dtype=torch.uint8)})
    if not dist.is_initialized() or dist.get_rank() == 0:
        for _, old in complete(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def load(compiled: Compiled, path: Path, *, model: str) -> dict[str, Any]:
    """Restore ``path`` into ``compiled``; the trainer state saved with it. One ValueError, naming
    the folder and what to do, when it is damaged or another run's."""
    fix = (f"delete {path} to resume from the checkpoint before it, or train into a new --out folder; "
           "no file was changed")
    try:
        extra = load_checkpoint(compiled, path)
    except ValueError as err:
        raise ValueError(f"cannot resume from {path}: {err}; {fix}") from None
    raw = extra.get(STATE_KEY)
    try:
        state = json.loads(bytes(raw.tolist()).decode()) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        state = None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"cannot resume from {path}: it holds no autopar trainer state (written by "
                         f"autopar.save, not autopar train?); {fix}")
    if state.get("model") != model:
        raise ValueError(f"cannot resume from {path}: it was trained as model {state.get('model')!r}, "
                         f"this run trains {model!r}; {fix}")
    return state
