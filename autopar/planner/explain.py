"""Why the planner rejected what it rejected: infeasibility and runner-up reasons, in words.

Data flow: ``search`` records an :class:`Infeasible` for every Config whose stages cannot fit
in device memory (the most frugal choice — an even split with the heaviest recomputation
allowed — broken down by the memory model) and calls :func:`alternative_reason` for each
runner-up. When nothing fits, :func:`infeasible_error` turns the closest miss into one
``InfeasiblePlanError`` naming the binding constraint (which stage, how many GiB of weights,
gradients, optimizer state and activations against the capacity) and the cheapest remedies.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import ModelProfile
from autopar.cost_models import memory as memory_model
from autopar.planner.build_plan import PlanContext, build_plan, even_split, rank_devices
from autopar.planner.probes import StageModel
from autopar.planner.space import Config
from autopar.plans import Parallelism, Plan

GIB = 2**30
_CAUSES = {
    "compute": "more compute",
    "recompute": "more recomputation",
    "tp_comm": "more tensor-parallel communication",
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

    @property
    def excess_bytes(self) -> float:
        return self.need_bytes - self.capacity_bytes


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def memory_shortfall(
    profile: ModelProfile, ctx: PlanContext, config: Config, model: StageModel, *,
    sequence_parallel: bool = False,
) -> Infeasible:
    """Break down the worst stage of the even split under the most frugal recomputation (memory
    priced with the search's ``sequence_parallel`` option, as its plans are)."""
    stages = config.pp * config.virtual_stages
    frugal = model.modes[-1]
    plan = build_plan(ctx, config, even_split(profile.num_layers, stages), [frugal] * stages)
    memory = memory_model.plan_memory(plan, profile, sequence_parallel=sequence_parallel)
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
    )


def _remedies(item: Infeasible, fix: Fix) -> list[str]:
    config, remedies = item.config, []
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
