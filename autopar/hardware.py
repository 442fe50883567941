"""Device and interconnect catalog: the hardware numbers every cost model reads.

Data flow: ``ClusterSpec`` (``autopar.cluster``) picks a :class:`DeviceSpec` and two
:class:`LinkLevel` s from here; the compute, communication and memory models in
``autopar.cost_models`` read peak FLOP/s, memory and bandwidth from them; Plans record
them (via ``ClusterSpec.to_dict``) so a plan says what hardware it assumed.

GPU numbers are datasheet numbers (dense, no sparsity) and cite their datasheet.
Link bandwidths are per device and per direction — the ``B`` of the nccl-tests
bus-bandwidth formulas. The CPU entry and the gloo links are placeholders
(``placeholder=True``) until ``autopar calibrate`` measures this machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8")
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
    "bfloat16": "bf16", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
    "float8_e4m3fnuz": "fp8", "float8_e5m2fnuz": "fp8",
}
GB = 1e9
GIB = 2**30
TERA = 1e12


def canonical_dtype(dtype: str) -> str:
    """``"bfloat16"``, ``"torch.bfloat16"`` or ``"bf16"`` → ``"bf16"`` (one of :data:`DTYPES`)."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)} or torch's name")
    return key


def _finite(value: object) -> bool:
    """An int or float that a float holds and that is finite (an int beyond any float is not)."""
    if type(value) is int:
        return abs(value) < 2**1023
    return type(value) is float and math.isfinite(value)


def _check(owner: object, name: str, kind: str) -> None:
    """Validate ``owner.name``: kind is "text" (nonempty str), "bool", "int" or "float" (> 0)."""
    value = getattr(owner, name)
    ok = {"text": isinstance(value, str) and value != "", "bool": type(value) is bool,
          "int": type(value) is int and value > 0,
          "float": _finite(value) and value > 0}[kind]
    if not ok:
        expected = {"text": "a nonempty str", "bool": "a bool"}.get(kind, f"a positive {kind}")
        owner_name = type(owner).__name__
        raise ValueError(f"{owner_name}.{name} = {value!r} is invalid: expected {expected}")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator (or CPU process): memory, peak compute by dtype, bandwidths.

    ``peak_flops_per_s`` holds sorted ``(dtype, flops_per_s)`` pairs (a mapping is
    accepted and normalized); dense peaks, multiply-add counted as two FLOPs.
    ``memory_bytes`` is the datasheet capacity read as GiB (HBM is binary-sized:
    nvidia-smi shows 81920 MiB on an A100 80GB); the memory model subtracts a reserve.
    ``intra_node_bandwidth_bytes_per_s`` is NVLink per GPU *per direction*, half of the
    datasheet's bidirectional total.
    """

    name: str
    memory_bytes: int
    peak_flops_per_s: tuple[tuple[str, float], ...]
    memory_bandwidth_bytes_per_s: float
    intra_node_bandwidth_bytes_per_s: float
    source: str
    placeholder: bool = False

    def __post_init__(self) -> None:
        for name, kind in (("name", "text"), ("source", "text"), ("placeholder", "bool"),
                           ("memory_bytes", "int"), ("memory_bandwidth_bytes_per_s", "float"),
                           ("intra_node_bandwidth_bytes_per_s", "float")):
            _check(self, name, kind)
        peaks = self.peak_flops_per_s
        pairs = peaks.items() if isinstance(peaks, Mapping) else peaks
        normalized = tuple(sorted((canonical_dtype(k), v) for k, v in pairs))
        dtypes = [dtype for dtype, _ in normalized]
        if not dtypes or len(set(dtypes)) != len(dtypes):
            raise ValueError(f"DeviceSpec {self.name}: peak_flops_per_s needs one entry per dtype, "
                             f"got {dtypes}")
        for dtype, flops in normalized:
            if not _finite(flops) or flops <= 0:
                raise ValueError(f"DeviceSpec {self.name}: peak_flops_per_s[{dtype}] = {flops!r} "
                                 "is invalid: expected a positive float")
        object.__setattr__(self, "peak_flops_per_s", normalized)

    def peak_flops_per_s_for(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (``"bf16"``, ``"bfloat16"``, ``"torch.float32"``…)."""
        key = canonical_dtype(dtype)
        for name, flops in self.peak_flops_per_s:
            if name == key:
                return flops
        have = [name for name, _ in self.peak_flops_per_s]
        raise ValueError(f"{self.name} has no {key} peak in the catalog; it lists {have}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (peaks as a ``{dtype: flops}`` object)."""
        data = asdict(self)
        data["peak_flops_per_s"] = dict(self.peak_flops_per_s)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceSpec:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ValueError."""
        return cls(**_checked_keys(cls, data))


@dataclass(frozen=True, kw_only=True)
class LinkLevel:
    """One level of the interconnect (within a node, across nodes).

    ``bandwidth_bytes_per_s`` is the effective bandwidth per device per direction — the
    ``B`` in the collective formulas (TECHNIQUES.md §4), a measured bus bandwidth where
    one is published. ``peak_bandwidth_bytes_per_s`` is the line rate it comes from.
    ``latency_s`` is the per-step α.
    """

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float
    source: str
    peak_bandwidth_bytes_per_s: float | None = None
    placeholder: bool = False

    def __post_init__(self) -> None:
        for name, kind in (("name", "text"), ("source", "text"), ("placeholder", "bool"),
                           ("bandwidth_bytes_per_s", "float"), ("latency_s", "float")):
            _check(self, name, kind)
        if self.peak_bandwidth_bytes_per_s is not None:
            _check(self, "peak_bandwidth_bytes_per_s", "float")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinkLevel:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ValueError."""
        return cls(**_checked_keys(cls, data))


def _checked_keys(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    required = [f.name for f in fields(cls) if MISSING is f.default is f.default_factory]
    unknown = sorted(set(data) - set(names))
    missing = [n for n in required if n not in data]
    if unknown or missing:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}; "
                         f"expected keys {names}")
    return dict(data)


_A100_SRC = "NVIDIA A100 Tensor Core GPU datasheet (2021), {} SXM column; dense peaks"
_H100_SRC = (
    "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM column; dense (half the sparse figures)"
)
_H200_SRC = "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column; compute as H100 SXM"
_A100_PEAKS = {"fp32": 19.5 * TERA, "tf32": 156 * TERA, "fp16": 312 * TERA, "bf16": 312 * TERA}
_H100_PEAKS = {
    "fp32": 67 * TERA, "tf32": 494 * TERA, "fp16": 989 * TERA, "bf16": 989 * TERA,
    "fp8": 1979 * TERA,
}


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GIB  # placeholder where sysconf is unavailable


def _cpu_spec() -> DeviceSpec:
    cores = os.cpu_count() or 1
    flops = cores * 32e9  # placeholder: ~32 GFLOP/s per core (AVX2 FMA), not measured
    return DeviceSpec(
        name="CPU",
        memory_bytes=_physical_memory_bytes(),
        peak_flops_per_s={"fp32": flops, "bf16": flops, "fp16": flops},
        memory_bandwidth_bytes_per_s=20e9,
        intra_node_bandwidth_bytes_per_s=2e9,
        source=f"placeholder, not a datasheet: {cores} cores × 32 GFLOP/s, 20 GB/s memory, "
        "this machine's RAM; replace with `autopar calibrate`",
        placeholder=True,
    )


def _gpu(name: str, *, memory_gib: int, peaks: dict[str, float], hbm_gb_per_s: float,
         nvlink_total_gb_per_s: float, source: str) -> DeviceSpec:
    return DeviceSpec(
        name=name, memory_bytes=memory_gib * GIB, peak_flops_per_s=peaks,
        memory_bandwidth_bytes_per_s=hbm_gb_per_s * GB,
        intra_node_bandwidth_bytes_per_s=nvlink_total_gb_per_s / 2 * GB,  # per direction
        source=source,
    )


DEVICE_CATALOG: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        _gpu("A100-40GB", memory_gib=40, peaks=_A100_PEAKS, hbm_gb_per_s=1555,
             nvlink_total_gb_per_s=600, source=_A100_SRC.format("A100 40GB")),
        _gpu("A100-80GB", memory_gib=80, peaks=_A100_PEAKS, hbm_gb_per_s=2039,
             nvlink_total_gb_per_s=600, source=_A100_SRC.format("A100 80GB")),
        _gpu("H100-SXM", memory_gib=80, peaks=_H100_PEAKS, hbm_gb_per_s=3350,
             nvlink_total_gb_per_s=900, source=_H100_SRC),
        _gpu("H200", memory_gib=141, peaks=_H100_PEAKS, hbm_gb_per_s=4800,
             nvlink_total_gb_per_s=900, source=_H200_SRC),
        _cpu_spec(),
    )
}
DEVICE_ALIASES: dict[str, str] = {
    "A100-SXM4-40GB": "A100-40GB", "A100-SXM4-80GB": "A100-80GB",
    "H100": "H100-SXM", "H100-80GB": "H100-SXM", "H200-141GB": "H200",
}
_LOOKUP = {k.casefold(): v for k, v in {**{n: n for n in DEVICE_CATALOG}, **DEVICE_ALIASES}.items()}


def valid_device_names() -> str:
    """``"A100-40GB, …, H100-SXM (also H100, H100-80GB), …"`` for error messages."""
    parts = []
    for name in DEVICE_CATALOG:
        aliases = [a for a, target in DEVICE_ALIASES.items() if target == name]
        parts.append(f"{name} (also {', '.join(aliases)})" if aliases else name)
    return ", ".join(parts)


def get_device(name: str) -> DeviceSpec:
    """The catalog entry for ``name`` (case-insensitive; aliases accepted)."""
    if not isinstance(name, str):
        raise TypeError(f"device name must be a str, got {type(name).__name__}")
    canonical = _LOOKUP.get(name.strip().casefold())
    if canonical is None:
        raise ValueError(
            f"unknown device type {name!r}; valid device types: {valid_device_names()}"
        )
    return DEVICE_CATALOG[canonical]


_TYPICAL = "latency: typical published NCCL figure"
NVLINK_A100 = LinkLevel(
    name="NVLink3/NVSwitch (DGX A100)", bandwidth_bytes_per_s=230 * GB, latency_s=5e-6,
    peak_bandwidth_bytes_per_s=300 * GB,
    source="A100 datasheet: 600 GB/s NVLink total = 300 GB/s per direction; 230 GB/s is the "
    f"measured 8×A100 all-reduce bus bandwidth (NCCL maintainers); {_TYPICAL} (~5 µs)",
)
NVLINK_H100 = LinkLevel(
    name="NVLink4/NVSwitch (DGX H100/H200)", bandwidth_bytes_per_s=370 * GB, latency_s=5e-6,
    peak_bandwidth_bytes_per_s=450 * GB,
    source="H100 datasheet: 900 GB/s NVLink total = 450 GB/s per direction; 370 GB/s is the "
    f"measured 8×H100 ring all-reduce bus bandwidth (NCCL maintainers); {_TYPICAL} (~5 µs)",
)
IB_HDR = LinkLevel(
    name="InfiniBand HDR (8×200 Gb/s per DGX A100 node)", bandwidth_bytes_per_s=22.5 * GB,
    latency_s=10e-6, peak_bandwidth_bytes_per_s=25 * GB,
    source="DGX A100: one 200 Gb/s HDR HCA per GPU = 25 GB/s (200 GB/s per node); 22.5 GB/s per "
    f"HCA from the measured 85–96 GB/s for 4 HCAs (NCCL maintainers); {_TYPICAL} (~10 µs)",
)
IB_NDR = LinkLevel(
    name="InfiniBand NDR (8×400 Gb/s per DGX H100 node)", bandwidth_bytes_per_s=45 * GB,
    latency_s=10e-6, peak_bandwidth_bytes_per_s=50 * GB,
    source="DGX H100: one 400 Gb/s NDR HCA per GPU = 50 GB/s; 45 GB/s assumes the 90% of line "
    f"rate measured for HDR (an assumption, not a measurement); {_TYPICAL} (~10 µs)",
)
GLOO_LOOPBACK = LinkLevel(
    name="gloo over loopback (this machine)", bandwidth_bytes_per_s=2 * GB, latency_s=50e-6,
    source="placeholder, not measured; replace with `autopar calibrate`", placeholder=True,
)
GLOO_TCP = LinkLevel(
    name="gloo over TCP between hosts", bandwidth_bytes_per_s=1 * GB, latency_s=100e-6,
    peak_bandwidth_bytes_per_s=1.25 * GB,
    source="placeholder for 10 GbE, not measured; replace with `autopar calibrate`",
    placeholder=True,
)
_DEFAULT_LINKS: dict[str, tuple[LinkLevel, LinkLevel]] = {
    "A100-40GB": (NVLINK_A100, IB_HDR), "A100-80GB": (NVLINK_A100, IB_HDR),
    "H100-SXM": (NVLINK_H100, IB_NDR), "H200": (NVLINK_H100, IB_NDR),
    "CPU": (GLOO_LOOPBACK, GLOO_TCP),
}


def default_links(device: str) -> tuple[LinkLevel, LinkLevel]:
    """``(intra_node, inter_node)`` link levels for a catalog device name or alias."""
    return _DEFAULT_LINKS[get_device(device).name]

