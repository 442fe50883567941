"""Calibration: measure this machine so that the cost model predicts it (``autopar calibrate``).

Data flow: :func:`calibrate` → :func:`measure_single_process` (``ops``: one operation at a time,
one thread, as each runtime rank runs) and ``group.measure_group`` (a gloo group of N spawned
processes) → the fits of ``fits`` → ``cost_models`` ``LocalProfile`` (with the ``CpuRates`` the
local-cluster model reads) → ``save_profile`` (atomic JSON) → the cost model, which loads it for
``local`` clusters.
"""

from __future__ import annotations

import dataclasses
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
    cpu_rates,
    fit_alpha_beta,
    fit_matmul_curve,
    fit_matmul_peak,
    layer_check,
)
from autopar.calibration.group import measure_group
from autopar.calibration.ops import (
    _TORCH_DTYPES,
    MIB,
    attention_flops,
    cpu_seconds,
    measure_attention_time_s,
    measure_elementwise_time_s,
    measure_linear_time_s,
    measure_matmul_time_s,
    measure_memory_time_s,
    measure_op_overhead_s,
    measure_op_time_s,
    measure_optimizer_time_s,
    measure_training_op_overhead_s,
    measure_transformer_layer_time_s,
    one_thread,
    others_busy_cores,
)
from autopar.cost_models.compute import FUSED_ATTENTION_BACKWARD_FLOPS_RATIO
from autopar.cost_models.local.profile import LocalProfile, ProcessShare, save_profile
from autopar.cost_models.local.rates import ELEMENTWISE_OPS

Shape = tuple[int, int, int]
KIB = 2**10
OTHER_LOAD_WARNING_CORES = 0.25


def transformer_shapes(tokens: Sequence[int], hidden: Sequence[int]) -> tuple[Shape, ...]:
    """The matmuls of a transformer layer: ``(tokens × h)(h × h)``, ``(h × 4h)`` and ``(4h × h)``."""
    return tuple((t, k, n) for t in tokens for h in hidden for k, n in ((h, h), (h, 4 * h), (4 * h, h)))


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """What :func:`calibrate` measures. :meth:`preset` gives the full and the ``--quick`` sets.
    Shapes: matmul and linear ``(m, k, n)``; attention ``(batch, heads, seq, head_dim)``; transformer
    layers ``(batch, seq, hidden, heads)``, each alone and in a stack of ``layer_stack``;
    ``op_elements`` / ``cross_entropy_elements`` the sizes of the elementwise training ops;
    ``share_layer_shape`` the ``(batch, seq, hidden, heads)`` blocks the compute share runs;
    ``measure_runtime``: time the runtime's own machinery on a tiny model."""

    nproc: int = 4
    matmul_shapes: tuple[Shape, ...] = transformer_shapes((256, 1024, 4096), (128, 256, 512, 1024))
    low_precision_shapes: tuple[Shape, ...] = transformer_shapes((1024,), (256, 1024))
    linear_shapes: tuple[Shape, ...] = transformer_shapes((512, 2048), (128, 256, 512))
    copy_bytes: int = 256 * MIB
    cold_pool_bytes: int = 256 * MIB
    elementwise_elements: int = 2**20
    op_elements: tuple[int, ...] = (2**16, 2**19, 2**22)
    cross_entropy_elements: tuple[int, ...] = (2**20, 2**22, 2**24)
    attention_shapes: tuple[tuple[int, int, int, int], ...] = (
        (4, 8, 128, 32), (8, 8, 128, 32), (4, 16, 256, 64), (2, 16, 512, 64))
    math_attention_shapes: tuple[tuple[int, int, int, int], ...] = ((4, 8, 128, 32), (2, 16, 256, 64))
    layer_shapes: tuple[tuple[int, int, int, int], ...] = (
        (4, 128, 128, 4), (4, 256, 128, 4), (4, 128, 512, 16), (2, 256, 512, 16))
    layer_stack: int = 8
    optimizer_params: int = 8 * 2**20
    share_seconds: float = 0.6
    share_layer_shape: tuple[int, int, int, int] = (4, 128, 192, 6)
    measure_runtime: bool = True
    collective_bytes: tuple[int, ...] = (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)
    repeats: int = 7
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if type(self.nproc) is not int or self.nproc < 2:
            raise ValueError(f"nproc = {self.nproc!r} is invalid: calibration needs an int >= 2 "
                             "(a gloo group to measure collectives on)")
        if type(self.repeats) is not int or self.repeats < 1:
            raise ValueError(f"repeats = {self.repeats!r} is invalid: expected an int >= 1")

    @classmethod
    def preset(cls, *, quick: bool, nproc: int = 4) -> CalibrationConfig:
        """The full measurement set (about a minute and a half on 2 idle cores), or ``quick``."""
        if not quick:
            return cls(nproc=nproc)
        return cls(nproc=nproc, matmul_shapes=transformer_shapes((256, 1024), (128, 512)),
                   low_precision_shapes=transformer_shapes((1024,), (256,))[:2],
                   linear_shapes=transformer_shapes((512,), (128, 512)), copy_bytes=128 * MIB,
                   cold_pool_bytes=128 * MIB, op_elements=(2**18, 2**21),
                   cross_entropy_elements=(2**20, 2**23),
                   attention_shapes=((4, 8, 128, 32), (2, 16, 256, 64)),
                   math_attention_shapes=((4, 8, 128, 32),), optimizer_params=2**21,
                   share_layer_shape=(2, 64, 128, 4), layer_stack=4,
                   layer_shapes=((4, 128, 128, 4), (2, 128, 512, 16)),
                   share_seconds=0.1, collective_bytes=(4 * KIB, 256 * KIB, 4 * MIB), repeats=3)


def _matmul_points(shapes: Sequence[Shape], dtype: str, config: CalibrationConfig) -> list[dict[str, Any]]:
    pool = torch.ones(config.cold_pool_bytes // _TORCH_DTYPES[dtype].itemsize, dtype=_TORCH_DTYPES[dtype])
    points = []
    for m, k, n in shapes:
        time_s = measure_matmul_time_s(m, k, n, dtype=dtype, repeats=config.repeats, pool=pool)
        points.append({"m": m, "k": k, "n": n, "time_s": time_s, "flops_per_s": 2 * m * k * n / time_s})
    return points


def _attention_points(config: CalibrationConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    flash, unfused = [], []
    for b, a, s, d in config.attention_shapes:
        fwd, both = measure_attention_time_s(b, a, s, d, repeats=config.repeats)
        flops = attention_flops(b, a, s, d)
        flash.append({"batch": b, "heads": a, "seq": s, "head_dim": d, "causal": True, "forward_s": fwd,
                      "forward_backward_s": both, "forward_flops_per_s": flops / fwd,
                      "train_flops_per_s": (1 + FUSED_ATTENTION_BACKWARD_FLOPS_RATIO) * flops / both})
    for b, a, s, d in config.math_attention_shapes:
        fwd, both = measure_attention_time_s(b, a, s, d, backend="math", repeats=config.repeats)
        unfused.append({"batch": b, "heads": a, "seq": s, "head_dim": d, "scores": b * a * s * s,
                        "forward_s": fwd, "train_s": both})
    return flash, unfused


def _op_points(config: CalibrationConfig) -> list[dict[str, Any]]:
    points = []
    for op in ELEMENTWISE_OPS:
        for n in config.cross_entropy_elements if op == "cross_entropy" else config.op_elements:
            fwd, both, elements = measure_op_time_s(op, n, repeats=config.repeats)
            points.append({"op": op, "elements": elements, "forward_s": fwd, "train_s": both})
    return points


def measure_single_process(config: CalibrationConfig) -> dict[str, Any]:
    """Everything one process measures alone, one thread (raw points, no fits)."""
    since = cpu_seconds((os.getpid(),))
    with one_thread():
        matmul = {"fp32": _matmul_points(config.matmul_shapes, "fp32", config)}
        for dtype in ("bf16", "fp16"):
            matmul[dtype] = _matmul_points(config.low_precision_shapes, dtype, config)
        flash, unfused = _attention_points(config)
        large, small = 256 * 1024, 4096
        optimizer = {"kind": "AdamW", "num_params": config.optimizer_params, "time_s":
                     measure_optimizer_time_s(config.optimizer_params, repeats=config.repeats)}
        optimizer |= {
            "large_tensors": {"tensor_numel": large, "num_tensors": max(1, config.optimizer_params // large),
                              "time_s": optimizer["time_s"]},
            "small_tensors": {"tensor_numel": small, "num_tensors": 256, "time_s": measure_optimizer_time_s(
                256 * small, tensor_numel=small, repeats=config.repeats)}}
        return {
            "clock": "thread CPU time", "matmul": matmul,
            "linear": [{"m": m, "k": k, "n": n,
                        "time_s": measure_linear_time_s(m, k, n, repeats=config.repeats)}
                       for m, k, n in config.linear_shapes],
            "copy": {"bytes": config.copy_bytes,
                     "time_s": measure_memory_time_s(config.copy_bytes, repeats=config.repeats)},
            "elementwise": {"elements": config.elementwise_elements, "passes": 7, "time_s":
                            measure_elementwise_time_s(config.elementwise_elements, repeats=config.repeats)},
            "ops": _op_points(config),
            "op_overhead_s": measure_op_overhead_s(repeats=config.repeats),
            "training_op_overhead_s": measure_training_op_overhead_s(repeats=config.repeats),
            "attention": flash, "math_attention": unfused,
            "transformer_layer": [{"batch": b, "seq": s, "hidden": h, "heads": a, "time_s":
                                   measure_transformer_layer_time_s(b, s, h, a, repeats=config.repeats),
                                   "num_layers_stacked": config.layer_stack, "stacked_time_s":
                                   measure_transformer_layer_time_s(b, s, h, a, num_layers=config.layer_stack,
                                                                    repeats=config.repeats)}
                                  for b, s, h, a in config.layer_shapes],
            "optimizer": optimizer,
            "others_busy_cores": others_busy_cores(since, (os.getpid(),)),
        }


def _share_rows(rows: list[dict[str, Any]]) -> tuple[ProcessShare, ...]:
    alone = rows[0]
    base_matmul, base_copy = alone["matmul_flops_per_s"][0], alone["copy_bytes_per_s"][0]
    return tuple(ProcessShare(num_processes=row["num_processes"],
                              matmul_fraction=statistics.fmean(row["matmul_flops_per_s"]) / base_matmul,
                              copy_fraction=statistics.fmean(row["copy_bytes_per_s"]) / base_copy)
                 for row in rows)


def build_profile(single: dict[str, Any], group: dict[str, Any], *, quick: bool, elapsed_s: float
                  ) -> LocalProfile:
    """The fits of ``calibrate_fits`` over raw measurements."""
    def shaped(points: list[dict[str, Any]]) -> list[tuple[Shape, float]]:
        return [((p["m"], p["k"], p["n"]), p["flops_per_s"]) for p in points]

    matmul, points = single["matmul"], group["collectives"]
    curve_peak, tile = fit_matmul_curve(shaped(matmul["fp32"]))
    sizes = sorted({p["num_ranks"] for p in points})
    links = tuple(fit_alpha_beta([p for p in points if p["num_ranks"] == n]) for n in sizes)
    by_kind = {f"{n} ranks {kind}": dataclasses.asdict(fit_alpha_beta(mine))
               for n in sizes for kind in (*KINDS, "p2p")
               if len(mine := [p for p in points if p["num_ranks"] == n and p["kind"] == kind]) >= 2}
    others = {"single_process": single["others_busy_cores"],
              "shares": group["others_busy_cores_during_shares"]}
    hostname, created = socket.gethostname(), datetime.now(UTC).isoformat(timespec="seconds")
    rates = cpu_rates(single, group, num_cores=os.cpu_count() or 1,
                      source=f"`autopar calibrate` on {hostname} at {created}")
    fits = {"matmul_curve_fp32": {"peak_flops_per_s": curve_peak, "tile_dim": tile}, "links_by_kind": by_kind,
            "layer_check": layer_check(rates, single["transformer_layer"])}
    return LocalProfile(
        hostname=hostname, created=created, num_cores=os.cpu_count() or 1, torch_version=torch.__version__,
        quick=quick, calibration_time_s=round(elapsed_s, 2),
        peak_flops_per_s={d: fit_matmul_peak(shaped(ps)) for d, ps in matmul.items()},
        best_matmul_flops_per_s={d: max(p["flops_per_s"] for p in ps) for d, ps in matmul.items()},
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
                      "environment": _environment() | {"others_busy_cores": others}})


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
    return {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "threads_per_process": 1}


def calibrate(*, out: str | os.PathLike[str] | None = None, nproc: int = 4, quick: bool = False,
              config: CalibrationConfig | None = None) -> tuple[LocalProfile, Path]:
    """Measure this machine, fit, and save the profile (default path: ``local_profile``).
    ``config`` overrides the preset that ``quick`` and ``nproc`` choose."""
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file path such as "
                         f"{Path(out) / 'profile.json'}")
    config = config or CalibrationConfig.preset(quick=quick, nproc=nproc)
    start = time.perf_counter()
    single = measure_single_process(config)
    group = measure_group(config)
    profile = build_profile(single, group, quick=quick, elapsed_s=time.perf_counter() - start)
    return profile, save_profile(profile, out)
