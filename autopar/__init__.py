"""autopar: a compiler-style auto-parallelizer for PyTorch training.

Data flow: ``capture`` (model + example batch → annotated fx graph) → passes →
cost models → planner → ``Plan`` (versioned JSON) → runtime. See the README and
``../shared/ARCHITECTURE.md``.

The public names below are imported on first use (PEP 562), so ``import autopar`` — and
the CLI's plan views, which need none of the runtime — stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "models": ("autopar.models", None),
    "Captured": ("autopar.capture", "Captured"),
    "CaptureError": ("autopar.capture", "CaptureError"),
    "capture": ("autopar.capture", "capture"),
    "ClusterSpec": ("autopar.cluster", "ClusterSpec"),
    "Compiled": ("autopar.compile", "Compiled"),
    "compile": ("autopar.compile", "compile"),
    "Fix": ("autopar.config", "Fix"),
    "estimate": ("autopar.planning", "estimate"),
    "plan": ("autopar.planning", "plan"),
    "Plan": ("autopar.plans", "Plan"),
    "load": ("autopar.runtime.checkpoint", "load"),
    "save": ("autopar.runtime.checkpoint", "save"),
    "transform": ("autopar.transform", "transform"),
}

__all__ = [
    "CaptureError", "Captured", "ClusterSpec", "Compiled", "Fix", "Plan", "__version__",
    "capture", "compile", "estimate", "load", "models", "plan", "save", "transform",
]

if TYPE_CHECKING:
    from autopar import models
    from autopar.capture import Captured, CaptureError, capture
    from autopar.cluster import ClusterSpec
    from autopar.compile import Compiled, compile
    from autopar.config import Fix
    from autopar.planning import estimate, plan
    from autopar.plans import Plan
    from autopar.runtime.checkpoint import load, save
    from autopar.transform import transform


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        if not name.startswith("_") and importlib.util.find_spec(f"autopar.{name}") is not None:
            return importlib.import_module(f"autopar.{name}")  # a subpackage: autopar.passes, …
        raise AttributeError(f"module 'autopar' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
