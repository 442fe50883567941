"""The planner's search space: every configuration the outer search may try.

Data flow: a ``ModelProfile``, a ``ClusterSpec``, the global batch and the user's pins
(``autopar.Fix``) go in; :func:`candidates` yields :class:`Config` records (degrees,
schedule, microbatching, ZeRO stage) that the inter-op solver (``inter_op``) turns into
stage splits with per-stage recomputation. Nothing here costs anything. :func:`broken_rule` names
the first rule below that some degrees (dp, tp, pp) break, and :func:`schedule_refusal` why a pinned
schedule cannot run, so that ``explain`` can say why the space is empty (a pin is kept or refused,
never changed).

Rules (each one a property of the runtime or of the model, not a heuristic):

* ``dp × cp × tp × pp`` is the device count; ``tp`` divides the attention heads and the hidden
  size and, unless pinned, stays inside a node (Megatron-LM's rule; a pin may cross nodes);
  ``pp`` is at most the number of repeated layers.
* Context parallelism (``cp``, ring attention over the mesh's cp axis, just outside tp: inside a
  node while ``cp × tp`` fits one, across nodes beyond; the cost model prices either): only for
  models made of transformer layers (the runtime rings the attention it finds in them), where the
  sequence splits into ``2·cp`` load-balanced chunks, and — unless pinned — where the ring pays:
  one step's K/V block moves no slower than its block attention computes on the fastest link a cp
  group can use (:func:`ring_pays`, the cost model's own ring terms at ``s/cp`` tokens). Shorter
  sequences leave every ring step waiting on the link, so cp would only trade compute for exposed
  transfers; this is what keeps the space (and planning time) of 2k-token models unchanged.
  ZeRO then shards over the ``dp · cp`` ranks holding the same parameters.
* Sequence parallelism (Megatron, with ``tp > 1``, where the ``s/cp`` tokens of a rank divide by
  tp): on unless pinned off (or ``CostOptions.sequence_parallel`` is False, e.g. Megatron-LM 2021):
  it moves the bytes of the all-reduces it replaces and divides the norm/dropout/residual work and
  activations by tp, so the cost model never finds it slower or larger; ``search`` evaluates the
  chosen configuration's other setting as an alternative so the Plan can say what it saved.
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
from autopar.cost_models import Group, ModelProfile
from autopar.cost_models.context_parallel import (
    check_sequence_split,
    ring_shape,
    ring_step_attention_times_s,
    ring_step_transfer_time_s,
)
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
    cp: int = 1
    sequence_parallel: bool = False

    @property
    def degrees(self) -> tuple[int, int, int, int, int]:
        return self.dp, self.tp, self.pp, self.ep, self.cp

    def describe(self) -> str:
        """``dp8 tp8 pp16 interleaved(v2) b1×m24 zero0`` (`` ep4`` after pp when ``ep > 1``, `` cp4``
        when ``cp > 1``, `` sp`` after tp with sequence parallelism): how alternatives are named."""
        sched = f"interleaved(v{self.virtual_stages})" if self.schedule == "interleaved" else self.schedule
        ep = f" ep{self.ep}" if self.ep > 1 else ""
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        sp = " sp" if self.sequence_parallel else ""
        return (
            f"dp{self.dp} tp{self.tp}{sp} pp{self.pp}{ep}{cp} {sched} b{self.microbatch_size}"
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


def schedule_refusal(fix: Fix, *, pp: int, num_microbatches: int, num_layers: int) -> tuple[str, str]:
    """Why the pinned schedule (or ``virtual_stages``) cannot run ``pp`` stages of ``num_layers``
    layers on ``num_microbatches`` microbatches, and what to pin instead (for :func:`_schedules`
    yielding nothing there): ``(kind, words)``, the kind naming the rule."""
    name, v, m, pin = fix.schedule, fix.virtual_stages, num_microbatches, _pin(fix)
    if name in ("gpipe", "1f1b", "zero_bubble") and v not in (None, 1):
        return "chunks", (f"{pin}: virtual_stages > 1 needs schedule='interleaved' ({name} runs one model "
                          "chunk per rank); drop virtual_stages or pin schedule='interleaved'")
    interleaved = "interleaved needs pp > 1 and layers divisible by pp × virtual_stages"
    if name == "interleaved" or (name is None and v not in (None, 1)):
        if pp == 1:
            return "pipeline", (f"{pin}: {interleaved}, but pp = 1 (no pipeline to interleave); pin pp > 1 "
                                "or another schedule")
        if m % pp:
            return "microbatches", (f"{pin}: interleaved needs num_microbatches divisible by pp, but "
                                    f"{m} does not divide by pp = {pp}; pin num_microbatches to a multiple "
                                    f"of {pp}")
        product = f"{pp} × {v}" if v else f"{pp} × v for any v in 2..{MAX_VIRTUAL_STAGES}"
        return "layers", (f"{pin}: {interleaved}, but the model's {num_layers} layers do not divide by "
                          f"{product}; pin pp and virtual_stages whose product divides {num_layers}, or "
                          "another schedule")
    if name == "zero_bubble" and pp == 1:
        return "pipeline", (f"{pin}: zero_bubble needs pp > 1 (it splits each stage's backward between "
                            "pipeline stages), but pp = 1; pin pp > 1, or schedule='1f1b' or 'gpipe' for "
                            "one stage")
    if name == "1f1b" and m < pp:
        return "microbatches", (f"{pin}: 1f1b with pp = {pp} needs at least pp microbatches (torch's "
                                f"Schedule1F1B), but num_microbatches = {m}; pin num_microbatches >= {pp} "
                                "(or a smaller microbatch_size), or schedule='gpipe'")
    return "other", f"{pin} cannot run pp = {pp} with {m} microbatches"


def _pin(fix: Fix) -> str:
    parts = [f"schedule={fix.schedule}"] if fix.schedule else []
    parts += [f"virtual_stages={fix.virtual_stages}"] if fix.virtual_stages else []
    return "pinned " + ", ".join(parts)


def _microbatches(local_batch: int, fix: Fix) -> list[int]:
    sizes = [b for b in divisors(local_batch) if fix.microbatch_size in (None, b)]
    if fix.num_microbatches is not None:
        sizes = [b for b in sizes if local_batch // b == fix.num_microbatches]
    return sizes


RULES = ("tp", "layers", "pins", "sequence", "batch", "microbatch", "schedule", "ep")
"""The rules of the module docstring in the order :func:`broken_rule` checks them: a tp the model or a
node does not allow, more stages than layers, a degree the pins exclude, pinned sequence parallelism
that the tp degree cannot split the sequence for, a data-parallel degree that does not divide the
global batch, microbatch pins the local batch cannot meet, no schedule the pins allow, no
expert-parallel degree the pins allow."""


def broken_rule(profile: ModelProfile, cluster: ClusterSpec, degrees: tuple[int, int, int], *,
                global_batch_size: int, fix: Fix) -> str | None:
    """The first of :data:`RULES` that ``degrees`` (dp, tp, pp) breaks, or None when
    :func:`candidates` yields a Config with them."""
    dp, tp, pp = degrees
    rule = _degree_rule(profile, cluster, degrees, global_batch_size=global_batch_size, fix=fix)
    if rule is not None:
        return rule
    sizes = _microbatches(global_batch_size // dp, fix)
    if not sizes:
        return "microbatch"
    if not any(any(True for _ in _schedules(pp, profile.num_layers, global_batch_size // (dp * b), fix))
               for b in sizes):
        return "schedule"
    return None if _ep_choices(profile, dp, fix) else "ep"


def _degree_rule(profile: ModelProfile, cluster: ClusterSpec, degrees: tuple[int, int, int], *,
                 global_batch_size: int, fix: Fix) -> str | None:
    dp, tp, pp = degrees
    if fix.tp is None and tp not in _tp_choices(profile, cluster, cluster.num_devices, fix):
        return "tp"
    if pp > max(profile.num_layers, 1):
        return "layers"
    if any(pin not in (None, value) for pin, value in ((fix.tp, tp), (fix.pp, pp), (fix.dp, dp))):
        return "pins"
    if fix.sequence_parallel and not _sp_choices(profile, tp, fix.cp or 1, fix):
        return "sequence"
    return "batch" if global_batch_size % dp else None


def all_degrees(cluster: ClusterSpec, *, cp: int = 1) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) whose product is the cluster's device count over ``cp``, tp then pp
    ascending."""
    world = cluster.num_devices // cp
    return [(world // (tp * pp), tp, pp) for tp in divisors(world) for pp in divisors(world // tp)]


def candidates(
    profile: ModelProfile, cluster: ClusterSpec, *, global_batch_size: int, fix: Fix
) -> Iterator[Config]:
    """Every configuration allowed by the rules above and the pins, in a fixed order."""
    for cp in cp_choices(profile, cluster, fix):
        for dp, tp, pp in all_degrees(cluster, cp=cp):
            if _degree_rule(profile, cluster, (dp, tp, pp), global_batch_size=global_batch_size, fix=fix):
                continue
            for b in _microbatches(global_batch_size // dp, fix):
                m = global_batch_size // (dp * b)
                for schedule, v in _schedules(pp, profile.num_layers, m, fix):
                    for zero in _zero_stages(dp * cp, fix):
                        if schedule == "zero_bubble" and zero >= 3 and dp * cp > 1:
                            continue  # the runtime refuses it (engine._check_supported)
                        for ep in _ep_choices(profile, dp, fix):
                            for sp in _sp_choices(profile, tp, cp, fix):
                                yield Config(dp=dp, tp=tp, pp=pp, schedule=schedule, virtual_stages=v,
                                             microbatch_size=b, num_microbatches=m, zero=zero, ep=ep, cp=cp,
                                             sequence_parallel=sp)


def _sp_choices(profile: ModelProfile, tp: int, cp: int, fix: Fix) -> list[bool]:
    """Sequence parallelism for ``tp`` (module docstring): on when tp > 1 and the ``s/cp`` tokens of
    a rank split over tp (the runtime shards them evenly), unless pinned off."""
    possible = tp > 1 and (profile.seq_len // cp) % tp == 0
    if fix.sequence_parallel is not None:
        return [fix.sequence_parallel] if possible or not fix.sequence_parallel else []
    return [possible]


def cp_choices(profile: ModelProfile, cluster: ClusterSpec, fix: Fix) -> list[int]:
    """Context-parallel degrees to search (module docstring): the pin, else 1 and every cp > 1
    dividing the device count whose ``2·cp`` chunks split the sequence and whose ring hides its K/V
    transfers behind its block compute on the fastest link a cp group can use (intra-node when
    ``cp`` fits a node): :func:`ring_pays` on the cost model's ring terms."""
    if fix.cp is not None:
        return [fix.cp]
    layers = profile.layers
    if not layers or not all(layer.is_transformer for layer in layers):
        return [1]  # the runtime rings attention it recognises in transformer layers
    world = cluster.num_devices // (fix.tp or 1) // (fix.pp or 1) // (fix.dp or 1)
    return [1] + [cp for cp in divisors(world)[1:]
                  if profile.seq_len % (2 * cp) == 0 and ring_pays(profile, cluster, cp)]


def ring_pays(profile: ModelProfile, cluster: ClusterSpec, cp: int) -> bool:
    """Whether one ring step's K/V block moves no slower than its block attention computes, on the
    fastest link ``cp`` ranks can share (``cost_models.context_parallel``: step compute ``c`` at
    ``s/cp`` tokens vs transfer ``T``; both scale alike with the microbatch and tp, so one shape
    decides). Below that length every step waits on the link: cp would trade compute for exposed
    transfers, never worth it while data or pipeline parallelism can use the devices instead."""
    layer = next(layer for layer in profile.layers if layer.is_transformer)
    shape = ring_shape(layer, microbatch_size=1, tp=1, cp=cp, bytes_per_element=profile.bytes_per_element)
    step_s, _ = ring_step_attention_times_s(shape, device=cluster.device, dtype=profile.dtype,
                                            causal=profile.causal)
    nodes = 1 if cp <= cluster.devices_per_node else cp // cluster.devices_per_node
    group = Group(size=cp, num_nodes=max(1, min(nodes, cp)))
    return ring_step_transfer_time_s(shape.kv_block_bytes, group=group, cluster=cluster) <= step_s


def check_sequence_pins(profile: ModelProfile, fix: Fix) -> None:
    """A pinned ``cp > 1`` needs a transformer model whose sequence splits into ``2·cp`` chunks
    (ValueError naming the fix otherwise)."""
    if fix.cp is None or fix.cp == 1:
        return
    if not profile.layers or not all(layer.is_transformer for layer in profile.layers):
        raise ValueError(f"fix['cp'] = {fix.cp}: context parallelism rings the attention of transformer "
                         "layers, and this model has layers of another kind; drop the cp pin")
    check_sequence_split(profile.seq_len, fix.cp)


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
