"""Measured per-operation rates of this machine's CPU: what the local-cluster model reads.

Data flow: ``autopar calibrate`` measures single operations (``calibrate_ops``) and a gloo group
(``calibrate_group``) → ``calibrate_fits.cpu_rates`` builds :class:`CpuRates` → stored inside the
``LocalProfile`` JSON → ``cpu_compute`` (per-layer times) and ``cpu_step`` (the step on N
processes sharing C cores) read it. Without a profile, :meth:`CpuRates.assumed` gives
placeholder rates of the same shape (every number marked ASSUMED).

Every rate is per process, one thread, running alone; :meth:`CpuRates.share` says how a
process's rate divides when ``k`` processes are busy at once: ``(compute, copy)`` fractions, the
first measured on the training op mix (a stack of transformer blocks), the second on a large copy.
Tables are measured points,
interpolated (never extrapolated beyond a clamp), so nothing here is fitted to a training step:

* ``linear``: FITTED curve ``rate(m, k, n) = P / (1 + T (1/m + 1/k + 1/n))`` over measured
  ``nn.Linear`` forward + backward timings (three matmuls, the bias add and its gradient);
* ``flash_attention``: measured fused (SDPA) attention rates per ``(seq, head_dim)``, FLOPs
  counted as ``compute`` counts them (causal half);
* ``math_attention_s_per_score``: the unfused (MATH backend) attention per score element;
* ``elementwise``: seconds per element, forward and forward + backward, per op and size;
* ``activation_reread_s_per_byte``: FITTED extra backward time per byte of a layer's saved
  activations once later layers have evicted them from the caches (a stack of blocks vs one);
* collectives: measured gloo times per kind, group size and message size
  (:meth:`collective_time_s`, piecewise linear in size: a measured α–β per segment).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ELEMENTWISE_OPS = ("layer_norm", "gelu", "add", "copy", "cross_entropy")
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


@dataclass(frozen=True, kw_only=True)
class OpTable:
    """Measured ``(num_elements, forward_s_per_element, train_s_per_element)`` points of one op;
    ``train`` is forward + backward. Between points: linear in ``log(num_elements)``."""

    points: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        points = tuple(sorted(tuple(float(x) for x in p) for p in self.points))
        if not points or any(len(p) != 3 or min(p) <= 0 for p in points):
            raise ValueError(f"OpTable.points = {self.points!r}: expected positive (n, fwd, train) triples")
        object.__setattr__(self, "points", points)

    def seconds(self, num_elements: float) -> tuple[float, float]:
        """(forward, backward) seconds for ``num_elements`` elements."""
        if num_elements <= 0:
            return 0.0, 0.0
        fwd, train = _interpolate(self.points, num_elements)
        return fwd * num_elements, max(0.0, train - fwd) * num_elements


def _interpolate(points: Sequence[tuple[float, ...]], x: float) -> tuple[float, ...]:
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return points[0][1:]
    if i == len(points):
        return points[-1][1:]
    lo, hi = points[i - 1], points[i]
    if hi[0] <= lo[0]:
        return hi[1:]
    w = (math.log(x) - math.log(lo[0])) / (math.log(hi[0]) - math.log(lo[0]))
    return tuple(a + w * (b - a) for a, b in zip(lo[1:], hi[1:], strict=True))


@dataclass(frozen=True, kw_only=True)
class CpuRates:
    """Per-process rates (see the module docstring); ``source`` says where they came from."""

    num_cores: int
    linear_peak_flops_per_s: float
    linear_tile_dim: float
    flash_attention: tuple[tuple[float, float, float, float], ...]
    math_attention_s_per_score: tuple[float, float]
    elementwise: Mapping[str, OpTable]
    copy_bytes_per_s: float
    activation_reread_s_per_byte: float
    op_overhead_s: float
    optimizer_s_per_param: float
    optimizer_s_per_tensor: float
    dtensor_dispatch_s: float
    dtensor_optimizer_s_per_tensor: float
    runtime_step_s: float
    runtime_microbatch_s: float
    collectives: tuple[tuple[str, int, float, float], ...]
    shares: tuple[tuple[int, float, float], ...]
    source: str

    def __post_init__(self) -> None:
        missing = sorted(set(ELEMENTWISE_OPS) - set(self.elementwise))
        if missing:
            raise ValueError(f"CpuRates.elementwise lacks {missing}; re-run `autopar calibrate`")
        tables = {k: v if isinstance(v, OpTable) else OpTable(points=v) for k, v in self.elementwise.items()}
        object.__setattr__(self, "elementwise", tables)
        for name in ("flash_attention", "collectives", "shares", "math_attention_s_per_score"):
            object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, (list, tuple)) else x
                                                 for x in getattr(self, name)))
        if not self.flash_attention or not self.shares:
            raise ValueError("CpuRates needs at least one attention point and one share")

    # --- compute -------------------------------------------------------------------------
    def linear_s(self, m: float, k: float, n: float) -> float:
        """Forward + backward of a (m×k)(k×n) linear layer: ``6mkn`` FLOPs on the FITTED curve."""
        if min(m, k, n) <= 0:
            return 0.0
        rate = self.linear_peak_flops_per_s / (1 + self.linear_tile_dim * (1 / m + 1 / k + 1 / n))
        return max(6 * m * k * n / rate, 3 * self.op_overhead_s)

    def flash_attention_s(self, flops_fwd: float, *, seq_len: float, head_dim: float) -> tuple[float, float]:
        """(forward, backward) seconds of fused attention doing ``flops_fwd`` forward FLOPs; the
        rates of the measured (seq, head_dim) nearest in log space."""
        if flops_fwd <= 0:
            return 0.0, 0.0

        def distance(point: tuple[float, ...]) -> float:
            return abs(math.log(point[0] / seq_len)) + abs(math.log(point[1] / head_dim))

        _, _, fwd_rate, train_rate = min(self.flash_attention, key=distance)
        from autopar.cost_models.compute import FUSED_ATTENTION_BACKWARD_FLOPS_RATIO

        train_s = (1 + FUSED_ATTENTION_BACKWARD_FLOPS_RATIO) * flops_fwd / train_rate
        fwd_s = min(flops_fwd / fwd_rate, train_s)
        return max(fwd_s, self.op_overhead_s), max(train_s - fwd_s, self.op_overhead_s)

    def math_attention_s(self, num_scores: float) -> tuple[float, float]:
        """(forward, backward) of unfused attention over ``num_scores`` = b·heads·s² scores."""
        fwd, train = self.math_attention_s_per_score
        return fwd * num_scores, max(0.0, train - fwd) * num_scores

    def elementwise_s(self, op: str, num_elements: float) -> tuple[float, float]:
        """(forward, backward) of the training op ``op`` over ``num_elements`` elements, each at
        least the per-op floor."""
        fwd, bwd = self.elementwise[op].seconds(num_elements)
        floor = self.op_overhead_s / 2
        return (max(fwd, floor), max(bwd, floor)) if num_elements > 0 else (0.0, 0.0)

    def copy_s(self, num_bytes: float) -> float:
        """A plain copy reading and writing ``num_bytes`` in all."""
        return num_bytes / self.copy_bytes_per_s if num_bytes > 0 else 0.0

    def optimizer_s(self, num_params: float, num_tensors: float, *, dtensor: bool) -> float:
        """AdamW (torch's per-tensor loop, as on CPU) over ``num_params`` in ``num_tensors`` tensors;
        DTensor parameters pay the DTensor dispatch on every per-tensor op."""
        per_tensor = self.optimizer_s_per_tensor + (self.dtensor_optimizer_s_per_tensor if dtensor else 0.0)
        return num_params * self.optimizer_s_per_param + num_tensors * per_tensor

    # --- communication and sharing -------------------------------------------------------
    def _measured_ranks(self, kind: str, num_ranks: int) -> int:
        counts = {p[1] for p in self.collectives if p[0] == kind}
        if not counts:
            raise ValueError(f"no {kind} measurements in the CPU profile; re-run `autopar calibrate`")
        return min(counts, key=lambda n: (abs(n - num_ranks), -n))

    def collective_time_s(self, kind: str, size_bytes: float, num_ranks: int) -> float:
        """Measured gloo time of ``kind`` for a full buffer of ``size_bytes`` (p2p: one message)
        among ``num_ranks``; the nearest measured group size, piecewise linear in size."""
        if size_bytes <= 0 or (num_ranks <= 1 and kind != "p2p"):
            return 0.0
        ranks = self._measured_ranks(kind, num_ranks)
        points = sorted((p[2], p[3]) for p in self.collectives if p[0] == kind and p[1] == ranks)
        if len(points) == 1:
            return points[0][1] * size_bytes / points[0][0]
        if size_bytes <= points[0][0]:
            return points[0][1]
        i = min(bisect.bisect_left([s for s, _ in points], size_bytes), len(points) - 1)
        (s0, t0), (s1, t1) = points[i - 1], points[i]
        return max(t0 + (t1 - t0) * (size_bytes - s0) / (s1 - s0), t0)

    def collective_work_s(self, kind: str, size_bytes: float, num_ranks: int, *, memory_bound: bool = False
                          ) -> float:
        """:meth:`collective_time_s` as the work of one process running alone: the measurement ran
        with its group's processes busy at once, so it is scaled back by their share (the step
        model scales it again by the share of however many processes are busy then)."""
        if size_bytes <= 0 or (num_ranks <= 1 and kind != "p2p"):
            return 0.0
        compute, copy = self.share(self._measured_ranks(kind, num_ranks))
        return self.collective_time_s(kind, size_bytes, num_ranks) * (copy if memory_bound else compute)

    def share(self, busy: float) -> tuple[float, float]:
        """(compute, copy) rate fractions of one process while ``busy`` processes compute at once,
        interpolated between measured counts; beyond them, the largest count's rate per core."""
        if busy <= 1:
            return 1.0, 1.0
        n, matmul, copy = self.shares[-1]
        if busy > n:
            return matmul * n / busy, copy * n / busy
        points = [(float(count), m, c) for count, m, c in self.shares]
        below = max((p for p in points if p[0] <= busy), key=lambda p: p[0], default=(1.0, 1.0, 1.0))
        above = min(p for p in points if p[0] >= busy)
        if above[0] == below[0]:
            return above[1], above[2]
        w = (busy - below[0]) / (above[0] - below[0])
        return below[1] + w * (above[1] - below[1]), below[2] + w * (above[2] - below[2])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        data = dataclasses.asdict(self)
        data["elementwise"] = {k: [list(p) for p in v.points] for k, v in self.elementwise.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CpuRates:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) != names:
            got = set(data) if isinstance(data, Mapping) else set()
            raise ValueError(f"CPU rates keys differ: unknown {sorted(got - names)}, missing "
                             f"{sorted(names - got)}; re-run `autopar calibrate`")
        tables = {k: OpTable(points=tuple(tuple(p) for p in v)) for k, v in data["elementwise"].items()}
        return cls(**{**data, "elementwise": tables})

    @classmethod
    def assumed(cls, num_cores: int) -> CpuRates:
        """ASSUMED rates for a machine never calibrated: every number a placeholder of the right
        order for one AVX2 core (as ``hardware``'s CPU entry), none measured; gloo as
        ``hardware.GLOO_LOOPBACK`` (2 GB/s, 50 µs). Run ``autopar calibrate`` to replace them."""
        ns = 1e-9
        table = OpTable(points=((2.0**18, 1 * ns, 3 * ns),))
        collectives = tuple((kind, n, size, _ring_steps(kind, n) * 50e-6 + _ring_bytes(kind, n, size) / 2e9)
                            for kind in COLLECTIVE_KINDS for n in (2, 4) if kind != "p2p" or n == 2
                            for size in (4096.0, 2.0**24))
        return cls(num_cores=num_cores, linear_peak_flops_per_s=32e9, linear_tile_dim=32.0,
                   flash_attention=((128.0, 64.0, 8e9, 8e9),), math_attention_s_per_score=(4 * ns, 12 * ns),
                   elementwise=dict.fromkeys(ELEMENTWISE_OPS, table), copy_bytes_per_s=10e9,
                   activation_reread_s_per_byte=1 / 10e9,
                   op_overhead_s=5e-6, optimizer_s_per_param=5 * ns, optimizer_s_per_tensor=50e-6,
                   dtensor_dispatch_s=30e-6, dtensor_optimizer_s_per_tensor=300e-6, runtime_step_s=5e-3,
                   runtime_microbatch_s=1e-3, collectives=collectives,
                   shares=((1, 1.0, 1.0), (num_cores, 1.0, 1.0)),  # beyond C: C/k
                   source="ASSUMED placeholders, not measured: run `autopar calibrate`")


def _ring_steps(kind: str, n: int) -> int:
    return 1 if kind == "p2p" else (2 if kind == "all_reduce" else 1) * (n - 1)


def _ring_bytes(kind: str, n: int, size: float) -> float:
    return size if kind == "p2p" else (2 if kind == "all_reduce" else 1) * (n - 1) / n * size
