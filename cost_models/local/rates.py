"""Measured per-operation rates of this machine's CPU: what the local-cluster model reads.

Data flow: ``autopar calibrate`` measures single operations (``calibrate_ops``) and a gloo group
(``calibrate_group``) → ``calibrate_fits.cpu_rates`` builds :class:`CpuRates` → stored inside the
``LocalProfile`` JSON → ``cpu_compute`` (per-layer times) and ``cpu_step`` (the step on N
processes sharing C cores) read it. Without a saved profile, :meth:`CpuRates.quick` (also reached
as :meth:`CpuRates.assumed`) measures this machine in a few seconds (``measure.quick_measurements``:
one process, the gloo ranks and the core sharing as threads) — once per process, cached on disk
beside the profile (:func:`quick_rates_path`, ``$AUTOPAR_QUICK_RATES`` to name the file, e.g. one
file for a whole test run) and labelled "quick" in ``source``, which a plan records
(``Predicted.options.local_rates``). :meth:`CpuRates.placeholders` keeps round constants, for
tests and for a machine where even the quick measurement fails.

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
* ``ring_blocks``: ring attention's torch block kernel per score element, per block size, for the
  own causal step and for the other steps' unmasked half blocks (:meth:`ring_block_s`);
* ``elementwise``: seconds per element, forward and forward + backward, per op and size;
* ``activation_reread_s_per_byte``: FITTED extra time per byte of a layer's saved activations
  inside a step (GPT blocks as the runtime's GPipe runs a stage, microbatches through a stack,
  gradients accumulating, vs one block alone; :func:`fit_activation_reread_s_per_byte`), of which
  ``activation_reread_forward_s_per_byte`` in the forward (the same stack's forwards alone vs one
  block's: writing activations that stay alive evicts the caches the next layer would have used);
* collectives: measured gloo times per kind, group size and message size
  (:meth:`collective_time_s`, piecewise linear in size: a measured α–β per segment);
* ``sync_waits``: measured times of an all-reduce inside a loop of GPT-block work, per busy
  processes, group size, work between and message size (:meth:`sync_wait_s`: what a training
  step's collective costs beyond :meth:`collective_time_s`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ELEMENTWISE_OPS = ("layer_norm", "gelu", "add", "copy", "cross_entropy")
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")
log = logging.getLogger("autopar.cost_models")
QUICK_FORMAT = "autopar-quick-rates"
QUICK_VERSION = 9  # 3: collectives timed as the median repeat, not the fastest; 4: sync waits;
# 5: ring blocks, 64 MiB collectives into fresh outputs, fresh pages; 6: the forward's share of the re-read;
# 7: core sharing measured with 2 and 4 processes whatever the cores; 8: ring exchanges after compute;
# 9: DTensor AdamW per parameter
MMAP_THRESHOLD_BYTES = 32 * 2**20
"""glibc's largest dynamic ``M_MMAP_THRESHOLD`` on 64-bit Linux (``DEFAULT_MMAP_THRESHOLD_MAX``):
torch's CPU tensors of at least this size are mapped afresh on every allocation (glibc maps a
request when its chunk, the size plus a header, reaches the threshold)."""
LOSS_GRADIENT_REFAULT_BYTES = MMAP_THRESHOLD_BYTES // 2
"""From this size on, the loss backward's logits-sized gradient lands on pages that fault in again
although it is below the mmap threshold: glibc returns the heap's top to the system once more than
twice the (dynamic) threshold is free there, and the step frees its logits-sized tensors together
(MEASURED in a plain one-process zoo GPT step, 2-core KVM AMD EPYC: the head's backward 49.3 ms
at 16 MiB of logits, 40.4 with glibc's trimming and mapping turned off, ``MALLOC_TRIM_THRESHOLD_``
/ ``MALLOC_MMAP_THRESHOLD_``; 57.0 vs 49.9 at another 16 MiB shape; 23.1 vs 21.9 and 25.1 vs 25.3
at 8 MiB)."""
MMAP_THRESHOLD_ELEMENTS = MMAP_THRESHOLD_BYTES // 4
"""The threshold in fp32 elements, as :class:`OpTable`'s points are measured."""
QUICK_ENV = "AUTOPAR_QUICK_RATES"
QUICK_SECONDS = 3.0
RUNTIME_MICROBATCH_OPS = 400.0
"""ASSUMED, not measured by the quick path: the runtime's per-microbatch machinery costs this many
autograd op overheads (``autopar calibrate`` measured 2.67 ms per microbatch beside 6.3 µs per op
on a 2-core Xeon VM; the quick path cannot run the runtime, a layer above the cost models)."""


@dataclass(frozen=True, kw_only=True)
class OpTable:
    """Measured ``(num_elements, forward_s_per_element, train_s_per_element)`` points of one op
    (fp32 operands); ``train`` is forward + backward. Between points: linear in
    ``log(num_elements)``, among the points on the same side of glibc's mmap threshold as the size
    asked for when that side has any (:data:`MMAP_THRESHOLD_ELEMENTS`: beyond it every output the op
    writes is new mapped memory whose pages fault in, a step rather than a slope — MEASURED on a
    2-core KVM AMD EPYC, one thread, fp32 logits over 8192 words: cross-entropy forward 0.68 ns per
    element at 2^22 elements, 2.3 at 2^23, 2.2 at 2^24; interpolating 2^22 → 2^24 priced 2^23 at
    1.45)."""

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
        beyond = num_elements >= MMAP_THRESHOLD_ELEMENTS
        same_side = tuple(p for p in self.points if (p[0] >= MMAP_THRESHOLD_ELEMENTS) == beyond)
        fwd, train = _interpolate(same_side or self.points, num_elements)
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
    sync_waits: tuple[tuple[int, int, float, float, float], ...] = ()
    """MEASURED ``(processes, group size, interval_s, size_bytes, in_step_s)``: the seconds a rank
    spends inside a gloo all-reduce of ``size_bytes`` (waiting for the later rank, and the transfer)
    when it follows ``interval_s`` of work on each of ``processes`` busy ranks, in disjoint groups of
    ``group size`` (``measure.measure_sync_waits``; in profiles before 2026-12-07 the iteration's
    growth, a difference of two loops that the machine's speed drift spoiled); empty in a profile
    older than the measurement."""
    exchange_waits: tuple[tuple[int, int, float, float, float], ...] = ()
    """MEASURED as ``sync_waits``, for the pair exchange ring attention makes at every hop (a send to
    and a receive from the other rank of a group of 2, ``measure.measure_sync_waits(kind="p2p")``):
    gloo moves those bytes in its transport thread, which competes with the busy processes for the
    cores (MEASURED, 4 ranks on 2 cores, cp 2 × dp 2: about 6.7 ms of step time per exchange where the
    all-reduce's waits said ~1.6; on a 2-core KVM AMD EPYC, 4 processes in pairs exchanging 1 MiB
    after ~6 ms of work each: +2–3 ms of CPU time per process and exchange, the 2 cores 1.96–1.98
    busy throughout), so the step model prices these waits as work, not as a blocked process
    (``step.cpu_stage_costs``). Empty in an older profile: the all-reduce's waits stand in."""
    dtensor_optimizer_s_per_param: float = 0.0
    """MEASURED extra AdamW seconds per DTensor parameter element beyond the per-tensor dispatch
    (``measure.measure_dtensor_overhead_s``: the extra grows with the tensor, MEASURED one rank of a
    2-core KVM Xeon: 0.20 ms per 256-element tensor, 0.32 ms at 65,536, 0.58 ms at 262,144 — the
    runtime's dp 2 AdamW step took 77 ms against 37 ms plain); 0 in an older profile."""
    linear_token_tile_dim: float | None = None
    """FITTED roll-off of ``linear_s`` in the rows (tokens) alone: a per-call cost that grows with
    the weight (``k·n``: MEASURED one thread of a 2-core KVM AMD EPYC, ``nn.Linear`` forward +
    backward on 64 rows ran 20–36 % slower than a curve fitted to ≥ 512 rows priced, 2–6 % at 1,024
    rows); None in an older profile, whose one roll-off serves every dimension."""
    activation_reread_forward_s_per_byte: float = 0.0
    """FITTED part of ``activation_reread_s_per_byte`` that the forward pays
    (:func:`fit_activation_reread_forward_s_per_byte`); 0 in an older profile (all in the backward)."""
    fresh_page_s_per_byte: float = 0.0
    """MEASURED extra seconds per byte of writing a new tensor larger than :data:`MMAP_THRESHOLD_BYTES`
    (its pages fault in: ``measure.measure_fresh_page_s_per_byte``); 0 in an older profile."""
    ring_blocks: tuple[tuple[float, float, float, float], ...] = ()
    """MEASURED ``(scores, causal, forward_s_per_score, backward_s_per_score)`` of ring attention's
    torch block kernel (``measure.measure_ring_block_s``): ``causal`` 1 for the own step's masked
    block (scores = b·heads·s²), 0 for an unmasked half block (b·heads·s·s/2); empty in a profile
    older than the measurement (then :meth:`ring_block_s` prices the math attention rate)."""

    def __post_init__(self) -> None:
        missing = sorted(set(ELEMENTWISE_OPS) - set(self.elementwise))
        if missing:
            raise ValueError(f"CpuRates.elementwise lacks {missing}; re-run `autopar calibrate`")
        tables = {k: v if isinstance(v, OpTable) else OpTable(points=v) for k, v in self.elementwise.items()}
        object.__setattr__(self, "elementwise", tables)
        for name in ("flash_attention", "collectives", "shares", "math_attention_s_per_score", "sync_waits",
                     "exchange_waits", "ring_blocks"):
            object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, (list, tuple)) else x
                                                 for x in getattr(self, name)))
        if not self.flash_attention or not self.shares:
            raise ValueError("CpuRates needs at least one attention point and one share")

    # --- compute -------------------------------------------------------------------------
    def linear_s(self, m: float, k: float, n: float) -> float:
        """Forward + backward of a (m×k)(k×n) linear layer: ``6mkn`` FLOPs on the FITTED curve,
        its rows' roll-off ``linear_token_tile_dim`` when the calibration fitted one."""
        if min(m, k, n) <= 0:
            return 0.0
        rows = self.linear_tile_dim if self.linear_token_tile_dim is None else self.linear_token_tile_dim
        rate = self.linear_peak_flops_per_s / (1 + rows / m + self.linear_tile_dim * (1 / k + 1 / n))
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

    def ring_block_s(self, num_scores: float, *, causal: bool) -> tuple[float, float]:
        """(forward, backward) seconds of ring attention's torch block kernel over ``num_scores``
        score elements (forward with the merge, backward recomputing the scores, with the
        gradient accumulation; ``measure.measure_ring_block_s``): per score, linear in
        ``log(scores)`` between the measured blocks of that kind, clamped at their ends. A
        profile without them: the math attention's rate, its backward plus the recomputed
        forward."""
        if num_scores <= 0:
            return 0.0, 0.0
        points = sorted((p[0], p[2], p[3]) for p in self.ring_blocks if bool(p[1]) == causal)
        if not points:
            fwd, bwd = self.math_attention_s(num_scores)
            return fwd, bwd + fwd
        fwd, bwd = _interpolate(points, num_scores)
        return fwd * num_scores, bwd * num_scores

    def elementwise_s(self, op: str, num_elements: float) -> tuple[float, float]:
        """(forward, backward) of the training op ``op`` over ``num_elements`` elements, each at
        least the per-op floor."""
        fwd, bwd = self.elementwise[op].seconds(num_elements)
        floor = self.op_overhead_s / 2
        return (max(fwd, floor), max(bwd, floor)) if num_elements > 0 else (0.0, 0.0)

    def copy_s(self, num_bytes: float) -> float:
        """A plain copy reading and writing ``num_bytes`` in all."""
        return num_bytes / self.copy_bytes_per_s if num_bytes > 0 else 0.0

    def fresh_s(self, num_bytes: float) -> float:
        """What allocating and first writing a new tensor of ``num_bytes`` adds to the op that
        writes it: its page faults from glibc's largest mmap threshold on (every such allocation
        is mapped afresh; MEASURED on a 2-core KVM AMD EPYC: a 1024 × 256 × 8192 fp32 matmul into a
        new 32 MiB output 48.8 ms, priced 34.1 ms without its pages, 47.4 with), nothing below (the
        heap reuses freed memory)."""
        return num_bytes * self.fresh_page_s_per_byte if num_bytes >= MMAP_THRESHOLD_BYTES else 0.0

    def loss_gradient_refault_s(self, num_bytes: float) -> float:
        """What the loss backward's new logits gradient of ``num_bytes`` adds for its pages from
        :data:`LOSS_GRADIENT_REFAULT_BYTES` on (beyond the mmap threshold the cross-entropy's
        measured rates hold its own outputs' faults, not this step's trimmed heap's)."""
        return num_bytes * self.fresh_page_s_per_byte if num_bytes >= LOSS_GRADIENT_REFAULT_BYTES else 0.0

    def optimizer_s(self, num_params: float, num_tensors: float, *, dtensor: bool) -> float:
        """AdamW (torch's per-tensor loop, as on CPU) over ``num_params`` in ``num_tensors`` tensors;
        DTensor parameters pay the DTensor dispatch on every per-tensor op."""
        per_tensor = self.optimizer_s_per_tensor + (self.dtensor_optimizer_s_per_tensor if dtensor else 0.0)
        per_param = self.optimizer_s_per_param + (self.dtensor_optimizer_s_per_param if dtensor else 0.0)
        return num_params * per_param + num_tensors * per_tensor

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

    def sync_wait_s(self, *, processes: int, group: int, interval_s: float, size_bytes: float,
                    exchange: bool = False) -> float:
        """Seconds a collective of ``group`` ranks (of ``processes`` busy on this machine) adds
        beyond its :meth:`collective_time_s` when it follows ``interval_s`` of work (wall clock) on
        each rank: at each ``sync_waits`` point of the nearest measured (processes, group), the
        all-reduce's measured time in the loop minus this profile's ``collective_time_s`` of the
        same all-reduce (arrival skew, wake-up, other processes busy), then linear in ``log(size)``
        and in ``log(interval)`` between the points, clamped at their ends; never negative; 0
        without measurements or for one rank. ``exchange``: a pair exchange (ring attention's hop),
        from ``exchange_waits`` beyond the p2p message's ``collective_time_s`` where measured."""
        exchange = exchange and bool(self.exchange_waits)
        table, kind = (self.exchange_waits, "p2p") if exchange else (self.sync_waits, "all_reduce")
        if group <= 1 or not table:
            return 0.0
        configs = {(p[0], p[1]) for p in table}
        key = min(configs, key=lambda c: (abs(c[0] - processes), abs(c[1] - group), -c[1]))
        by_interval: dict[float, list[tuple[float, float]]] = {}
        stretch = self.share(self._measured_ranks(kind, key[1]))[0] / self.share(key[0])[0]
        for p in table:
            if (p[0], p[1]) == key:
                beyond = p[4] - stretch * self.collective_time_s(kind, p[3], p[1])
                by_interval.setdefault(p[2], []).append((p[3], beyond))
        rows = [(interval, _interpolate(sorted(points), max(size_bytes, 1.0))[0])
                for interval, points in sorted(by_interval.items())]
        return max(0.0, _interpolate(rows, max(interval_s, 1e-9))[0])

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
        for name, empty in (("sync_waits", ()), ("exchange_waits", ()), ("ring_blocks", ()),
                            ("fresh_page_s_per_byte", 0.0), ("dtensor_optimizer_s_per_param", 0.0),
                            ("activation_reread_forward_s_per_byte", 0.0), ("linear_token_tile_dim", None)):
            if isinstance(data, Mapping) and name not in data:  # a profile saved before the measurement
                data = {**data, name: empty}
        if not isinstance(data, Mapping) or set(data) != names:
            got = set(data) if isinstance(data, Mapping) else set()
            raise ValueError(f"CPU rates keys differ: unknown {sorted(got - names)}, missing "
                             f"{sorted(names - got)}; re-run `autopar calibrate`")
        tables = {k: OpTable(points=tuple(tuple(p) for p in v)) for k, v in data["elementwise"].items()}
        return cls(**{**data, "elementwise": tables})

    @classmethod
    def placeholders(cls, num_cores: int) -> CpuRates:
        """ASSUMED round numbers, none measured: of the right order for one AVX2 core (as
        ``hardware``'s CPU entry); gloo as ``hardware.GLOO_LOOPBACK`` (2 GB/s, 50 µs). For tests,
        and for a machine where :meth:`quick` fails; they cannot rank plans."""
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

    @classmethod
    def quick(cls, num_cores: int | None = None, *, path: str | os.PathLike[str] | None = None) -> CpuRates:
        """This machine's rates from the quick built-in measurement (module docstring): measured
        once per process, else read from ``path`` (default :func:`quick_rates_path`) when it was
        measured on this machine with this torch, else measured now (a few seconds; one process at
        a time, the others wait for its file) and saved there. ``num_cores`` relabels the result."""
        if _OVERRIDE:
            return _OVERRIDE[-1]
        key = _machine_key()
        target = Path(path) if path is not None else quick_rates_path()
        cache_key = (json.dumps(key, sort_keys=True), str(target) if path is not None else "")
        rates = _QUICK.get(cache_key)
        if rates is None:
            try:
                rates = _load_quick(target, key) or _measure_quick(target, key)
            except Exception as error:  # noqa: BLE001 - a plan must still be priced
                log.warning("the quick measurement of this CPU failed (%s: %s); pricing local plans from "
                            "ASSUMED placeholders, which cannot rank plans: run `autopar calibrate`",
                            type(error).__name__, error)
                rates = cls.placeholders(key["num_cores"])
            _QUICK[cache_key] = rates
        wanted = key["num_cores"] if num_cores is None else num_cores
        return rates if rates.num_cores == wanted else dataclasses.replace(rates, num_cores=wanted)

    @classmethod
    def assumed(cls, num_cores: int) -> CpuRates:
        """The rates of a machine ``autopar calibrate`` has not profiled: :meth:`quick` (the name
        the step model calls; no longer constants)."""
        return cls.quick(num_cores)

    @classmethod
    def from_quick_measurements(cls, raw: Mapping[str, Any], *, source: str) -> CpuRates:
        """Rates from ``measure.quick_measurements``'s raw points (no fits beyond the linear curve
        and the AdamW two-term split)."""
        from autopar.cost_models.compute import FUSED_ATTENTION_BACKWARD_FLOPS_RATIO

        peak, tile = _fit_linear([((p["m"], p["k"], p["n"]), 6 * p["m"] * p["k"] * p["n"] / p["time_s"])
                                  for p in raw["linear"]])
        flash = []
        for p in raw["attention"]:
            flops = 2 * p["batch"] * p["heads"] * p["seq"] ** 2 * p["head_dim"]  # causal: half of 4·b·a·s²·d
            flash.append((float(p["seq"]), float(p["head_dim"]), flops / p["forward_s"],
                          (1 + FUSED_ATTENTION_BACKWARD_FLOPS_RATIO) * flops / p["forward_backward_s"]))
        scores = raw["math_attention"]
        tables = {op: OpTable(points=tuple((p["elements"], p["forward_s"] / p["elements"],
                                            p["train_s"] / p["elements"])
                                           for p in raw["ops"] if p["op"] == op))
                  for op in ELEMENTWISE_OPS}
        (big_numel, big), (small_numel, small) = sorted(
            (p["tensor_numel"], p["time_s"] / p["num_tensors"]) for p in raw["optimizer"])[::-1]
        per_param = max((big - small) / (big_numel - small_numel), 0.0)
        overhead = raw["training_op_overhead_s"]
        return cls(
            num_cores=raw["num_cores"], linear_peak_flops_per_s=peak, linear_tile_dim=tile,
            flash_attention=tuple(flash),
            math_attention_s_per_score=(scores["forward_s"] / scores["scores"],
                                        scores["train_s"] / scores["scores"]),
            elementwise=tables, copy_bytes_per_s=raw["copy"]["bytes"] / raw["copy"]["time_s"],
            fresh_page_s_per_byte=raw["copy"].get("fresh_page_s_per_byte", 0.0),
            activation_reread_s_per_byte=fit_activation_reread_s_per_byte(raw.get("transformer_layer", ())),
            activation_reread_forward_s_per_byte=fit_activation_reread_forward_s_per_byte(
                raw.get("transformer_layer", ())),
            op_overhead_s=overhead, optimizer_s_per_param=per_param,
            optimizer_s_per_tensor=max(small - per_param * small_numel, 0.0),
            dtensor_dispatch_s=raw["dtensor"]["dispatch_s"],
            dtensor_optimizer_s_per_tensor=raw["dtensor"]["optimizer_s_per_tensor"], runtime_step_s=0.0,
            dtensor_optimizer_s_per_param=raw["dtensor"].get("optimizer_s_per_param", 0.0),
            runtime_microbatch_s=RUNTIME_MICROBATCH_OPS * overhead,
            collectives=tuple((p["kind"], p["num_ranks"], float(p["size_bytes"]), p["time_s"])
                              for p in raw["collectives"]),
            shares=tuple(tuple(row) for row in raw["shares"]), source=source,
            sync_waits=sync_wait_points(raw.get("sync_waits", ())),
            exchange_waits=sync_wait_points(raw.get("sync_waits", ()), kind="p2p"),
            ring_blocks=ring_block_points(raw.get("ring_blocks", ())))


def ring_block_points(raw: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, float, float, float], ...]:
    """``CpuRates.ring_blocks`` from ``measure.measure_ring_block_s``'s points."""
    return tuple((float(p["scores"]), 1.0 if p["causal"] else 0.0, p["forward_s"] / p["scores"],
                  p["backward_s"] / p["scores"]) for p in raw)


def sync_wait_points(raw: Sequence[Mapping[str, Any]], *, kind: str = "all_reduce"
                     ) -> tuple[tuple[int, int, float, float, float], ...]:
    """``CpuRates.sync_waits`` (``kind`` ``"all_reduce"``) or ``exchange_waits`` (``"p2p"``) from
    ``measure.measure_sync_waits``'s points (a point without a kind is an all-reduce's)."""
    return tuple((int(p["num_processes"]), int(p["group_size"]), float(p["interval_s"]),
                  float(p["size_bytes"]), float(p["in_step_s"])) for p in raw
                 if p.get("kind", "all_reduce") == kind)


def _fit_linear(points: Sequence[tuple[tuple[float, float, float], float]]) -> tuple[float, float]:
    """FITTED ``(P, T)`` of ``rate = P / (1 + T s)``, ``s = 1/m + 1/k + 1/n``: least squares of
    ``1/rate = 1/P + (T/P) s`` (T ≥ 0; the best rate as P when the points say nothing more)."""
    xs = [1 / m + 1 / k + 1 / n for (m, k, n), _ in points]
    ys = [1 / rate for _, rate in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0
    intercept = mean_y - slope * mean_x
    if slope <= 0 or intercept <= 0:
        return max(rate for _, rate in points), 0.0
    return 1 / intercept, slope / intercept


def stack_saved_bytes(point: Mapping[str, Any]) -> float:
    """Saved activation bytes of one measured zoo GPT block (fp32, fused attention) per microbatch,
    as the CPU compute model counts them (``memory.saved_layer_bytes``)."""
    from autopar.cost_models.local.memory import saved_layer_bytes
    from autopar.cost_models.profile import LayerProfile

    h = point["hidden"]
    layer = LayerProfile(name="block", flops_fwd=0.0, flops_bwd=0.0, param_count=0, hidden_size=h,
                         num_heads=point["heads"], seq_len=point["seq"], ffn_size=4 * h)
    return saved_layer_bytes(layer, microbatch_size=point["batch"], tp=1, fused_attention=True,
                             bytes_per_element=4)


def fit_activation_reread_s_per_byte(points: Sequence[Mapping[str, Any]]) -> float:
    """FITTED seconds per saved-activation byte: least squares through 0 of ``stacked − alone``
    (per layer and microbatch: GPT blocks as the runtime's GPipe runs a stage vs one block alone,
    ``measure.measure_gpt_stack_time_s``) against the layer's activation bytes. A fit over
    measurements of blocks, never over the steps it predicts."""
    return _fit_through_zero([(stack_saved_bytes(p), p["stacked_time_s"] - p["time_s"])
                              for p in points if "stacked_time_s" in p])


def fit_activation_reread_forward_s_per_byte(points: Sequence[Mapping[str, Any]]) -> float:
    """FITTED forward part of :func:`fit_activation_reread_s_per_byte`: the same fit of the stack's
    forwards alone against one block's forward (``forward_only``), at most the whole (MEASURED on a
    2-core KVM Xeon, fp32: 0.1–0.2 of 0.17–0.46 ns per saved byte); 0 without those points."""
    whole = fit_activation_reread_s_per_byte(points)
    forward = _fit_through_zero([(stack_saved_bytes(p), p["stacked_forward_time_s"] - p["forward_time_s"])
                                 for p in points if "stacked_forward_time_s" in p and "forward_time_s" in p])
    return min(forward, whole)


def _fit_through_zero(rows: Sequence[tuple[float, float]]) -> float:
    """``a`` of ``y = a x`` through 0: the median of the rows' ``y / x``, never negative; 0 without
    rows. The median, not least squares: the stack's extra over a block alone is 0–18 % of it, the
    size of one measurement's noise, and least squares follows the largest shape's (MEASURED over
    ten calibrations of a 2-core KVM Xeon: 0.2–3.5 × 10⁻¹⁰ s/byte by least squares, 0.7–3.0 by
    the median)."""
    slopes = [y / x for x, y in rows if x > 0]
    return max(0.0, statistics.median(slopes)) if slopes else 0.0


# --- the quick measurement's cache ------------------------------------------------------------------
_QUICK: dict[tuple[str, str], CpuRates] = {}
_OVERRIDE: list[CpuRates] = []


@contextlib.contextmanager
def quick_rates_as(rates: CpuRates) -> Iterator[None]:
    """Within the body, :meth:`CpuRates.quick` returns ``rates`` and measures nothing: for work
    whose predictions do not matter (the calibration timing the runtime on a tiny model)."""
    _OVERRIDE.append(rates)
    try:
        yield
    finally:
        _OVERRIDE.pop()


def quick_rates_path() -> Path:
    """``$AUTOPAR_QUICK_RATES``, else ``quick-<hostname>.json`` beside the saved profile
    (``$XDG_CACHE_HOME/autopar``, ``~/.cache`` when unset)."""
    named = os.environ.get(QUICK_ENV)
    if named:
        return Path(named)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "autopar" / f"quick-{socket.gethostname()}.json"


def _machine_key() -> dict[str, Any]:
    """What a cached quick measurement must match: the machine and the torch that measured it."""
    import torch

    return {"hostname": socket.gethostname(), "num_cores": os.cpu_count() or 1, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "version": QUICK_VERSION}


def _load_quick(path: Path, key: Mapping[str, Any]) -> CpuRates | None:
    """The rates cached at ``path`` if they were measured under ``key`` (else None, silently:
    the caller measures again)."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != QUICK_FORMAT or data.get("key") != dict(key):
            return None
        return CpuRates.from_dict(data["rates"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _measure_quick(path: Path, key: Mapping[str, Any]) -> CpuRates:
    """Measure now (under a lock beside ``path``: a process that finds another measuring waits for
    its file), label the rates, and save them atomically (unless the folder is not writable)."""
    from autopar.cost_models.local.measure import quick_measurements

    with _locked(path):
        found = _load_quick(path, key)
        if found is not None:
            return found
        start = time.perf_counter()
        raw = quick_measurements(seconds=QUICK_SECONDS, ops=ELEMENTWISE_OPS, kinds=COLLECTIVE_KINDS)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:12]
        elapsed = time.perf_counter() - start
        rates = CpuRates.from_quick_measurements(raw, source=(
            f"quick built-in measurement ({elapsed:.1f} s; no saved `autopar calibrate` profile) on "
            f"{key['hostname']} at {created}, id {digest}, {path}"))
        data = {"format": QUICK_FORMAT, "key": dict(key), "created": created, "id": digest,
                "measure_s": round(elapsed, 2), "raw": raw, "rates": rates.to_dict()}
        try:
            _write_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
            where = f"saved to {path}"
        except OSError as error:
            where = f"not saved ({error})"
        log.warning("no saved calibration of this machine: local plans are priced from a quick measurement "
                    "(%.1f s, %s); `autopar calibrate` measures it fully", elapsed, where)
        return rates


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (no lock where the folder cannot be made or locks do
    not exist)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{path}.lock", "w")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _ring_steps(kind: str, n: int) -> int:
    return 1 if kind == "p2p" else (2 if kind == "all_reduce" else 1) * (n - 1)


def _ring_bytes(kind: str, n: int, size: float) -> float:
    return size if kind == "p2p" else (2 if kind == "all_reduce" else 1) * (n - 1) / n * size
