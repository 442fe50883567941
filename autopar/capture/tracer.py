"""The torch.fx front end of capture: a tracer that proxies buffers and takes a
leaf-module policy.

``nn.Module`` → :func:`trace_fx` → ``fx.GraphModule`` (before annotation). The
default ``fx.Tracer`` turns buffer reads into constants, so a nanoGPT-style
``self.mask[:, :, :T, :T]`` with a traced ``T`` fails; proxying buffers makes them
``get_attr`` nodes instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

LeafSpec = type[nn.Module] | str
"""A leaf module given by class (every instance) or by qualified path ("blocks.3.attn")."""


class AutoparTracer(fx.Tracer):
    """fx tracer with proxied buffers and a configurable leaf-module policy.

    A module is a leaf (one ``call_module`` node, not traced through) when it is a
    standard ``torch.nn`` module (fx's default), an instance of a class in
    ``leaf_modules``, or its path is named there.
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec] = ()) -> None:
        super().__init__(param_shapes_constant=False)
        self.proxy_buffer_attributes = True
        specs = tuple(leaf_modules)
        for spec in specs:
            if not (isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, nn.Module))):
                raise TypeError(
                    f"leaf_modules entries must be nn.Module subclasses or module paths, got "
                    f"{spec!r}; pass e.g. leaf_modules=[MyAttention] or ['blocks.0.attn']"
                )
        self._leaf_types = tuple(s for s in specs if isinstance(s, type))
        self._leaf_paths = frozenset(s for s in specs if isinstance(s, str))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_fx(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_modules: Iterable[LeafSpec] = (),
) -> fx.GraphModule:
    """Symbolically trace ``model`` with :class:`AutoparTracer`.

    Forward parameters that the example call leaves out are traced as constants
    at their defaults (so ``attention_mask=None`` does not trace the mask branch).
    The returned GraphModule shares parameters and buffers with ``model``.
    """
    tracer = AutoparTracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=_unbound_defaults(model, args, kwargs))
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def check_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """Bind the example call to ``model.forward``; a mismatch is the user's to fix."""
    signature = inspect.signature(model.forward)
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"example inputs do not match {type(model).__name__}.forward{signature}: {err}; "
            "pass example_inputs as the positional arguments of forward (a tensor or a tuple) "
            "and keyword arguments through example_kwargs="
        ) from None


def _unbound_defaults(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    signature = inspect.signature(model.forward)
    bound = check_call(model, args, kwargs)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in bound.arguments
        and p.default is not inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
