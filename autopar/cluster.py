"""``ClusterSpec``: the cluster a model is planned for, parsed from a short string or a file.

Data flow: the user gives ``"2x8xA100-80GB"``, ``"local:4"`` or a ``.toml``/``.json``
path; :meth:`ClusterSpec.parse` turns it into devices and link levels taken from the
hardware catalog (``autopar.hardware``). Cost models and the planner read
it; a Plan stores :meth:`ClusterSpec.to_dict`, and the runtime uses ``backend``.

Cluster file keys (TOML or JSON, one flat table; units are in the names; keys left out
keep the catalog's values)::

    nodes = 2                          # required, int >= 1
    devices_per_node = 8               # required, int >= 1
    device = "A100-80GB"               # required, catalog name or alias
    backend = "nccl"                   # optional: "nccl" (GPUs) or "gloo"
    memory_gib = 80                    # optional: per-device memory, GiB (2**30 bytes)
    peak_tflops = { bf16 = 280 }       # optional: per-dtype peak, TFLOP/s (10**12)
    intra_node_bandwidth_gb_per_s = 230  # optional: per device per direction, GB/s (10**9)
    intra_node_latency_us = 5          # optional: microseconds
    inter_node_bandwidth_gb_per_s = 22.5
    inter_node_latency_us = 10
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from autopar.hardware import (
    DEVICE_ALIASES,
    DEVICE_CATALOG,
    GLOO_LOOPBACK,
    GLOO_TCP,
    DeviceSpec,
    LinkLevel,
    canonical_dtype,
    default_links,
    get_device,
    valid_device_names,
)

Backend = Literal["gloo", "nccl"]
EXPECTED = "NODESxDEVICESxTYPE like 2x8xA100-80GB, local[:N], or a .toml/.json file"
_COUNT_PREFIX = re.compile(r"([+-]?\d+)[x×]", re.IGNORECASE)
_DEVICE_NAMES = {name.casefold() for name in (*DEVICE_CATALOG, *DEVICE_ALIASES)}


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """``num_nodes`` nodes of ``devices_per_node`` identical devices, two link levels.

    ``local`` means this machine: autopar spawns ``devices_per_node`` CPU processes
    over gloo, each with a 1/N share of its RAM, cores and memory bandwidth. ``text``
    is what the spec was parsed from.
    """

    num_nodes: int
    devices_per_node: int
    device: DeviceSpec
    intra_node: LinkLevel
    inter_node: LinkLevel
    backend: Backend
    local: bool
    text: str

    def __post_init__(self) -> None:
        for name in ("num_nodes", "devices_per_node"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ClusterSpec.{name} = {value!r} is invalid: expected an int >= 1")
        if type(self.local) is not bool or not isinstance(self.text, str):
            raise ValueError(f"ClusterSpec.local must be a bool and .text a str, "
                             f"got {self.local!r} and {self.text!r}")
        if self.backend not in get_args(Backend):
            raise ValueError(f"ClusterSpec.backend = {self.backend!r} is invalid: "
                             f"expected one of {list(get_args(Backend))}")
        if self.backend == "nccl" and self.device.name == "CPU":
            raise ValueError("ClusterSpec.backend = 'nccl' needs GPUs; CPU devices use 'gloo'")
        if self.local and (self.num_nodes != 1 or self.backend != "gloo"):
            raise ValueError("a local cluster is one node of CPU processes over gloo")

    @property
    def num_devices(self) -> int:
        """Total devices (ranks): ``num_nodes × devices_per_node``."""
        return self.num_nodes * self.devices_per_node

    @property
    def levels(self) -> tuple[LinkLevel, ...]:
        """The link levels traffic can cross: intra-node if >1 device per node, inter if >1 node."""
        levels = (self.intra_node,) if self.devices_per_node > 1 else ()
        return levels + ((self.inter_node,) if self.num_nodes > 1 else ())

    @classmethod
    def parse(cls, spec: str | os.PathLike[str]) -> ClusterSpec:
        """Parse ``"2x8xA100-80GB"``, ``"8xH100"``, ``"local"``, ``"local:4"`` or a file path."""
        if isinstance(spec, os.PathLike):
            return _from_file(os.fspath(spec))
        if not isinstance(spec, str):
            raise TypeError(f"cluster spec must be a str or a path, got {type(spec).__name__}")
        text = spec.strip()
        if not text:
            raise _bad(spec, "it is empty")
        if text.lower().endswith((".toml", ".json")):
            return _from_file(text)
        if text.lower() == "local" or text.lower().startswith("local:"):
            return _local(spec, None if text.lower() == "local" else text[len("local:"):])
        return _from_counts(spec)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what a Plan stores); :meth:`from_dict` inverts it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("device", "intra_node", "inter_node"):
            data[name] = data[name].to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterSpec:
        """Rebuild from :meth:`to_dict` output, validating keys and values."""
        if not isinstance(data, Mapping):
            raise TypeError(f"ClusterSpec.from_dict needs a dict, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(data) != sorted(names):
            raise ValueError(f"cluster dict has keys {sorted(data)}; expected {sorted(names)}")
        return cls(**{**data, "device": DeviceSpec.from_dict(data["device"]),
                      "intra_node": LinkLevel.from_dict(data["intra_node"]),
                      "inter_node": LinkLevel.from_dict(data["inter_node"])})

    def __str__(self) -> str:
        num = self.num_devices
        if self.local:
            return f"local: {num} CPU process{'es' * (num != 1)} over gloo"
        head = (f"{self.num_nodes}×{self.devices_per_node} {self.device.name} "
                f"({num} device{'s' * (num != 1)}, {self.backend})")
        links = ", ".join(f"{lv.name} {lv.bandwidth_bytes_per_s / 1e9:g} GB/s"
                          for lv in self.levels)
        return f"{head}: {links}" if links else head


def _bad(spec: str, problem: str) -> ValueError:
    return ValueError(f"cannot parse cluster spec {spec!r}: {problem}; expected {EXPECTED}; "
                      f"valid device types: {valid_device_names()}")


def _local(spec: str, count_text: str | None) -> ClusterSpec:
    if count_text is not None and not re.fullmatch(r"\s*[+-]?\d+\s*", count_text):
        raise _bad(spec, f"the process count {count_text.strip()!r} after 'local:' is not an int")
    num = (os.cpu_count() or 1) if count_text is None else int(count_text)
    if num < 1:
        raise _bad(spec, f"local needs at least 1 process, got {num}")
    return ClusterSpec(num_nodes=1, devices_per_node=num, device=_local_device(num),
                       intra_node=GLOO_LOOPBACK, inter_node=GLOO_TCP, backend="gloo",
                       local=True, text=spec)


def _local_device(num: int) -> DeviceSpec:
    cpu = get_device("CPU")
    return dataclasses.replace(cpu, memory_bytes=max(1, cpu.memory_bytes // num),
                               peak_flops_per_s={k: v / num for k, v in cpu.peak_flops_per_s},
                               memory_bandwidth_bytes_per_s=cpu.memory_bandwidth_bytes_per_s / num,
                               source=f"{cpu.source}; a 1/{num} share per local process")


def _from_counts(spec: str) -> ClusterSpec:
    rest = re.sub(r"\s+", "", spec)
    counts: list[int] = []
    while len(counts) < 2 and (match := _COUNT_PREFIX.match(rest)):
        counts.append(int(match.group(1)))
        rest = rest[match.end():]
    if not counts:
        hint = f" (did you mean 1x{rest}?)" if rest.casefold() in _DEVICE_NAMES else ""
        raise _bad(spec, f"no device count found{hint}")
    if not rest:
        raise _bad(spec, "the device type is missing after the counts")
    if _COUNT_PREFIX.match(rest):
        raise _bad(spec, "too many counts: at most NODESxDEVICES come before the type")
    names = ("number of nodes", "devices per node")[-len(counts):]
    for name, value in zip(names, counts, strict=True):
        if value < 1:
            raise _bad(spec, f"the {name} must be >= 1, got {value}")
    if rest.casefold() not in _DEVICE_NAMES:
        raise _bad(spec, f"unknown device type {rest!r}")
    return _build(num_nodes=counts[0] if len(counts) == 2 else 1, devices_per_node=counts[-1],
                  device=get_device(rest), text=spec)


def _build(*, num_nodes: int, devices_per_node: int, device: DeviceSpec, text: str,
           backend: str | None = None, intra: LinkLevel | None = None,
           inter: LinkLevel | None = None) -> ClusterSpec:
    default_intra, default_inter = default_links(device.name)
    return ClusterSpec(
        num_nodes=num_nodes, devices_per_node=devices_per_node, device=device,
        intra_node=intra or default_intra, inter_node=inter or default_inter,
        backend=backend or ("gloo" if device.name == "CPU" else "nccl"),  # type: ignore[arg-type]
        local=False, text=text,
    )


_FILE_REQUIRED = ("nodes", "devices_per_node", "device")
_FILE_OPTIONAL = ("backend", "memory_gib", "peak_tflops", "intra_node_bandwidth_gb_per_s",
                  "intra_node_latency_us", "inter_node_bandwidth_gb_per_s", "inter_node_latency_us")


def _from_file(path: str) -> ClusterSpec:
    data = _read_file(path)
    try:
        return _from_file_data(data, path)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cluster file {path!r}: {error}") from error


def _read_file(path: str) -> dict[str, Any]:
    is_toml = path.lower().endswith(".toml")
    if not path.lower().endswith((".toml", ".json")):
        raise ValueError(f"cluster file {path!r} must end in .toml or .json; expected {EXPECTED}")
    if not os.path.isfile(path):
        raise ValueError(f"cluster file {path!r} not found; expected {EXPECTED}")
    if is_toml:
        import tomllib  # Python 3.11+; on 3.10 write the cluster file as .json
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file) if is_toml else json.load(file)
    except (ValueError, UnicodeDecodeError) as error:  # TOMLDecodeError, JSONDecodeError
        kind = "TOML" if is_toml else "JSON"
        raise ValueError(f"cluster file {path!r} is not valid {kind}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"cluster file {path!r} must hold one object/table of keys, "
                         f"got {type(data).__name__}")
    return data


def _from_file_data(data: dict[str, Any], path: str) -> ClusterSpec:
    valid = _FILE_REQUIRED + _FILE_OPTIONAL
    for key in sorted(set(data) - set(valid)):
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown key {key!r}{hint}; valid keys: {list(valid)}")
    missing = [key for key in _FILE_REQUIRED if key not in data]
    if missing:
        raise ValueError(f"missing required key(s) {missing}; required: {list(_FILE_REQUIRED)}")
    for key in ("nodes", "devices_per_node"):
        if type(data[key]) is not int or data[key] < 1:
            raise ValueError(f"{key!r} must be an int >= 1, got {_show(data[key])}")
    if not isinstance(data["device"], str):
        raise ValueError(f"'device' must be a string, got {_show(data['device'])}")
    device = _override_device(get_device(data["device"]), data, path)
    intra, inter = default_links(device.name)
    return _build(num_nodes=data["nodes"], devices_per_node=data["devices_per_node"],
                  device=device, text=path, backend=data.get("backend"),
                  intra=_override_link(intra, "intra_node", data, path),
                  inter=_override_link(inter, "inter_node", data, path))


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _number(data: Mapping[str, Any], key: str, *, scale: float = 1.0) -> float:
    """``data[key] × scale`` (the scale converts the file's unit: GiB → bytes, TFLOP/s → FLOP/s)."""
    value = data[key]
    try:
        number = float(value) if type(value) in (int, float) else math.nan
    except OverflowError:  # an int no float holds
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{key!r} must be a positive number, got {_show(value)}")
    if not math.isfinite(number * scale):
        raise ValueError(f"{key!r} = {value!r} is too large")
    return number * scale


def _override_device(device: DeviceSpec, data: dict[str, Any], path: str) -> DeviceSpec:
    changes: dict[str, Any] = {}
    if "memory_gib" in data:
        changes["memory_bytes"] = int(_number(data, "memory_gib", scale=2**30))
    if "peak_tflops" in data:
        table = data["peak_tflops"]
        if not isinstance(table, dict) or not table:
            raise ValueError(f"'peak_tflops' must be a table of dtype -> TFLOP/s like "
                             f"{{bf16 = 280}}, got {_show(table)}")
        peaks = dict(device.peak_flops_per_s)
        peaks.update({canonical_dtype(dtype): _number(table, dtype, scale=1e12) for dtype in table})
        changes["peak_flops_per_s"] = peaks
    if not changes:
        return device
    changes["source"] = f"{device.source}; {', '.join(sorted(changes))} overridden by {path}"
    return dataclasses.replace(device, **changes)


def _override_link(link: LinkLevel, level: str, data: dict[str, Any], path: str) -> LinkLevel:
    changes: dict[str, Any] = {}
    if f"{level}_bandwidth_gb_per_s" in data:
        changes["bandwidth_bytes_per_s"] = _number(data, f"{level}_bandwidth_gb_per_s", scale=1e9)
        changes["peak_bandwidth_bytes_per_s"] = None
    if f"{level}_latency_us" in data:
        changes["latency_s"] = _number(data, f"{level}_latency_us", scale=1e-6)
    if not changes:
        return link
    return dataclasses.replace(link, source=f"{', '.join(sorted(changes))} from {path}; "
                               f"otherwise {link.source}", placeholder=False, **changes)
