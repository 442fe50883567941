"""Annotation: run a captured graph once and write a :class:`NodeRecord` per node.

front end (``tracer.py`` / ``export.py``) → ``fx.GraphModule`` → :func:`annotate`
→ every node has ``node.meta["autopar"]``. Values are propagated with real
tensors when the model lives on a real device (buffers are restored afterwards,
so capture leaves the model unchanged) and with ``meta`` tensors when it lives on
``meta`` (nothing is allocated). FLOPs come from ``flops.py``; layer indices from
``layers.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from autopar.capture.flops import FlopPair, count_node_flops, signature_key
from autopar.capture.layers import LayerIndex
from autopar.capture.record import META_KEY, NodeRecord

_NO_WORK_OPS = ("placeholder", "get_attr", "output")


@dataclass
class _Propagation:
    """Per-node state gathered while the graph runs."""

    needs_grad: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    flop_cache: dict[Any, FlopPair] = field(default_factory=dict)
    seen_params: set[int] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_view_of_input(out: Any, inputs: list[torch.Tensor]) -> bool:
    outs = _tensors(out)
    bases = {id(t) for t in inputs} | {id(t._base) for t in inputs if t._base is not None}
    return bool(outs) and all(t._is_view() and id(t._base) in bases for t in outs)


class _Annotator(fx.Interpreter):
    """An Interpreter that records shapes, FLOPs, bytes and ownership per node."""

    def __init__(self, gm: fx.GraphModule, layers: LayerIndex) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.layers = layers
        self.state = _Propagation()

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = getattr(self, n.op)(n.target, args, kwargs)
        n.meta[META_KEY] = self._record(n, args, kwargs, out)
        return out

    def _grad_mask(self, args: Any, kwargs: Any) -> Any:
        """Mirror of (args, kwargs): True where the value needs a gradient."""
        flags = self.state.needs_grad
        return tree_map(
            lambda v: bool(flags.get(v, False)) if isinstance(v, torch.Tensor) else False,
            (args, kwargs),
        )

    def _record(self, n: fx.Node, args: Any, kwargs: Any, out: Any) -> NodeRecord:
        outs = _tensors(out)
        param_bytes, owns_trainable = self._owned_params(n)
        mask = self._grad_mask(args, kwargs)
        if any(tree_flatten(mask)[0]) or owns_trainable:
            for t in outs:
                if t.is_floating_point():
                    self.state.needs_grad[t] = True
        flops = (0, 0) if n.op in _NO_WORK_OPS else self._flops(n, args, kwargs, mask)
        in_tensors = _tensors((args, kwargs))
        moves_data = n.op not in _NO_WORK_OPS and not _is_view_of_input(out, in_tensors)
        written = sum(_nbytes(t) for t in outs) if moves_data else 0
        read = sum(_nbytes(t) for t in in_tensors) + (param_bytes if n.op == "call_module" else 0)
        path = self.layers.module_path(n)
        return NodeRecord(
            shapes=tuple(tuple(t.shape) for t in outs),
            dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in outs),
            flops_fwd=flops[0],
            flops_bwd=flops[1],
            bytes_read=read if moves_data else 0,
            bytes_written=written,
            param_bytes=param_bytes,
            module_path=path,
            layer=self.layers.layer_of(path),
        )

    def _owned_params(self, n: fx.Node) -> tuple[int, bool]:
        if n.op == "get_attr":
            value = self.fetch_attr(str(n.target))
            params = [value] if isinstance(value, nn.Parameter) else []
        elif n.op == "call_module":
            params = list(self.module.get_submodule(str(n.target)).parameters())
        else:
            return 0, False
        fresh = [p for p in params if id(p) not in self.state.seen_params]
        self.state.seen_params.update(id(p) for p in fresh)
        return sum(_nbytes(p) for p in fresh), any(p.requires_grad for p in params)

    def _flops(self, n: fx.Node, args: Any, kwargs: Any, mask: Any) -> FlopPair:
        key = signature_key(self.module, n, args, kwargs, mask)
        cached = self.state.flop_cache.get(key)
        if cached is not None:
            return cached
        result = self._count(n, args, kwargs, mask)
        self.state.flop_cache[key] = result
        return result


    def _count(self, n: fx.Node, args: Any, kwargs: Any, mask: Any) -> FlopPair:
        """On ``meta`` first; ops that need data retry on real copies when there are any."""
        has_data = any(t.device.type != "meta" for t in _tensors((args, kwargs)))
        attempts = (True, False) if has_data else (True,)
        for on_meta in attempts:
            try:
                return count_node_flops(self.module, n, args, kwargs, mask, on_meta=on_meta)
            except Exception as err:
                failure = err
        self.state.warnings.append(f"FLOPs of node {n.name} ({n.target}) not counted: {failure}")
        return (0, 0)


@contextmanager
def _restored_buffers(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in module.buffers() if b.device.type != "meta"]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def flat_inputs(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The graph's placeholder values for a call ``gm(*args, **kwargs)``."""
    import inspect

    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    positional = list(bound.args) + list(bound.kwargs.values())
    return list(gm.graph.process_inputs(*positional))


def annotate(
    gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], layers: LayerIndex
) -> list[str]:
    """Fill ``node.meta["autopar"]`` for every node; return warnings (uncounted FLOPs)."""
    annotator = _Annotator(gm, layers)
    with torch.no_grad(), _restored_buffers(gm), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        annotator.run(*flat_inputs(gm, args, kwargs))
    return annotator.state.warnings
