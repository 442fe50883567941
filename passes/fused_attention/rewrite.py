"""Rewriting one matched attention into a FlashAttention-2 node (Dao 2023), for the fused-attention pass.

Data flow: ``attention_patterns.find_attention`` → :func:`rewrite_attention` (this module) →
the graph with one ``autopar.kernels.flash_scaled_dot_product_attention`` node in place of the
match, called from ``fused_attention.py``. The written-out score steps fold into SDPA arguments:
scalar factors multiply into ``scale`` (1.0 when there are none), additive terms and
``masked_fill``/``where`` fills build ``attn_mask`` (a boolean mask when the only step is a −inf
fill; scalar shifts are dropped, softmax does not see them), an ``nn.Dropout`` module's rate is
read at run time (train/eval still switch it), Kᵀ is read as K and repeated K/V heads as
grouped-query heads. Every node created gets a ``node.meta["autopar"]`` record, its shape found by
running it on ``meta`` tensors; the fused node keeps the FLOPs of the nodes it replaced and
reads/writes only q, k, v (mask) and the output — no s² terms.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from autopar.capture.record import META_KEY, NodeRecord
from autopar.kernels.attention import flash_scaled_dot_product_attention, kernel_shape_reason
from autopar.passes.fused_attention.patterns import AttentionMatch, arg, kind, real_users, shape


class UnfitError(ValueError):
    """The match cannot be expressed as SDPA arguments; the message says why."""


@dataclass(frozen=True)
class Rewrite:
    """The fused node and what it was given."""

    node: fx.Node
    mask: str
    kv_groups: int
    kernel_note: str


def module_dropout_rate(module: nn.Module) -> float:
    """An ``nn.Dropout``'s rate as it would apply now: 0 in eval mode."""
    return float(module.p) if module.training else 0.0


def rewrite_attention(gm: fx.GraphModule, match: AttentionMatch, where: dict[str, Any]) -> Rewrite:
    """Replace ``match`` by one fused node (raises :class:`UnfitError`, graph untouched, when the
    shapes do not fit SDPA's)."""
    key, value, groups = _operands(gm, match)
    q, k, v = _check(match, key, value)
    build = _Builder(gm, match, where)
    with gm.graph.inserting_before(match.output):
        key = key if key is not None else build.call(torch.transpose, (match.key_t, -2, -1))
        if match.form == "softmax":
            mask, scale = build.mask(match.steps), build.scale(match.steps)
        else:
            mask, scale = match.attn_mask, match.scale
        dropout = match.dropout
        if isinstance(dropout, str):  # an nn.Dropout module: its rate at run time
            dropout = build.call(module_dropout_rate, (build.node("get_attr", dropout, ()),))
        kwargs = {"attn_mask": mask, "dropout_p": dropout, "is_causal": match.is_causal, "scale": scale}
        fused = build.call(flash_scaled_dot_product_attention, (match.query, key, value), kwargs, fused=True)
    match.output.replace_all_uses_with(fused)
    for name in ("val", "tensor_meta"):
        if name in match.output.meta:
            fused.meta[name] = match.output.meta[name]
    _erase(gm.graph, match.consumed + [match.key_t, match.key, match.value])
    four_d = [s if len(s) == 4 else (1, *s) for s in (q, k, v)]
    metas = [torch.empty(s, device="meta", dtype=_dtype(match.query)) for s in four_d]
    mask_kind = "none" if mask is None else ("bool" if _dtype_of(mask) == torch.bool else "additive")
    groups = groups if groups > 1 else (q[1] // k[1] if len(q) == 4 else 1)
    note = kernel_shape_reason(*metas) or ""
    return Rewrite(node=fused, mask=mask_kind, kv_groups=groups, kernel_note=note)


def _operands(gm: fx.GraphModule, match: AttentionMatch) -> tuple[fx.Node | None, fx.Node, int]:
    """(key or None for "transpose key_t", value, groups) after undoing repeated K/V heads."""
    key, value = match.key, match.value
    if key is None:
        return None, value, 1
    key_x, key_groups = unrepeat(gm, key)
    value_x, value_groups = unrepeat(gm, value)
    if key_groups == value_groups and key_groups > 1:
        return key_x, value_x, key_groups
    return key, value, 1


def unrepeat(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int]:
    """(x, groups) when ``node`` repeats x's heads (dim −3) ``groups`` times, else (node, 1)."""
    out = shape(node)
    if out is None or len(out) < 3:
        return node, 1
    k = kind(gm, node)
    if k == "repeat" and len(node.args) >= 2 and isinstance(node.args[1], int):
        dim = arg(node, 2, "dim")
        heads_dim = isinstance(dim, int) and dim % len(out) == len(out) - 3
        return (node.args[0], node.args[1]) if heads_dim else (node, 1)
    expand = node.args[0] if k == "reshape" else None
    if kind(gm, expand) != "expand" or kind(gm, expand.args[0]) != "unsqueeze":  # type: ignore[union-attr]
        return node, 1
    x = expand.args[0].args[0]  # type: ignore[union-attr]
    mid, xs, dim = shape(expand), shape(x), arg(expand.args[0], 1, "dim")  # type: ignore[union-attr]
    if mid is None or xs is None or len(mid) != len(out) + 1 or not isinstance(dim, int):
        return node, 1
    groups = mid[-3]
    repeated = xs[:-3] + (xs[-3] * groups,) + xs[-2:]
    if dim % len(mid) != len(mid) - 3 or mid != xs[:-2] + (groups,) + xs[-2:] or out != repeated:
        return node, 1
    return x, groups


def _check(match: AttentionMatch, key: fx.Node | None, value: fx.Node) -> tuple[tuple[int, ...], ...]:
    q = shape(match.query)
    k = shape(key) if key is not None else _swap_last(shape(match.key_t))
    v, out = shape(value), shape(match.output)
    if q is None or k is None or v is None or out is None:
        raise UnfitError("query, key, value or output shapes are unknown")
    if not len(q) == len(k) == len(v) or len(q) not in (3, 4):
        raise UnfitError(f"query/key/value shapes {q}, {k}, {v}: expected 3-D or 4-D")
    heads_ok = len(q) == 3 or (q[1] % k[1] == 0 and k[1] == v[1])
    if q[0] != k[0] or k[0] != v[0] or not heads_ok or k[-2] != v[-2] or q[-1] != k[-1]:
        raise UnfitError(f"query/key/value shapes {q}, {k}, {v} are not (batch, heads, seq, head_dim)-alike "
                         "(batch broadcasting is not matched)")
    if out != q[:-1] + v[-1:]:
        raise UnfitError(f"output shape {out} is not {q[:-1] + v[-1:]}")
    dtypes = {_dtype(n) for n in (match.query, value, key if key is not None else match.key_t)}
    if len(dtypes) != 1:
        raise UnfitError(f"query/key/value dtypes differ: {sorted(map(str, dtypes))}")
    return q, k, v


def _swap_last(s: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if s is None or len(s) < 2 else s[:-2] + (s[-1], s[-2])


def _dtype(node: fx.Node) -> torch.dtype | None:
    record = node.meta.get(META_KEY)
    if record is not None and record.dtypes:
        return getattr(torch, record.dtypes[0])
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _dtype_of(value: Any) -> torch.dtype | None:
    return _dtype(value) if isinstance(value, fx.Node) else None


def _erase(graph: fx.Graph, candidates: list[Any]) -> None:
    """Erase the matched nodes (and repeat_kv chains) that nothing uses any more, users first."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    pending = {n for n in candidates if isinstance(n, fx.Node)}
    while pending:
        node = max(pending, key=order.__getitem__)
        pending.discard(node)
        if node.op not in ("call_function", "call_method", "call_module") or node.graph is not graph:
            continue
        for user in set(node.users) - set(real_users(node)):
            graph.erase_node(user)
        if not node.users:
            pending.update(n for n in node.all_input_nodes if n.op in ("call_function", "call_method")
                           and _is_repeat_chain(n))
            graph.erase_node(node)


def _is_repeat_chain(node: fx.Node) -> bool:
    return node.target in (torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default, "expand",
                           "unsqueeze", torch.ops.aten.repeat_interleave.self_int)


class _Builder:
    """Creates the replacement's nodes with ``node.meta["autopar"]`` records (shapes on meta)."""

    def __init__(self, gm: fx.GraphModule, match: AttentionMatch, where: dict[str, Any]) -> None:
        self.gm, self.match, self.where = gm, match, where
        self.copied = {k: match.anchor.meta[k] for k in ("nn_module_stack", "stack_trace")
                       if k in match.anchor.meta}

    def node(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
             *, fused: bool = False) -> fx.Node:
        node = self.gm.graph.create_node(op, target, args, kwargs or {})
        node.meta.update(self.copied)
        node.meta[META_KEY] = self._record(node, fused)
        return node

    def call(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
             *, fused: bool = False) -> fx.Node:
        return self.node("call_function", target, args, kwargs, fused=fused)

    def _record(self, node: fx.Node, fused: bool) -> NodeRecord:
        value = self._meta_value(node)
        outs = [value] if isinstance(value, torch.Tensor) else []
        ins = [t for t in (self._meta_value(n) for n in node.all_input_nodes) if isinstance(t, torch.Tensor)]
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        consumed = [n.meta[META_KEY] for n in self.match.consumed if META_KEY in n.meta] if fused else []
        view = node.target is torch.transpose
        return NodeRecord(shapes=tuple(tuple(t.shape) for t in outs),
                          dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in outs),
                          flops_fwd=sum(r.flops_fwd for r in consumed),
                          flops_bwd=sum(r.flops_bwd for r in consumed),
                          bytes_read=0 if view else nbytes(ins), bytes_written=0 if view else nbytes(outs),
                          param_bytes=0, **self.where)

    def _meta_value(self, node: fx.Node) -> Any:
        """The node's value on ``meta``: from its record, or by running a node created here."""
        if node.op == "get_attr":
            try:
                return self.gm.get_submodule(str(node.target))
            except AttributeError:
                return _from_record(node)
        if META_KEY in node.meta:
            return _from_record(node)
        args, kwargs = tree_map(lambda a: self._meta_value(a) if isinstance(a, fx.Node) else a,
                                (node.args, node.kwargs))
        try:
            with torch.no_grad():
                return node.target(*args, **kwargs)
        except Exception:  # an input without a record: the new node's record stays shapeless
            return None

    def mask(self, steps: list[tuple[Any, ...]]) -> Any:
        """``attn_mask`` from the score steps, bottom-up (scalar shifts are dropped: softmax
        does not see them)."""
        fills = [s for s in steps if s[0] in ("fill", "keep")]
        if len(steps) - sum(s[0] == "scale" for s in steps) == 1 and fills and fills[0][2] == float("-inf"):
            cond = fills[0][1]
            return cond if fills[0][0] == "keep" else self.call(torch.logical_not, (cond,))
        mask = None
        for step in steps:
            if step[0] == "scale" and mask is not None:
                mask = self.call(torch.div if step[2] else torch.mul, (mask, step[1]))
            elif step[0] == "add" and isinstance(step[1], fx.Node):
                mask = step[1] if mask is None else self.call(torch.add, (mask, step[1]))
            elif step[0] in ("fill", "keep"):
                cond = step[1] if step[0] == "fill" else self.call(torch.logical_not, (step[1],))
                mask = self.call(torch.where, (cond, step[2], 0.0 if mask is None else mask))
        return mask

    def scale(self, steps: list[tuple[Any, ...]]) -> Any:
        """The product of the scalar factors on the scores (1.0 without any, not SDPA's 1/√d)."""
        scale: Any = None
        for step in steps:
            if step[0] != "scale":
                continue
            factor, divide = step[1], step[2]
            if isinstance(factor, (int, float)) and isinstance(scale, (float, type(None))):
                scale = (1.0 if scale is None else scale) * (1.0 / factor if divide else factor)
            elif scale is None and not divide:
                scale = factor
            else:
                scale = self.call(operator.truediv if divide else operator.mul,
                                  (1.0 if scale is None else scale, factor))
        return 1.0 if scale is None else scale


def _from_record(node: fx.Node) -> Any:
    """A meta tensor shaped like the node's value (1.0 for a non-tensor value)."""
    s, dtype = shape(node), _dtype(node)
    if s is None or dtype is None:
        return 1.0
    return torch.empty(s, dtype=dtype, device="meta")
