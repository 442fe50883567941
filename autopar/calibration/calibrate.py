"""Calibration: measure this machine so that the cost model predicts it (``autopar calibrate``).

Data flow: :func:`calibrate` → :func:`measure_single_process` (``ops``: one operation at a time,
one thread, as each runtime rank runs) and ``group.measure_group`` (a gloo group of N spawned
processes) → the fits of ``fits`` → ``cost_models`` ``LocalProfile`` (with the ``CpuRates`` the
local-cluster model reads; their ``source`` names the profile: host, time, content id, path) →
``save_profile`` (atomic JSON) → the cost model, which loads it for ``local`` clusters.

The whole calibration runs within ``CalibrationConfig.seconds`` of wall clock (80 s, quick 30 s;
with the interpreter's start and the group's, under 2 minutes on any 2-core x86 CPU): the single-process part
takes ``single_fraction`` of it, the group the rest, its processes' start included; inside each
part every measurement gets a slot of what is left (``progress.run_tasks``) and prints one line on
stderr. A low-precision dtype this CPU emulates (``measure.emulated_dtypes``: no
avx512_bf16/amx_bf16, no avx512_fp16/amx_fp16) is measured briefly — one warm 256³ matmul — and
said so; any matmul shape whose one call would not fit its slot at the dtype's measured rate is
skipped, and said so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from autopar.calibration.fits import (
    KINDS,
    alone_rate,
    cpu_rates,
    fit_alpha_beta,
    fit_matmul_curve,
    fit_matmul_peak,
    layer_check,
    rows_by_count,
)
from autopar.calibration.group import measure_group
from autopar.calibration.ops import (
    MIB,
    PROBE_DIM,
    TORCH_DTYPES,
    attention_flops,
    cpu_seconds,
    matmul_call_s,
    measure_attention_time_s,
    measure_elementwise_time_s,
    measure_fresh_page_s_per_byte,
    measure_gpt_stack_pair_s,
    measure_linear_curve_s,
    measure_machine_speed,
    measure_matmul_time_s,
    measure_memory_time_s,
    measure_op_overhead_s,
    measure_op_time_s,
    measure_optimizer_time_s,
    measure_probe_flops_per_s,
    measure_training_op_overhead_s,
    one_thread,
    others_busy_cores,
)
from autopar.calibration.progress import Progress, Skip, Task, run_tasks
from autopar.cost_models.compute import FUSED_ATTENTION_BACKWARD_FLOPS_RATIO
from autopar.cost_models.local.measure import cpu_flags, emulated_dtypes, ring_block_point
from autopar.cost_models.local.profile import LocalProfile, ProcessShare, default_profile_path, save_profile
from autopar.cost_models.local.rates import ELEMENTWISE_OPS

Shape = tuple[int, int, int]
KIB = 2**10
OTHER_LOAD_WARNING_CORES = 0.25
LOW_PRECISION = ("bf16", "fp16")
DEFAULT_SECONDS = 80.0
QUICK_SECONDS = 30.0


def transformer_shapes(tokens: Sequence[int], hidden: Sequence[int]) -> tuple[Shape, ...]:
    """The matmuls of a transformer layer: ``(tokens × h)(h × h)``, ``(h × 4h)`` and ``(4h × h)``."""
    return tuple((t, k, n) for t in tokens for h in hidden for k, n in ((h, h), (h, 4 * h), (4 * h, h)))


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """What :func:`calibrate` measures, and within how many ``seconds`` (wall clock, all of it:
    ``single_fraction`` for the single-process part, the rest for the group, its start included).
    :meth:`preset` gives the full and the ``--quick`` sets.
    Shapes: matmul and linear ``(m, k, n)``; attention ``(batch, heads, seq, head_dim)``; transformer
    layers ``(batch, seq, hidden, heads)``, each alone and as the runtime's GPipe runs a stage:
    ``stack_microbatches`` microbatches forward through a stack of ``layer_stack``, then backward;
    ``op_elements`` / ``cross_entropy_elements`` the sizes of the elementwise training ops;
    ``share_layer_shape`` the ``(batch, seq, hidden, heads)`` blocks the compute share runs;
    ``measure_runtime``: time the runtime's own machinery on a tiny model; ``emulated``: dtypes to
    treat as emulated whatever the CPU says (the brief path, for testing it anywhere);
    ``progress``: print one line per measurement on stderr."""

    nproc: int = 4
    seconds: float = DEFAULT_SECONDS
    single_fraction: float = 0.45
    matmul_shapes: tuple[Shape, ...] = transformer_shapes((256, 2048), (128, 256, 512, 1024))
    low_precision_shapes: tuple[Shape, ...] = transformer_shapes((1024,), (256, 1024))
    linear_shapes: tuple[Shape, ...] = transformer_shapes((64, 512, 2048), (128, 256, 512))  # 64: few tokens
    copy_bytes: int = 256 * MIB
    cold_pool_bytes: int = 256 * MIB
    elementwise_elements: int = 2**20
    op_elements: tuple[int, ...] = (2**16, 2**19, 2**22)
    cross_entropy_elements: tuple[int, ...] = (2**20, 2**22, 2**23, 2**24)  # 2^23: at the mmap threshold
    attention_shapes: tuple[tuple[int, int, int, int], ...] = (
        (4, 8, 128, 32), (8, 8, 128, 32), (4, 16, 256, 64), (2, 16, 512, 64))
    math_attention_shapes: tuple[tuple[int, int, int, int], ...] = ((4, 8, 128, 32), (2, 16, 256, 64))
    ring_block_shapes: tuple[tuple[int, int, int, int], ...] = ((4, 8, 128, 32), (8, 8, 256, 32))
    layer_shapes: tuple[tuple[int, int, int, int], ...] = (
        (4, 128, 128, 4), (4, 256, 128, 4), (4, 128, 512, 16), (2, 256, 512, 16))
    layer_stack: int = 4
    stack_microbatches: int = 4
    optimizer_params: int = 8 * 2**20
    share_layer_shape: tuple[int, int, int, int] = (4, 128, 192, 6)
    measure_runtime: bool = True
    collective_bytes: tuple[int, ...] = (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB,
                                         64 * MIB)
    emulated: tuple[str, ...] = ()
    progress: bool = True
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if type(self.nproc) is not int or self.nproc < 2:
            raise ValueError(f"nproc = {self.nproc!r} is invalid: calibration needs an int >= 2 "
                             "(a gloo group to measure collectives on)")
        if type(self.seconds) not in (int, float) or not 0 < self.seconds <= 3600:
            raise ValueError(f"seconds = {self.seconds!r} is invalid: expected a time budget in (0, 3600]")
        if not 0 < self.single_fraction < 1:
            raise ValueError(f"single_fraction = {self.single_fraction!r} is invalid: expected (0, 1)")
        unknown = sorted(set(self.emulated) - set(LOW_PRECISION))
        if unknown:
            raise ValueError(f"emulated = {unknown} is invalid: expected some of {list(LOW_PRECISION)}")

    @classmethod
    def preset(cls, *, quick: bool, nproc: int = 4, seconds: float | None = None,
               emulated: Sequence[str] = ()) -> CalibrationConfig:
        """The full measurement set (80 s), or ``quick`` (30 s); ``seconds`` overrides the budget."""
        extra: dict[str, Any] = {"nproc": nproc, "emulated": tuple(emulated)}
        if not quick:
            return cls(seconds=DEFAULT_SECONDS if seconds is None else seconds, **extra)
        return cls(seconds=QUICK_SECONDS if seconds is None else seconds,
                   matmul_shapes=transformer_shapes((256, 1024), (128, 512)),
                   low_precision_shapes=transformer_shapes((1024,), (256,))[:2],
                   linear_shapes=transformer_shapes((512,), (128, 512)), copy_bytes=128 * MIB,
                   cold_pool_bytes=128 * MIB, op_elements=(2**18, 2**21),
                   cross_entropy_elements=(2**20, 2**23),
                   attention_shapes=((4, 8, 128, 32), (2, 16, 256, 64)),
                   math_attention_shapes=((4, 8, 128, 32),), ring_block_shapes=((4, 8, 128, 32),),
                   optimizer_params=2**21,
                   share_layer_shape=(2, 64, 128, 4), layer_stack=4,
                   layer_shapes=((4, 128, 128, 4), (2, 128, 512, 16)),
                   collective_bytes=(4 * KIB, 256 * KIB, 4 * MIB, 64 * MIB), **extra)


def _shape(m: int, k: int, n: int) -> str:
    return f"{m}×{k}×{n}"


def _gflops(value: float) -> str:
    return f"{value / 1e9:,.1f} GFLOP/s"


def _matmul_tasks(config: CalibrationConfig, emulated: dict[str, str], points: dict[str, list[dict[str, Any]]]
                  ) -> list[Task]:
    """Per dtype: the probe, then each shape (cold operands) unless the dtype is emulated (the probe
    alone: "measured briefly") or the probe's rate says one call would not fit the slot."""
    tasks: list[Task] = []
    for dtype in ("fp32", *LOW_PRECISION):
        shapes = config.matmul_shapes if dtype == "fp32" else config.low_precision_shapes
        points[dtype] = []
        probe: dict[str, float] = {}
        itemsize = TORCH_DTYPES[dtype].itemsize
        pool_elements = config.cold_pool_bytes // itemsize
        pool: list[torch.Tensor] = []

        def run_probe(slot: float, dtype: str = dtype, probe: dict[str, float] = probe) -> float:
            probe["flops_per_s"] = rate = measure_probe_flops_per_s(dtype, seconds=slot)
            if dtype in emulated:
                points[dtype].append({"m": PROBE_DIM, "k": PROBE_DIM, "n": PROBE_DIM, "warm": True,
                                      "time_s": 2 * PROBE_DIM**3 / rate, "flops_per_s": rate})
            return rate

        def show_probe(rate: float, dtype: str = dtype, count: int = len(shapes)) -> str:
            if dtype in emulated:
                return (f"{_gflops(rate)}; {emulated[dtype]}: measured briefly (this one warm "
                        f"{PROBE_DIM}³ matmul), its {count} shapes skipped")
            return _gflops(rate)

        tasks.append(Task(f"matmul {dtype} probe {PROBE_DIM}³ (warm)", run_probe,
                          weight=0.3, show=show_probe))
        if dtype in emulated:
            continue
        for m, k, n in sorted(shapes, key=lambda s: s[0] * s[1] * s[2]):
            def run(slot: float, m: int = m, k: int = k, n: int = n, dtype: str = dtype,
                    probe: dict[str, float] = probe, pool: list[torch.Tensor] = pool,
                    pool_elements: int = pool_elements, itemsize: int = itemsize) -> float:
                call_s = matmul_call_s(m, k, n, flops_per_s=probe["flops_per_s"], pool_elements=pool_elements,
                                       itemsize=itemsize)
                if call_s > max(slot, 0.05):
                    raise Skip(f"one call would take ~{call_s:.1f} s at the probe's "
                               f"{_gflops(probe['flops_per_s'])}, over its {slot:.2f} s slot")
                if not pool:  # cold operands: a pool larger than the caches, made once per dtype
                    pool.append(torch.ones(pool_elements, dtype=TORCH_DTYPES[dtype]))
                time_s = measure_matmul_time_s(m, k, n, dtype=dtype, seconds=slot, pool=pool[0])
                points[dtype].append({"m": m, "k": k, "n": n, "time_s": time_s,
                                      "flops_per_s": 2 * m * k * n / time_s})
                return 2 * m * k * n / time_s

            tasks.append(Task(f"matmul {dtype} {_shape(m, k, n)}", run, show=_gflops))

        def release(_: float, pool: list[torch.Tensor] = pool, dtype: str = dtype,
                    probe: dict[str, float] = probe) -> str:
            pool.clear()
            if not points[dtype]:  # every shape skipped: the probe is the measurement
                rate = probe["flops_per_s"]
                points[dtype].append({"m": PROBE_DIM, "k": PROBE_DIM, "n": PROBE_DIM, "warm": True,
                                      "time_s": 2 * PROBE_DIM**3 / rate, "flops_per_s": rate})
                return "every shape skipped: the probe stands for them"
            return f"{len(points[dtype])} shapes measured"

        tasks.append(Task(f"matmul {dtype} done", release, weight=0.0))
    return tasks


def _triton_attention_skip(_: float) -> Any:
    """On CPU the Triton kernel is not measured: say why (``autopar.kernels``' own reason)."""
    from autopar.kernels import triton_available, unsupported_reason

    q = torch.zeros(1, 1, 16, 16)
    reason = unsupported_reason(q, q, q) if triton_available() else "Triton is not installed"
    raise Skip(f"{reason or 'CPU tensors'}; on CPU Triton runs only in its interpreter "
               "(TRITON_INTERPRET=1), a Python emulation of the GPU kernel, not a kernel the runtime "
               "would run: the planner prices CPU attention as SDPA (measured above)")


def _ring_block_tasks(config: CalibrationConfig, points: list[dict[str, Any]]) -> list[Task]:
    """Ring attention's torch block kernel (``measure_ring_block_s``), the own causal step and an
    unmasked half block, per shape of ``config.ring_block_shapes``."""
    tasks = []
    for b, a, s, d in config.ring_block_shapes:
        for causal in (True, False):
            def block(slot: float, b: int = b, a: int = a, s: int = s, d: int = d, causal: bool = causal
                      ) -> float:
                points.append(ring_block_point(b, a, s, d, causal=causal, seconds=slot))
                return (points[-1]["forward_s"] + points[-1]["backward_s"]) / points[-1]["scores"]
            kind = "causal own block" if causal else "unmasked half block"
            tasks.append(Task(f"ring attention {kind} fwd+bwd fp32 (b {b}, heads {a}, seq {s}, d {d})", block,
                              weight=0.5, show=lambda v: f"{v * 1e9:.2f} ns/score"))
    return tasks


def single_process_tasks(config: CalibrationConfig, raw: dict[str, Any]) -> list[Task]:
    """The single-process measurements as tasks filling ``raw`` (the points ``build_profile`` fits)."""
    emulated = emulated_dtypes() | {d: f"treated as emulated (--emulate {d})" for d in config.emulated}
    raw.update(matmul={}, linear=[], ops=[], attention=[], math_attention=[], ring_blocks=[],
               transformer_layer=[], emulated=emulated)
    tasks = _matmul_tasks(config, emulated, raw["matmul"])

    def linear_curve(slot: float) -> float:
        shapes = config.linear_shapes
        times = measure_linear_curve_s(shapes, seconds=slot)
        pairs = list(zip(shapes, times, strict=True))
        raw["linear"] = [{"m": m, "k": k, "n": n, "time_s": t} for (m, k, n), t in pairs]
        return max(6 * m * k * n / t for (m, k, n), t in pairs)

    tasks.append(Task(f"nn.Linear fwd+bwd, {len(config.linear_shapes)} shapes round-robin (best)",
                      linear_curve, weight=len(config.linear_shapes), show=_gflops))

    def copy(slot: float) -> float:
        raw["copy"] = {"bytes": config.copy_bytes, "time_s": measure_memory_time_s(config.copy_bytes,
                                                                                   seconds=slot / 2),
                       "fresh_page_s_per_byte": measure_fresh_page_s_per_byte(seconds=slot / 2)}
        return config.copy_bytes / raw["copy"]["time_s"]

    def elementwise(slot: float) -> float:
        n = config.elementwise_elements
        time_s = measure_elementwise_time_s(n, seconds=slot)
        raw["elementwise"] = {"elements": n, "passes": 7, "time_s": time_s}
        return 7 * 4 * n / raw["elementwise"]["time_s"]

    def bandwidth(value: float) -> str:
        return f"{value / 1e9:,.1f} GB/s"

    def faults(value: float) -> str:
        return f"{bandwidth(value)}, new pages {raw['copy']['fresh_page_s_per_byte'] * 1e9:.2f} ns/byte"

    tasks += [Task(f"copy {config.copy_bytes // MIB} MiB, and a new tensor's page faults", copy, show=faults),
              Task(f"elementwise fp32 add, scale, GELU ({config.elementwise_elements} elements)", elementwise,
                   show=bandwidth)]
    for op in ELEMENTWISE_OPS:
        for n in config.cross_entropy_elements if op == "cross_entropy" else config.op_elements:
            def training_op(slot: float, op: str = op, n: int = n) -> float:
                fwd, both, elements = measure_op_time_s(op, n, seconds=slot)
                raw["ops"].append({"op": op, "elements": elements, "forward_s": fwd, "train_s": both})
                return both / elements
            tasks.append(Task(f"{op} fwd+bwd, {n} elements", training_op,
                              show=lambda v: f"{v * 1e9:.2f} ns/element"))

    def overhead(slot: float) -> float:
        raw["op_overhead_s"] = measure_op_overhead_s(seconds=slot)
        return raw["op_overhead_s"]

    def training_overhead(slot: float) -> float:
        raw["training_op_overhead_s"] = measure_training_op_overhead_s(seconds=slot)
        return raw["training_op_overhead_s"]

    def micro(value: float) -> str:
        return f"{value * 1e6:.2f} µs"

    tasks += [Task("per-op dispatch (1-element add)", overhead, weight=0.5, show=micro),
              Task("per-op autograd fwd+bwd (1-element multiply)", training_overhead, weight=0.5, show=micro)]
    for b, a, s, d in config.attention_shapes:
        def flash(slot: float, b: int = b, a: int = a, s: int = s, d: int = d) -> float:
            fwd, both = measure_attention_time_s(b, a, s, d, seconds=slot)
            flops = attention_flops(b, a, s, d)
            raw["attention"].append({
                "batch": b, "heads": a, "seq": s, "head_dim": d, "causal": True, "forward_s": fwd,
                "forward_backward_s": both, "forward_flops_per_s": flops / fwd,
                "train_flops_per_s": (1 + FUSED_ATTENTION_BACKWARD_FLOPS_RATIO) * flops / both})
            return raw["attention"][-1]["train_flops_per_s"]
        tasks.append(Task(f"attention SDPA flash fwd+bwd fp32 (b {b}, heads {a}, seq {s}, d {d})", flash,
                          show=_gflops))
    tasks.append(Task("attention Triton kernel", _triton_attention_skip, weight=0.0))
    for b, a, s, d in config.math_attention_shapes:
        def unfused(slot: float, b: int = b, a: int = a, s: int = s, d: int = d) -> float:
            fwd, both = measure_attention_time_s(b, a, s, d, backend="math", seconds=slot)
            raw["math_attention"].append({"batch": b, "heads": a, "seq": s, "head_dim": d,
                                          "scores": b * a * s * s, "forward_s": fwd, "train_s": both})
            return both / (b * a * s * s)
        tasks.append(Task(f"attention SDPA math fwd+bwd fp32 (b {b}, heads {a}, seq {s}, d {d})", unfused,
                          show=lambda v: f"{v * 1e9:.2f} ns/score"))
    tasks += _ring_block_tasks(config, raw["ring_blocks"])
    for b, s, h, a in config.layer_shapes:
        def layer(slot: float, shape: tuple[int, int, int, int] = (b, s, h, a)) -> float:
            layout = {"num_layers": config.layer_stack, "num_microbatches": config.stack_microbatches}
            alone, stacked = measure_gpt_stack_pair_s(*shape, **layout, seconds=2 * slot / 3)
            forward, stacked_forward = measure_gpt_stack_pair_s(*shape, **layout, seconds=slot / 3,
                                                                forward_only=True)
            raw["transformer_layer"].append({
                "batch": shape[0], "seq": shape[1], "hidden": shape[2], "heads": shape[3], "time_s": alone,
                "forward_time_s": forward, "num_layers_stacked": config.layer_stack,
                "num_microbatches_stacked": config.stack_microbatches, "stacked_time_s": stacked,
                "stacked_forward_time_s": stacked_forward})
            return stacked

        tasks.append(Task(f"GPT block fwd+bwd (b {b}, seq {s}, hidden {h}, heads {a}), alone and with "
                          f"{config.stack_microbatches} microbatches through a stack of "
                          f"{config.layer_stack}, in alternation", layer, weight=3.0,
                          show=lambda v: f"{v * 1e3:.2f} ms per layer stacked"))

    large, small = 256 * 1024, 4096

    def adamw_large(slot: float) -> float:
        time_s = measure_optimizer_time_s(config.optimizer_params, tensor_numel=large, seconds=slot)
        raw["optimizer"] = {"kind": "AdamW", "num_params": config.optimizer_params, "time_s": time_s,
                            "large_tensors": {"tensor_numel": large, "time_s": time_s,
                                              "num_tensors": max(1, config.optimizer_params // large)}}
        return time_s / config.optimizer_params

    def adamw_small(slot: float) -> float:
        time_s = measure_optimizer_time_s(256 * small, tensor_numel=small, seconds=slot)
        raw["optimizer"]["small_tensors"] = {"tensor_numel": small, "num_tensors": 256, "time_s": time_s}
        return time_s / 256

    tasks += [Task(f"AdamW, {config.optimizer_params} parameters in tensors of {large}", adamw_large,
                   show=lambda v: f"{v * 1e9:.2f} ns/parameter"),
              Task(f"AdamW, 256 tensors of {small}", adamw_small, show=lambda v: f"{v * 1e6:.1f} µs/tensor")]
    return tasks


def measure_single_process(config: CalibrationConfig, *, seconds: float | None = None,
                           progress: Progress | None = None) -> dict[str, Any]:
    """Everything one process measures alone, one thread, within ``seconds`` (default: the
    config's single-process share): raw points (no fits) and each measurement's timing."""
    since = cpu_seconds((os.getpid(),))
    progress = progress or Progress(enabled=config.progress)
    raw: dict[str, Any] = {"clock": "thread CPU time"}
    budget = config.seconds * config.single_fraction if seconds is None else seconds
    began = time.perf_counter()
    with one_thread():
        _first_use()
        budget -= time.perf_counter() - began
        _, timings = run_tasks(single_process_tasks(config, raw), seconds=budget, progress=progress)
    raw["timings"] = timings
    raw["others_busy_cores"] = others_busy_cores(since, (os.getpid(),))
    return raw


def _first_use() -> None:
    """Run each kind of operation once, untimed: their first calls import and set up (AdamW's first
    step alone takes a second), which no measurement's slot should pay for."""
    x = torch.randn(8, 8, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None],
                                                     is_causal=True).sum().backward()
    parameter = torch.nn.Parameter(torch.randn(8))
    parameter.grad = torch.randn(8)
    torch.optim.AdamW([parameter]).step()


def _share_rows(rows: list[dict[str, Any]]) -> tuple[ProcessShare, ...]:
    """One ``ProcessShare`` per busy-process count (the repeated one-process row only sets the
    baseline, ``fits.alone_rate``)."""
    base_matmul, base_copy = alone_rate(rows, "matmul_flops_per_s"), alone_rate(rows, "copy_bytes_per_s")
    def share(row: dict[str, Any]) -> ProcessShare:
        if row["num_processes"] == 1:
            return ProcessShare(num_processes=1, matmul_fraction=1.0, copy_fraction=1.0)
        return ProcessShare(num_processes=row["num_processes"],
                            matmul_fraction=statistics.fmean(row["matmul_flops_per_s"]) / base_matmul,
                            copy_fraction=statistics.fmean(row["copy_bytes_per_s"]) / base_copy)

    return tuple(share(row) for row in rows_by_count(rows))


def profile_id(single: dict[str, Any], group: dict[str, Any]) -> str:
    """A short content hash of the raw measurements: which profile priced a plan."""
    text = json.dumps({"single": single, "group": group}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_profile(single: dict[str, Any], group: dict[str, Any], *, quick: bool, elapsed_s: float,
                  path: str | os.PathLike[str] | None = None,
                  machine_speed: dict[str, float] | None = None) -> LocalProfile:
    """The fits of ``fits`` over raw measurements; the rates' ``source`` names the profile (host,
    time, content id, the file it is saved to); ``machine_speed``: the speed probes around the
    measurements (:func:`calibration_speed`), recorded with the environment."""
    def shaped(points: list[dict[str, Any]]) -> list[tuple[Shape, float]]:
        return [((p["m"], p["k"], p["n"]), p["flops_per_s"]) for p in points]

    matmul, points = single["matmul"], group["collectives"]
    cold = [p for p in matmul["fp32"] if not p.get("warm")] or matmul["fp32"]
    curve_peak, tile = fit_matmul_curve(shaped(cold))
    sizes = sorted({p["num_ranks"] for p in points})
    links = tuple(fit_alpha_beta([p for p in points if p["num_ranks"] == n]) for n in sizes)
    by_kind = {f"{n} ranks {kind}": dataclasses.asdict(fit_alpha_beta(mine))
               for n in sizes for kind in (*KINDS, "p2p")
               if len(mine := [p for p in points if p["num_ranks"] == n and p["kind"] == kind]) >= 2}
    others = {"single_process": single["others_busy_cores"],
              "shares": group["others_busy_cores_during_shares"]}
    hostname, created = socket.gethostname(), datetime.now(UTC).isoformat(timespec="seconds")
    where = f", {path}" if path is not None else ""
    rates = cpu_rates(single, group, num_cores=os.cpu_count() or 1,
                      source=f"`autopar calibrate`{' --quick' if quick else ''} on {hostname} at {created}, "
                             f"id {profile_id(single, group)}{where}")
    fits = {"matmul_curve_fp32": {"peak_flops_per_s": curve_peak, "tile_dim": tile}, "links_by_kind": by_kind,
            "layer_check": layer_check(rates, single["transformer_layer"])}
    return LocalProfile(
        hostname=hostname, created=created, num_cores=os.cpu_count() or 1, torch_version=torch.__version__,
        quick=quick, calibration_time_s=round(elapsed_s, 2),
        peak_flops_per_s={d: fit_matmul_peak(shaped(ps)) for d, ps in matmul.items() if ps},
        best_matmul_flops_per_s={d: max(p["flops_per_s"] for p in ps) for d, ps in matmul.items() if ps},
        matmul_tile_dim=max(tile, 1e-3), matmul_curve_peak_flops_per_s=curve_peak,
        memory_bandwidth_bytes_per_s=single["copy"]["bytes"] / single["copy"]["time_s"],
        elementwise_bandwidth_bytes_per_s=7 * 4 * single["elementwise"]["elements"]
        / single["elementwise"]["time_s"],
        op_overhead_s=single["op_overhead_s"],
        attention_flops_per_s=statistics.median(p["train_flops_per_s"] for p in single["attention"]),
        optimizer_time_s_per_param=single["optimizer"]["time_s"] / single["optimizer"]["num_params"],
        shares=_share_rows(group["shares"]), links=links, cpu=rates,
        measurements={**single, "shares": group["shares"], "collectives": points, "dtensor": group["dtensor"],
                      "runtime": group["runtime"], "fits": fits,
                      "timings": {"single_process": single.get("timings", []),
                                  "group": group.get("timings", [])},
                      "environment": _environment() | {"others_busy_cores": others,
                                                       "machine_speed": machine_speed or {}}})


def other_load_warning(profile: LocalProfile, *, max_cores: float = OTHER_LOAD_WARNING_CORES) -> str | None:
    """A warning when other processes kept more than ``max_cores`` busy while calibrating."""
    others = profile.measurements.get("environment", {}).get("others_busy_cores", {})
    busy = {k: v for k, v in others.items() if v is not None and v > max_cores}
    if not busy:
        return None
    where = ", ".join(f"{v:.2f} cores during the {k.replace('_', ' ')} part" for k, v in busy.items())
    return (f"other processes were busy ({where}): the measured rates are too low; run "
            "`autopar calibrate` again on an idle machine")


def _environment() -> dict[str, Any]:
    flags = cpu_flags()
    return {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags_low_precision": sorted(f for f in flags if "bf16" in f or "fp16" in f),
            "load_average": [round(x, 2) for x in os.getloadavg()], "threads_per_process": 1}


def calibrate(*, out: str | os.PathLike[str] | None = None, nproc: int = 4, quick: bool = False,
              seconds: float | None = None, emulated: Sequence[str] = (),
              config: CalibrationConfig | None = None) -> tuple[LocalProfile, Path]:
    """Measure this machine within the config's ``seconds``, fit, and save the profile (default
    path: ``local_profile``). ``config`` overrides the preset that ``quick``, ``nproc``,
    ``seconds`` and ``emulated`` choose."""
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file path such as "
                         f"{Path(out) / 'profile.json'}")
    config = config or CalibrationConfig.preset(quick=quick, nproc=nproc, seconds=seconds, emulated=emulated)
    target = Path(out) if out is not None else default_profile_path()
    start = time.perf_counter()
    deadline = time.time() + config.seconds
    progress = Progress(start=start, enabled=config.progress)
    progress.line(f"measuring this CPU within {config.seconds:.0f} s: one process, then a gloo group of "
                  f"{config.nproc} (one line per measurement)")
    speed = {"start": measure_machine_speed()}
    single = measure_single_process(config, progress=progress)
    group = measure_group(config, deadline=deadline, progress=progress)
    speed["end"] = measure_machine_speed()
    progress.line(f"machine speed probe: {speed['start']:.1f} at the start, {speed['end']:.1f} at the end "
                  "(units per second)")
    profile = build_profile(single, group, quick=quick, elapsed_s=time.perf_counter() - start, path=target,
                            machine_speed=speed)
    return profile, save_profile(profile, target)


def calibration_speed(profile: LocalProfile) -> float | None:
    """The machine's speed while ``profile`` was measured (``ops.measure_machine_speed`` units, the
    mean of the probes at its start and end); None for a profile that did not record it."""
    speed = profile.measurements.get("environment", {}).get("machine_speed") or {}
    values = [v for v in (speed.get("start"), speed.get("end")) if isinstance(v, (int, float)) and v > 0]
    return statistics.fmean(values) if values else None
