"""Data-parallel traffic as it runs, per layer: ZeRO-0 (``replicate``: DDP semantics), ZeRO-1/2
(FSDP2 ``fully_shard(reshard_after_forward=False)``) and ZeRO-3 (``fully_shard``, FSDP2) — each
layer's all-gathers, reduce-scatters or all-reduces on one link, overlapped with the compute of
the layers around it.

Data flow: ``estimate._dp_and_optimizer_s`` turns a pipeline rank's layers into :class:`Unit`
records (unsharded bytes, compute seconds per microbatch) and :func:`dp_step_times` (a two-stream
event simulation, collective times from ``comm``) returns the seconds left on the critical path,
added to the step as ``dp_comm``. ``memory`` adds :func:`in_flight_bytes` (ZeRO-3).

Semantics (FSDP2 ``fully_shard`` per transformer block, as torchtitan applies it; the same
schedule as FSDP1 in Zhao et al., "PyTorch FSDP", VLDB 2023, §3.3–4.1; ZeRO in Rajbhandari et
al., SC'20, §5; DDP's bucketed all-reduce in Li et al., "PyTorch Distributed", VLDB 2020, §3.2.3,
with one bucket per layer):

* A unit is one transformer layer (``fully_shard``/``replicate`` applied to each block, then to the
  model; autopar's runtime, ``runtime/data_parallel.py``, shards each layer of a stage as its own
  unit for ZeRO ≥ 1 and replicates the stage as one module for ZeRO-0); a root unit holds the rest
  (embedding, final norm, LM head).
  The root is gathered once at the start of forward and kept unsharded until the end of backward
  (FSDP2's documented root heuristic), its gradient reduced last.
* Forward (ZeRO ≥ 1, :attr:`Traffic.gather_forward`): when unit ``i`` starts computing, the gather
  of unit ``i + d`` is issued (prefetch depth ``d``, FSDP2's implicit forward prefetch is 1), so
  ``d + 1`` layer units are unsharded at once. Unit ``i`` computes once the previous unit finished
  and its own gather arrived. ZeRO-1/2 gather here the parameters the last optimizer step updated
  (``reshard_after_forward=False``: they stay unsharded until the end of backward).
* Backward (reverse order): under ZeRO-3 every layer was resharded after forward, so it is gathered
  again (:attr:`Traffic.gather_backward`): when unit ``i``'s backward starts, the gather of the next
  unit to run backward is issued. When a unit's backward ends its gradient's reduction is issued
  (:attr:`Traffic.reduce`): a reduce-scatter (ZeRO ≥ 1) or an all-reduce (ZeRO-0). Activation
  recomputation runs inside the unit's backward (checkpointing wraps the block).
* One link: collectives run one at a time in issue order (FSDP2 gives gathers and reductions
  separate streams, but they share the NIC, so their bandwidth adds up to the same time).
  Hence exposed: the first gather, the last reductions, and whatever a unit's collectives take
  beyond its compute — nothing hides once the per-GPU batch is small.
* Each collective is the α-β ring of ``comm`` at the group's size and topology (hierarchical over
  nodes), so its latency grows linearly with the ranks per node and the nodes.
* Gradient accumulation (:func:`step_traffic`): a training loop without pipelining reduces every
  microbatch, and ZeRO-1/2 gather again in every forward (FSDP2 reshards after each backward); a
  ``torch.distributed.pipelining`` schedule (``pipelined``; autopar's runtime drives every plan with
  one, pp 1 included) turns gradient sync and resharding after backward off for the microbatches'
  backwards, so one reduction per step, ZeRO-1/2 gather in the first forward only, and ZeRO-3 still
  gathers in every forward and backward. The reduction is issued after the last microbatch's
  backward, as torch 2.13's pipelining does it (``PipelineStage.perform_reduce_grad`` runs every
  unit's post-backward once all backwards are done: ``reduce_after_backward``), so none of it hides
  behind compute; only a training loop without pipelining reduces each layer as its backward ends.

Per microbatch this moves ``2(n−1)/n·S`` (ZeRO-0: all-reduce; ZeRO-1/2: reduce-scatter plus
all-gather, the same volume) or ``3(n−1)/n·S`` (ZeRO-3: two gathers and a reduce-scatter) over
the same link and issue points, so ZeRO-3 never exposes less than ZeRO-2 on the same units.

Memory in flight (:func:`in_flight_bytes`): the root's unsharded weights and gradients, ``d + 1``
unsharded layer units, and the unsharded gradient of one unit awaiting its reduce-scatter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.comm import Group, all_gather_time_s, all_reduce_time_s, reduce_scatter_time_s

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec

DEFAULT_PREFETCH_DEPTH = 1
"""FSDP2's implicit forward prefetch and explicit backward prefetch: one unit ahead."""


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One data-parallel unit on one device, per microbatch: ``param_bytes`` unsharded (what a
    gather produces and a reduction consumes), ``forward_s`` and ``backward_s`` (recomputation
    included) of compute that the unit's collectives may hide behind."""

    param_bytes: float
    forward_s: float = 0.0
    backward_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Traffic:
    """What one microbatch moves (module docstring): gathers before each unit's forward, again
    before its backward, and each unit's gradient reduction after its backward."""

    gather_forward: bool = False
    gather_backward: bool = False
    reduce: bool = False
    reduce_after_backward: bool = False  # all reductions issued once the backward is over


@dataclass(frozen=True, kw_only=True)
class DpTimes:
    """Compute and data-parallel collectives of a rank (no optimizer): ``total_s`` on the critical
    path, ``compute_s`` of compute alone, ``gather_s`` and ``reduce_s`` of link time."""

    total_s: float
    compute_s: float
    gather_s: float
    reduce_s: float

    @property
    def exposed_s(self) -> float:
        """Collective seconds on the critical path."""
        return self.total_s - self.compute_s

    def __add__(self, other: DpTimes) -> DpTimes:
        return DpTimes(total_s=self.total_s + other.total_s, compute_s=self.compute_s + other.compute_s,
                       gather_s=self.gather_s + other.gather_s, reduce_s=self.reduce_s + other.reduce_s)

    def __mul__(self, count: int) -> DpTimes:
        return DpTimes(total_s=count * self.total_s, compute_s=count * self.compute_s,
                       gather_s=count * self.gather_s, reduce_s=count * self.reduce_s)


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


def microbatch_time_s(root: Unit, layers: list[Unit], *, gather_s: list[float], reduce_s: list[float],
                      root_gather_s: float, root_reduce_s: float, traffic: Traffic,
                      prefetch_depth: int = DEFAULT_PREFETCH_DEPTH) -> DpTimes:
    """The timeline of one microbatch (module docstring): ``layers`` in forward order with the
    time of each one's gather and reduction; ``root`` gathered first and reduced last."""
    if prefetch_depth < 1:
        raise ValueError(f"prefetch_depth = {prefetch_depth!r}: expected an int >= 1")
    link, n = _Link(), len(layers)
    ready = [0.0] * n
    clock = link.run(0.0, root_gather_s) if traffic.gather_forward else 0.0
    issued = 0
    for i in range(n):  # forward
        while traffic.gather_forward and issued < min(n, i + 1 + prefetch_depth):
            ready[issued] = link.run(clock, gather_s[issued])
            issued += 1
        clock = max(clock, ready[i]) + layers[i].forward_s
    clock += root.forward_s
    clock += root.backward_s
    issued = n - 1
    for i in reversed(range(n)):  # backward
        while traffic.gather_backward and issued >= max(0, i - prefetch_depth):
            ready[issued] = link.run(clock, gather_s[issued])
            issued -= 1
        clock = max(clock, ready[i]) + layers[i].backward_s
        if traffic.reduce and not traffic.reduce_after_backward:
            link.run(clock, reduce_s[i])
    if traffic.reduce and traffic.reduce_after_backward:
        for i in reversed(range(n)):
            link.run(clock, reduce_s[i])
    if traffic.reduce:
        link.run(clock, root_reduce_s)
    compute = sum(u.forward_s + u.backward_s for u in (root, *layers))
    reduced = (sum(reduce_s) + root_reduce_s) if traffic.reduce else 0.0
    gathered = link.busy_s - reduced
    return DpTimes(total_s=max(clock, link.free_s), compute_s=compute, gather_s=gathered, reduce_s=reduced)


def step_traffic(*, zero: int, num_microbatches: int, pipelined: bool) -> list[tuple[Traffic, int]]:
    """The microbatches of one step as (what each moves, how many) (module docstring)."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero = {zero!r}: expected 0, 1, 2 or 3")
    m = num_microbatches
    gather, again = zero >= 1, zero == 3
    if not pipelined:
        return [(Traffic(gather_forward=gather, gather_backward=again, reduce=True), m)]
    if m == 1:
        return [(Traffic(gather_forward=gather, gather_backward=again, reduce=True,
                         reduce_after_backward=True), 1)]
    first = Traffic(gather_forward=gather, gather_backward=again)
    middle = Traffic(gather_forward=again, gather_backward=again)  # ZeRO-1/2 stay gathered
    last = Traffic(gather_forward=again, gather_backward=again, reduce=True, reduce_after_backward=True)
    if first == middle:  # ZeRO-0 and ZeRO-3
        return [(first, m - 1), (last, 1)]
    return [(first, 1), (middle, m - 2), (last, 1)]


def dp_step_times(root: Unit, layers: list[Unit], *, zero: int, group: Group, cluster: ClusterSpec,
                  num_microbatches: int, pipelined: bool = False, grad_bytes_ratio: float = 1.0,
                  prefetch_depth: int = DEFAULT_PREFETCH_DEPTH) -> DpTimes:
    """All ``num_microbatches`` of a step on one rank of the data-parallel ``group`` at ZeRO stage
    ``zero``; ``pipelined``: a pipelining schedule drives them (:func:`step_traffic`).
    ``grad_bytes_ratio``: bytes reduced per byte gathered (2 for bf16 weights reduced in fp32)."""
    reduce = all_reduce_time_s if zero == 0 else reduce_scatter_time_s

    def gather(unit: Unit) -> float:
        return all_gather_time_s(unit.param_bytes, group=group, cluster=cluster)

    def reduction(unit: Unit) -> float:
        return reduce(unit.param_bytes * grad_bytes_ratio, group=group, cluster=cluster)

    timing = dict(gather_s=[gather(u) for u in layers], reduce_s=[reduction(u) for u in layers],
                  root_gather_s=gather(root), root_reduce_s=reduction(root), prefetch_depth=prefetch_depth)
    total = DpTimes(total_s=0.0, compute_s=0.0, gather_s=0.0, reduce_s=0.0)
    for traffic, count in step_traffic(zero=zero, num_microbatches=num_microbatches, pipelined=pipelined):
        if count:
            total += microbatch_time_s(root, layers, traffic=traffic, **timing) * count
    return total


def in_flight_bytes(root_param_bytes: float, layer_param_bytes: list[float], *,
                    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH) -> tuple[float, float]:
    """(weights, gradients) unsharded at the peak beyond the sharded states: the root's weights and
    gradients for the whole microbatch, ``d + 1`` consecutive layer units' weights, and one unit's
    unsharded gradient before its reduce-scatter."""
    window = prefetch_depth + 1
    largest = max((sum(layer_param_bytes[i:i + window]) for i in range(len(layer_param_bytes))), default=0.0)
    return root_param_bytes + largest, root_param_bytes + max(layer_param_bytes, default=0.0)
