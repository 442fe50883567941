"""Fused attention: replace every attention in a captured graph by one FlashAttention-2 node.

Data flow: ``autopar.capture`` → annotated graph → :func:`fused_attention_pass` (behind the
:class:`FusedAttention` config) → a graph where each attention is one
``autopar.kernels.flash_scaled_dot_product_attention`` node (SDPA's signature; the Triton
FlashAttention-2 kernels of Dao 2023 where they can run, SDPA otherwise) → cost models (no
s² score tensors left in the node records), planner, runtime.

``attention_patterns.find_attention`` finds SDPA calls and written-out
``softmax(Q·Kᵀ·scale + mask)·V`` (dropout optional); ``attention_rewrite.rewrite_attention``
turns each match into SDPA arguments and one node. What was replaced, and why any attention was
left alone, is in ``gm.meta["autopar_fused_attention"]`` (:func:`fused_attention_record`), in
graph order; the log says it too. New nodes get ``node.meta["autopar"]`` records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx

from autopar.capture.record import META_KEY
from autopar.kernels.attention import flash_scaled_dot_product_attention
from autopar.passes.fused_attention.patterns import AttentionSkip, find_attention
from autopar.passes.fused_attention.rewrite import UnfitError, rewrite_attention
from autopar.passes.runner import PassContext

RECORD_KEY = "autopar_fused_attention"
log = logging.getLogger("autopar.passes")


@dataclass(frozen=True, kw_only=True)
class FusedAttention:
    """Fused attention: ``autopar.transform(model, x, passes=[FusedAttention()])``.

    ``sdpa``: replace ``scaled_dot_product_attention`` calls; ``softmax``: replace attention
    written out as softmax and matmuls (Hugging Face "eager" attention, nanoGPT-style code).
    """

    name: ClassVar[str] = "fused_attention"

    sdpa: bool = True
    softmax: bool = True

    def __post_init__(self) -> None:
        for field_name in ("sdpa", "softmax"):
            if not isinstance(getattr(self, field_name), bool):
                raise ValueError(f"FusedAttention.{field_name} = {getattr(self, field_name)!r} is invalid: "
                                 "expected True or False")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return fused_attention_pass(gm, ctx, config=self)


@dataclass(frozen=True, kw_only=True)
class AttentionRecord:
    """One attention the pass met: the fused node it became, or why it was left alone.

    ``kernel_note`` is empty when the Triton kernel covers the shapes and dtypes (on a GPU, or
    with ``TRITON_INTERPRET=1``), else why that node will run SDPA instead.
    """

    node: str
    module_path: str
    layer: int | None
    form: str
    replaced: bool
    reason: str = ""
    mask: str = "none"
    causal: bool = False
    dropout: str = "0.0"
    kv_groups: int = 1
    kernel_note: str = ""


@dataclass(frozen=True)
class FusedAttentionRecord:
    """Every attention of the graph, in order (``gm.meta["autopar_fused_attention"]``)."""

    entries: tuple[AttentionRecord, ...]

    @property
    def replaced(self) -> tuple[AttentionRecord, ...]:
        return tuple(e for e in self.entries if e.replaced)

    @property
    def skipped(self) -> tuple[AttentionRecord, ...]:
        return tuple(e for e in self.entries if not e.replaced)


def fused_attention_record(gm: fx.GraphModule) -> FusedAttentionRecord | None:
    """What the pass did to ``gm`` (None when it did not run)."""
    record = gm.meta.get(RECORD_KEY)
    return record if isinstance(record, FusedAttentionRecord) else None


def fused_attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The fused attention nodes of ``gm``."""
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is flash_scaled_dot_product_attention]


def fused_attention_pass(gm: fx.GraphModule, ctx: PassContext, *, config: FusedAttention) -> fx.GraphModule:
    """Replace each attention of ``gm`` by one fused node (see the module docstring)."""
    entries = []
    for found in find_attention(gm):
        where = _where(found.anchor)
        if isinstance(found, AttentionSkip):
            entries.append(AttentionRecord(node=found.anchor.name, form="other", replaced=False,
                                           reason=found.reason, **where))
            continue
        if not getattr(config, found.form):
            entries.append(AttentionRecord(node=found.anchor.name, form=found.form, replaced=False,
                                           reason=f"FusedAttention({found.form}=False)", **where))
            continue
        try:
            done = rewrite_attention(gm, found, where)
        except UnfitError as err:
            entries.append(AttentionRecord(node=found.anchor.name, form=found.form, replaced=False,
                                           reason=str(err), **where))
            continue
        entries.append(AttentionRecord(
            node=done.node.name, form=found.form, replaced=True, mask=done.mask, causal=bool(found.is_causal),
            dropout=str(found.dropout), kv_groups=done.kv_groups, kernel_note=done.kernel_note, **where))
    for entry in entries:
        log.info("fused attention %s %s: %s", entry.node, entry.module_path or "-",
                 "replaced" if entry.replaced else f"left alone, {entry.reason}")
    gm.meta[RECORD_KEY] = FusedAttentionRecord(tuple(entries))
    gm.graph.lint()
    gm.recompile()
    return gm


def _where(anchor: fx.Node) -> dict[str, Any]:
    record = anchor.meta.get(META_KEY)
    return {"module_path": record.module_path if record else "", "layer": record.layer if record else None}


def _where(anchor: fx.Node) -> dict[str, Any]:
    record = anchor.meta.get(META_KEY)
    return {"module_path": record.module_path if record else "", "layer": record.layer if record else None}
