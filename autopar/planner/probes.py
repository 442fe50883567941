"""Per-layer and per-stage costs for the stage-split solver, read off the cost model itself.

Data flow: ``search`` hands a :class:`~autopar.planner.space.Config`; :class:`Prober`
builds small *probe plans* and asks ``autopar.cost_models`` (``stage_costs``,
``plan_memory``) what they cost, then returns a :class:`StageModel` of numpy arrays that
``inter_op`` solves over. Probing, instead of re-deriving the formulas here, keeps the
solver's objective equal to the estimate a finished Plan gets: stage time is additive over
its layers (``stage_costs`` sums per-layer compute and tensor-parallel collectives, then adds
the embedding / LM head and the P2P sends of the stage's position), so

* probe A — a profile with no layers on ``pp`` empty stages — gives each position's fixed
  work (embedding, head, sends) and fixed memory (their parameters, the logits);
* probe B — one layer of each distinct kind on stage 0 — gives that layer's work per
  microbatch minus probe A's stage 0.

Memory may come from another profile than time (``memory_profile``): with random-LTD the
time is the schedule's average but memory must fit the full-length end of the schedule.
Memory per layer uses the memory model's own per-layer function (stored activations per
in-flight microbatch and the recomputation working set) and ``moe.layer_state_bytes`` (dense
parameters sharded by ZeRO over ``dp``, experts held ``E/ep`` with unsharded states).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from autopar.cost_models import CostOptions, LayerProfile, ModelProfile, in_flight_microbatches
from autopar.cost_models import memory as memory_model
from autopar.cost_models.estimate import stage_costs
from autopar.cost_models.moe import layer_state_bytes
from autopar.planner.build_plan import PlanContext, build_plan, rank_devices
from autopar.planner.space import Config

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True, kw_only=True)
class StageModel:
    """Arrays for one Config (``R`` recomputation modes, ``L`` layers, ``P`` stage positions).

    ``work_s[r, l]``: layer ``l``'s seconds per microbatch under mode ``r`` (forward, backward,
    recompute, its TP collectives); ``weight_grad_s`` the part zero-bubble defers.
    ``stored_bytes[r, l]`` activations kept per in-flight microbatch, ``working_bytes[r, l]``
    the recomputation working set, ``state_bytes[l]`` weights + gradients + optimizer per device.
    ``fixed_*[k]``: what stage position ``k`` holds besides its layers.
    """

    modes: tuple[str, ...]
    work_s: np.ndarray
    weight_grad_s: np.ndarray
    stored_bytes: np.ndarray
    working_bytes: np.ndarray
    state_bytes: np.ndarray
    fixed_work_s: np.ndarray
    fixed_weight_grad_s: np.ndarray
    fixed_bytes: np.ndarray
    in_flight: np.ndarray
    capacity_bytes: float
    fragmentation: float
    workspace_bytes: float


def _kind(layer: LayerProfile) -> LayerProfile:
    return dataclasses.replace(layer, name="probe")


class Prober:
    """Caches probe results across the Configs of one search."""

    def __init__(self, profile: ModelProfile, ctx: PlanContext, options: CostOptions,
                 memory_profile: ModelProfile | None = None) -> None:
        self.profile, self.ctx, self.options = profile, ctx, options
        self.states = memory_model.training_states(gpu=ctx.cluster.device.name != "CPU",
                                                   element_bytes=profile.bytes_per_element)
        self.memory_profile = memory_profile or profile
        mem_kinds = [_kind(layer) for layer in self.memory_profile.layers]
        self._mem_kinds = tuple(dict.fromkeys(mem_kinds))
        self._mem_kind_of = np.array([self._mem_kinds.index(kind) for kind in mem_kinds], dtype=np.int64)
        self._empty = dataclasses.replace(profile, layers=())
        kinds = [_kind(layer) for layer in profile.layers]
        self.kinds = tuple(dict.fromkeys(kinds))
        self.kind_of = np.array([self.kinds.index(kind) for kind in kinds], dtype=np.int64)
        self._layer_work: dict[tuple[object, ...], tuple[float, float]] = {}
        self._fixed_work: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._fixed_params: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._bytes: dict[tuple[object, ...], tuple[np.ndarray, np.ndarray]] = {}
        self.probes = 0

    def _probe_ctx(self, num_layers: int) -> PlanContext:
        return dataclasses.replace(self.ctx, num_layers=num_layers, graph_fingerprint="probe")

    def _probe_plan(self, config: Config, split: list[tuple[int, int]], mode: str, num_layers: int) -> Any:
        one = dataclasses.replace(
            config, schedule="gpipe" if config.schedule == "gpipe" else "1f1b", virtual_stages=1, zero=0
        )
        self.probes += 1
        return build_plan(self._probe_ctx(num_layers), one, split, [mode] * config.pp), one

    def _fixed_parts(self, config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per position: fixed work, fixed weight-gradient work, fixed bytes under ``config.zero``."""
        key = (config.dp, config.tp, config.pp, config.microbatch_size, config.cp, config.sequence_parallel)
        if key not in self._fixed_work:
            plan, _ = self._probe_plan(config, [(0, 0)] * config.pp, "none", 0)
            costs = stage_costs(plan, self._empty, options=self.options)
            self._fixed_work[key] = (
                np.array([c.times().work_s for c in costs]),
                np.array([c.times().backward_weight_s for c in costs]),
            )
        mkey = key + (config.num_microbatches if config.schedule == "gpipe" else 0,)
        if mkey not in self._fixed_params:
            plan, one = self._probe_plan(config, [(0, 0)] * config.pp, "none", 0)
            memory = memory_model.plan_memory(plan, self._empty)
            parts = [memory[rank_devices(one, k)[0]] for k in range(config.pp)]
            per_param = memory_model.model_state_bytes(1.0, states=self.states)
            self._fixed_params[mkey] = (
                np.array([m.model_states_bytes / per_param for m in parts]),
                np.array([m.logits_bytes for m in parts]),
            )
        params, logits = self._fixed_params[mkey]
        per_param = memory_model.model_state_bytes(1.0, zero=config.zero, dp=config.dp * config.cp,
                                                   states=self.states)
        return (*self._fixed_work[key], params * per_param + logits)

    def _layer(self, kind_index: int, config: Config, mode: str) -> tuple[float, float]:
        """(work, weight-gradient work) of one layer of kind ``kind_index`` per microbatch."""
        key = (kind_index, config.tp, config.microbatch_size, mode, config.ep, config.cp,
               config.sequence_parallel)
        if key not in self._layer_work:
            profile = dataclasses.replace(self.profile, layers=(self.kinds[kind_index],))
            plan, one = self._probe_plan(config, [(0, 1)] + [(1, 1)] * (config.pp - 1), mode, 1)
            stage = stage_costs(plan, profile, options=self.options)[0].times()
            base_work, base_weight = (x[0] for x in self._fixed_parts(one)[:2])
            self._layer_work[key] = (stage.work_s - base_work, stage.backward_weight_s - base_weight)
        return self._layer_work[key]

    def _per_layer(self, config: Config, mode: str, part: int) -> np.ndarray:
        by_kind = np.array([self._layer(i, config, mode)[part] for i in range(len(self.kinds))])
        return by_kind[self.kind_of]

    def stage_model(self, config: Config, modes: tuple[str, ...] = RECOMPUTE_MODES) -> StageModel:
        """The arrays ``inter_op`` needs for ``config`` (v = 1 schedules)."""
        profile, t = self.profile, config.tp
        work = np.array([self._per_layer(config, r, 0) for r in modes])
        weight = np.array([self._per_layer(config, r, 1) for r in modes])
        stored = np.array([self.layer_bytes(config, r)[0] for r in modes])
        working = np.array([self.layer_bytes(config, r)[1] for r in modes])
        states = np.array([layer_state_bytes(layer, tp=t, zero=config.zero, dp=config.dp * config.cp,
                                             ep=config.ep, states=self.states)
                           for layer in profile.layers])
        fixed_work, fixed_weight, fixed_bytes = self._fixed_parts(config)
        in_flight = np.array(
            [
                in_flight_microbatches(
                    config.schedule, pp=config.pp, rank=k, num_microbatches=config.num_microbatches
                )
                for k in range(config.pp)
            ]
        )
        cluster = self.ctx.cluster
        gpu = cluster.device.name != "CPU"
        return StageModel(
            modes=modes,
            work_s=work,
            weight_grad_s=weight,
            stored_bytes=stored,
            working_bytes=working,
            state_bytes=states,
            fixed_work_s=fixed_work,
            fixed_weight_grad_s=fixed_weight,
            fixed_bytes=fixed_bytes,
            in_flight=in_flight,
            capacity_bytes=float(cluster.device.memory_bytes),
            fragmentation=memory_model.FRAGMENTATION_FRACTION,
            workspace_bytes=float(memory_model.WORKSPACE_BYTES if gpu else 0),
        )

    def per_layer_work_s(self, config: Config, mode: str) -> np.ndarray:
        """Each layer's work per microbatch under ``mode`` (seconds)."""
        return self._per_layer(config, mode, 0)

    def per_layer_weight_grad_s(self, config: Config, mode: str) -> np.ndarray:
        """Each layer's weight-gradient work per microbatch under ``mode`` (zero-bubble defers it)."""
        return self._per_layer(config, mode, 1)

    def layer_bytes(self, config: Config, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """Per layer: (activation bytes stored per in-flight microbatch, recomputation working set)."""
        key = (config.tp, config.microbatch_size, mode, config.ep, config.cp, config.sequence_parallel)
        if key not in self._bytes:
            pairs = [
                memory_model._layer_bytes(  # the memory model's own per-layer rule
                    kind,
                    self.memory_profile,
                    microbatch_size=config.microbatch_size,
                    tp=config.tp,
                    recompute=mode,
                    sequence_parallel=config.sequence_parallel,
                    cp=config.cp,
                    ep=config.ep,
                )
                for kind in self._mem_kinds
            ]
            by_kind = np.array(pairs).reshape(len(self._mem_kinds), 2)
            self._bytes[key] = (by_kind[self._mem_kind_of, 0], by_kind[self._mem_kind_of, 1])
        return self._bytes[key]

    def layer_work_lower_bound_s(self, config: Config) -> float:
        """Σ over layers of the cheapest mode's work per microbatch (no fixed parts)."""
        return float(self._per_layer(config, "none", 0).sum())
