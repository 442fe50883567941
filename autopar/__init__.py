"""autopar: a compiler-style auto-parallelizer for PyTorch training.

Data flow: ``capture`` (model + example batch → annotated fx graph) → passes →
cost models → planner → ``Plan`` (versioned JSON) → runtime. See the README and
``../shared/ARCHITECTURE.md``.
"""

from autopar.capture import Captured, CaptureError, capture

__version__ = "0.1.0"

__all__ = ["CaptureError", "Captured", "__version__", "capture"]
