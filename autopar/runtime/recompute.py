"""Activation recomputation of a stage module, per the Plan's stage setting.

``"full"``: every layer of the stage runs under ``torch.utils.checkpoint``, so only
layer inputs are kept and the layer is recomputed in backward. ``"selective"``
(Korthikanti et al. 2022): layers are checkpointed with a selective policy that
saves the outputs of matrix multiplications and recomputes the rest (attention's
softmax/dropout and the s×s scores, norms, activations). ``"none"``: unchanged.
The stage graph is regrouped into one submodule per layer with
``torch.fx.passes.split_module`` so that each layer is one checkpoint region.

Context parallelism (``cp_rewrite.RingAttention``): under ``"full"`` the ring is recomputed with
its layer (every cp rank replays it at the same point of the schedule, so the K/V exchanges pair
up; the replay never stops early); under ``"selective"`` each ring attention is its own region,
outside the checkpoint, so its output and log-sum-exp are saved and backward issues no forward
exchanges again (the ring's block kernels are not ATen matmuls the policy could save).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import autopar.kernels  # noqa: F401 - registers torch.ops.autopar.flash_attention
from autopar.capture.record import META_KEY
from autopar.runtime.cp_rewrite import is_ring_attention, ring_attention_modules
from autopar.runtime.expert_parallel import has_expert_parallel

_SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.autopar.flash_attention.default,  # the fused kernel: saved, not re-run, by selective
}


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class LayerUnit(nn.Module):
    """One layer of a regrouped stage as its own module: the unit that FSDP2 shards, gathers and
    reshards (``runtime.data_parallel``), as the per-layer model ``cost_models.fsdp`` prices it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


class Recomputed(LayerUnit):
    """Runs ``inner`` under activation checkpointing (full or selective)."""

    def __init__(self, inner: nn.Module, mode: str) -> None:
        super().__init__(inner)
        self.mode = mode
        self.exchanges = has_expert_parallel(inner) or bool(ring_attention_modules(inner))

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args)
        context = None
        if self.mode == "selective":
            context = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
        kwargs: dict[str, Any] = {"context_fn": context} if context is not None else {}
        if self.exchanges:  # replay the whole layer: its all-to-alls / ring P2P must run on every rank
            kwargs["early_stop"] = False
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def apply_recompute(gm: fx.GraphModule, mode: str, *, regroup: bool = False) -> nn.Module:
    """``gm`` with each layer wrapped for recomputation; ``gm`` itself for ``"none"`` unless
    ``regroup`` (then each layer becomes a plain :class:`LayerUnit`, for per-layer sharding)."""
    if mode == "none" and not regroup:
        return gm
    assert mode in ("none", "selective", "full"), mode
    saved = {n for n in gm.graph.nodes if is_ring_attention(gm, n)} if mode == "selective" else set()
    part_of = _partitions(gm, saved)
    regrouped = split_module(gm, gm, lambda node: part_of[node], keep_original_order=True)
    for name, child in list(regrouped.named_children()):
        keep = bool(saved) and bool(ring_attention_modules(child))  # a saved ring attention region
        if name.startswith("submod_") and _is_layer_part(child) and not keep:
            setattr(regrouped, name, Recomputed(child, mode) if mode != "none" else LayerUnit(child))
    return regrouped


def _partitions(gm: fx.GraphModule, alone: set[fx.Node]) -> dict[fx.Node, int]:
    """Consecutive nodes of one layer share a partition; other runs, and each node of ``alone``,
    get their own."""
    part_of: dict[fx.Node, int] = {}
    part, previous = 0, object()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        record = node.meta.get(META_KEY)
        layer = None if record is None else record.layer
        if node in alone:  # its own partition; the next node starts another
            part, previous = part + 1, object()
            part_of[node] = part
            continue
        if node.op != "get_attr" and layer != previous:
            part += 1
            previous = layer
        part_of[node] = part
    for node in gm.graph.nodes:  # attributes join the partition of their first user
        if node.op == "get_attr" and node.users:
            part_of[node] = min(part_of.get(u, part) for u in node.users)
    return part_of


def _is_layer_part(module: nn.Module) -> bool:
    if not isinstance(module, fx.GraphModule):
        return False
    layers = {getattr(n.meta.get(META_KEY), "layer", None) for n in module.graph.nodes
              if n.op not in ("placeholder", "output", "get_attr")}
    return len(layers) == 1 and None not in layers
