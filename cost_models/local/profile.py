"""The measured profile of this machine: its file format, and applying it to a local cluster.

Data flow: ``autopar calibrate`` (``calibrate``) measures this machine → :class:`LocalProfile`
→ :func:`save_profile` writes versioned JSON atomically (default
``~/.cache/autopar/profile-<hostname>.json``) → :func:`load_profile` → :func:`apply_profile`
replaces the placeholder CPU ``DeviceSpec`` and gloo ``LinkLevel`` of a ``local:N``
``ClusterSpec`` with measured ones, for whatever reads a cluster as a datasheet (the GPU-style
models, views). :func:`calibrated` does the last two steps when a profile exists. ``estimate``
itself prices local clusters with the local-cluster model (``cpu_step``), which reads the
profile's ``cpu`` rates (``cpu_rates.CpuRates``) — from the default file automatically.

What ``apply_profile`` sets, per process of a ``local:N`` cluster (one thread each):

* ``peak_flops_per_s[dtype]`` = the matmul peak FITTED to the measured shapes under the compute
  model's own roll-off ``η = 1 / (1 + T(1/m + 1/k + 1/n))`` (``compute.MATMUL_TILE_DIM``), times
  the per-process share measured with N processes busy at once (N ranks share the cores);
* ``memory_bandwidth_bytes_per_s`` = the large-copy bandwidth times its measured share;
* ``intra_node`` = gloo over loopback: ``B`` and ``α`` FITTED by least squares to collective
  and send/recv timings of N ranks (the nearest measured group size).

Version 2 added ``cpu``; a version-1 file is refused with the advice to calibrate again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopar.cost_models.local.rates import CpuRates
from autopar.hardware import LinkLevel, canonical_dtype

if TYPE_CHECKING:  # autopar.cluster imports the hardware catalog: no import cycle at run time
    from autopar.cluster import ClusterSpec

SCHEMA_VERSION = 2
FORMAT = "autopar-local-profile"
RERUN = "run `autopar calibrate` to measure this machine again"


@dataclass(frozen=True, kw_only=True)
class LinkFit:
    """gloo over loopback among ``num_ranks`` processes: ``t = x·S/B + y·α`` (``comm``'s formulas),
    FITTED by least squares on relative error; ``rms_relative_error`` is the fit's residual."""

    num_ranks: int
    bandwidth_bytes_per_s: float
    latency_s: float
    rms_relative_error: float


@dataclass(frozen=True, kw_only=True)
class ProcessShare:
    """With ``num_processes`` processes busy at once, each one's rate ÷ the rate of one alone."""

    num_processes: int
    matmul_fraction: float
    copy_fraction: float


@dataclass(frozen=True, kw_only=True)
class LocalProfile:
    """What ``autopar calibrate`` measured on one machine, one thread per process.

    Rates are per process running alone; :meth:`share` says how they divide when several run.
    ``cpu`` holds the per-operation rates of the local-cluster model.
    ``peak_flops_per_s`` is FITTED under the compute model's fixed roll-off (what the model can
    use); ``matmul_tile_dim`` with ``matmul_curve_peak_flops_per_s`` is the fp32 curve FITTED
    with a free roll-off (what the machine does). ``measurements`` holds every raw point.
    """

    hostname: str
    created: str
    num_cores: int
    torch_version: str
    quick: bool
    calibration_time_s: float
    peak_flops_per_s: tuple[tuple[str, float], ...]
    best_matmul_flops_per_s: tuple[tuple[str, float], ...]
    matmul_tile_dim: float
    matmul_curve_peak_flops_per_s: float
    memory_bandwidth_bytes_per_s: float
    elementwise_bandwidth_bytes_per_s: float
    op_overhead_s: float
    attention_flops_per_s: float
    optimizer_time_s_per_param: float
    shares: tuple[ProcessShare, ...]
    links: tuple[LinkFit, ...]
    cpu: CpuRates
    measurements: Mapping[str, Any]
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"LocalProfile.schema_version = {self.schema_version!r}; this autopar reads "
                             f"version {SCHEMA_VERSION}: {RERUN}")
        for name in ("peak_flops_per_s", "best_matmul_flops_per_s"):
            value = getattr(self, name)
            pairs = value.items() if isinstance(value, Mapping) else value
            object.__setattr__(self, name, tuple(sorted((canonical_dtype(k), v) for k, v in pairs)))
        object.__setattr__(self, "shares", tuple(sorted(self.shares, key=lambda s: s.num_processes)))
        object.__setattr__(self, "links", tuple(sorted(self.links, key=lambda fit: fit.num_ranks)))
        positive = ["matmul_tile_dim", "matmul_curve_peak_flops_per_s", "memory_bandwidth_bytes_per_s",
                    "elementwise_bandwidth_bytes_per_s", "op_overhead_s", "attention_flops_per_s",
                    "optimizer_time_s_per_param"]
        values = {name: getattr(self, name) for name in positive}
        values |= {f"peak_flops_per_s[{k}]": v for k, v in self.peak_flops_per_s}
        for fit in self.links:
            values |= {f"links[{fit.num_ranks}].bandwidth_bytes_per_s": fit.bandwidth_bytes_per_s,
                       f"links[{fit.num_ranks}].latency_s": fit.latency_s}
        for name, value in values.items():
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"LocalProfile.{name} = {value!r} is invalid: expected a positive number")
        if "fp32" not in dict(self.peak_flops_per_s) or not self.links:
            raise ValueError("LocalProfile needs an fp32 peak and at least one gloo link fit")

    def peak_for(self, dtype: str) -> float:
        """FITTED per-process peak FLOP/s for ``dtype`` (fp32's where the dtype was not measured)."""
        peaks = dict(self.peak_flops_per_s)
        return peaks.get(canonical_dtype(dtype), peaks["fp32"])

    def share(self, num_processes: int) -> ProcessShare:
        """The measured share for ``num_processes`` busy processes; beyond what was measured,
        ``min(1, cores / N)`` of the largest measured entry's rate per core."""
        for entry in self.shares:
            if entry.num_processes == num_processes:
                return entry
        fraction = min(1.0, self.num_cores / num_processes)
        return ProcessShare(num_processes=num_processes, matmul_fraction=fraction, copy_fraction=fraction)

    def link(self, num_ranks: int) -> LinkFit:
        """The link fit measured with ``num_ranks`` ranks, else the nearest group size measured."""
        return min(self.links, key=lambda fit: (abs(fit.num_ranks - num_ranks), -fit.num_ranks))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (peaks as ``{dtype: flops}`` objects)."""
        data = dataclasses.asdict(self)
        data["peak_flops_per_s"] = dict(self.peak_flops_per_s)
        data["best_matmul_flops_per_s"] = dict(self.best_matmul_flops_per_s)
        data["measurements"] = dict(self.measurements)
        data["cpu"] = self.cpu.to_dict()
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalProfile:
        """Inverse of :meth:`to_dict`; a wrong format, version or key set raises ValueError."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not an autopar local profile (no \"format\": \"{FORMAT}\"); {RERUN}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"profile schema_version {data.get('schema_version')!r} is not "
                             f"{SCHEMA_VERSION}, the version this autopar reads; {RERUN}")
        body = {k: v for k, v in data.items() if k != "format"}
        names = {f.name for f in dataclasses.fields(cls)}
        if set(body) != names:
            raise ValueError(f"profile keys differ from version {SCHEMA_VERSION}: unknown "
                             f"{sorted(set(body) - names)}, missing {sorted(names - set(body))}; {RERUN}")
        try:
            shares = tuple(ProcessShare(**s) for s in body["shares"])
            links = tuple(LinkFit(**fit) for fit in body["links"])
            cpu = CpuRates.from_dict(body["cpu"])
        except (TypeError, AttributeError) as error:
            raise ValueError(f"profile shares/links/cpu are malformed ({error}); {RERUN}") from error
        return cls(**{**body, "shares": shares, "links": links, "cpu": cpu})


def default_profile_path() -> Path:
    """``$XDG_CACHE_HOME/autopar/profile-<hostname>.json`` (``~/.cache`` when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "autopar" / f"profile-{socket.gethostname()}.json"


def save_profile(profile: LocalProfile, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``profile`` as JSON atomically (a temporary file in the same folder, then
    ``os.replace``): a reader sees the old file or the new one, never half of one."""
    target = Path(path) if path is not None else default_profile_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(profile.to_dict(), indent=1, sort_keys=True) + "\n"
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def load_profile(path: str | os.PathLike[str] | None = None) -> LocalProfile | None:
    """The profile at ``path`` (default: :func:`default_profile_path`); None when the default
    file does not exist. A named file that is missing, corrupt or of another version raises
    ValueError naming the file."""
    target = Path(path) if path is not None else default_profile_path()
    if not target.is_file():
        if path is None:
            return None
        raise ValueError(f"profile file {str(target)!r} not found; run `autopar calibrate --out {target}`")
    try:
        data = json.loads(target.read_text())
        return LocalProfile.from_dict(data)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        message = " ".join(str(error).split())
        message += "" if "autopar calibrate" in message else f"; {RERUN}"
        raise ValueError(f"profile file {str(target)!r} is unreadable: {message}") from error


def apply_profile(cluster: ClusterSpec, profile: LocalProfile, *, busy_processes: int | None = None
                  ) -> ClusterSpec:
    """``cluster`` with its CPU device and gloo intra-node link replaced by measured numbers
    (see the module docstring); everything else, memory included, is kept. ``busy_processes``:
    how many processes are assumed to compute at once (default all N of the node) — the share
    of the cores each one gets."""
    if cluster.device.name != "CPU" or cluster.backend != "gloo":
        raise ValueError(f"a local profile describes this machine's CPU over gloo; cluster "
                         f"{cluster.text!r} has {cluster.device.name} devices over {cluster.backend}")
    num = cluster.devices_per_node
    busy = num if busy_processes is None else busy_processes
    if type(busy) is not int or not 1 <= busy <= num:
        raise ValueError(f"busy_processes = {busy_processes!r} is invalid: expected an int in 1..{num}")
    share, fit = profile.share(busy), profile.link(num)
    where = f"`autopar calibrate` on {profile.hostname} at {profile.created}"
    peaks = {dtype: flops * share.matmul_fraction for dtype, flops in profile.peak_flops_per_s}
    device = dataclasses.replace(
        cluster.device, peak_flops_per_s=peaks,
        memory_bandwidth_bytes_per_s=profile.memory_bandwidth_bytes_per_s * share.copy_fraction,
        placeholder=False,
        source=f"measured by {where}, one thread per process: matmul peak FITTED to the measured "
        f"shapes under the compute model's roll-off, large-copy bandwidth, each × the share measured "
        f"with {busy} processes busy ({share.matmul_fraction:.2f}, {share.copy_fraction:.2f}); memory: "
        f"{cluster.device.source}")
    link = LinkLevel(
        name="gloo over loopback (calibrated)", bandwidth_bytes_per_s=fit.bandwidth_bytes_per_s,
        latency_s=fit.latency_s, placeholder=False,
        source=f"B and α FITTED by least squares to {fit.num_ranks}-rank gloo all-reduce, all-gather, "
        f"reduce-scatter and send/recv timings ({where}; rms error {100 * fit.rms_relative_error:.0f} %)")
    return dataclasses.replace(cluster, device=device, intra_node=link)


def calibrated(cluster: ClusterSpec, profile: LocalProfile | None = None) -> ClusterSpec:
    """A local cluster with this machine's profile applied when one exists (``profile`` or the
    default file); any other cluster, or no profile, is returned unchanged."""
    if not cluster.local:
        return cluster
    profile = profile if profile is not None else load_profile()
    return cluster if profile is None else apply_profile(cluster, profile)
