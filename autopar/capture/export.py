"""The torch.export front end of capture, for models fx cannot trace.

``nn.Module`` → :func:`trace_export` → ``fx.GraphModule`` of ATen ops with
parameters as ``get_attr`` nodes (``ExportedProgram.module()``), before annotation.
Non-strict export runs the model's Python, so Hugging Face ``**kwargs`` forwards
work. The graph is specialized to the example shapes; ``autopar.compile`` captures
again for new shapes.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from autopar.quiet import quiet_logger


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Decoders must not build a KV cache while exported for training.

    Hugging Face models copy their config into sub-stacks (T5's decoder), so every
    config object reachable from a submodule is switched off and restored.
    """
    configs = {id(c): c for m in model.modules()
               if hasattr(c := getattr(m, "config", None), "use_cache")}.values()
    saved = [(c, c.use_cache) for c in configs]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


def trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    """Export ``model`` non-strictly and return the runnable, unlifted GraphModule.

    The module shares parameters and buffers with ``model``.
    """
    # a failed export logs and prints whole graphs; capture reports the failure itself
    with _no_kv_cache(model), quiet_logger("torch"), contextlib.redirect_stderr(io.StringIO()):
        program = torch.export.export(model, args, kwargs, strict=False)
    return program.module()
