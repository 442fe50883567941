"""Context parallelism as a graph transformation: attention becomes ring attention, positions global.

Data flow: ``autopar.launch_plan`` captures the runtime's microbatch at the local length
``seq/cp`` (``sequence_shard.local_example``) → the engine calls :func:`context_parallel_graph`
on that capture (this module) → a copy of the graph (sharing the model's parameters) in which

- every attention — ``scaled_dot_product_attention`` calls, the fused-attention pass's nodes, and
  attention written out as ``softmax(Q·Kᵀ·scale + mask)·V`` (found by the fused-attention pass's
  matcher, ``autopar.passes.fused_attention.patterns.find_attention``) — is one call of a
  :class:`RingAttention` module: ``autopar.runtime.context_parallel.ring_attention`` over the cp
  group (Liu et al. 2023, ring attention; load-balanced causal chunks as Llama 3 §3.3.2), with
  the Triton FlashAttention-2 block (Dao 2023) where ``autopar.kernels.attention.supports`` says
  it runs and the tensors are on a GPU or the attention was fused (on CPU that is the Triton
  interpreter, asked for by fusing), the exact torch block otherwise;
- the mask feeding each attention is checked to be causal (or absent) and then dropped, with the
  nodes that only built it: the mask is *evaluated* on the capture's example inputs (its nodes
  may read inputs only through their sizes), so a mask built any way from the sequence length —
  ``torch.tril(torch.ones(s, s))``, ``masked_fill(triu, -inf)``, Hugging Face's mask functions
  over ``arange`` positions, a sliced buffer — is recognised by what it is (``cp_masks``);
- every remaining ``arange`` of the local length (positions for embeddings or rotary tables)
  is followed by :class:`GlobalPositions`, which turns ``start + [0, seq/cp)`` into the global
  positions of this rank's tokens (``context_parallel_position_ids``). An ``arange`` of that length
  that is not a position (one over a dimension that happens to equal ``seq/cp``) would be changed
  too: such models run with a cp whose ``seq/cp`` differs from their other sizes.

Everything else in a transformer layer is token-local, so it runs unchanged on the local tokens
(sizes in ``view``/``reshape`` are the local length because the capture was made at it). What
cannot run under cp is refused with a ValueError naming the node and the fix: a mask that is not
causal, an additive bias (ALiBi), dropout inside attention, cross-attention, or a softmax-matmul
attention the matcher does not recognise. What was done is in ``gm.meta[RECORD_KEY]``
(:class:`ContextParallelRecord`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed.tensor import DTensor, Shard

from autopar.capture import Captured
from autopar.capture.annotate import flat_inputs
from autopar.capture.batch import leading_dims
from autopar.capture.record import META_KEY
from autopar.kernels.attention import flash_scaled_dot_product_attention, supports
from autopar.passes.fused_attention.patterns import (
    AttentionMatch,
    AttentionSkip,
    arg,
    find_attention,
    kind,
    real_users,
    shape,
)
from autopar.passes.fused_attention.rewrite import module_dropout_rate
from autopar.plans import Plan
from autopar.runtime.context_parallel import (
    FLASH_BLOCK_ATTENTION,
    TORCH_BLOCK_ATTENTION,
    context_parallel_position_ids,
    ring_attention,
)
from autopar.runtime.cp_masks import evaluate_masks, mask_is_causal, refuse
from autopar.runtime.layout import Layout

RECORD_KEY = "autopar_context_parallel"
_ARANGE = (torch.arange, torch.ops.aten.arange.default, torch.ops.aten.arange.start,
           torch.ops.aten.arange.start_step)
_FUSED_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


class RingAttention(nn.Module):
    """One attention of a context-parallel stage: ``ring_attention`` over the cp ``group``.

    ``forward(q, k, v[, scale])`` with SDPA's layout, (b, h, s_local, d) or (b, s_local, d);
    ``scale`` is given as an input when the graph computes it. ``num_calls`` counts forwards."""

    def __init__(self, *, group: dist.ProcessGroup, causal: bool, scale: float | None, fused: bool) -> None:
        super().__init__()
        self.group, self.causal, self.scale, self.fused = group, causal, scale, fused
        self.num_calls = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Any = None) -> torch.Tensor:
        self.num_calls += 1
        if isinstance(q, DTensor):  # tensor parallelism: heads sharded over tp, each rank rings its own
            layout = (q.device_mesh, q.placements)
            if any(isinstance(p, Shard) and p.dim % q.dim() == q.dim() - 2 for p in q.placements):
                raise ValueError(f"ring attention got queries sharded along the sequence over tp "
                                 f"({q.placements}); gather the sequence before attention")
            q, k, v = (t.to_local() if isinstance(t, DTensor) else t for t in (q, k, v))
            return DTensor.from_local(self._ring(q, k, v, scale), *layout, run_check=False)
        return self._ring(q, k, v, scale)

    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Any) -> torch.Tensor:
        flat = q.dim() == 3
        if flat:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        flash = (self.fused or q.is_cuda) and supports(q, k, v)  # CPU: the interpreter only if asked
        block = FLASH_BLOCK_ATTENTION if flash else TORCH_BLOCK_ATTENTION
        out = ring_attention(q, k, v, group=self.group, causal=self.causal,
                             scale=self.scale if scale is None else float(scale), block=block)
        return out.squeeze(1) if flat else out


class GlobalPositions(nn.Module):
    """``start + arange(seq/cp)`` → ``start +`` the global positions of this cp rank's tokens."""

    def __init__(self, *, cp: int, rank: int) -> None:
        super().__init__()
        self.cp, self.rank = cp, rank

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        ids = context_parallel_position_ids(local.shape[-1] * self.cp, cp=self.cp, rank=self.rank,
                                            device=local.device)
        return local.narrow(-1, 0, 1) + ids.to(local.dtype)


@dataclass(frozen=True)
class ContextParallelRecord:
    """What :func:`context_parallel_graph` did: attentions replaced (original node → causal) and
    the ``arange`` nodes made global, at local sequence length ``local_seq_len``."""

    attention: tuple[tuple[str, bool], ...]
    positions: tuple[str, ...]
    local_seq_len: int


def context_parallel_graph(gm: fx.GraphModule, *, local_seq_len: int, cp: int, rank: int,
                           group: dist.ProcessGroup, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """A copy of ``gm`` (same parameters and submodules) whose attentions run over the cp ring.

    ``gm`` was captured at ``local_seq_len`` tokens; ``example_inputs`` are its placeholders'
    values (the capture's example). Raises ValueError for what cannot run under cp."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    found = [*find_attention(out), *_fused_attention(out)]
    _refuse_unmatched_softmax(out, {f.anchor for f in found})
    plans = [_plan_attention(out, f, local_seq_len) for f in sorted(found, key=_order(out))]
    if not plans:
        raise ValueError(f"context parallelism (cp = {cp}) found no attention in the model's graph to "
                         "run as ring attention; use cp = 1 for a model without attention")
    _check_masks(out, plans, example_inputs, local_seq_len)
    dropped: list[fx.Node] = []
    for index, planned in enumerate(plans):
        dropped += _rewrite(out, planned, index, group=group)
    _erase_unused(out.graph, dropped)
    positions = _globalize_positions(out, local_seq_len, cp=cp, rank=rank)
    out.meta[RECORD_KEY] = ContextParallelRecord(
        attention=tuple((p.match.anchor.name, p.causal) for p in plans), positions=positions,
        local_seq_len=local_seq_len)
    out.graph.lint()
    out.recompile()
    return out


def rewrite_for_plan(captured: Captured, plan: Plan, layout: Layout) -> fx.GraphModule:
    """The graph the engine cuts into stages: the capture's own for cp 1, else its context-parallel
    copy on this rank's cp group (the capture was made at the local length)."""
    gm, cp = captured.graph_module, plan.parallelism.cp
    if cp == 1:
        return gm
    local = plan.seq_len // cp if plan.seq_len else 0
    _, captured_len = leading_dims(captured.example_args, captured.example_kwargs)
    if captured_len != local:
        raise ValueError(f"context parallelism (cp = {cp}) runs stage graphs captured at seq/cp = {local} "
                         f"tokens, but this capture has {captured_len}; build the Engine through "
                         "autopar.launch_plan.start_engine (compiled.step), which captures at seq/cp")
    example = flat_inputs(gm, captured.example_args, captured.example_kwargs)
    return context_parallel_graph(gm, local_seq_len=local, cp=cp, rank=layout.cp_rank,
                                  group=layout.group("cp"), example_inputs=example)


def ring_attention_modules(module: nn.Module) -> list[RingAttention]:
    """The :class:`RingAttention` modules inside ``module``."""
    return [m for m in module.modules() if isinstance(m, RingAttention)]


def is_ring_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` calls a :class:`RingAttention` module of ``gm``."""
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), RingAttention)


# ---------------------------------------------------------------------------------------------
# Matching and checking

@dataclass
class _Planned:
    match: AttentionMatch
    mask: list[tuple[Any, ...]]  # score steps (softmax form) or [("sdpa", attn_mask, is_causal)]
    causal: bool = False
    fused: bool = False


def _plan_attention(gm: fx.GraphModule, found: AttentionMatch | AttentionSkip, local: int) -> _Planned:
    if isinstance(found, AttentionSkip):
        raise refuse(found.anchor, f"its pattern is not recognised ({found.reason})",
                      "write it as softmax(Q·Kᵀ·scale + causal mask)·V or call "
                      "F.scaled_dot_product_attention, or use cp = 1")
    match = found
    if match.form == "sdpa":
        if arg(match.anchor, 7, "enable_gqa", False) not in (True, False):
            raise refuse(match.anchor, "enable_gqa is computed", "pass a constant, or use cp = 1")
        planned = _Planned(match, [("sdpa", match.attn_mask, match.is_causal)],
                           fused=match.anchor.target is flash_scaled_dot_product_attention)
    else:
        planned = _Planned(match, list(match.steps))
    _check_dropout(gm, match)
    q, v = shape(match.query), shape(match.value)
    k = shape(match.key) if match.key is not None else _swapped(shape(match.key_t))
    lengths = {s[-2] for s in (q, k, v) if s is not None and len(s) >= 2}
    if None in (q, k, v) or lengths != {local}:
        raise refuse(match.anchor, f"query/key/value shapes {q}, {k}, {v} are not self-attention over the "
                      f"local sequence of {local} tokens (cross-attention?)", "use cp = 1 for this model")
    if not isinstance(match.is_causal, bool):
        raise refuse(match.anchor, "is_causal is computed", "pass a constant, or use cp = 1")
    return planned


def _fused_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    """The fused-attention pass's nodes (SDPA's signature), as SDPA matches."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is flash_scaled_dot_product_attention:
            a = {name: arg(node, i, name) for i, name in enumerate(_FUSED_PARAMS)}
            found.append(AttentionMatch(form="sdpa", anchor=node, output=node, query=a["query"], key=a["key"],
                                        key_t=None, value=a["value"], attn_mask=a["attn_mask"],
                                        dropout=a["dropout_p"] or 0.0, is_causal=a["is_causal"] or False,
                                        scale=a["scale"], consumed=[node]))
    return found


def _refuse_unmatched_softmax(gm: fx.GraphModule, matched: set[fx.Node]) -> None:
    """A softmax whose probabilities multiply values (through casts and dropout) that the matcher
    did not take for attention would run on the local keys only: refused."""
    for node in gm.graph.nodes:
        if kind(gm, node) != "softmax" or node in matched:
            continue
        probabilities = node
        while len(users := real_users(probabilities)) == 1 and kind(gm, users[0]) in ("cast", "dropout"):
            probabilities = users[0]
        if any(kind(gm, u) == "matmul" and u.args[0] is probabilities for u in real_users(probabilities)):
            raise refuse(node, "its pattern is not recognised (the scores pass through something other "
                          "than scaling, additive terms and masks)", "write it as softmax(Q·Kᵀ·scale + "
                          "causal mask)·V or call F.scaled_dot_product_attention, or use cp = 1")


def _order(gm: fx.GraphModule) -> Any:
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda found: position[found.anchor]


def _swapped(s: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if s is None or len(s) < 2 else (*s[:-2], s[-1], s[-2])


def _check_dropout(gm: fx.GraphModule, match: AttentionMatch) -> None:
    rate = match.dropout
    if isinstance(rate, fx.Node) and rate.target is module_dropout_rate:  # fused: an nn.Dropout's rate
        rate = str(rate.args[0].target)  # type: ignore[union-attr]
    if isinstance(rate, str):  # an nn.Dropout module
        rate = float(gm.get_submodule(rate).p)
    if isinstance(rate, fx.Node) or (isinstance(rate, (int, float)) and rate > 0):
        raise refuse(match.anchor, f"it applies dropout (p = {rate}) to the attention probabilities, which "
                      "ring attention does not", "set the attention dropout to 0 or use cp = 1")


def _check_masks(gm: fx.GraphModule, plans: list[_Planned], example_inputs: Sequence[Any],
                 local: int) -> None:
    """Evaluate every mask on the example inputs and classify it (sets ``causal``)."""
    wanted = [n for p in plans for step in p.mask for n in step[1:] if isinstance(n, fx.Node)]
    values = evaluate_masks(gm, wanted, example_inputs)
    for planned in plans:
        planned.causal = mask_is_causal(planned.mask, values, local, planned.match.anchor)


# ---------------------------------------------------------------------------------------------
# Rewriting

def _rewrite(gm: fx.GraphModule, planned: _Planned, index: int, *, group: dist.ProcessGroup) -> list[fx.Node]:
    """Replace one attention by a RingAttention call; returns the nodes that may now be unused."""
    match, graph = planned.match, gm.graph
    scale = match.scale if match.form == "sdpa" else _product_scale(planned.mask)
    name = f"cp_attention_{index}"
    gm.add_submodule(name, RingAttention(group=group, causal=planned.causal, fused=planned.fused,
                                         scale=None if isinstance(scale, fx.Node) else scale))
    with graph.inserting_before(match.output):
        key = match.key
        if key is None:
            key = graph.call_function(torch.transpose, (match.key_t, -2, -1))
            _annotate(key, match.key_t, shape_of=_swapped(shape(match.key_t)))
        extra = (scale,) if isinstance(scale, fx.Node) else ()
        ring = graph.call_module(name, (match.query, key, match.value, *extra))
        _annotate(ring, match.output)
    for meta_key in ("nn_module_stack", "stack_trace"):
        if meta_key in match.anchor.meta:
            ring.meta[meta_key] = match.anchor.meta[meta_key]
    match.output.replace_all_uses_with(ring)
    mask_inputs = [n for step in planned.mask for n in step[1:] if isinstance(n, fx.Node)]
    return [*match.consumed, *mask_inputs]


def _product_scale(steps: list[tuple[Any, ...]]) -> Any:
    """The scores' scale from the written-out steps (1.0 without any): a number, or one node."""
    scale: Any = 1.0
    for step in steps:
        if step[0] != "scale":
            continue
        if isinstance(step[1], fx.Node):
            if step[2] or scale != 1.0:
                raise refuse(step[1], "its scores are scaled by a computed value in several steps",
                              "scale by one constant, or use cp = 1")
            scale = step[1]
        else:
            scale = scale / step[1] if step[2] else scale * step[1]
    return scale


def _annotate(node: fx.Node, like: fx.Node, *, shape_of: tuple[int, ...] | None = None) -> None:
    """``like``'s autopar record (layer, module path) on a new node, its shape if given."""
    record = like.meta.get(META_KEY)
    if record is not None:
        shapes = record.shapes if shape_of is None else (shape_of,)
        node.meta[META_KEY] = dataclasses.replace(record, shapes=shapes)


def _erase_unused(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase candidates nothing uses any more, and what only they used (users before inputs)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    pending = {n for n in candidates if n in order}
    matched = set(pending)  # a matched nn.Dropout/nn.Softmax call may go too; other modules stay
    while pending:
        node = max(pending, key=order.__getitem__)
        pending.discard(node)
        erasable = node.op in ("call_function", "call_method") or (
            node.op == "call_module" and node in matched)
        if not erasable or real_users(node):
            continue
        for user in list(node.users):  # export's metadata assertions
            graph.erase_node(user)
        pending.update(n for n in node.all_input_nodes if n in order)
        graph.erase_node(node)


def _globalize_positions(gm: fx.GraphModule, local: int, *, cp: int, rank: int) -> tuple[str, ...]:
    """Follow each ``arange`` of ``local`` unit steps by :class:`GlobalPositions`."""
    graph, done = gm.graph, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ARANGE or shape(node) != (local,):
            continue
        if node.target is torch.ops.aten.arange.start_step and arg(node, 2, "step", 1) != 1:
            continue
        if node.target is torch.arange and len(node.args) > 2 and node.args[2] != 1:
            continue
        if "cp_positions" not in dict(gm.named_children()):
            gm.add_submodule("cp_positions", GlobalPositions(cp=cp, rank=rank))
        with graph.inserting_after(node):
            positions = graph.call_module("cp_positions", (node,))
        _annotate(positions, node)
        node.replace_all_uses_with(positions, delete_user_cb=functools.partial(operator.is_not, positions))
        done.append(node.name)
    return tuple(done)
