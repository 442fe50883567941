"""Turn a chosen configuration and stage split into a ``Plan``.

Data flow: ``search`` (a :class:`~autopar.planner.space.Config`, layer ranges and a
recomputation mode per stage) → :func:`build_plan` → ``Plan`` (then ``estimate_plan``
fills its prediction). The device layout is autopar's standard one, the same as pinned
plans (``autopar.plans.pinned``): tensor parallelism fastest (inside a node), then data
parallelism, then pipeline ranks; stage ``k`` runs on pipeline rank ``k mod pp`` as
virtual chunk ``k // pp``. Expert parallelism is ``Parallelism.ep`` only: the mesh keeps its
``pp × dp × tp`` axes (an ``ep`` axis would have to split ``dp``, whose size the Plan checks
against ``dp``), and the runtime forms groups of ``ep`` consecutive data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.planner.space import Config
from autopar.plans import MESH_AXES, Mesh, Parallelism, Plan, Schedule, Sharding, Stage
from autopar.plans.pinned import layer_ranges, mesh_grid


@dataclass(frozen=True, kw_only=True)
class PlanContext:
    """What every Plan of one search shares."""

    model: str
    graph_fingerprint: str
    cluster: ClusterSpec
    global_batch_size: int
    seq_len: int | None
    num_layers: int
    shardings: Callable[[Config], tuple[Sharding, ...] | None] = lambda config: None
    """``shardings(config)``: the per-node tensor-parallel strategies for a configuration (the
    intra-op solver's answer for a captured graph); None for an analytic profile (no graph),
    where the cost model's Megatron-LM layout is assumed."""


def rank_devices(config: Config, rank: int) -> tuple[int, ...]:
    """Device ids of pipeline rank ``rank``: ``dp × cp × tp`` of them, tp fastest (the mesh order)."""
    return tuple(mesh_grid(pp=config.pp, dp=config.dp, cp=config.cp, tp=config.tp)[rank])


def even_split(num_layers: int, num_stages: int) -> tuple[tuple[int, int], ...]:
    """Contiguous, equal-as-possible layer ranges (earlier stages take the remainder), as pinned
    plans split them (``autopar.plans.pinned``)."""
    return tuple(layer_ranges(num_layers, num_stages))


def build_plan(
    ctx: PlanContext, config: Config, split: Sequence[tuple[int, int]], recompute: Sequence[str]
) -> Plan:
    """The Plan running ``config`` with stage ``k`` on layers ``split[k]``."""
    pp = config.pp
    stages = tuple(
        Stage(
            index=k,
            first_node="",
            last_node="",
            layers=tuple(layers),
            devices=rank_devices(config, k % pp),
            recompute=mode,
            virtual_chunk=k // pp,
        )  # type: ignore[arg-type]
        for k, (layers, mode) in enumerate(zip(split, recompute, strict=True))
    )
    return Plan(
        model=ctx.model,
        graph_fingerprint=ctx.graph_fingerprint,
        cluster=ctx.cluster.to_dict(),
        global_batch_size=ctx.global_batch_size,
        seq_len=ctx.seq_len,
        parallelism=Parallelism(dp=config.dp, tp=config.tp, pp=pp, ep=config.ep, cp=config.cp,
                                sequence_parallel=config.sequence_parallel),
        mesh=Mesh(axis_names=MESH_AXES, shape=(pp, config.dp, config.cp, config.tp),
                  device_ids=tuple(range(ctx.cluster.num_devices))),
        stages=stages,
        shardings=(ctx.shardings(config) or ()) if config.tp > 1 else (),
        schedule=Schedule(
            name=config.schedule,
            microbatch_size=config.microbatch_size,  # type: ignore[arg-type]
            num_microbatches=config.num_microbatches,
            virtual_stages=config.virtual_stages,
        ),
        zero=config.zero,
    )
