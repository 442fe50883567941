"""Attention patterns in captured graphs, for the fused-attention pass.

Data flow: ``autopar.capture`` → annotated ``fx.GraphModule`` → :func:`find_attention` (this
module: matching only, the graph is not changed) → ``fused_attention.py`` rewrites each
:class:`AttentionMatch` into one FlashAttention-2 (Dao 2023) node and reports each
:class:`AttentionSkip`. Both front ends are read: ATen ops from ``torch.export`` and torch
functions, tensor methods and ``nn`` modules from ``torch.fx``.

Two forms are matched. An SDPA call (``F.scaled_dot_product_attention`` or
``aten.scaled_dot_product_attention``). A written-out softmax: ``softmax(S)`` over the last dim,
then optional casts and one dropout, then ``· V``, where ``S`` is built from ``Q·Kᵀ`` by scalar
``*``/``/``, additive terms (masks, position biases) and ``masked_fill``/``where`` with a scalar.
The walk records those steps in order so the rewrite can fold them into SDPA's ``scale`` and
``attn_mask``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from autopar.capture.record import META_KEY

aten = torch.ops.aten
_FUNCTION_KINDS: dict[Any, str] = {
    aten.matmul.default: "matmul", aten.bmm.default: "matmul", torch.matmul: "matmul",
    operator.matmul: "matmul", torch.bmm: "matmul",
    aten.softmax.int: "softmax", aten._softmax.default: "softmax", aten._safe_softmax.default: "softmax",
    torch.softmax: "softmax", F.softmax: "softmax",
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", operator.mul: "mul", torch.mul: "mul",
    aten.div.Tensor: "div", aten.div.Scalar: "div", operator.truediv: "div", torch.div: "div",
    aten.add.Tensor: "add", aten.add.Scalar: "add", operator.add: "add", torch.add: "add",
    aten.masked_fill.Scalar: "fill", aten.masked_fill.Tensor: "fill", torch.masked_fill: "fill",
    aten.where.self: "where", aten.where.ScalarOther: "where", aten.where.ScalarSelf: "where",
    aten.where.Scalar: "where", torch.where: "where",
    aten.dropout.default: "dropout", F.dropout: "dropout", torch.dropout: "dropout",
    aten.to.dtype: "cast", aten.to.dtype_layout: "cast", aten._to_copy.default: "cast",
    aten.type_as.default: "cast", aten.contiguous.default: "cast", aten.clone.default: "cast",
    aten.alias.default: "cast",
    aten.scaled_dot_product_attention.default: "sdpa", F.scaled_dot_product_attention: "sdpa",
    aten.transpose.int: "transpose", torch.transpose: "transpose", aten.permute.default: "permute",
    torch.permute: "permute", aten.unsqueeze.default: "unsqueeze", aten.expand.default: "expand",
    aten.reshape.default: "reshape", aten.view.default: "reshape", aten._unsafe_view.default: "reshape",
    aten.repeat_interleave.self_int: "repeat", torch.repeat_interleave: "repeat",
    aten.baddbmm.default: "baddbmm", torch.baddbmm: "baddbmm", aten.einsum.default: "einsum",
    torch.einsum: "einsum",
}
_METHOD_KINDS = {
    "matmul": "matmul", "bmm": "matmul", "softmax": "softmax", "mul": "mul", "div": "div", "add": "add",
    "masked_fill": "fill", "to": "cast", "float": "cast", "type_as": "cast", "contiguous": "cast",
    "transpose": "transpose", "permute": "permute", "unsqueeze": "unsqueeze", "expand": "expand",
    "reshape": "reshape", "view": "reshape", "repeat_interleave": "repeat",
}
_LOW_LEVEL_SDPA = tuple(getattr(aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"))
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SCORE_STEPS = ("cast", "mul", "div", "add", "fill", "where")


@dataclass
class AttentionMatch:
    """One attention as SDPA arguments. ``key_t`` is Kᵀ when ``key`` is None (a transpose is
    inserted). ``steps`` (bottom-up from Q·Kᵀ): ("scale", factor, divide), ("add", term),
    ("fill", cond, value) — value where cond —, ("keep", cond, value) — value where not cond.
    ``dropout``: a rate, a node, or an ``nn.Dropout`` path (its rate at run time)."""

    form: str
    anchor: fx.Node
    output: fx.Node
    query: fx.Node
    key: fx.Node | None
    key_t: fx.Node | None
    value: fx.Node
    steps: list[tuple[Any, ...]] = field(default_factory=list)
    attn_mask: Any = None
    dropout: Any = 0.0
    is_causal: Any = False
    scale: Any = None
    consumed: list[fx.Node] = field(default_factory=list)


@dataclass(frozen=True)
class AttentionSkip:
    """Attention the pass leaves alone, and why."""

    anchor: fx.Node
    reason: str


class _NoMatch(Exception):
    pass


def kind(gm: fx.GraphModule, node: Any) -> str | None:
    """The pattern kind of a node ("matmul", "softmax", "dropout", …) or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        if node.target in _LOW_LEVEL_SDPA:
            return "sdpa_kernel"
        return _FUNCTION_KINDS.get(node.target)
    if node.op == "call_method":
        return _METHOD_KINDS.get(str(node.target))
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return {nn.Dropout: "dropout", nn.Softmax: "softmax", nn.Identity: "cast"}.get(type(module))
    return None


def shape(node: Any) -> tuple[int, ...] | None:
    """The node's (first) tensor shape from its autopar record, else its ``val``."""
    if not isinstance(node, fx.Node):
        return None
    record = node.meta.get(META_KEY)
    if record is not None and record.shapes:
        return tuple(record.shapes[0])
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{node.name} ({target})"


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users other than export's metadata assertions."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, fx.Node) and shape(value) in ((), None))


def _reaches_matmul(gm: fx.GraphModule, node: Any, depth: int = 12, *, loose: bool = False) -> bool:
    """Whether ``node`` is computed from a matmul through score steps (``loose``: also through
    reshapes and from baddbmm/einsum — enough to call a softmax attention and report it)."""
    k = kind(gm, node)
    if k == "matmul" or (loose and k in ("baddbmm", "einsum")):
        return True
    if depth == 0 or not (k in _SCORE_STEPS or (loose and k == "reshape")):
        return False
    return any(_reaches_matmul(gm, a, depth - 1, loose=loose) for a in node.all_input_nodes)


def _split(gm: fx.GraphModule, a: Any, b: Any, what: str) -> tuple[fx.Node, Any]:
    """(scores operand, other operand) of a binary step."""
    hits = [_reaches_matmul(gm, a), _reaches_matmul(gm, b)]
    if hits == [True, False]:
        return a, b
    if hits == [False, True]:
        return b, a
    raise _NoMatch(f"cannot tell scores from the other operand of {what}")


def _dropout(node: fx.Node) -> Any:
    """The dropout rate in effect: a number, a node, or an ``nn.Dropout`` path."""
    if node.op == "call_module":
        return str(node.target)
    if node.target is F.dropout:
        p, train = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    else:
        p, train = arg(node, 1, "p"), arg(node, 2, "train", True)
    if not isinstance(train, bool):
        raise _NoMatch(f"dropout {node.name} takes its training flag from a value")
    return p if train else 0.0


def _softmax_dim(gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target)).dim
    return arg(node, 1, "dim")


def _score_steps(gm: fx.GraphModule, match: AttentionMatch, node: Any) -> fx.Node:
    """Walk from the softmax input down to Q·Kᵀ, recording steps; returns the matmul."""
    steps: list[tuple[Any, ...]] = []
    while (k := kind(gm, node)) != "matmul":
        if k not in _SCORE_STEPS or not isinstance(node, fx.Node):
            raise _NoMatch(f"scores pass through {describe(node) if isinstance(node, fx.Node) else node!r}")
        if len(real_users(node)) != 1:
            raise _NoMatch(f"scores {describe(node)} are used outside the attention")
        match.consumed.append(node)
        node, step = _step(gm, node, k)
        if step is not None:
            steps.append(step)
    match.steps = steps[::-1]
    return node


def _step(gm: fx.GraphModule, node: fx.Node, k: str) -> tuple[Any, tuple[Any, ...] | None]:
    """(the scores operand of ``node``, the step it applies to them)."""
    if k == "cast":
        return node.args[0], None
    if k == "fill":
        value = arg(node, 2, "value")
        if not _is_scalar(value):
            raise _NoMatch(f"{describe(node)} fills with a tensor")
        return node.args[0], ("fill", node.args[1], value)
    if k == "where":  # where(cond, a, b)
        score, other = _split(gm, node.args[1], node.args[2], describe(node))
        if not _is_scalar(other):
            raise _NoMatch(f"{describe(node)} selects between scores and a tensor")
        keeps = score is node.args[1]  # other where not cond: cond keeps the scores
        return score, ("keep" if keeps else "fill", node.args[0], other)
    if k == "add":
        if arg(node, 2, "alpha", 1) != 1:
            raise _NoMatch(f"{describe(node)} adds with alpha")
        score, term = _split(gm, node.args[0], node.args[1], describe(node))
        return score, ("add", term)
    if k == "div":
        score, other = node.args[0], node.args[1]
    else:
        score, other = _split(gm, node.args[0], node.args[1], describe(node))
    if not _is_scalar(other):
        raise _NoMatch(f"scores are scaled by a tensor in {describe(node)}")
    return score, ("scale", other, k == "div")


def _key_from_transposed(gm: fx.GraphModule, kt: fx.Node) -> fx.Node | None:
    """K when ``kt`` is a transpose of K's last two dims."""
    ndim = len(shape(kt) or ())
    k = kind(gm, kt)
    last_two = {-1, -2, ndim - 1, ndim - 2}
    if k == "transpose":
        dims = {arg(kt, 1, "dim0"), arg(kt, 2, "dim1")}
        if len(dims) == 2 and dims <= last_two and {d % ndim for d in dims} == {ndim - 1, ndim - 2}:
            return kt.args[0]
    if k == "permute":
        dims = list(kt.args[1]) if isinstance(kt.args[1], (list, tuple)) else list(kt.args[1:])
        if [d % ndim for d in dims] == [*range(ndim - 2), ndim - 1, ndim - 2]:
            return kt.args[0]
    return None


def _softmax_match(gm: fx.GraphModule, softmax: fx.Node) -> AttentionMatch | AttentionSkip | None:
    scores = softmax.args[0] if softmax.args else None
    if not _reaches_matmul(gm, scores, loose=True):
        return None  # a softmax that is not attention (e.g. a Mixture-of-Experts router)
    match = AttentionMatch(form="softmax", anchor=softmax, output=softmax, query=softmax, key=None,
                           key_t=None, value=softmax, consumed=[softmax])
    try:
        ndim, dim = len(shape(scores) or ()), _softmax_dim(gm, softmax)
        if ndim not in (3, 4) or dim not in (-1, ndim - 1):
            raise _NoMatch(f"softmax over dim {dim} of a {ndim}-D tensor")
        qk = _score_steps(gm, match, scores)
        if len(real_users(qk)) != 1:
            raise _NoMatch(f"the scores {describe(qk)} are used outside the attention")
        match.consumed.append(qk)
        match.query, match.key_t = qk.args[0], qk.args[1]
        match.key = _key_from_transposed(gm, match.key_t)
        _value_matmul(gm, match, softmax)
    except _NoMatch as err:
        return AttentionSkip(softmax, str(err))
    return match


def _value_matmul(gm: fx.GraphModule, match: AttentionMatch, node: fx.Node) -> None:
    """Walk from the probabilities through casts and one dropout to ``P·V``."""
    seen_dropout = False
    while True:
        users = real_users(node)
        if len(users) != 1:
            raise _NoMatch(f"the probabilities {describe(node)} have {len(users)} users "
                           "(returned with output_attentions=True?)")
        user, k = users[0], kind(gm, users[0])
        match.consumed.append(user)
        if k == "matmul" and user.args[0] is node:
            match.output, match.value = user, user.args[1]
            return
        if k == "dropout" and not seen_dropout:
            match.dropout, seen_dropout = _dropout(user), True
        elif k != "cast":
            raise _NoMatch(f"the probabilities go to {describe(user)} before the value matmul")
        node = user


def _sdpa_match(gm: fx.GraphModule, node: fx.Node) -> AttentionMatch:
    args = {name: arg(node, i, name) for i, name in enumerate(_SDPA_PARAMS)}
    return AttentionMatch(form="sdpa", anchor=node, output=node, query=args["query"], key=args["key"],
                          key_t=None, value=args["value"], attn_mask=args["attn_mask"],
                          dropout=args["dropout_p"] or 0.0, is_causal=args["is_causal"] or False,
                          scale=args["scale"], consumed=[node])


def find_attention(gm: fx.GraphModule) -> list[AttentionMatch | AttentionSkip]:
    """Every attention in ``gm``, in graph order: matches to rewrite and skips to report."""
    found: list[AttentionMatch | AttentionSkip] = []
    for node in list(gm.graph.nodes):
        k = kind(gm, node)
        if k == "sdpa":
            found.append(_sdpa_match(gm, node))
        elif k == "sdpa_kernel":
            found.append(AttentionSkip(node, "a backend's SDPA kernel op (capture before dispatch)"))
        elif k == "softmax":
            result = _softmax_match(gm, node)
            if result is not None:
                found.append(result)
    return found
