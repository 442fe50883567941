"""The parts of a Plan (parallelism, mesh, stages, schedule, predictions) as frozen dataclasses.

Data flow: the planner fills these (``Predicted`` and its per-stage and memory records by
``cost_models.estimate``); ``autopar.plans.Plan`` (the root record) holds them;
``autopar.plans.io`` turns them into versioned JSON that the runtime, the CLI views and
the benchmarks read. Each part validates itself at construction and names the field,
the value and what is allowed.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Literal, get_args

SCHEMA_VERSION = 3
"""2: ``Predicted`` gained ``stages``, ``memory``, ``dtype`` and ``options`` (files of version 1
load with them empty: ``autopar.plans.io``). 3: ``Parallelism`` gained ``cp`` (context parallelism)
and ``sequence_parallel``, and new meshes are ``pp × dp × cp × tp`` (files of versions 1 and 2 load
with ``cp`` 1 and no sequence parallelism: what they ran)."""
OLDEST_SCHEMA_VERSION = 1
MESH_AXES = ("pp", "dp", "cp", "tp")
"""The axes of a new plan's mesh, slowest first (tensor parallelism innermost, on the fastest links)."""
ScheduleName = Literal["gpipe", "1f1b", "interleaved", "zero_bubble"]
Recompute = Literal["none", "selective", "full"]
BREAKDOWN_KEYS = ("compute", "recompute", "tp_comm", "cp_comm", "pp_comm", "dp_comm", "ep_comm", "bubble",
                  "optimizer")


def _fail(owner: object, name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{type(owner).__name__}.{name} = {value!r} is invalid: expected {expected}")


def _int(owner: object, name: str, minimum: int, value: Any = None) -> None:
    value = getattr(owner, name) if value is None else value
    if type(value) is not int or value < minimum:
        raise _fail(owner, name, value, f"an int >= {minimum}")
    if value >= 2**63:  # what JSON readers other than Python's hold, and the views' floats
        raise ValueError(f"{type(owner).__name__}.{name} = an int of {value.bit_length()} bits is invalid: "
                         "expected an int below 2**63")


def _text(owner: object, *names: str, allow_empty: bool = False) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, str) or not (value or allow_empty):
            raise _fail(owner, name, value, "a str" if allow_empty else "a nonempty str")


def _choice(owner: object, name: str, allowed: tuple[Any, ...]) -> None:
    if getattr(owner, name) not in allowed:
        raise _fail(owner, name, getattr(owner, name), f"one of {list(allowed)}")


def _is_number(value: Any) -> bool:
    if type(value) is int:  # a JSON int can be larger than any float
        return 0 <= value <= sys.float_info.max
    return type(value) is float and math.isfinite(value) and value >= 0


def _floats(owner: object, *names: str) -> None:
    """Optional non-negative floats; ints are stored as floats so JSON is stable."""
    for name in names:
        value = getattr(owner, name)
        if value is not None and not _is_number(value):
            raise _fail(owner, name, value, "a finite float >= 0 or None")
        object.__setattr__(owner, name, None if value is None else float(value))


def _numbers(owner: object, *names: str) -> None:
    """Required non-negative floats (ints are stored as floats)."""
    for name in names:
        value = getattr(owner, name)
        if not _is_number(value):
            raise _fail(owner, name, value, "a finite float >= 0")
        object.__setattr__(owner, name, float(value))


def _tuple_of(owner: object, name: str, kind: type) -> tuple[Any, ...]:
    """Store a list as a tuple; check each item's type (a bool is not an int)."""
    value = getattr(owner, name)
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(item, kind) and not (kind is int and type(item) is bool) for item in value
    ):
        raise _fail(owner, name, value, f"a tuple of {kind.__name__}")
    object.__setattr__(owner, name, tuple(value))
    return tuple(value)


def _sorted_pairs(owner: object, name: str, ok: Any, expected: str) -> None:
    """Store a mapping as sorted ``(key, value)`` pairs (hashable, stable); check ``ok(k, v)``."""
    value = getattr(owner, name)
    try:
        pairs = tuple(sorted(dict(value).items()))
    except (TypeError, ValueError):
        raise _fail(owner, name, value, "a mapping with str keys") from None
    for key, item in pairs:
        if not isinstance(key, str) or not ok(key, item):
            raise _fail(owner, f"{name}[{key!r}]", item, expected)
    object.__setattr__(owner, name, tuple((k, tuple(v) if isinstance(v, list) else v)
                                          for k, v in pairs))


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    """Degrees of parallelism: ``dp``, ``tp`` and ``pp`` are the data-, tensor- and pipeline-parallel
    degrees; the world size is ``pp × dp × cp × tp`` (the mesh's axis order)."""

    dp: int
    tp: int
    pp: int
    ep: int = 1
    """Expert parallelism: the experts sharded across the ``dp`` ranks of each ``cp`` slice (each cp
    rank routes its own part of the sequence), so ``ep`` divides ``dp``."""
    cp: int = 1
    """Context parallelism: each layer's sequence split over ``cp`` ranks (ring attention,
    load-balanced causal chunks)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs ``tp > 1``): the norm/dropout/residual regions split
    along the sequence over the ``tp`` ranks (Korthikanti et al. 2022)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep", "cp"):
            _int(self, name, 1)
        if self.dp % self.ep:
            raise ValueError(f"Parallelism.ep = {self.ep} must divide dp = {self.dp} "
                             "(experts are sharded across data-parallel ranks)")
        if not isinstance(self.sequence_parallel, bool):
            raise _fail(self, "sequence_parallel", self.sequence_parallel, "True or False")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("Parallelism.sequence_parallel = True needs tp > 1 (it splits the "
                             "tensor-parallel ranks' replicated regions); set tp ≥ 2 or turn it off")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def check_world_size(self, world_size: int) -> None:
        """Raise, showing the arithmetic, unless ``pp × dp × cp × tp == world_size``."""
        if self.world_size != world_size:
            cp = f" × cp({self.cp})" if self.cp > 1 else ""
            raise ValueError(f"tp({self.tp}) × pp({self.pp}) × dp({self.dp}){cp} = {self.world_size} "
                             f"≠ world size {world_size}")


@dataclass(frozen=True, kw_only=True)
class Mesh:
    """A named device mesh; ``device_ids`` lists the ranks row-major over ``shape``."""

    axis_names: tuple[str, ...]
    shape: tuple[int, ...]
    device_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        names, shape = _tuple_of(self, "axis_names", str), _tuple_of(self, "shape", int)
        ids = _tuple_of(self, "device_ids", int)
        if len(names) != len(shape) or len(set(names)) != len(names) or not all(names):
            raise _fail(self, "axis_names", names, f"{len(shape)} distinct nonempty names")
        for size in shape:
            _int(self, "shape", 1, size)
        if math.prod(shape) != len(ids) or len(set(ids)) != len(ids) or min(ids, default=0) < 0:
            raise _fail(self, "device_ids", ids, f"{math.prod(shape)} distinct ids >= 0")

    @property
    def size(self) -> int:
        return len(self.device_ids)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """A pipeline stage: fx nodes ``first_node``..``last_node`` (empty: the graph's start or
    end), layers ``[layers[0], layers[1])``, run by ``devices``; ``virtual_chunk`` is its
    chunk index on those devices under interleaving."""

    index: int
    first_node: str
    last_node: str
    layers: tuple[int, int]
    devices: tuple[int, ...]
    recompute: Recompute = "none"
    virtual_chunk: int = 0

    def __post_init__(self) -> None:
        _int(self, "index", 0)
        _int(self, "virtual_chunk", 0)
        _text(self, "first_node", "last_node", allow_empty=True)
        layers, devices = _tuple_of(self, "layers", int), _tuple_of(self, "devices", int)
        if len(layers) != 2 or not 0 <= layers[0] <= layers[1]:
            raise _fail(self, "layers", layers, "a half-open range (start, end), 0 <= start <= end")
        if not devices or len(set(devices)) != len(devices) or min(devices) < 0:
            raise _fail(self, "devices", devices, "at least one distinct device id >= 0")
        _choice(self, "recompute", get_args(Recompute))


@dataclass(frozen=True, kw_only=True)
class Sharding:
    """The sharding strategy chosen for one graph node (e.g. ``"colwise"``, ``"replicate"``)."""

    node: str
    strategy: str

    def __post_init__(self) -> None:
        _text(self, "node", "strategy")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Pipeline schedule: each step's batch runs as ``num_microbatches`` microbatches of
    ``microbatch_size`` samples; ``virtual_stages`` is the number of model chunks per device."""

    name: ScheduleName
    microbatch_size: int
    num_microbatches: int
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        _choice(self, "name", get_args(ScheduleName))
        for name in ("microbatch_size", "num_microbatches", "virtual_stages"):
            _int(self, name, 1)
        if self.name in ("gpipe", "1f1b") and self.virtual_stages != 1:
            raise _fail(self, "virtual_stages", self.virtual_stages, f"1 for {self.name}")
        if self.name == "interleaved" and self.virtual_stages < 2:
            raise _fail(self, "virtual_stages", self.virtual_stages, ">= 2 for interleaved")


def _config_value_ok(_key: str, value: Any) -> bool:
    """A JSON scalar (finite if a float) or a list/tuple of them."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    return all(isinstance(v, (str, int, bool, type(None))) or
               (isinstance(v, float) and math.isfinite(v)) for v in items)


@dataclass(frozen=True, kw_only=True)
class AppliedPass:
    """A graph pass that was applied; ``config`` is sorted ``(key, value)`` pairs whose
    values are JSON scalars or tuples of them (a mapping and lists are accepted)."""

    name: str
    config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _text(self, "name")
        _sorted_pairs(self, "config", _config_value_ok, "a JSON scalar or a list of them")

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)


@dataclass(frozen=True, kw_only=True)
class StageTimes:
    """Seconds per microbatch of one stage (a model chunk) on its devices, communication included:
    what the schedule model (``cost_models.schedule``) runs, and the base of :class:`StagePrediction`.

    ``backward_s`` is the input-gradient part; ``backward_weight_s`` the weight-gradient part,
    run separately only by zero-bubble schedules. ``recompute_s`` runs right before backward.
    ``send_forward_s`` / ``send_backward_s``: P2P to the next / previous stage (0 at the ends).
    """

    forward_s: float
    backward_s: float
    backward_weight_s: float = 0.0
    recompute_s: float = 0.0
    send_forward_s: float = 0.0
    send_backward_s: float = 0.0

    @property
    def work_s(self) -> float:
        """All seconds this stage spends on one microbatch."""
        return (self.forward_s + self.backward_s + self.backward_weight_s + self.recompute_s
                + self.send_forward_s + self.send_backward_s)


@dataclass(frozen=True, kw_only=True)
class StagePrediction(StageTimes):
    """The cost model's seconds for one pipeline stage (model chunk), per microbatch on one of its
    devices (``cost_models.stage_costs``). ``forward_s``, ``backward_s`` (input gradient),
    ``backward_weight_s`` (weight gradient, run apart only by zero-bubble schedules),
    ``recompute_s`` and the P2P sends ``send_forward_s``/``send_backward_s`` are what the schedule
    runs (``cost_models.StageTimes``), communication included; of them, ``tp_comm_s`` are
    tensor-parallel collectives, ``ep_comm_s`` MoE all-to-alls, ``cp_comm_s`` ring-attention K/V
    transfers no block hides and ``dp_comm_s`` data-parallel traffic repeated every microbatch
    (ZeRO-3 weight gathers on CPU). ``params_per_device``: the
    stage's parameters on each of its devices. ``memory_without_recompute_bytes``: the peak bytes of
    the stage's devices were it not recomputing (None when it recomputes nothing)."""

    index: int
    tp_comm_s: float = 0.0
    ep_comm_s: float = 0.0
    cp_comm_s: float = 0.0
    dp_comm_s: float = 0.0
    params_per_device: float
    memory_without_recompute_bytes: int | None = None

    def __post_init__(self) -> None:
        _int(self, "index", 0)
        _numbers(self, "forward_s", "backward_s", "backward_weight_s", "recompute_s", "send_forward_s",
                 "send_backward_s", "tp_comm_s", "ep_comm_s", "cp_comm_s", "dp_comm_s", "params_per_device")
        if self.memory_without_recompute_bytes is not None:
            _int(self, "memory_without_recompute_bytes", 0)



MEMORY_PARTS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "logits_bytes",
                "reserve_bytes")


@dataclass(frozen=True, kw_only=True)
class MemoryPrediction:
    """The cost model's bytes at the peak of every device holding exactly the stages ``stages``
    (``cost_models.plan_memory``): weights, gradients and optimizer states (the model states),
    activations, logits and reserve (workspace and fragmentation). ``peak_bytes`` is their sum
    rounded down, the devices' entry in ``Predicted.peak_memory_bytes``."""

    stages: tuple[int, ...]
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    logits_bytes: float
    reserve_bytes: float
    peak_bytes: int

    def __post_init__(self) -> None:
        stages = _tuple_of(self, "stages", int)
        if list(stages) != sorted(set(stages)) or min(stages, default=0) < 0:
            raise _fail(self, "stages", stages, "distinct stage indices >= 0 in increasing order")
        _numbers(self, *MEMORY_PARTS)
        _int(self, "peak_bytes", 0)

    def parts(self) -> dict[str, float]:
        """Bytes by category, ``"weights"`` … ``"reserve"`` (the names without ``_bytes``)."""
        return {name.removesuffix("_bytes"): getattr(self, name) for name in MEMORY_PARTS}


@dataclass(frozen=True, kw_only=True)
class CostOptionsUsed:
    """The ``cost_models.CostOptions`` a prediction was priced with, as plain values; for local
    clusters ``local_rates`` says where the CPU rates came from (a calibration, or placeholders)."""

    dp_overlap: float
    tp_overlap: float
    sequence_parallel: bool
    p2p_scatter_gather: bool
    local_rates: str | None = None

    def __post_init__(self) -> None:
        _numbers(self, "dp_overlap", "tp_overlap")
        for name in ("dp_overlap", "tp_overlap"):
            if getattr(self, name) > 1:
                raise _fail(self, name, getattr(self, name), "a fraction in [0, 1]")
        for name in ("sequence_parallel", "p2p_scatter_gather"):
            if type(getattr(self, name)) is not bool:
                raise _fail(self, name, getattr(self, name), "a bool")
        if self.local_rates is not None:
            _text(self, "local_rates")


@dataclass(frozen=True, kw_only=True)
class Predicted:
    """The cost model's estimate, None (or empty) where not estimated: ``peak_memory_bytes``
    per device, ``breakdown`` seconds per step by :data:`BREAKDOWN_KEYS`; ``stages`` one
    :class:`StagePrediction` per pipeline stage in order, ``memory`` one :class:`MemoryPrediction`
    per set of stages a device holds, ``dtype`` the training dtype the model was priced in and
    ``options`` the cost options used. Views draw from these numbers alone."""

    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tflops_per_device: float | None = None
    mfu: float | None = None
    peak_memory_bytes: tuple[int, ...] | None = None
    breakdown: tuple[tuple[str, float], ...] = ()
    stages: tuple[StagePrediction, ...] = ()
    memory: tuple[MemoryPrediction, ...] = ()
    dtype: str | None = None
    options: CostOptionsUsed | None = None

    def __post_init__(self) -> None:
        _floats(self, "step_time_s", "tokens_per_s", "tflops_per_device", "mfu")
        for value in () if self.peak_memory_bytes is None else _tuple_of(
                self, "peak_memory_bytes", int):
            _int(self, "peak_memory_bytes", 0, value)
        _sorted_pairs(self, "breakdown", lambda k, v: k in BREAKDOWN_KEYS and _is_number(v),
                      f"seconds >= 0 under a key from {list(BREAKDOWN_KEYS)}")
        object.__setattr__(self, "breakdown", tuple((k, float(v)) for k, v in self.breakdown))
        for position, stage in enumerate(_tuple_of(self, "stages", StagePrediction)):
            if stage.index != position:
                raise _fail(self, f"stages[{position}].index", stage.index, f"{position} (stage order)")
        held = [m.stages for m in _tuple_of(self, "memory", MemoryPrediction)]
        if len(set(held)) != len(held):
            raise _fail(self, "memory", held, "one entry per set of stages")
        if self.dtype is not None:
            _text(self, "dtype")
        if self.options is not None and not isinstance(self.options, CostOptionsUsed):
            raise _fail(self, "options", self.options, "a CostOptionsUsed or None")

    def breakdown_dict(self) -> dict[str, float]:
        return dict(self.breakdown)


@dataclass(frozen=True, kw_only=True)
class Alternative:
    """A configuration the planner considered and did not choose, and why."""

    parallelism: Parallelism
    schedule: Schedule
    predicted_step_time_s: float | None
    reason: str

    def __post_init__(self) -> None:
        _floats(self, "predicted_step_time_s")
        _text(self, "reason")


def unsupported_version(version: Any) -> str:
    newer = type(version) is int and version > SCHEMA_VERSION
    return (f"plan schema_version {version!r} is not supported; this autopar reads versions "
            f"{OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION}"
            + (" (a newer autopar wrote the file: upgrade autopar to read it)" if newer else "")
            + " — re-plan with `autopar plan`")
