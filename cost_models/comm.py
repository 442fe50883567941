"""Communication model: alpha-beta times of collectives on a ``ClusterSpec``.

Data flow: ``estimate`` asks for the tensor-parallel, pipeline (P2P) and data-parallel
traffic of a Plan; this module turns bytes and a :class:`Group` (how many ranks, over how
many nodes) into seconds using the cluster's two link levels (``hardware.LinkLevel``: the
per-device, per-direction bus bandwidth ``B`` and the per-step latency ``α``).

Ring formulas (nccl-tests conventions, TECHNIQUES §4; ``S`` the full buffer, ``n`` ranks):
all-reduce ``2(n−1)/n · S/B + 2(n−1)α``; reduce-scatter and all-gather
``(n−1)/n · S/B + (n−1)α``; all-to-all ``(n−1)/n · S/B + (n−1)α``; broadcast and P2P
``S/B + α`` (broadcast pipelined along a ring: ``+ (n−1)α``). A group inside one node uses
the intra-node link; a group with one rank per node the inter-node link; a group with
``L > 1`` ranks on each of ``N > 1`` nodes is hierarchical: reduce-scatter inside the node,
all-reduce of ``S/L`` across nodes (every GPU on its own NIC, in parallel), all-gather
inside the node.

Data-parallel traffic overlaps compute as the training code issues it. ``dp_overlap`` ∈ [0, 1]
(``estimate.CostOptions``) is the share of it issued per layer as the layers run — each layer's
gradient reduced as its backward ends, ZeRO-1/2/3 parameters gathered as the forward reaches
them, simulated on the shared link by ``fsdp.dp_step_times`` — the rest is the whole-model
traffic of :func:`dp_sync_time_s` after the last backward, all of it on the critical path.
:data:`DEFAULT_DP_OVERLAP` is 1: FSDP2 ``fully_shard`` and ``replicate`` applied per transformer
block issue every collective per unit; Megatron-LM as of 2021 all-reduced the gradients after the
last backward, 0 (``megatron.MEGATRON_2021``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.hardware import LinkLevel

if TYPE_CHECKING:  # autopar.cluster imports the hardware catalog: no import cycle at run time
    from autopar.cluster import ClusterSpec

DEFAULT_DP_OVERLAP = 1.0
"""Every data-parallel collective issued per layer (module docstring)."""


@dataclass(frozen=True, kw_only=True)
class Group:
    """``size`` ranks spread evenly over ``num_nodes`` nodes."""

    size: int
    num_nodes: int = 1

    def __post_init__(self) -> None:
        if type(self.size) is not int or self.size < 1:
            raise ValueError(f"Group.size = {self.size!r}: expected an int >= 1")
        if type(self.num_nodes) is not int or not 1 <= self.num_nodes <= self.size:
            raise ValueError(f"Group.num_nodes = {self.num_nodes!r}: expected 1..size({self.size})")

    @property
    def per_node(self) -> int:
        return self.size // self.num_nodes

    @classmethod
    def of(cls, device_ids: Iterable[int], *, cluster: ClusterSpec) -> Group:
        """The group formed by these global device ids (node = id // devices_per_node)."""
        ids = list(device_ids)
        return cls(size=len(ids), num_nodes=len({i // cluster.devices_per_node for i in ids}))


def ring_all_reduce_time_s(size_bytes: float, *, num_ranks: int, bandwidth_bytes_per_s: float,
                           latency_s: float) -> float:
    """Ring all-reduce: ``2(n−1)/n · S/B + 2(n−1)α`` (0 for one rank)."""
    n = num_ranks
    return 0.0 if n <= 1 else 2 * (n - 1) / n * size_bytes / bandwidth_bytes_per_s + 2 * (n - 1) * latency_s


def ring_gather_time_s(size_bytes: float, *, num_ranks: int, bandwidth_bytes_per_s: float,
                       latency_s: float) -> float:
    """Ring reduce-scatter, all-gather or all-to-all of a full buffer ``S``:
    ``(n−1)/n · S/B + (n−1)α``."""
    n = num_ranks
    return 0.0 if n <= 1 else (n - 1) / n * size_bytes / bandwidth_bytes_per_s + (n - 1) * latency_s


def _ring(kind: str, size_bytes: float, num_ranks: int, link: LinkLevel) -> float:
    fn = ring_all_reduce_time_s if kind == "all_reduce" else ring_gather_time_s
    return fn(size_bytes, num_ranks=num_ranks, bandwidth_bytes_per_s=link.bandwidth_bytes_per_s,
              latency_s=link.latency_s)


def _collective(kind: str, size_bytes: float, group: Group, cluster: ClusterSpec) -> float:
    if group.size <= 1 or size_bytes <= 0:
        return 0.0
    if group.num_nodes == 1:
        return _ring(kind, size_bytes, group.size, cluster.intra_node)
    if group.per_node == 1:
        return _ring(kind, size_bytes, group.size, cluster.inter_node)
    local, nodes = group.per_node, group.num_nodes
    inside = _ring("gather", size_bytes, local, cluster.intra_node)
    across = _ring(kind, size_bytes / local, nodes, cluster.inter_node)
    return across + (2 * inside if kind == "all_reduce" else inside)


def all_reduce_time_s(size_bytes: float, *, group: Group, cluster: ClusterSpec) -> float:
    """All-reduce of ``size_bytes`` on every rank of ``group``."""
    return _collective("all_reduce", size_bytes, group, cluster)


def reduce_scatter_time_s(size_bytes: float, *, group: Group, cluster: ClusterSpec) -> float:
    """Reduce-scatter of a full buffer of ``size_bytes`` into ``group.size`` shards."""
    return _collective("gather", size_bytes, group, cluster)


def all_gather_time_s(size_bytes: float, *, group: Group, cluster: ClusterSpec) -> float:
    """All-gather whose result (the full buffer) is ``size_bytes``."""
    return _collective("gather", size_bytes, group, cluster)


def all_to_all_time_s(size_bytes: float, *, group: Group, cluster: ClusterSpec) -> float:
    """All-to-all of ``size_bytes`` per rank; intra- and inter-node parts run concurrently."""
    n, local = group.size, group.per_node
    if n <= 1 or size_bytes <= 0:
        return 0.0
    intra, inter = cluster.intra_node, cluster.inter_node
    inside = (local - 1) / n * size_bytes / intra.bandwidth_bytes_per_s
    if group.num_nodes == 1:
        return inside + (n - 1) * intra.latency_s
    across = (n - local) / n * size_bytes / inter.bandwidth_bytes_per_s
    return max(inside, across) + (n - 1) * inter.latency_s


def broadcast_time_s(size_bytes: float, *, group: Group, cluster: ClusterSpec) -> float:
    """Pipelined ring broadcast: ``S/B + (n−1)α`` on the slowest link the group crosses."""
    if group.size <= 1 or size_bytes <= 0:
        return 0.0
    link = cluster.intra_node if group.num_nodes == 1 else cluster.inter_node
    return size_bytes / link.bandwidth_bytes_per_s + (group.size - 1) * link.latency_s


def p2p_time_s(size_bytes: float, *, cluster: ClusterSpec, same_node: bool) -> float:
    """One send/receive: ``S/B + α`` on the link between the two devices."""
    if size_bytes <= 0:
        return 0.0
    link = cluster.intra_node if same_node else cluster.inter_node
    return size_bytes / link.bandwidth_bytes_per_s + link.latency_s


def tp_volume_elements_per_layer(*, microbatch_size: int, seq_len: int, hidden_size: int, tp: int) -> float:
    """Elements each device moves for one transformer layer and microbatch (forward 2 all-reduces,
    backward 2): ``8 b s h (t−1)/t`` (TECHNIQUES §3)."""
    return 8 * microbatch_size * seq_len * hidden_size * (tp - 1) / tp


def pipeline_p2p_time_s(*, activation_bytes: float, tp: int, cluster: ClusterSpec, same_node: bool,
                        scatter_gather: bool = True) -> float:
    """Send one microbatch's boundary activation (``b s h`` elements) to the next stage.

    With scatter/gather (Megatron-LM) each of the ``t`` tensor-parallel ranks sends ``1/t``
    over its own link, then the receivers all-gather inside their node.
    """
    if not scatter_gather or tp == 1:
        return p2p_time_s(activation_bytes, cluster=cluster, same_node=same_node)
    gather = all_gather_time_s(activation_bytes, group=Group(size=tp), cluster=cluster)
    return p2p_time_s(activation_bytes / tp, cluster=cluster, same_node=same_node) + gather


def dp_sync_time_s(num_params: float, *, bytes_per_element: int, zero: int, group: Group,
                   cluster: ClusterSpec, num_microbatches: int = 1) -> float:
    """Data-parallel traffic per step for ``num_params`` parameters on each device, as one
    collective per kind (the whole-model rule, nothing overlapped).

    ZeRO 0: all-reduce the gradients. ZeRO 1/2: reduce-scatter the gradients, all-gather the
    updated weights. ZeRO 3 (FSDP): per microbatch, all-gather the weights for forward and
    again for backward, and reduce-scatter the gradients. How much of it the layers' compute
    hides when issued per layer is ``fsdp.dp_step_times`` (what ``estimate`` prices at
    ``dp_overlap`` 1).
    """
    size = num_params * bytes_per_element
    if zero == 0:
        return all_reduce_time_s(size, group=group, cluster=cluster)
    scatter = reduce_scatter_time_s(size, group=group, cluster=cluster)
    gather = all_gather_time_s(size, group=group, cluster=cluster)
    return scatter + gather if zero in (1, 2) else num_microbatches * (2 * gather + scatter)


def exposed_dp_time_s(sync_s: float, *, overlap: float, backward_window_s: float) -> float:
    """The part of a whole-model data-parallel sync left on the critical path when ``overlap`` of it
    hides behind a backward of ``backward_window_s`` (at most): ``S − min(overlap·S, window)``;
    the per-layer model (``fsdp``) replaced it in ``estimate``."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"dp_overlap = {overlap!r}: expected a fraction in [0, 1]")
    return sync_s - min(overlap * sync_s, backward_window_s)
