"""The planner's search space: every configuration the outer search may try.

Data flow: a ``ModelProfile``, a ``ClusterSpec``, the global batch and the user's pins
(``autopar.Fix``) go in; :func:`candidates` yields :class:`Config` records (degrees,
schedule, microbatching, ZeRO stage) that the inter-op solver (``inter_op``) turns into
stage splits with per-stage recomputation. Nothing here costs anything.

Rules (each one a property of the runtime or of the model, not a heuristic):

* ``dp × tp × pp`` is the device count; ``tp`` divides the attention heads and the hidden
  size and, unless pinned, stays inside a node (Megatron-LM's rule; a pin may cross nodes);
  ``pp`` is at most the number of repeated layers.
* The global batch divides by ``dp × microbatch_size``; ``num_microbatches`` follows.
* Without pipelining the schedule is ``gpipe`` (all forwards, then all backwards: torch's
  GPipe on one stage), or ``1f1b`` when pinned (forward and backward per microbatch: plain
  gradient accumulation, one microbatch's activations alive; not searched yet). With pipelining:
  GPipe, 1F1B (at least ``pp`` microbatches, as torch's schedule requires), zero-bubble
  (ZB-H1) and interleaved 1F1B with ``v`` chunks per rank, where ``pp × v`` divides the
  layers (equal chunks, as Megatron-LM requires) and ``num_microbatches`` divides by ``pp``.
* ZeRO stages 0, 1 and 3 (FSDP) when ``dp > 1``; stage 2 costs what stage 1 costs in this
  cost model and saves less than 3, so it is not searched unless pinned.
* Expert parallelism (models with MoE layers only): ``ep`` divides ``dp`` and every MoE layer's
  expert count, so ``ep ∈ divisors(gcd(dp, E₁, E₂, …))`` (DeepSpeed-MoE's layout: ``ep``
  consecutive data-parallel ranks share the experts, ``cost_models.moe``); ``ep = 1`` replicates
  the experts on every data-parallel rank. Any ``tp`` goes with it: the MoE layers run whole on
  every tensor-parallel rank, each tp coordinate with its own expert-parallel groups (the runtime's
  ``ExpertGroups``). Without MoE layers ``ep`` is 1, and pinning more is an error
  (:func:`check_ep_pin`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import ModelProfile
from autopar.cost_models.moe import num_experts_gcd

MAX_VIRTUAL_STAGES = 8
"""Interleaving deeper than this adds P2P traffic for bubbles already below 1/8 of 1F1B's."""


@dataclass(frozen=True, kw_only=True, order=True)
class Config:
    """One point of the outer search (stage split and recomputation are chosen per Config)."""

    dp: int
    tp: int
    pp: int
    schedule: str
    virtual_stages: int
    microbatch_size: int
    num_microbatches: int
    zero: int
    ep: int = 1

    @property
    def degrees(self) -> tuple[int, int, int, int]:
        return self.dp, self.tp, self.pp, self.ep

    def describe(self) -> str:
        """``dp8 tp8 pp16 interleaved(v2) b1×m24 zero0`` (`` ep4`` after pp when ``ep > 1``): how
        alternatives are named."""
        sched = f"interleaved(v{self.virtual_stages})" if self.schedule == "interleaved" else self.schedule
        ep = f" ep{self.ep}" if self.ep > 1 else ""
        return (
            f"dp{self.dp} tp{self.tp} pp{self.pp}{ep} {sched} b{self.microbatch_size}"
            f"×m{self.num_microbatches} zero{self.zero}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_choices(profile: ModelProfile, cluster: ClusterSpec, world: int, fix: Fix) -> list[int]:
    if fix.tp is not None:
        return [fix.tp]
    heads = {layer.num_heads for layer in profile.layers if layer.num_heads}
    limit = cluster.devices_per_node
    return [
        t
        for t in divisors(world)
        if t <= limit and profile.hidden_size % t == 0 and all(a % t == 0 for a in heads)
    ]


def _schedules(pp: int, num_layers: int, m: int, fix: Fix) -> Iterator[tuple[str, int]]:
    if pp == 1:  # one stage: a pinned 1F1B runs forward and backward per microbatch (less memory)
        if fix.schedule in (None, "gpipe", "1f1b") and fix.virtual_stages in (None, 1):
            yield fix.schedule or "gpipe", 1
        return
    for name in ("gpipe", "1f1b", "zero_bubble"):
        if name == "zero_bubble" and fix.recompute not in (None, "none") and fix.schedule != name:
            continue  # the runtime does not combine them unless asked (search._modes)
        if name == "1f1b" and m < pp:
            continue  # torch's Schedule1F1B needs a microbatch per stage at least
        if fix.schedule in (None, name) and fix.virtual_stages in (None, 1):
            yield name, 1
    if fix.schedule not in (None, "interleaved") or m % pp:
        return
    for v in range(2, MAX_VIRTUAL_STAGES + 1):
        if fix.virtual_stages in (None, v) and num_layers % (pp * v) == 0:
            yield "interleaved", v


def _microbatches(local_batch: int, fix: Fix) -> list[int]:
    sizes = [b for b in divisors(local_batch) if fix.microbatch_size in (None, b)]
    if fix.num_microbatches is not None:
        sizes = [b for b in sizes if local_batch // b == fix.num_microbatches]
    return sizes


def candidates(
    profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int, fix: Fix
) -> Iterator[Config]:
    """Every configuration allowed by the rules above and the pins, in a fixed order."""
    world, num_layers = cluster.num_devices, profile.num_layers
    for tp in _tp_choices(profile, cluster, world, fix):
        for pp in divisors(world // tp):
            dp = world // (tp * pp)
            if pp > max(num_layers, 1) or fix.pp not in (None, pp) or fix.dp not in (None, dp):
                continue
            if global_batch_size % dp:
                continue
            for b in _microbatches(global_batch_size // dp, fix):
                m = global_batch_size // (dp * b)
                for schedule, v in _schedules(pp, num_layers, m, fix):
                    for zero in _zero_stages(dp, fix):
                        for ep in _ep_choices(profile, dp, fix):
                            yield Config(
                                dp=dp,
                                tp=tp,
                                pp=pp,
                                schedule=schedule,
                                virtual_stages=v,
                                microbatch_size=b,
                                num_microbatches=m,
                                zero=zero,
                                ep=ep,
                            )


def _ep_choices(profile: ModelProfile, dp: int, fix: Fix) -> list[int]:
    """Expert-parallel degrees for ``dp`` data-parallel ranks (module docstring)."""
    experts = num_experts_gcd(profile)
    return [e for e in divisors(math.gcd(dp, experts or 1)) if fix.ep in (None, e)]


def check_ep_pin(profile: ModelProfile, fix: Fix) -> None:
    """A pinned ``ep > 1`` needs MoE layers whose expert counts it divides (ValueError otherwise)."""
    if fix.ep is None or fix.ep == 1:
        return
    experts = num_experts_gcd(profile)
    if not experts:
        raise ValueError(f"fix['ep'] = {fix.ep}: expert parallelism needs MoE layers and this model has "
                         "none; add passes=[autopar.passes.MoE(num_experts=...)] or drop the ep pin")
    if experts % fix.ep:
        raise ValueError(f"fix['ep'] = {fix.ep} does not divide the MoE layers' {experts} experts (gcd over "
                         f"layers); pin ep to a divisor of {experts}: {divisors(experts)}")


def _zero_stages(dp: int, fix: Fix) -> tuple[int, ...]:
    if fix.zero is not None:
        return (fix.zero,)
    return (0, 1, 3) if dp > 1 else (0,)


def explain_empty(profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int, fix: Fix) -> str:
    """Why :func:`candidates` yields nothing: the first rule every degree choice breaks."""
    world = cluster.num_devices
    if not _tp_choices(profile, cluster, world, fix):
        return (
            f"no tensor-parallel degree divides both the hidden size {profile.hidden_size} and "
            f"the heads within a node of {cluster.devices_per_node} devices"
            + (f" (pinned tp={fix.tp})" if fix.tp else "")
        )
    if fix.world_size() > world or world % fix.world_size():
        return f"the pinned degrees {fix.pinned()} do not divide the cluster's {world} devices"
    if fix.pp is not None and fix.pp > profile.num_layers:
        return f"pp={fix.pp} exceeds the model's {profile.num_layers} repeated layers"
    if fix.ep is not None and fix.ep > 1:
        return (
            f"pinned ep={fix.ep} must divide dp (expert-parallel groups are data-parallel ranks); "
            f"the pins {fix.pinned()} leave no dp × tp × pp = {world} with dp divisible by {fix.ep} "
            f"and dividing the global batch {global_batch_size}"
        )
    return (
        f"no dp × tp × pp = {world} with dp dividing the global batch {global_batch_size} satisfies "
        f"the pins {fix.pinned() or '{}'} (interleaving needs pp × v to divide the layers and "
        "the microbatches to divide by pp)"
    )
