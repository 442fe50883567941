"""The parts of a Plan (parallelism, mesh, stages, schedule, predictions) as frozen dataclasses.

Data flow: the planner fills these; ``autopar.plans.Plan`` (the root record) holds them;
``autopar.plans.io`` turns them into versioned JSON that the runtime, the CLI views and
the benchmarks read. Each part validates itself at construction and names the field,
the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

SCHEMA_VERSION = 1
ScheduleName = Literal["gpipe", "1f1b", "interleaved", "zero_bubble"]
Recompute = Literal["none", "selective", "full"]
BREAKDOWN_KEYS = ("compute", "recompute", "tp_comm", "pp_comm", "dp_comm", "ep_comm", "bubble",
                  "optimizer")


def _fail(owner: object, name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{type(owner).__name__}.{name} = {value!r} is invalid: expected {expected}")


def _int(owner: object, name: str, minimum: int, value: Any = None) -> None:
    value = getattr(owner, name) if value is None else value
    if type(value) is not int or value < minimum:
        raise _fail(owner, name, value, f"an int >= {minimum}")


def _text(owner: object, *names: str, allow_empty: bool = False) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, str) or not (value or allow_empty):
            raise _fail(owner, name, value, "a str" if allow_empty else "a nonempty str")


def _choice(owner: object, name: str, allowed: tuple[Any, ...]) -> None:
    if getattr(owner, name) not in allowed:
        raise _fail(owner, name, getattr(owner, name), f"one of {list(allowed)}")


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def _floats(owner: object, *names: str) -> None:
    """Optional non-negative floats; ints are stored as floats so JSON is stable."""
    for name in names:
        value = getattr(owner, name)
        if value is not None and not _is_number(value):
            raise _fail(owner, name, value, "a finite float >= 0 or None")
        object.__setattr__(owner, name, None if value is None else float(value))


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
    """Degrees of parallelism. World size is ``dp × tp × pp``; expert parallelism shards
    the experts across data-parallel ranks, so ``ep`` divides ``dp``."""

    dp: int
    tp: int
    pp: int
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep"):
            _int(self, name, 1)
        if self.dp % self.ep:
            raise ValueError(f"Parallelism.ep = {self.ep} must divide dp = {self.dp} "
                             "(experts are sharded across data-parallel ranks)")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def check_world_size(self, world_size: int) -> None:
        """Raise, showing the arithmetic, unless ``dp × tp × pp == world_size``."""
        if self.world_size != world_size:
            raise ValueError(f"tp({self.tp}) × pp({self.pp}) × dp({self.dp}) = {self.world_size} "
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
    """Pipeline schedule; ``virtual_stages`` is the number of model chunks per device."""

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
class Predicted:
    """The cost model's estimate, None (or empty) where not estimated: ``peak_memory_bytes``
    per device, ``breakdown`` seconds per step by :data:`BREAKDOWN_KEYS`."""

    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tflops_per_device: float | None = None
    mfu: float | None = None
    peak_memory_bytes: tuple[int, ...] | None = None
    breakdown: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        _floats(self, "step_time_s", "tokens_per_s", "tflops_per_device", "mfu")
        for value in () if self.peak_memory_bytes is None else _tuple_of(
                self, "peak_memory_bytes", int):
            _int(self, "peak_memory_bytes", 0, value)
        _sorted_pairs(self, "breakdown", lambda k, v: k in BREAKDOWN_KEYS and _is_number(v),
                      f"seconds >= 0 under a key from {list(BREAKDOWN_KEYS)}")
        object.__setattr__(self, "breakdown", tuple((k, float(v)) for k, v in self.breakdown))

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
    return (f"plan schema_version {version!r} is not supported; this autopar reads version "
            f"{SCHEMA_VERSION} — re-plan with `autopar plan`")
