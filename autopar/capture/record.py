"""The typed per-node annotation that capture writes to ``node.meta["autopar"]``.

Capture (``autopar.capture``) fills one :class:`NodeRecord` per fx node; passes,
cost models, the planner and the views read it. Upstream keys (``val``,
``tensor_meta``, ``stack_trace``, ``nn_module_stack``) are left in place.
"""

from __future__ import annotations

from dataclasses import dataclass

META_KEY = "autopar"


@dataclass(frozen=True, kw_only=True)
class NodeRecord:
    """What autopar knows about one node of a captured graph.

    ``shapes``/``dtypes`` describe each tensor the node produces (flattened over
    tuples and pytrees; empty for non-tensor results). FLOPs count multiply-adds as
    two operations (a matmul (m×k)(k×n) is 2mkn), as ``torch.utils.flop_counter`` does.
    ``flops_bwd`` counts the backward FLOPs this node causes when every floating
    input that may need a gradient gets one. ``bytes_read``/``bytes_written`` are the
    tensor bytes a naive (unfused) kernel reads and writes. ``param_bytes`` is the
    bytes of parameters this node owns (``get_attr`` of a parameter, a leaf module
    call, or an exported parameter placeholder). ``layer`` is the index of the
    repeated block (transformer layer) the node belongs to, counted over all repeated
    stacks in execution order, or None outside any block.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    flops_fwd: int
    flops_bwd: int
    bytes_read: int
    bytes_written: int
    param_bytes: int
    module_path: str
    layer: int | None

    @property
    def output_bytes(self) -> int:
        """Bytes of the tensors this node produces (same as ``bytes_written``)."""
        return self.bytes_written
