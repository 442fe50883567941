"""Why the planner rejected what it rejected: empty search spaces, infeasibility and runner-up
reasons, in words.

Data flow: when ``space.candidates`` yields nothing, :func:`explain_empty` names the rule
(``space.RULES``) that the degree choices coming closest to a Config break — a pinned schedule that
cannot run, a global batch that no data-parallel degree divides, … — with the values, what was
expected and the fix, suggesting to unpin only what was pinned. :func:`unsharded_message` does the
same when every Config left uses a tensor-parallel degree that the intra-op solver would not shard.
``search`` records an :class:`Infeasible` for every Config whose stages cannot fit
in device memory (the most frugal choice — an even split with the heaviest recomputation
allowed — broken down by the memory model) and calls :func:`alternative_reason` for each
runner-up. When nothing fits, :func:`infeasible_error` turns the closest miss into one
``InfeasiblePlanError`` naming the binding constraint (which stage, how many GiB of weights,
gradients, optimizer state and activations against the capacity) and the cheapest remedies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import ModelProfile
from autopar.cost_models import memory as memory_model
from autopar.planner.build_plan import PlanContext, build_plan, even_split, rank_devices
from autopar.planner.probes import StageModel
from autopar.planner.space import RULES, Config, all_degrees, broken_rule, divisors, schedule_refusal
from autopar.plans import Parallelism, Plan

GIB = 2**30
_CAUSES = {
    "compute": "more compute",
    "recompute": "more recomputation",
    "tp_comm": "more tensor-parallel communication",
    "cp_comm": "more exposed ring-attention transfers (context parallelism)",
    "pp_comm": "more pipeline sends",
    "dp_comm": "more exposed data-parallel gradient sync",
    "ep_comm": "more expert all-to-all",
    "bubble": "a larger pipeline bubble",
    "optimizer": "a slower optimizer step",
}


class InfeasiblePlanError(ValueError):
    """No configuration fits in device memory; the message names the binding constraint."""


@dataclass(frozen=True, kw_only=True)
class Infeasible:
    """A Config whose most frugal split still exceeds memory on ``stage``."""

    config: Config
    parallelism: Parallelism
    stage: int
    need_bytes: float
    capacity_bytes: float
    message: str
    moe: bool = False
    activations_bytes: float = 0.0
    """Activations and logits of the worst stage's devices (what cp and sequence parallelism shrink)."""
    seq_len: int = 0

    @property
    def excess_bytes(self) -> float:
        return self.need_bytes - self.capacity_bytes


Degrees = tuple[int, int, int]
"""(dp, tp, pp)"""


def explain_empty(profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int, fix: Fix,
                  skip_tp: Collection[int] = ()) -> str:
    """Why ``space.candidates`` yields nothing (with ``skip_tp``: nothing at another tensor-parallel
    degree): the furthest rule that any (dp, tp, pp) of the cluster reaches before breaking it."""
    world = cluster.num_devices
    if fix.world_size() > world or world % fix.world_size():
        return f"the pinned degrees {fix.pinned()} do not divide the cluster's {world} devices"
    rules = {d: broken_rule(profile, cluster, d, global_batch_size=global_batch_size, fix=fix)
             for d in all_degrees(cluster, cp=fix.cp or 1) if d[1] not in skip_tp}
    broken = {d: rule for d, rule in rules.items() if rule is not None}
    if not broken:
        return "every configuration is excluded"
    furthest = max(broken.values(), key=RULES.index)
    closest = sorted(d for d, rule in broken.items() if rule == furthest)
    if furthest == "batch":
        return _batch_message(profile, cluster, global_batch_size, fix, closest, rules, skip_tp)
    if furthest == "schedule":
        return _schedule_message(profile, global_batch_size, fix, closest)
    if furthest == "microbatch":
        local_batches = sorted({global_batch_size // dp for dp, _, _ in closest})
        return _microbatch_message(global_batch_size, fix, local_batches)
    if furthest == "ep":
        return (f"pinned ep={fix.ep} must divide dp (expert-parallel groups are data-parallel ranks); "
                f"the pins {fix.pinned()} leave no dp × tp × pp = {world} with dp divisible by {fix.ep} "
                f"and dividing the global batch {global_batch_size}")
    limits = _model_limits(profile, cluster, set(broken.values()), fix)
    return (f"no dp × tp × pp = {world} satisfies {limits}"
            + (f"; pinned pp={fix.pp} exceeds the model's {profile.num_layers} repeated layers"
               if fix.pp is not None and fix.pp > profile.num_layers else ""))


def unsharded_message(profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int, fix: Fix,
                      tps: list[int]) -> str:
    """Every Config left uses a tensor-parallel degree in ``tps`` that the intra-op solver does not
    shard: say so, and why no other degree is allowed (unpinning tp only when it was pinned)."""
    head = (f"the intra-op solver shards nothing at tp={tps} for this model (tensor parallelism costs more "
            "communication than it saves at its width)")
    if fix.tp is not None:
        return f"{head}, and tp is pinned to {fix.tp}; unpin tp or pin tp=1"
    why = explain_empty(profile, cluster, global_batch_size=global_batch_size, fix=fix, skip_tp=tps)
    return f"{head}, and no configuration without it is allowed: {why}"


def _batch_message(profile: ModelProfile, cluster: ClusterSpec, batch: int, fix: Fix, closest: list[Degrees],
                   rules: dict[Degrees, str | None], skip_tp: Collection[int]) -> str:
    """No data-parallel degree that the model and pins allow divides the global batch: the value, the
    degrees that do divide it and what rules them out, and the fix."""
    world, dps = cluster.num_devices, sorted({dp for dp, _, _ in closest})
    if fix.dp is not None:
        head = f"the pinned dp={fix.dp} does not divide the global batch {batch}"
    else:
        head = (f"global batch {batch} cannot be split over any data-parallel degree of the {world} devices: "
                f"dp ∈ {dps} (with tp × pp = {world} ÷ dp) does not divide {batch}")
    clauses, unpin = [], set()
    for dp in divisors(math.gcd(batch, world)):
        mine = {d: rule for d, rule in rules.items() if d[0] == dp}
        if any(rule is None for rule in mine.values()):
            continue  # only in skip_tp's company: unsharded_message said why
        pins = _violated_pins(profile, cluster, batch, fix, dp) if "pins" in mine.values() else set()
        if pins:
            clauses.append(f"dp={dp} (tp × pp = {world // dp}) is ruled out by the pins {fix.pinned()}")
            unpin |= pins
            continue
        left = sorted(tp for tp in skip_tp if world % (dp * tp) == 0)
        only = f"allows only tp={left}" if left else "allows no split"
        clauses.append(f"dp={dp} leaves tp × pp = {world // dp}, which {only} "
                       f"({_model_limits(profile, cluster, set(mine.values()), fix)})")
    nearest = dps[0] * math.ceil(batch / dps[0])
    fixes = [f"use a global batch divisible by {dps[0]} (e.g. {nearest})"]
    if unpin:
        fixes.append("unpin " + "/".join(sorted(unpin)))
    return "; ".join([head, *clauses]) + "; " + " or ".join(fixes)


def _violated_pins(profile: ModelProfile, cluster: ClusterSpec, batch: int, fix: Fix, dp: int) -> set[str]:
    """The degree pins that keep data-parallel degree ``dp`` from a Config it would otherwise have."""
    free = dataclasses.replace(fix, dp=None, tp=None, pp=None)
    names: set[str] = set()
    for d in all_degrees(cluster):
        if d[0] == dp and broken_rule(profile, cluster, d, global_batch_size=batch, fix=free) is None:
            names |= {name for name, value in zip(("dp", "tp", "pp"), d, strict=True)
                      if getattr(fix, name) not in (None, value)}
    return names


def _model_limits(profile: ModelProfile, cluster: ClusterSpec, rules: set[str | None], fix: Fix) -> str:
    """The model's and the cluster's rules among ``rules``, in words."""
    heads = sorted({layer.num_heads for layer in profile.layers if layer.num_heads})
    words = []
    if "layers" in rules:
        words.append(f"pp ≤ the model's {profile.num_layers} repeated layers")
    if "tp" in rules:
        words.append(f"tp dividing the hidden size {profile.hidden_size}"
                     + (f" and the {heads[0] if len(heads) == 1 else heads} heads" if heads else "")
                     + f", within a node of {cluster.devices_per_node} devices")
    if "pins" in rules:
        words.append(f"the pins {fix.pinned()}")
    if "sequence" in rules:
        words.append(f"pinned sequence_parallel needs tp > 1 dividing the {profile.seq_len // (fix.cp or 1)} "
                     "tokens of each context-parallel rank")
    return "; ".join(words) or "the rules"


def _schedule_message(profile: ModelProfile, batch: int, fix: Fix, closest: list[Degrees]) -> str:
    """The pinned schedule cannot run on any degrees that reach it: each kind of reason once (for
    the deepest pipeline, the other pipeline depths named), and what to pin instead."""
    reasons: dict[str, tuple[str, list[int]]] = {}
    for dp, _, pp in sorted(closest, key=lambda d: (-d[2], d)):
        local = batch // dp
        most = local // fix.microbatch_size if fix.microbatch_size else fix.num_microbatches or local
        kind, text = schedule_refusal(fix, pp=pp, num_microbatches=most, num_layers=profile.num_layers)
        reasons.setdefault(kind, (text, []))[1].append(pp)
    texts = []
    for kind, (text, pps) in reasons.items():
        others = sorted(set(pps) - {pps[0]}, reverse=True) if kind in ("layers", "microbatches") else []
        texts.append(text + (f" (likewise for pp = {', '.join(map(str, others))})" if others else ""))
    return "; ".join(texts)


def _microbatch_message(batch: int, fix: Fix, locals_: list[int]) -> str:
    """The microbatch pins fit no local batch (the global batch over a data-parallel degree)."""
    where = f"(global batch {batch} ÷ dp = {locals_} sequences)"
    if fix.microbatch_size and fix.num_microbatches:
        product = fix.microbatch_size * fix.num_microbatches
        return (f"the pinned microbatch_size={fix.microbatch_size} × num_microbatches="
                f"{fix.num_microbatches} = {product} is no local batch {where}; pin values whose product is "
                "one of them")
    name = "microbatch_size" if fix.microbatch_size else "num_microbatches"
    return (f"the pinned {name}={getattr(fix, name)} divides no local batch {where}; pin a divisor of one "
            "of them")


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def memory_shortfall(
    profile: ModelProfile, ctx: PlanContext, config: Config, model: StageModel
) -> Infeasible:
    """Break down the worst stage of the even split under the most frugal recomputation."""
    stages = config.pp * config.virtual_stages
    frugal = model.modes[-1]
    plan = build_plan(ctx, config, even_split(profile.num_layers, stages), [frugal] * stages)
    memory = memory_model.plan_memory(plan, profile)
    worst = max(range(config.pp), key=lambda k: memory[rank_devices(config, k)[0]].total_bytes)
    part = memory[rank_devices(config, worst)[0]]
    weights, grads = part.weights_bytes, part.gradients_bytes
    optimizer = part.model_states_bytes - weights - grads
    capacity = float(ctx.cluster.device.memory_bytes)
    message = (
        f"stage {worst} needs {_gib(part.total_bytes)} GiB on {ctx.cluster.device.name} "
        f"(capacity {_gib(capacity)} GiB): weights {_gib(weights)}, gradients {_gib(grads)}, "
        f"optimizer {_gib(optimizer)}, activations {_gib(part.activations_bytes + part.logits_bytes)}, "
        f"reserve {_gib(part.reserve_bytes)} (recompute={frugal})"
    )
    return Infeasible(
        config=config,
        parallelism=plan.parallelism,
        stage=worst,
        need_bytes=part.total_bytes,
        capacity_bytes=capacity,
        message=message,
        moe=any(layer.moe is not None for layer in profile.layers),
        activations_bytes=part.activations_bytes + part.logits_bytes,
        seq_len=profile.seq_len,
    )


def _sequence_remedies(item: Infeasible, fix: Fix) -> list[str]:
    """When activations are what does not fit: the context-parallel degree that would make them fit
    (activations ÷ cp, the states unchanged: ``cost_models.context_parallel``) and sequence
    parallelism (the norm/dropout/residual regions ÷ t)."""
    config, remedies = item.config, []
    rest = item.need_bytes - item.activations_bytes
    if item.activations_bytes <= 0 or rest >= item.capacity_bytes:
        return remedies  # the states alone do not fit: splitting the sequence cannot help
    share = (f"activations do not fit: {_gib(item.activations_bytes)} GiB of them beside {_gib(rest)} GiB "
             "of the rest")
    cp = next((c for c in (2**k for k in range(1, 16)) if item.seq_len % (2 * c * config.cp) == 0
               and rest + item.activations_bytes / c <= item.capacity_bytes), None)
    if cp is not None:
        pin = "unpin cp or pin " if fix.cp is not None else ""
        remedies.append(f"{share}; try context parallelism, {pin}cp={cp * config.cp} (each microbatch's "
                        f"activations ÷ {cp})")
    if config.pp == 1 and config.schedule == "gpipe" and config.num_microbatches > 1 and fix.schedule is None:
        remedies.append("schedule='1f1b' (one stage then keeps one microbatch's activations, not all "
                        f"{config.num_microbatches})")
    if config.tp > 1 and not config.sequence_parallel:
        remedies.append("sequence_parallel=True (norm, dropout and residual activations ÷ tp)")
    elif config.tp == 1 and fix.tp is None:
        remedies.append("tensor parallelism with sequence_parallel=True (activations ÷ tp)")
    return remedies


def _remedies(item: Infeasible, fix: Fix) -> list[str]:
    config, remedies = item.config, _sequence_remedies(item, fix)
    if fix.recompute not in (None, "full"):
        remedies.append("allow recomputation (drop the recompute pin or pin recompute='full')")
    if config.microbatch_size > 1 or fix.microbatch_size:
        remedies.append("a smaller microbatch (microbatch_size=1)")
    if config.dp > 1 and config.zero < 3:
        remedies.append("shard the model states over data parallelism (zero=3, FSDP)")
    if item.moe and fix.ep is not None:
        remedies.append("unpin ep so the experts can be sharded over more data-parallel ranks")
    if fix.pp or fix.tp:
        remedies.append("unpin pp/tp so the model can be split further")
    remedies.append("more devices or devices with more memory")
    return remedies


def infeasible_error(items: list[Infeasible], cluster: ClusterSpec, fix: Fix) -> InfeasiblePlanError:
    """The error for a search where nothing fits: the closest miss and the remedies."""
    if not items:
        return InfeasiblePlanError(f"no configuration fits on {cluster}")
    closest = min(items, key=lambda item: (item.excess_bytes, item.config))
    pins = f" with pins {fix.pinned()}" if fix.pinned() else ""
    return InfeasiblePlanError(
        f"nothing fits in memory on {cluster}{pins}; the closest configuration "
        f"({closest.config.describe()}): "
        f"{closest.message}. Remedies: " + "; ".join(_remedies(closest, fix))
    )


def alternative_reason(best: Plan, other: Plan, description: str) -> str:
    """``"dp8 tp8 pp16 …: +0.84 s (+9.1 %), mostly a larger pipeline bubble (+0.62 s)"``."""
    assert best.predicted.step_time_s is not None and other.predicted.step_time_s is not None
    delta = other.predicted.step_time_s - best.predicted.step_time_s
    mine, theirs = best.predicted.breakdown_dict(), other.predicted.breakdown_dict()
    changes = {key: theirs.get(key, 0.0) - mine.get(key, 0.0) for key in _CAUSES}
    key = max(sorted(changes), key=lambda k: changes[k])
    share = f", mostly {_CAUSES[key]} (+{changes[key]:.3g} s)" if changes[key] > 0 else ""
    percent = 100 * delta / best.predicted.step_time_s
    return f"{description}: +{delta:.3g} s (+{percent:.1f} %){share}{_ep_reason(best, other, changes)}"


def _ep_reason(best: Plan, other: Plan, changes: dict[str, float]) -> str:
    """What a different expert-parallel degree changed: the all-to-all against the gradient sync
    (experts replicated on more ranks sync more gradient bytes) and the rest."""
    ep, mine = other.parallelism.ep, best.parallelism.ep
    if ep == mine:
        return ""
    return (f"; ep{ep} instead of ep{mine}: expert all-to-all {changes['ep_comm']:+.3g} s, gradient sync "
            f"{changes['dp_comm']:+.3g} s, compute {changes['compute'] + changes['recompute']:+.3g} s")
