"""Fully sharded data parallelism (ZeRO-3, FSDP2) as it runs: per-unit all-gathers and
reduce-scatters on one link, overlapped with each unit's compute.

Data flow: ``estimate._dp_and_optimizer_s`` (plans with ``zero`` = 3) turns a pipeline rank's
layers into :class:`Unit` records (unsharded bytes, compute seconds per microbatch) with
:func:`units_of`, and :func:`fsdp_step_times` (a two-stream event simulation, collective
times from ``comm.all_gather_time_s`` / ``comm.reduce_scatter_time_s``) returns the seconds left on
the critical path, added to the step as ``dp_comm``. ``memory`` adds :func:`in_flight_bytes`.

Semantics (FSDP2 ``fully_shard`` per transformer block, as torchtitan applies it; the same
schedule as FSDP1 in Zhao et al., "PyTorch FSDP", VLDB 2023, §3.3–4.1; ZeRO-3 in Rajbhandari et
al., SC'20, §5.3):

* A unit is one transformer layer; a root unit holds the rest (embedding, final norm, LM head).
  The root is gathered once at the start of forward and kept unsharded until the end of backward
  (FSDP2's documented root heuristic), its gradient reduce-scattered last.
* Forward: when unit ``i`` starts computing, the gather of unit ``i + d`` is issued (prefetch depth
  ``d``, FSDP2's implicit forward prefetch is 1), so ``d + 1`` layer units are unsharded at once.
  Unit ``i`` computes once the previous unit finished and its own gather arrived.
* Backward (reverse order): every layer was resharded after forward, so it is gathered again;
  when unit ``i``'s backward starts, the gather of the next unit to run backward is issued, and
  when it ends its gradients' reduce-scatter is issued. Activation recomputation runs inside the
  unit's backward (checkpointing wraps the block).
* One link: gathers and reduce-scatters run one at a time in issue order (FSDP2 gives them
  separate streams, but they share the NIC, so their bandwidth adds up to the same time).
  Hence exposed: the first gather, the last reduce-scatter, and whatever a unit's collectives
  take beyond its compute — nothing hides once the per-GPU batch is small.
* Each collective is the α-β ring of ``comm`` at the group's size and topology (hierarchical over
  nodes), so its latency grows linearly with the ranks per node and the nodes.
* Gradient accumulation: with ``reduce_every_microbatch`` (FSDP2 without pipelining: every
  microbatch reduce-scatters) each microbatch is the same timeline; a pipelining schedule defers
  the reduce-scatter to the last microbatch (``torch.distributed.pipelining`` turns gradient sync
  off for the others), so only that one pays it.

Memory in flight (:func:`in_flight_bytes`): the root's unsharded weights and gradients, ``d + 1``
unsharded layer units, and the unsharded gradient of one unit awaiting its reduce-scatter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.comm import Group, all_gather_time_s, reduce_scatter_time_s

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec

DEFAULT_PREFETCH_DEPTH = 1
"""FSDP2's implicit forward prefetch and explicit backward prefetch: one unit ahead."""


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One FSDP unit on one device, per microbatch: ``param_bytes`` unsharded (what a gather
    produces and a reduce-scatter consumes), ``forward_s`` and ``backward_s`` (recomputation
    included) of compute that the unit's collectives may hide behind."""

    param_bytes: float
    forward_s: float = 0.0
    backward_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class FsdpTimes:
    """One step of a rank: ``total_s`` of its compute and FSDP collectives (no optimizer),
    ``compute_s`` of compute alone, ``gather_s`` and ``scatter_s`` of link time."""

    total_s: float
    compute_s: float
    gather_s: float
    scatter_s: float

    @property
    def exposed_s(self) -> float:
        """Collective seconds on the critical path."""
        return self.total_s - self.compute_s


class _Link:
    """One shared link: collectives run one at a time in issue order."""

    def __init__(self) -> None:
        self.free_s = 0.0
        self.busy_s = 0.0

    def run(self, issue_s: float, duration_s: float) -> float:
        """When a collective issued at ``issue_s`` finishes."""
        self.free_s = max(issue_s, self.free_s) + duration_s
        self.busy_s += duration_s
        return self.free_s


def microbatch_time_s(root: Unit, layers: list[Unit], *, gather_s: list[float], scatter_s: list[float],
                      root_gather_s: float, root_scatter_s: float, reduce_scatter: bool = True,
                      prefetch_depth: int = DEFAULT_PREFETCH_DEPTH) -> FsdpTimes:
    """The timeline of one microbatch (module docstring): ``layers`` in forward order with the
    time of each one's gather and reduce-scatter; ``root`` gathered first and reduced last."""
    if prefetch_depth < 1:
        raise ValueError(f"prefetch_depth = {prefetch_depth!r}: expected an int >= 1")
    link, n = _Link(), len(layers)
    ready = [0.0] * n
    clock = link.run(0.0, root_gather_s)
    issued = 0
    for i in range(n):  # forward
        while issued < min(n, i + 1 + prefetch_depth):
            ready[issued] = link.run(clock, gather_s[issued])
            issued += 1
        clock = max(clock, ready[i]) + layers[i].forward_s
    clock += root.forward_s
    clock += root.backward_s
    issued = n - 1
    for i in reversed(range(n)):  # backward
        while issued >= max(0, i - prefetch_depth):
            ready[issued] = link.run(clock, gather_s[issued])
            issued -= 1
        clock = max(clock, ready[i]) + layers[i].backward_s
        if reduce_scatter:
            link.run(clock, scatter_s[i])
    if reduce_scatter:
        link.run(clock, root_scatter_s)
    compute = sum(u.forward_s + u.backward_s for u in (root, *layers))
    scatter = (sum(scatter_s) + root_scatter_s) if reduce_scatter else 0.0
    return FsdpTimes(total_s=max(clock, link.free_s), compute_s=compute, gather_s=link.busy_s - scatter,
                     scatter_s=scatter)


def fsdp_step_times(root: Unit, layers: list[Unit], *, group: Group, cluster: ClusterSpec,
                    num_microbatches: int, reduce_every_microbatch: bool = True,
                    grad_bytes_ratio: float = 1.0, prefetch_depth: int = DEFAULT_PREFETCH_DEPTH) -> FsdpTimes:
    """All ``num_microbatches`` of a step on one rank of the data-parallel ``group``.
    ``grad_bytes_ratio``: bytes reduced per byte gathered (2 for bf16 weights reduced in fp32)."""
    def gather(unit: Unit) -> float:
        return all_gather_time_s(unit.param_bytes, group=group, cluster=cluster)

    def scatter(unit: Unit) -> float:
        return reduce_scatter_time_s(unit.param_bytes * grad_bytes_ratio, group=group, cluster=cluster)

    timing = dict(gather_s=[gather(u) for u in layers], scatter_s=[scatter(u) for u in layers],
                  root_gather_s=gather(root), root_scatter_s=scatter(root), prefetch_depth=prefetch_depth)
    last = microbatch_time_s(root, layers, reduce_scatter=True, **timing)
    if num_microbatches == 1:
        return last
    other = last if reduce_every_microbatch else microbatch_time_s(root, layers, reduce_scatter=False,
                                                                    **timing)
    k = num_microbatches - 1
    return FsdpTimes(total_s=last.total_s + k * other.total_s,
                     compute_s=last.compute_s + k * other.compute_s,
                     gather_s=last.gather_s + k * other.gather_s,
                     scatter_s=last.scatter_s + k * other.scatter_s)


def in_flight_bytes(root_param_bytes: float, layer_param_bytes: list[float], *,
                    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH) -> tuple[float, float]:
    """(weights, gradients) unsharded at the peak beyond the sharded states: the root's weights and
    gradients for the whole microbatch, ``d + 1`` consecutive layer units' weights, and one unit's
    unsharded gradient before its reduce-scatter."""
    window = prefetch_depth + 1
    largest = max((sum(layer_param_bytes[i:i + window]) for i in range(len(layer_param_bytes))), default=0.0)
    return root_param_bytes + largest, root_param_bytes + max(layer_param_bytes, default=0.0)
