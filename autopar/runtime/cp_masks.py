"""Attention masks under context parallelism: evaluated on the capture's example, then classified.

Data flow: ``cp_rewrite.context_parallel_graph`` hands each attention's mask — SDPA's ``attn_mask``
and ``is_causal``, or the score steps of a written-out softmax (additive terms, ``masked_fill``,
``where``, scales; ``autopar.passes.fused_attention.patterns``) — to :func:`evaluate_masks`,
which runs only the nodes the masks depend on, on the capture's example inputs, and to
:func:`mask_is_causal`, which applies the steps to zero scores and reads the result: −inf (or
below :data:`MASKED_BELOW`) exactly above the diagonal is causal, nothing masked is
bidirectional; anything else (another pattern, a per-sample padding mask, an additive bias such
as ALiBi, Press et al. 2022) cannot be cut into ring blocks and is refused by :func:`refuse`,
naming the node and the fix. Judging the mask by its value makes every way of writing a causal
mask from the sequence length equal: ``tril(ones(s, s))``, ``triu`` fills, a sliced buffer, Hugging
Face's mask functions over ``arange`` positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from autopar.capture.record import META_KEY
from autopar.passes.fused_attention.patterns import describe

MASKED_BELOW = -1e4  # an additive mask value this negative has softmax weight exp(-1e4) = 0 in fp32
_SIZE_READS = ("size", "dim")  # methods that read a tensor's metadata, not its values
_SIZE_ATTRS = ("shape", "device", "dtype", "ndim")


def refuse(node: fx.Node, why: str, fix: str) -> ValueError:
    """The error for an attention that cannot run under context parallelism."""
    return ValueError(f"context parallelism cannot run attention {describe(node)}: {why}; {fix}")


def mask_is_causal(steps: list[tuple[Any, ...]], values: dict[fx.Node, Any], local: int,
                   anchor: fx.Node) -> bool:
    """True for a causal mask, False for none (raises for anything else). ``steps``: the score
    steps of a written-out softmax, or ``[("sdpa", attn_mask, is_causal)]``; ``values``: the
    masks' nodes evaluated (:func:`evaluate_masks`); ``local``: the sequence length captured."""
    return _classify(_bias(steps, values, local), local, anchor)


def _bias(steps: list[tuple[Any, ...]], values: dict[fx.Node, Any], local: int) -> torch.Tensor:
    """What the score steps add to Q·Kᵀ·scale: the steps applied to zero scores (masks are
    where/fill with a constant, terms are added; the scores' own scale does not matter at 0)."""
    value = lambda x: values[x] if isinstance(x, fx.Node) else x  # noqa: E731
    bias = torch.zeros(())
    for step in steps:
        if step[0] == "sdpa":
            mask, causal = value(step[1]), step[2]
            if mask is not None:
                bias = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.float()
            if causal:
                bias = bias + torch.full((local, local), float("-inf")).triu(1)
        elif step[0] == "scale":
            factor = float(value(step[1]))
            bias = bias / factor if step[2] else bias * factor
        elif step[0] == "add":
            bias = bias + torch.as_tensor(value(step[1])).float()
        elif step[0] == "fill":
            bias = torch.where(torch.as_tensor(value(step[1])), float(value(step[2])), bias)
        else:  # keep: the scores where cond, the value elsewhere
            bias = torch.where(torch.as_tensor(value(step[1])), bias, float(value(step[2])))
    return bias


def _classify(bias: torch.Tensor, local: int, anchor: fx.Node) -> bool:
    """True for a causal mask, False for none; raises for anything else."""
    if bias.numel() == 1:
        if float(bias) <= MASKED_BELOW:
            raise refuse(anchor, "its mask hides every key", "check the model's mask, or use cp = 1")
        return False
    full = torch.broadcast_to(bias, (*bias.shape[:-2], local, local))
    masked = full <= MASKED_BELOW
    if bool((full[~masked] != 0).any()):
        raise refuse(anchor, "it adds a bias to the scores (ALiBi or relative positions?) that ring "
                      "attention does not apply", "use cp = 1 for this model")
    pattern = masked.reshape(-1, local, local)
    if not bool((pattern == pattern[:1]).all()):
        raise refuse(anchor, "its mask differs between samples or heads (a padding mask?)",
                      "pass no attention mask (causal attention needs none) or use cp = 1")
    future = torch.ones(local, local, dtype=torch.bool).triu(1)
    if torch.equal(pattern[0], future):
        return True
    if not bool(pattern[0].any()):
        return False
    raise refuse(anchor, "its mask is neither causal nor empty (an arbitrary mask cannot be split "
                  "into ring blocks)", "use a causal mask built from the sequence length, or cp = 1")


def evaluate_masks(gm: fx.GraphModule, wanted: list[fx.Node],
                   example_inputs: Sequence[Any]) -> dict[fx.Node, Any]:
    """The values of ``wanted`` (mask nodes) on the example inputs, computed by the nodes they
    depend on only. Where they read a tensor's sizes alone, that tensor is not computed: zeros of
    its recorded shape stand in. A graph input whose values they read is refused."""
    if not wanted:
        return {}
    needed, sized = _mask_ancestors(wanted)
    for node in needed:
        if node.op == "placeholder":
            raise refuse(wanted[0], f"its mask depends on the values of input {node.name}",
                          "pass no attention mask (causal attention needs none), or use cp = 1")
    inputs = {n: v for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs,
                                   strict=False)}
    sub, env, feed = fx.Graph(), {}, []
    for node in gm.graph.nodes:
        if node in sized:
            env[node] = sub.placeholder(node.name)
            feed.append(inputs[node] if node in inputs else _stand_in(node, wanted[0]))
        elif node in needed:
            env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[n] for n in wanted))
    with torch.no_grad():
        values = fx.GraphModule(gm, sub)(*feed)
    return dict(zip(wanted, values, strict=True))


def _mask_ancestors(wanted: list[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(nodes whose values the masks need, nodes whose sizes alone they read)."""
    needed: set[fx.Node] = set()
    sized: set[fx.Node] = set()
    stack = list(wanted)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        source = node.args[0] if _reads_size(node) else None
        if isinstance(source, fx.Node):
            sized.add(source)
        stack += [n for n in node.all_input_nodes if n is not source]
    return needed, sized - needed


def _stand_in(node: fx.Node, anchor: fx.Node) -> torch.Tensor:
    record = node.meta.get(META_KEY)
    if record is None or len(record.shapes) != 1:
        raise refuse(anchor, f"its mask reads the size of {describe(node)}, whose shape was not recorded",
                      "use cp = 1 for this model")
    return torch.zeros(record.shapes[0], dtype=getattr(torch, record.dtypes[0]))


def _reads_size(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SIZE_READS
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in _SIZE_ATTRS
        return node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.size.default)
    return False
