"""Graph fingerprint: a short, stable hash that ties a Plan to the graph it was made for.

Data flow: capture produces an annotated ``fx.GraphModule``; ``graph_fingerprint(gm)``
goes into ``Plan.graph_fingerprint``; ``Plan.load(path, expect_fingerprint=...)`` refuses
a plan whose model changed. The hash covers a canonical text of the graph — each node's
op, its target by qualified name (module path and class for submodules), its argument
structure by node name, its output shapes and dtypes (``node.meta["autopar"]``, else
``"val"``/``"tensor_meta"``) — and the parameter and buffer shapes. Nothing
process-specific enters it (no ``id()``, no addresses), so it is the same across runs.

Devices do not enter it either: a graph exported on ``meta`` (how ``autopar plan`` builds
models) carries ``device=meta`` in its factory calls where the runtime's capture of the real
model says ``cpu`` or ``cuda:3``, and each rank runs its stages on its own device whatever the
graph says. Every ``torch.device`` argument is written ``device``, so a plan made on ``meta``
applies to the model the same source builds on any device.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Any

import torch
from torch import fx
from torch.fx.node import _get_qualified_name

from autopar.capture.record import META_KEY, NodeRecord

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """sha256 of :func:`canonical_graph_text`, first 16 hex digits."""
    return hashlib.sha256(canonical_graph_text(gm).encode("utf-8")).hexdigest()[:16]


def canonical_graph_text(gm: fx.GraphModule) -> str:
    """One line per node, then one per parameter/buffer (sorted by name)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"graph_fingerprint needs an fx.GraphModule, got {type(gm).__name__}")
    lines = [
        f"{node.name} = {node.op} {_target(gm, node)} args={_arg(node.args)} "
        f"kwargs={_arg(node.kwargs)} -> {_outputs(node)}"
        for node in gm.graph.nodes
    ]
    tensors = dict(gm.named_parameters()) | {f"buffer {k}": v for k, v in gm.named_buffers()}
    lines += [f"{name}: {_tensor(tensor)}" for name, tensor in sorted(tensors.items())]
    return "\n".join(lines)


def _qualified_name(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)  # e.g. "aten.mm.default"
    try:  # fx's own naming: torch.relu, _operator.add, torch.nn.functional.softmax
        return _get_qualified_name(target)
    except (AttributeError, RuntimeError, TypeError):
        return _ADDRESS.sub("", repr(target))


def _target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        settings = _ADDRESS.sub("", module.extra_repr())
        return f"{node.target}:{type(module).__qualname__}({settings})"
    if node.op == "call_function":
        return _qualified_name(node.target)
    return str(node.target)  # call_method, get_attr, placeholder, output: a name


def _arg(value: Any) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_arg(item) for item in value) + ("," * (len(value) == 1)) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_arg(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_arg(v)}" for k, v in sorted(value.items(), key=str)) + "}"
    if isinstance(value, slice):
        return f"slice({_arg(value.start)}, {_arg(value.stop)}, {_arg(value.step)})"
    if isinstance(value, torch.device):
        return "device"  # where the graph runs is each rank's choice (module docstring)
    if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return f"tensor {_tensor(value)}"
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if callable(value):
        return _qualified_name(value)
    return f"{type(value).__qualname__}:{_ADDRESS.sub('', repr(value))}"


def _tensor(tensor: Any) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


def _outputs(node: fx.Node) -> str:
    record = node.meta.get(META_KEY)
    if isinstance(record, NodeRecord):
        return f"{[list(shape) for shape in record.shapes]} {list(record.dtypes)}"
    for key in ("val", "tensor_meta"):
        if node.meta.get(key) is not None:
            return _describe(node.meta[key])
    return "?"


def _describe(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # Tensor, FakeTensor, TensorMetadata
        return _tensor(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe(item) for item in value) + ")"
    if isinstance(value, dict):
        items = sorted(value.items(), key=str)
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in items) + "}"
    if isinstance(value, (bool, int, float, str, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    return type(value).__qualname__
