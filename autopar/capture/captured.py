"""The result of capture: an annotated graph plus model-level totals.

``autopar.capture`` returns a :class:`Captured`; passes, the cost model, the
planner, ``autopar.compile`` and the CLI's ``autopar capture`` table read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from autopar.capture.layers import LayerIndex, LayerInfo
from autopar.capture.record import META_KEY, NodeRecord


@dataclass(frozen=True, kw_only=True)
class Captured:
    """An annotated ``fx.GraphModule`` and what capture learned about the model.

    ``flops_fwd``/``flops_bwd`` are totals for one call on the example inputs;
    ``param_count`` counts each parameter tensor once (tied weights once).
    ``warnings`` lists front ends that failed before the one that worked, and nodes
    whose FLOPs could not be counted.
    """

    graph_module: fx.GraphModule
    frontend: str
    model_name: str
    layers: tuple[LayerInfo, ...]
    flops_fwd: int
    flops_bwd: int
    param_count: int
    param_bytes: int
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    warnings: tuple[str, ...]
    capture_time_s: float

    @property
    def flops_per_step(self) -> int:
        """Forward plus backward FLOPs of one training step on the example batch."""
        return self.flops_fwd + self.flops_bwd

    def records(self) -> list[tuple[fx.Node, NodeRecord]]:
        """Every node with its annotation, in graph order."""
        return [(n, n.meta[META_KEY]) for n in self.graph_module.graph.nodes]

    def largest_activations(self, k: int = 5) -> list[tuple[fx.Node, NodeRecord]]:
        """The ``k`` nodes that write the most bytes (ties broken by graph order)."""
        ranked = [(n, r) for n, r in self.records() if r.bytes_written > 0]
        return sorted(ranked, key=lambda item: -item[1].bytes_written)[:k]

    @classmethod
    def build(
        cls,
        *,
        graph_module: fx.GraphModule,
        model: nn.Module,
        frontend: str,
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any],
        layer_index: LayerIndex,
        warnings: tuple[str, ...],
        capture_time_s: float,
    ) -> Captured:
        """Sum the node records into totals and per-layer summaries."""
        records = [n.meta[META_KEY] for n in graph_module.graph.nodes]
        unique = {id(p): p for p in model.parameters()}.values()
        return cls(
            graph_module=graph_module,
            frontend=frontend,
            model_name=type(model).__name__,
            layers=_layer_infos(model, layer_index, records),
            flops_fwd=sum(r.flops_fwd for r in records),
            flops_bwd=sum(r.flops_bwd for r in records),
            param_count=sum(p.numel() for p in unique),
            param_bytes=sum(p.numel() * p.element_size() for p in unique),
            example_args=example_args,
            example_kwargs=example_kwargs,
            warnings=warnings,
            capture_time_s=capture_time_s,
        )


def _layer_infos(
    model: nn.Module, index: LayerIndex, records: list[NodeRecord]
) -> tuple[LayerInfo, ...]:
    fwd = [0] * len(index.blocks)
    bwd = [0] * len(index.blocks)
    for record in records:
        if record.layer is not None:
            fwd[record.layer] += record.flops_fwd
            bwd[record.layer] += record.flops_bwd
    infos = []
    for i, block in enumerate(index.blocks):
        params = {id(p): p for p in model.get_submodule(block).parameters()}.values()
        infos.append(LayerInfo(
            name=block, index=i, stack=index.block_stack[block],
            param_count=sum(p.numel() for p in params), flops_fwd=fwd[i], flops_bwd=bwd[i],
        ))
    return tuple(infos)
