"""Capture failures, explained: which module and source line blocked capture.

``autopar.capture`` raises :class:`CaptureError` when every front end failed. The
message names the innermost user module and the user source line where each
front end stopped, and what to do (mark a leaf module, choose a front end).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch
from torch import nn

_LIBRARY_ROOTS = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (torch, os, __import__("autopar"))
    if getattr(m, "__file__", None)
)


class CaptureError(ValueError):
    """No front end could capture the model. The message says where and what to do."""


@dataclass(frozen=True)
class Blame:
    """Where one front end stopped."""

    frontend: str
    error: str
    module_path: str | None
    module_type: str | None
    location: str | None

    def describe(self) -> str:
        where = f" at {self.location}" if self.location else ""
        module = f" in module '{self.module_path}' ({self.module_type})" if self.module_type else ""
        return f"{self.frontend} failed{module}{where}: {self.error}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def blame(frontend: str, err: BaseException, model: nn.Module) -> Blame:
    """Find the innermost module of ``model`` and the last user source line in ``err``."""
    paths = {id(m): p for p, m in model.named_modules()}
    module_path = module_type = location = None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            module_path, module_type = paths[id(owner)] or "<root>", type(owner).__name__
        filename = frame.f_code.co_filename
        if not filename.startswith(_LIBRARY_ROOTS) and "<" not in filename:
            line = (traceback.extract_tb(tb, limit=1)[0].line or "").strip()
            location = f"{filename}:{tb.tb_lineno} `{line}`"
        tb = tb.tb_next
    return Blame(frontend, _first_line(err), module_path, module_type, location)


def capture_error(model: nn.Module, blames: list[Blame]) -> CaptureError:
    """One error for all failed front ends, with remedies."""
    name = type(model).__name__
    details = "; ".join(b.describe() for b in blames)
    modules = [b.module_type for b in blames if b.module_type and b.module_path != "<root>"]
    leaf = f"leaf_modules=[{modules[0]}]" if modules else "leaf_modules=[TheFailingModule]"
    return CaptureError(
        f"could not capture {name}: {details}. What to do: mark the failing module as a leaf "
        f"({leaf}) so fx does not trace into it, pass frontend='export' or frontend='fx' to "
        "choose a front end, or remove data-dependent Python control flow from forward"
    )
