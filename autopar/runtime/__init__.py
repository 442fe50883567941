"""The runtime: executes a Plan on torch.distributed (the mechanism half of autopar).

Data flow: ``Captured`` + ``Plan`` → ``split`` (stage graphs) → ``recompute`` →
``data_parallel`` → ``pipeline`` (PipelineStage + schedule) → :class:`Engine`.
Processes come from ``launch`` (autopar's local spawner, or torchrun). The runtime
decides nothing: a hand-written Plan runs as well as a planned one.
"""

from autopar.runtime.engine import Engine
from autopar.runtime.launch import init_from_env, spawn

__all__ = ["Engine", "init_from_env", "spawn"]
