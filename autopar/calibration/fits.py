"""Calibration fits: raw measurements in, the numbers the cost model reads out.

Data flow: ``calibrate_ops`` (one process) and ``calibrate_group`` (N processes) measure →
these fits → ``calibrate.build_profile`` stores them in the ``LocalProfile`` (``CpuRates``
inside it). FITTED to those calibration measurements only, never to training-step times:

* matmul peak under the GPU compute model's roll-off ``η = 1/(1 + T(1/m + 1/k + 1/n))`` with
  ``T = compute.MATMUL_TILE_DIM``: ``log P = mean_i log(rate_i / η_i)`` (:func:`fit_matmul_peak`);
  the same with ``T`` free (:func:`fit_matmul_curve`), for cold matmuls and for ``nn.Linear``
  forward + backward (``CpuRates.linear_*``);
* gloo link: ``t = x·β + y·α`` with ``x`` (bytes on the wire per rank) and ``y`` (latency steps)
  from ``comm``'s ring formulas, ``B = 1/β``, least squares on relative error with ``α, β ≥ 0``
  (:func:`fit_alpha_beta`), jointly over all collectives of one group size (the GPU-style
  ``LinkLevel`` of ``apply_profile``); the CPU model reads the measured points themselves;
* AdamW: per-parameter and per-tensor seconds from two tensor sizes (two equations);
* activation re-read: seconds per byte of a layer's saved activations (``memory``'s count) that the
  backward of a layer inside a stack spends beyond the same layer alone, whose activations stay in
  the caches (least squares through 0 over the measured block shapes);
* runtime: per-step and per-microbatch seconds from ``m`` and ``3m`` microbatches (two equations;
  0 when the calibration skipped it).

:func:`layer_check` composes ``cpu_compute``'s layer time from the fitted rates and compares it
with the measured transformer blocks — a check of the composition, nothing is fitted to it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from autopar.cost_models.compute import MATMUL_TILE_DIM
from autopar.cost_models.local.profile import LinkFit
from autopar.cost_models.local.rates import (
    ELEMENTWISE_OPS,
    CpuRates,
    OpTable,
    fit_activation_reread_forward_s_per_byte,
    fit_activation_reread_s_per_byte,
    ring_block_points,
    stack_saved_bytes,
    sync_wait_points,
)

Shape = tuple[int, int, int]
KINDS = ("all_reduce", "all_gather", "reduce_scatter")


ROLL_OFF_GRID = (0.0, *(2 ** (i / 4) for i in range(-8, 41)))
"""The roll-off scales a curve fit tries: 0 and a log grid 0.25…1024."""


def _slowdown(shape: Shape, tile: float, rows: float) -> float:
    """``1 + T_m/m + T (1/k + 1/n)``: how much slower than the peak a ``(m, k, n)`` matmul runs."""
    m, k, n = shape
    return 1 + rows / m + tile * (1 / k + 1 / n)


def _peak_and_error(points: Sequence[tuple[Shape, float]], tile: float, rows: float) -> tuple[float, float]:
    """P as the least-squares log mean of ``rate · slowdown``, and the squared log error around it."""
    logs = [math.log(rate * _slowdown(shape, tile, rows)) for shape, rate in points]
    mean = statistics.fmean(logs)
    return math.exp(mean), sum((x - mean) ** 2 for x in logs)


def fit_matmul_peak(points: Sequence[tuple[Shape, float]], *, tile_dim: float = MATMUL_TILE_DIM) -> float:
    """FITTED peak P: least squares of ``log rate = log P − log(1 + T Σ 1/dim)`` over ``points``
    (``((m, k, n), flops_per_s)``)."""
    if not points:
        raise ValueError("no matmul measurements to fit a peak to")
    return _peak_and_error(points, tile_dim, tile_dim)[0]


def fit_matmul_curve(points: Sequence[tuple[Shape, float]]) -> tuple[float, float]:
    """FITTED ``(P, T)`` with the roll-off scale free: T on :data:`ROLL_OFF_GRID`, P by
    :func:`fit_matmul_peak`; the pair with the least squared log error."""
    tile = min(ROLL_OFF_GRID, key=lambda t: _peak_and_error(points, t, t)[1])
    return fit_matmul_peak(points, tile_dim=tile), tile


def fit_linear_curve(points: Sequence[tuple[Shape, float]]) -> tuple[float, float, float | None]:
    """FITTED ``(P, T, T_m)`` of ``rate = P / (1 + T_m/m + T (1/k + 1/n))`` for ``nn.Linear``:
    both roll-offs on :data:`ROLL_OFF_GRID`, P the least-squares log mean; with fewer than two row
    counts measured, :func:`fit_matmul_curve`'s one roll-off and ``T_m`` None."""
    if len({m for (m, _, _), _ in points}) < 2:
        return (*fit_matmul_curve(points), None)
    tile, rows = min(((t, r) for t in ROLL_OFF_GRID for r in ROLL_OFF_GRID),
                     key=lambda pair: _peak_and_error(points, *pair)[1])
    return _peak_and_error(points, tile, rows)[0], tile, rows


def ring_coefficients(kind: str, num_ranks: int, size_bytes: float) -> tuple[float, float]:
    """``(x, y)`` with ``t = x/B + y·α`` in ``comm``'s formulas for ``kind`` of a full buffer."""
    n = num_ranks
    if kind == "all_reduce":
        return 2 * (n - 1) / n * size_bytes, 2.0 * (n - 1)
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n * size_bytes, float(n - 1)
    if kind == "p2p":
        return float(size_bytes), 1.0
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {[*KINDS, 'p2p']}")


def fit_alpha_beta(points: Sequence[dict[str, Any]]) -> LinkFit:
    """FITTED bandwidth and latency of one group size from points ``{kind, num_ranks,
    size_bytes, time_s}``: least squares of the relative error, ``α, β ≥ 0``."""
    rows = []
    for p in points:
        x, y = ring_coefficients(p["kind"], p["num_ranks"], p["size_bytes"])
        rows.append((x / p["time_s"], y / p["time_s"]))
    if len({p["num_ranks"] for p in points}) != 1 or len(rows) < 2:
        raise ValueError("fit_alpha_beta needs at least 2 points of one group size")
    saa, sab, sbb = (sum(a * a for a, _ in rows), sum(a * b for a, b in rows), sum(b * b for _, b in rows))
    sa, sb = sum(a for a, _ in rows), sum(b for _, b in rows)
    candidates = [(sa / saa, 0.0), (0.0, sb / sbb)]
    det = saa * sbb - sab * sab
    if det > 0:
        beta, alpha = (sa * sbb - sb * sab) / det, (saa * sb - sab * sa) / det
        if beta >= 0 and alpha >= 0:
            candidates.append((beta, alpha))

    def residuals(beta_alpha: tuple[float, float]) -> list[float]:
        return [a * beta_alpha[0] + b * beta_alpha[1] - 1 for a, b in rows]

    beta, alpha = min(candidates, key=lambda c: sum(r * r for r in residuals(c)))
    rms = math.sqrt(statistics.fmean(r * r for r in residuals((beta, alpha))))
    return LinkFit(num_ranks=points[0]["num_ranks"], bandwidth_bytes_per_s=1 / max(beta, 1e-15),
                   latency_s=max(alpha, 1e-9), rms_relative_error=rms)


def _two_terms(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """``(a, b) ≥ 0`` with ``y = a x + b`` through two measured points."""
    slope = max((y2 - y1) / (x2 - x1), 0.0) if x2 != x1 else 0.0
    return slope, max(y1 - slope * x1, 0.0)


def alone_rate(rows: Sequence[dict[str, Any]], key: str) -> float:
    """``key``'s rate of one process alone: the best of the one-process rows (the group measures
    one first and again after the others, ``group.group_tasks``: a baseline caught in a slow moment
    would make every share above it look faster than alone)."""
    return max(row[key][0] for row in rows if row["num_processes"] == 1)


def rows_by_count(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first core-sharing row of each busy-process count, by count (the repeated one-process
    row only sets the baseline, :func:`alone_rate`)."""
    first: dict[int, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["num_processes"], row)
    return [first[n] for n in sorted(first)]


def compute_shares(rows: Sequence[dict[str, Any]], *, num_cores: int) -> tuple[tuple[int, float, float], ...]:
    """``(n, compute, copy)`` per busy-process count: compute = the transformer layer's rate per CPU
    second relative to one process alone (cache and memory contention; at most 1: sharing never
    speeds a process up, a ratio above 1 is the baseline's noise — MEASURED 0.95–1.07 for 2
    processes over ten calibrations of a 2-core KVM Xeon), times ``min(1, C/n)`` (a
    work-conserving scheduler gives ``n`` processes ``C`` cores); copy = the wall-clock copy rate
    relative to one process alone (at most 1). The repeated one-process row only sets the baseline
    (:func:`alone_rate`)."""
    layers, copies = alone_rate(rows, "layers_per_cpu_s"), alone_rate(rows, "copy_bytes_per_s")

    def share(row: dict[str, Any]) -> tuple[int, float, float]:
        n = row["num_processes"]
        if n == 1:
            return (1, 1.0, 1.0)
        compute = min(1.0, statistics.fmean(row["layers_per_cpu_s"]) / layers) * min(1.0, num_cores / n)
        return (n, compute, min(1.0, statistics.fmean(row["copy_bytes_per_s"]) / copies))

    return tuple(share(row) for row in rows_by_count(rows))


def cpu_rates(single: dict[str, Any], group: dict[str, Any], *, num_cores: int, source: str) -> CpuRates:
    """:class:`CpuRates` from the raw calibration points (module docstring)."""
    linear = [((p["m"], p["k"], p["n"]), 6 * p["m"] * p["k"] * p["n"] / p["time_s"])
              for p in single["linear"]]
    peak, tile, rows = fit_linear_curve(linear)
    flash = tuple((float(p["seq"]), float(p["head_dim"]), p["forward_flops_per_s"], p["train_flops_per_s"])
                  for p in single["attention"])
    math_points = [(p["forward_s"] / p["scores"], p["train_s"] / p["scores"])
                   for p in single["math_attention"]]
    per_element = [(p["op"], (p["elements"], p["forward_s"] / p["elements"], p["train_s"] / p["elements"]))
                   for p in single["ops"]]
    tables = {op: OpTable(points=tuple(point for name, point in per_element if name == op))
              for op in ELEMENTWISE_OPS}
    big, small = single["optimizer"]["large_tensors"], single["optimizer"]["small_tensors"]
    per_tensor_big = big["time_s"] / big["num_tensors"]
    per_tensor_small = small["time_s"] / small["num_tensors"]
    per_param, per_tensor = _two_terms(big["tensor_numel"], per_tensor_big,
                                       small["tensor_numel"], per_tensor_small)
    steps = sorted((int(m), t) for m, t in group["runtime"]["step_s_by_microbatches"].items())
    per_microbatch, per_step = _two_terms(*steps[0], *steps[-1]) if len(steps) > 1 else (0.0, 0.0)
    shares = compute_shares(group["shares"], num_cores=num_cores)
    return CpuRates(
        num_cores=num_cores, linear_peak_flops_per_s=peak, linear_tile_dim=tile, linear_token_tile_dim=rows,
        flash_attention=flash,
        math_attention_s_per_score=tuple(statistics.median(x) for x in zip(*math_points, strict=True)),
        elementwise=tables, copy_bytes_per_s=single["copy"]["bytes"] / single["copy"]["time_s"],
        fresh_page_s_per_byte=single["copy"].get("fresh_page_s_per_byte", 0.0),
        activation_reread_s_per_byte=fit_activation_reread_s_per_byte(single["transformer_layer"]),
        activation_reread_forward_s_per_byte=fit_activation_reread_forward_s_per_byte(single["transformer_layer"]),
        op_overhead_s=single["training_op_overhead_s"], optimizer_s_per_param=per_param,
        optimizer_s_per_tensor=per_tensor, dtensor_dispatch_s=group["dtensor"]["dispatch_s"],
        dtensor_optimizer_s_per_tensor=group["dtensor"]["optimizer_s_per_tensor"],
        dtensor_optimizer_s_per_param=group["dtensor"].get("optimizer_s_per_param", 0.0),
        runtime_step_s=per_step, runtime_microbatch_s=per_microbatch,
        collectives=tuple((p["kind"], p["num_ranks"], float(p["size_bytes"]), p["time_s"])
                          for p in group["collectives"]),
        shares=shares, source=source, sync_waits=sync_wait_points(group.get("sync_waits", ())),
        exchange_waits=sync_wait_points(group.get("sync_waits", ()), kind="p2p"),
        ring_blocks=ring_block_points(single.get("ring_blocks", ())))


def layer_check(rates: CpuRates, points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``cpu_compute``'s forward + backward time of each measured zoo GPT block, alone (without the
    re-read of its evicted activations) and in a stack, and their errors."""
    from autopar.cost_models.local.compute import transformer_layer_part
    from autopar.cost_models.profile import LayerProfile

    rows = []
    for p in points:
        b, s, h, a = p["batch"], p["seq"], p["hidden"], p["heads"]
        layer = LayerProfile(name="block", flops_fwd=0.0, flops_bwd=0.0, param_count=0, hidden_size=h,
                             num_heads=a, seq_len=s, ffn_size=4 * h)
        times = transformer_layer_part(layer, rates=rates, microbatch_size=b, tp=1, bytes_per_element=4).times
        predicted = times.forward_s + times.backward_s
        alone = predicted - rates.activation_reread_s_per_byte * stack_saved_bytes(p)
        rows.append({**p, "predicted_alone_s": alone, "alone_error_pct": 100 * (alone / p["time_s"] - 1)}
                    | ({"predicted_stacked_s": predicted,
                        "stacked_error_pct": 100 * (predicted / p["stacked_time_s"] - 1)}
                       if "stacked_time_s" in p else {}))
    return rows
