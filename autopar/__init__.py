"""autopar: a compiler-style auto-parallelizer for PyTorch training.

Data flow: ``capture`` (model + example batch → annotated fx graph) → passes →
cost models → planner → ``Plan`` (versioned JSON) → runtime. See the README and
``../shared/ARCHITECTURE.md``.
"""

from autopar import models
from autopar.capture import Captured, CaptureError, capture
from autopar.cluster import ClusterSpec
from autopar.compile import Compiled, compile
from autopar.config import Fix
from autopar.planning import estimate, plan
from autopar.plans import Plan
from autopar.runtime.checkpoint import load, save
from autopar.transform import transform

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "Captured", "ClusterSpec", "Compiled", "Fix", "Plan", "__version__",
    "capture", "compile", "estimate", "load", "models", "plan", "save", "transform",
]
