"""autopar: a compiler-style auto-parallelizer for PyTorch training.

Data flow: ``lower`` (capture → passes → profiles: a ``Program``) → ``plan`` (the planner on the
Program) → ``Plan`` (versioned JSON) → ``compile`` (an executor runs the Plan). The package root only
re-exports the public names; the layers, from ``cli`` at the top to ``config``/``hardware`` at the
bottom, are drawn in docs/ARCHITECTURE.md and checked by the import contract in pyproject.toml.
"""

from autopar import models
from autopar.capture import Captured, CaptureError, capture
from autopar.checkpoint import load, save
from autopar.cluster import ClusterSpec
from autopar.compile import Compiled, compile
from autopar.config import Fix
from autopar.lower import Program, lower
from autopar.plan_api import estimate, plan
from autopar.plans import Plan
from autopar.train import TrainConfig, TrainResult, train
from autopar.transform import transform
from autopar.version import __version__

__all__ = [
    "CaptureError", "Captured", "ClusterSpec", "Compiled", "Fix", "Plan", "Program", "__version__",
    "TrainConfig", "TrainResult",
    "capture", "compile", "estimate", "load", "lower", "models", "plan", "save", "train", "transform",
]
