"""The runtime: executes a Plan on torch.distributed (the mechanism half of autopar).

Data flow: ``Captured`` + ``Plan`` → ``split`` (stage graphs) → ``recompute`` →
``data_parallel`` → ``pipeline`` (PipelineStage + schedule) → :class:`Engine`; one device runs
``local.LocalEngine``. Both implement ``executor.Executor`` (step, measured step, optimizer, Plan,
parameters by the model's names), the only face ``autopar.compile``, checkpoints and reports see.
Processes come from ``launch`` (autopar's local spawner, or torchrun). The runtime decides
nothing: a hand-written Plan runs as well as a planned one.

Layer: above ``planner``, ``passes`` and ``kernels``, below ``lower``; never imports the planner.
"""

from typing import Any

from autopar.runtime.launch import init_from_env, spawn

__all__ = ["Engine", "init_from_env", "spawn"]


def __getattr__(name: str) -> Any:
    """``Engine`` is imported on first use: torch's pipelining and DTensor take ~0.8 s to import,
    which commands that never train (``autopar show``, ``plan``) should not pay."""
    if name == "Engine":
        from autopar.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'autopar.runtime' has no attribute {name!r}")
