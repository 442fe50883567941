"""A Plan from the user's pinned choices (``fix=``), without any search.

Data flow: ``autopar.compile(..., fix={"pp": 2, "tp": 2, ...})`` → :func:`plan_from_fix`
→ Plan → runtime. Every degree must be pinned or implied by the world size; what is
not pinned gets a plain default (stated below), never a searched one: layers are
split into contiguous, equal-as-possible stages (earlier stages take the remainder),
the schedule is 1F1B (GPipe for one stage), one microbatch per data-parallel rank,
no recomputation, ZeRO 0, and with tp > 1 the caller's shardings (Megatron's
column/row alternation from ``autopar.plans.megatron``). The planner (a later
issue) replaces these defaults with chosen values; the runtime runs either kind of
Plan the same way.
"""

from __future__ import annotations

from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.plans.plan import Plan
from autopar.plans.schema import MESH_AXES, Mesh, Parallelism, Schedule, Sharding, Stage


def _degrees(fix: Fix, world: int) -> tuple[int, int, int, int]:
    tp, pp, cp = fix.tp or 1, fix.pp or 1, fix.cp or 1
    dp = fix.dp if fix.dp is not None else world // (tp * pp * cp)
    if dp * tp * pp * cp != world:
        shown = f" × cp({cp})" if cp > 1 else ""
        raise ValueError(f"dp({dp}) × tp({tp}) × pp({pp}){shown} = {dp * tp * pp * cp} ≠ world size "
                         f"{world}; pin degrees whose product is the cluster's device count")
    return dp, tp, pp, cp


def mesh_grid(*, pp: int, dp: int, cp: int, tp: int) -> list[list[int]]:
    """Pipeline rank → its devices, ``dp``, then ``cp``, then ``tp`` (fastest), the order every
    stage lists them in; device ids run row-major over the ``pp × dp × cp × tp`` mesh."""
    return [[((p * dp + d) * cp + c) * tp + t for d in range(dp) for c in range(cp) for t in range(tp)]
            for p in range(pp)]


def layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous, equal-as-possible ranges; earlier stages take the remainder."""
    if num_layers < num_stages:
        raise ValueError(f"the model has {num_layers} repeated layers, too few for {num_stages} "
                         "pipeline stages; lower pp (or virtual_stages)")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for k in range(num_stages):
        size = base + (1 if k < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def plan_from_fix(model: str, *, graph_fingerprint: str, num_layers: int, cluster: ClusterSpec,
                  fix: Fix, global_batch_size: int, seq_len: int | None,
                  shardings: tuple[Sharding, ...] = ()) -> Plan:
    """The Plan the pinned choices describe, with the defaults above for the rest."""
    world = cluster.num_devices
    dp, tp, pp, cp = _degrees(fix, world)
    virtual = fix.virtual_stages or (2 if fix.schedule == "interleaved" else 1)
    name = fix.schedule or ("1f1b" if pp > 1 else "gpipe")
    if global_batch_size % dp:
        raise ValueError(f"global batch {global_batch_size} is not divisible by dp({dp})")
    local = global_batch_size // dp
    micro = fix.microbatch_size or (local // fix.num_microbatches if fix.num_microbatches else local)
    num_micro = fix.num_microbatches or local // micro
    grid = mesh_grid(pp=pp, dp=dp, cp=cp, tp=tp)
    stages = []
    for k, layers in enumerate(layer_ranges(num_layers, pp * virtual)):
        devices = tuple(grid[k % pp])
        stages.append(Stage(index=k, first_node="", last_node="", layers=layers, devices=devices,
                            recompute=fix.recompute or "none", virtual_chunk=k // pp))
    return Plan(
        model=model, graph_fingerprint=graph_fingerprint, cluster=cluster.to_dict(),
        global_batch_size=global_batch_size, seq_len=seq_len,
        parallelism=Parallelism(dp=dp, tp=tp, pp=pp, ep=fix.ep or 1, cp=cp,
                                sequence_parallel=bool(fix.sequence_parallel)),
        mesh=Mesh(axis_names=MESH_AXES, shape=(pp, dp, cp, tp), device_ids=tuple(range(world))),
        stages=tuple(stages),
        shardings=shardings if tp > 1 else (),
        schedule=Schedule(name=name, microbatch_size=micro, num_microbatches=num_micro,
                          virtual_stages=virtual),
        zero=fix.zero or 0,
    )
