"""The :class:`Plan` root record: degrees, mesh, stages, schedule, passes, predictions.

Re-exported by ``autopar.plans``; its parts live in ``schema``, JSON and files in ``io``.
"""


from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autopar.cluster import ClusterSpec
from autopar.plans.io import load_plan, plan_from_json, plan_to_json, save_plan
from autopar.plans.schema import (
    SCHEMA_VERSION,
    Alternative,
    AppliedPass,
    Mesh,
    Parallelism,
    Predicted,
    Schedule,
    Sharding,
    Stage,
    _choice,
    _fail,
    _int,
    _text,
    _tuple_of,
    unsupported_version,
)
from autopar.version import __version__


def _created_by() -> str:
    return f"autopar {__version__}"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything needed to run one model on one cluster, and why it was chosen.

    ``cluster`` is ``ClusterSpec.to_dict()`` (a ClusterSpec is accepted and converted);
    ``graph_fingerprint`` is ``graph_fingerprint(gm)`` of the captured graph.
    ``global_batch_size = dp × microbatch_size × num_microbatches``; ``stages`` are in
    model order, ``pp × virtual_stages`` of them, each run by ``dp × tp`` devices.
    Plans compare by value; they are not hashable (``cluster`` is a plain dict).
    """

    schema_version: int = SCHEMA_VERSION
    model: str
    graph_fingerprint: str
    cluster: dict[str, Any]
    global_batch_size: int
    seq_len: int | None
    parallelism: Parallelism
    mesh: Mesh
    stages: tuple[Stage, ...]
    schedule: Schedule
    shardings: tuple[Sharding, ...] = ()
    zero: int = 0
    passes: tuple[AppliedPass, ...] = ()
    predicted: Predicted = field(default_factory=Predicted)
    alternatives: tuple[Alternative, ...] = ()
    created_by: str = field(default_factory=_created_by)

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise ValueError(unsupported_version(self.schema_version) if self.schema_version != 1 else
                             f"Plan.schema_version = 1 is invalid: a Plan in memory is version "
                             f"{SCHEMA_VERSION}; Plan.load and Plan.from_json upgrade version-1 files")
        _text(self, "model", "graph_fingerprint", "created_by")
        _int(self, "global_batch_size", 1)
        _int(self, "zero", 0)
        _choice(self, "zero", (0, 1, 2, 3))
        if self.seq_len is not None:
            _int(self, "seq_len", 1)
        for name, kind in (("parallelism", Parallelism), ("mesh", Mesh), ("schedule", Schedule),
                           ("predicted", Predicted)):
            if not isinstance(getattr(self, name), kind):
                raise _fail(self, name, getattr(self, name), f"a {kind.__name__}")
        for name, kind in (("stages", Stage), ("shardings", Sharding), ("passes", AppliedPass),
                           ("alternatives", Alternative)):
            _tuple_of(self, name, kind)
        cluster = self.cluster if isinstance(self.cluster, ClusterSpec) else _cluster(self.cluster)
        object.__setattr__(self, "cluster", cluster.to_dict())
        self.parallelism.check_world_size(cluster.num_devices)
        _check_layout(self)

    @property
    def world_size(self) -> int:
        return self.parallelism.world_size

    @property
    def sequence_parallel(self) -> bool:
        """Whether the tensor-parallel regions run Megatron sequence parallelism."""
        return self.parallelism.sequence_parallel

    def cluster_spec(self) -> ClusterSpec:
        return ClusterSpec.from_dict(self.cluster)

    @classmethod
    def single_device(cls, model: str, *, graph_fingerprint: str,
                      cluster: ClusterSpec | Mapping[str, Any], global_batch_size: int,
                      seq_len: int | None = None, num_layers: int = 0) -> Plan:
        """The trivial plan: the whole model on device 0, one microbatch, no sharding."""
        return cls(
            model=model, graph_fingerprint=graph_fingerprint, cluster=cluster,  # type: ignore[arg-type]
            global_batch_size=global_batch_size, seq_len=seq_len,
            parallelism=Parallelism(dp=1, tp=1, pp=1),
            mesh=Mesh(axis_names=("dp",), shape=(1,), device_ids=(0,)),
            stages=(Stage(index=0, first_node="", last_node="", layers=(0, num_layers),
                          devices=(0,)),),
            schedule=Schedule(name="gpipe", microbatch_size=global_batch_size, num_microbatches=1),
        )

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
        return plan_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return plan_from_json(text, record=cls)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temp file in the same folder, fsync, ``os.replace``."""
        save_plan(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, expect_fingerprint: str | None = None) -> Plan:
        """Read a plan file; with ``expect_fingerprint``, refuse a plan made for another graph."""
        return load_plan(path, record=cls, expect_fingerprint=expect_fingerprint)


def _cluster(data: Any) -> ClusterSpec:
    try:
        return ClusterSpec.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Plan.cluster is invalid: {error}") from error


def _check_layout(plan: Plan) -> None:
    """Mesh, stages, batch and per-device lists must agree with the parallelism."""
    par, sched, world = plan.parallelism, plan.schedule, plan.world_size
    if sorted(plan.mesh.device_ids) != list(range(world)):
        raise _fail(plan, "mesh.device_ids", plan.mesh.device_ids, f"ids 0..{world - 1}")
    for axis, size in zip(plan.mesh.axis_names, plan.mesh.shape, strict=True):
        if axis in ("dp", "tp", "pp", "ep", "cp") and getattr(par, axis) != size:
            raise _fail(plan, f"mesh axis {axis!r}", size, f"{axis}({getattr(par, axis)})")
    memory = plan.predicted.peak_memory_bytes
    if memory is not None and len(memory) != world:
        raise _fail(plan, "predicted.peak_memory_bytes", memory, f"{world} entries, one per device")
    expected, product = par.pp * sched.virtual_stages, par.dp * sched.microbatch_size
    if len(plan.stages) != expected:
        raise _fail(plan, "stages", f"{len(plan.stages)} stages",
                    f"pp({par.pp}) × virtual_stages({sched.virtual_stages}) = {expected}")
    end = plan.stages[0].layers[0]
    for position, stage in enumerate(plan.stages):
        if stage.index != position:
            raise _fail(plan, f"stages[{position}].index", stage.index, f"{position} (model order)")
        if stage.layers[0] != end:
            raise _fail(plan, f"stages[{position}].layers", stage.layers, f"to start at {end}")
        if len(stage.devices) != world // par.pp or max(stage.devices) >= world:
            raise _fail(plan, f"stages[{position}].devices", stage.devices,
                        f"dp × cp × tp = {world // par.pp} device ids below {world}")
        if stage.virtual_chunk >= sched.virtual_stages:
            raise _fail(plan, f"stages[{position}].virtual_chunk", stage.virtual_chunk,
                        f"< virtual_stages({sched.virtual_stages})")
        end = stage.layers[1]
    if len({s.node for s in plan.shardings}) != len(plan.shardings):
        raise _fail(plan, "shardings", plan.shardings, "one entry per node")
    if product * sched.num_microbatches != plan.global_batch_size:
        raise ValueError(
            f"global_batch_size({plan.global_batch_size}) ≠ dp({par.dp}) × microbatch_size"
            f"({sched.microbatch_size}) × num_microbatches({sched.num_microbatches}) = "
            f"{product * sched.num_microbatches}")


def device_stages(plan: Plan) -> list[tuple[int, ...]]:
    """The stage indices each device holds, in device-id order (0 … world − 1)."""
    held: list[list[int]] = [[] for _ in range(plan.world_size)]
    for stage in plan.stages:
        for device in stage.devices:
            held[device].append(stage.index)
    return [tuple(stages) for stages in held]
