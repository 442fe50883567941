"""Calibration: measure this machine so that the cost model predicts it (``autopar calibrate``).

Data flow: :func:`calibrate` → single-process measurements (one thread, as each runtime rank
runs) and a gloo group of N spawned processes (``autopar.runtime.launch.spawn``) → the fits
below → ``local_profile.LocalProfile`` → ``local_profile.save_profile`` (atomic JSON) → the
cost model, through ``local_profile.apply_profile``.

Each ``measure_*_time_s`` is the measured twin of the cost-model function it names:
``compute.matmul_time_s`` (operands cycled through 96 MB so they come from memory, as in a
training step), ``compute.memory_time_s``, fused attention and the whole of
``compute.transformer_layer_times`` (a zoo GPT block), ``estimate``'s optimizer step (AdamW),
and ``comm``'s ``all_reduce_time_s`` / ``all_gather_time_s`` / ``reduce_scatter_time_s`` /
``p2p_time_s``. Single-process timings follow ``timeit``: the fastest of several repeats (the
others carry unrelated load on a shared machine); a collective's repeat lasts until its slowest
rank is done. The group also measures each process's share of the machine with 1…N processes
busy at once. Cores that other processes kept busy meanwhile are recorded
(:func:`other_load_warning`).

Fits, FITTED to these measurements only (never to training-step times):

* matmul peak under the compute model's roll-off ``η = 1/(1 + T(1/m + 1/k + 1/n))`` with
  ``T = compute.MATMUL_TILE_DIM``: ``log P = mean_i log(rate_i / η_i)`` (least squares in log
  space, :func:`fit_matmul_peak`); the same with ``T`` free (:func:`fit_matmul_curve`);
* in-training matmul fraction: the ``f`` at which ``compute``'s layer time, with attention at
  the measured SDPA rate, matches the measured transformer layers (:func:`fit_layer_matmul_fraction`);
* gloo link: ``t = x·β + y·α`` with ``x`` (bytes on the wire per rank) and ``y`` (latency
  steps) from ``comm``'s ring formulas, ``B = 1/β``, by least squares on relative error with
  ``α, β ≥ 0`` (:func:`fit_alpha_beta`), jointly over all collectives of one group size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autopar.cost_models.compute import (
    FUSED_ATTENTION_BACKWARD_FLOPS_RATIO,
    MATMUL_TILE_DIM,
    Kernels,
    transformer_layer_times,
)
from autopar.cost_models.local_profile import LinkFit, LocalProfile, ProcessShare, save_profile
from autopar.cost_models.profile import LayerProfile

Shape = tuple[int, int, int]
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_KINDS = ("all_reduce", "all_gather", "reduce_scatter")
KIB, MIB = 2**10, 2**20
OTHER_LOAD_WARNING_CORES = 0.25
COLD_WORKING_SET_BYTES = 96 * MIB
"""Operand bytes a cold matmul cycles through: beyond this machine's ~32–64 MB of effective cache
(a large copy slows from ~28 to ~14 GB/s between 32 and 64 MB here)."""


def transformer_shapes(tokens: Sequence[int], hidden: Sequence[int]) -> tuple[Shape, ...]:
    """The matmuls of a transformer layer: ``(tokens × h)(h × h)``, ``(h × 4h)`` and ``(4h × h)``."""
    return tuple((t, k, n) for t in tokens for h in hidden for k, n in ((h, h), (h, 4 * h), (4 * h, h)))


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """What :func:`calibrate` measures. :meth:`preset` gives the full and the ``--quick`` sets."""

    nproc: int = 4
    matmul_shapes: tuple[Shape, ...] = transformer_shapes((256, 1024, 4096), (128, 256, 512, 1024))
    low_precision_shapes: tuple[Shape, ...] = transformer_shapes((1024,), (256, 1024))
    copy_bytes: int = 256 * MIB
    cold_pool_bytes: int = 256 * MIB
    elementwise_elements: int = 2**20
    attention_shapes: tuple[tuple[int, int, int, int], ...] = (
        (4, 8, 128, 32), (8, 8, 128, 32), (4, 16, 256, 64), (2, 16, 512, 64))
    layer_shapes: tuple[tuple[int, int, int, int], ...] = (
        (4, 128, 128, 4), (4, 256, 128, 4), (4, 128, 512, 16), (2, 256, 512, 16))
    optimizer_params: int = 8 * 2**20
    share_seconds: float = 0.6
    collective_bytes: tuple[int, ...] = (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)
    repeats: int = 7
    timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if type(self.nproc) is not int or self.nproc < 2:
            raise ValueError(f"nproc = {self.nproc!r} is invalid: calibration needs an int >= 2 "
                             "(a gloo group to measure collectives on)")
        if type(self.repeats) is not int or self.repeats < 1:
            raise ValueError(f"repeats = {self.repeats!r} is invalid: expected an int >= 1")

    @classmethod
    def preset(cls, *, quick: bool, nproc: int = 4) -> CalibrationConfig:
        """The full measurement set (under a minute on 2 idle cores), or ``quick``: under ~20 s."""
        if not quick:
            return cls(nproc=nproc)
        return cls(nproc=nproc, matmul_shapes=transformer_shapes((256, 1024), (128, 512)),
                   low_precision_shapes=transformer_shapes((1024,), (256,))[:2], copy_bytes=128 * MIB,
                   cold_pool_bytes=128 * MIB,
                   attention_shapes=((4, 8, 128, 32), (2, 16, 256, 64)), optimizer_params=2**21,
                   layer_shapes=((4, 128, 128, 4), (2, 128, 512, 16)),
                   share_seconds=0.1, collective_bytes=(4 * KIB, 256 * KIB, 4 * MIB), repeats=3)


def cpu_seconds(pids: Sequence[int] = ()) -> tuple[float, float, float] | None:
    """(wall clock, CPU-seconds all cores were busy since boot, CPU-seconds used by ``pids``) from
    Linux's /proc; None elsewhere."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        mine = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            mine += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), (sum(ticks) - ticks[3] - ticks[4]) * tick_s, mine * tick_s


def others_busy_cores(since: tuple[float, float, float] | None, pids: Sequence[int] = ()) -> float | None:
    """Cores kept busy by processes other than ``pids`` since ``since`` (other users' load)."""
    now = cpu_seconds(pids)
    if since is None or now is None:
        return None
    return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / max(now[0] - since[0], 1e-9)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one intra-op thread, as each runtime rank does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fastest_s(fn: Callable[[], Any], *, repeats: int, inner: int = 1) -> float:
    """Seconds per call of ``fn``: one warm-up, then the fastest of ``repeats`` × ``inner`` calls."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def measure_matmul_time_s(m: int, k: int, n: int, *, dtype: str = "fp32", repeats: int = 3,
                          pool: torch.Tensor | None = None) -> float:
    """Measured twin of ``compute.matmul_time_s``: one (m×k)(k×n) matmul. With ``pool`` (a flat
    tensor larger than the caches) each call takes fresh operands from it, so they come from
    memory as in a training step, where each weight and activation is touched once per pass."""
    size = m * k + k * n + m * n
    if pool is None:
        pool = torch.ones(size, dtype=_TORCH_DTYPES[dtype])
    assert pool.dtype == _TORCH_DTYPES[dtype] and pool.numel() >= size
    wanted = math.ceil(COLD_WORKING_SET_BYTES / (size * pool.element_size()))  # beyond the caches
    sets = [pool[i * size:(i + 1) * size] for i in range(max(1, min(wanted, pool.numel() // size)))]
    views = [(x[:m * k].view(m, k), x[m * k:size - m * n].view(k, n), x[size - m * n:].view(m, n))
             for x in sets]
    rounds = max(1, int(2e7 / (m * k * n * len(views))))

    def cycle() -> None:
        for a, b, out in views:
            torch.mm(a, b, out=out)

    return fastest_s(cycle, repeats=repeats, inner=rounds) / len(views)


def measure_memory_time_s(num_bytes: int, *, repeats: int = 3) -> float:
    """Measured twin of ``compute.memory_time_s``: a copy that reads and writes ``num_bytes`` in all."""
    src = torch.ones(max(1, num_bytes // 8))
    dst = torch.empty_like(src)
    return fastest_s(lambda: dst.copy_(src), repeats=repeats)


def measure_elementwise_time_s(num_elements: int, *, repeats: int = 3) -> float:
    """An add, a scaled copy and a GELU on fp32 tensors of ``num_elements``: 7 element passes."""
    x, y = torch.randn(num_elements), torch.randn(num_elements)
    return fastest_s(lambda: F.gelu(torch.add(x, y).mul_(0.5)), repeats=repeats, inner=5)


def measure_op_overhead_s(*, repeats: int = 3) -> float:
    """Dispatch time of one tiny op (a 1-element add): the per-op floor of eager PyTorch on CPU."""
    x = torch.ones(1)
    return fastest_s(lambda: torch.add(x, x), repeats=repeats, inner=2000)


def measure_training_op_overhead_s(*, repeats: int = 3, num_ops: int = 100) -> float:
    """Per op, forward and backward through autograd, of a chain of tiny (1-element) multiplies."""
    x = torch.ones(1, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(num_ops):
            y = y * 1.0
        y.backward()

    return fastest_s(chain, repeats=repeats) / num_ops


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, *, causal: bool = True) -> float:
    """Forward FLOPs of fused attention as ``compute`` counts them (causal: half)."""
    return 4 * batch * seq * seq * heads * head_dim * (0.5 if causal else 1.0)


def measure_attention_time_s(batch: int, heads: int, seq: int, head_dim: int, *, backward: bool,
                             causal: bool = True, repeats: int = 3) -> float:
    """Measured twin of fused attention in ``compute``: SDPA forward (and backward) in fp32."""
    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=backward) for _ in range(3))

    def run() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            out.backward(torch.ones_like(out))

    with contextlib.nullcontext() if backward else torch.no_grad():
        return fastest_s(run, repeats=repeats)


def measure_transformer_layer_time_s(batch: int, seq: int, hidden: int, heads: int, *, repeats: int = 3
                                     ) -> float:
    """Measured twin of ``compute.transformer_layer_times`` (forward + backward): one block of the zoo
    GPT (pre-LN, fused causal attention, GELU MLP of 4h) in fp32, eager."""
    from autopar.models.configs import GPTConfig
    from autopar.models.gpt import Block

    torch.manual_seed(0)
    block = Block(GPTConfig(num_layers=1, hidden_size=hidden, num_heads=heads, seq_len=seq, vocab_size=8))
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    return fastest_s(lambda: block(x).sum().backward(), repeats=repeats)


def measure_optimizer_time_s(num_params: int, *, repeats: int = 3) -> float:
    """Measured twin of ``estimate``'s optimizer step: the runtime's default AdamW over
    ``num_params`` fp32 parameters in 256×1024 tensors."""
    chunk = 256 * 1024
    params = [torch.nn.Parameter(torch.randn(256, 1024)) for _ in range(max(1, num_params // chunk))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    return fastest_s(optimizer.step, repeats=repeats)


def fit_matmul_peak(points: Sequence[tuple[Shape, float]], *, tile_dim: float = MATMUL_TILE_DIM) -> float:
    """FITTED peak P: least squares of ``log rate = log P − log(1 + T Σ 1/dim)`` over ``points``
    (``((m, k, n), flops_per_s)``)."""
    if not points:
        raise ValueError("no matmul measurements to fit a peak to")
    logs = [math.log(rate * (1 + tile_dim * (1 / m + 1 / k + 1 / n))) for (m, k, n), rate in points]
    return math.exp(statistics.fmean(logs))


def fit_matmul_curve(points: Sequence[tuple[Shape, float]]) -> tuple[float, float]:
    """FITTED ``(P, T)`` with the roll-off scale free: T on a log grid 0.25…1024, P by
    :func:`fit_matmul_peak`; the pair with the least squared log error."""

    def error(tile: float) -> float:
        peak = fit_matmul_peak(points, tile_dim=tile)
        return sum((math.log(rate) - math.log(peak / (1 + tile * (1 / m + 1 / k + 1 / n)))) ** 2
                   for (m, k, n), rate in points)

    grid = [0.0] + [2 ** (i / 4) for i in range(-8, 41)]
    tile = min(grid, key=error)
    return fit_matmul_peak(points, tile_dim=tile), tile


def _layer_parts_s(point: dict[str, Any], *, peak_flops_per_s: float, memory_bytes_per_s: float
                   ) -> tuple[float, float, float]:
    """``compute``'s forward + backward time of a layer at fraction 1 of ``peak_flops_per_s``, split
    into (matmuls, fused attention, the rest: memory-bound passes)."""
    from autopar.cost_models.hardware import DeviceSpec

    device = DeviceSpec(name="CPU", memory_bytes=2**30, peak_flops_per_s={"fp32": peak_flops_per_s},
                        memory_bandwidth_bytes_per_s=memory_bytes_per_s, intra_node_bandwidth_bytes_per_s=1e9,
                        source="calibration", placeholder=True)
    b, s, h, a = point["batch"], point["seq"], point["hidden"], point["heads"]
    layer = LayerProfile(name="layer", flops_fwd=0.0, flops_bwd=0.0, param_count=0, hidden_size=h,
                         num_heads=a, seq_len=s, ffn_size=4 * h)
    kernels = Kernels(device=device, dtype="fp32", bytes_per_element=4, microbatch_size=b, tp=1)
    times = transformer_layer_times(layer, kernels=kernels)
    linear = ((b * s, h, 3 * h), (b * s, h, h), (b * s, h, 4 * h), (b * s, 4 * h, h))
    matmul_s = sum(kernels.matmul(m, k, n) + kernels.matmul(m, n, k) + kernels.matmul(k, m, n)
                   for m, k, n in linear)
    attention_s = (1 + FUSED_ATTENTION_BACKWARD_FLOPS_RATIO) * attention_flops(b, a, s, h // a)
    attention_s /= peak_flops_per_s
    return matmul_s, attention_s, times.forward_s + times.backward_s - matmul_s - attention_s


def fit_layer_matmul_fraction(points: Sequence[dict[str, Any]], *, peak_flops_per_s: float,
                              attention_flops_per_s: float, memory_bytes_per_s: float) -> float:
    """FITTED in-training matmul fraction ``f`` of ``peak_flops_per_s`` (as ``compute``'s GPU entries
    fit theirs to a layer timing): least squares in log space of measured transformer-layer times
    (``measure_transformer_layer_time_s``) against ``compute``'s ``matmul_s / f + attention at the
    measured SDPA rate + the rest``."""
    parts = [(_layer_parts_s(p, peak_flops_per_s=peak_flops_per_s, memory_bytes_per_s=memory_bytes_per_s),
              p["time_s"]) for p in points]

    def error(fraction: float) -> float:
        return sum((math.log(mm / fraction + att * peak_flops_per_s / attention_flops_per_s + rest)
                    - math.log(measured)) ** 2 for (mm, att, rest), measured in parts)

    grid = [2 ** (i / 64) for i in range(-256, 129)]  # 1/16 … 4, steps of 1.1 %
    return min(grid, key=error)


def ring_coefficients(kind: str, num_ranks: int, size_bytes: float) -> tuple[float, float]:
    """``(x, y)`` with ``t = x/B + y·α`` in ``comm``'s formulas for ``kind`` of a full buffer."""
    n = num_ranks
    if kind == "all_reduce":
        return 2 * (n - 1) / n * size_bytes, 2.0 * (n - 1)
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n * size_bytes, float(n - 1)
    if kind == "p2p":
        return float(size_bytes), 1.0
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {[*_KINDS, 'p2p']}")


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


def _matmul_points(shapes: Sequence[Shape], dtype: str, config: CalibrationConfig) -> list[dict[str, Any]]:
    pool = torch.ones(config.cold_pool_bytes // _TORCH_DTYPES[dtype].itemsize, dtype=_TORCH_DTYPES[dtype])
    points = []
    for m, k, n in shapes:
        time_s = measure_matmul_time_s(m, k, n, dtype=dtype, repeats=config.repeats, pool=pool)
        points.append({"m": m, "k": k, "n": n, "time_s": time_s, "flops_per_s": 2 * m * k * n / time_s})
    return points


def _attention_points(config: CalibrationConfig) -> list[dict[str, Any]]:
    points = []
    for b, a, s, d in config.attention_shapes:
        fwd = measure_attention_time_s(b, a, s, d, backward=False, repeats=config.repeats)
        both = measure_attention_time_s(b, a, s, d, backward=True, repeats=config.repeats)
        flops = attention_flops(b, a, s, d)
        points.append({"batch": b, "heads": a, "seq": s, "head_dim": d, "causal": True,
                       "forward_s": fwd, "forward_backward_s": both,
                       "forward_flops_per_s": flops / fwd,
                       "train_flops_per_s": (1 + FUSED_ATTENTION_BACKWARD_FLOPS_RATIO) * flops / both})
    return points


def _layer_points(config: CalibrationConfig) -> list[dict[str, Any]]:
    return [{"batch": b, "seq": s, "hidden": h, "heads": a,
             "time_s": measure_transformer_layer_time_s(b, s, h, a, repeats=config.repeats)}
            for b, s, h, a in config.layer_shapes]


def measure_single_process(config: CalibrationConfig) -> dict[str, Any]:
    """Everything one process measures alone, one thread (raw points, no fits)."""
    since = cpu_seconds((os.getpid(),))
    with one_thread():
        matmul = {"fp32": _matmul_points(config.matmul_shapes, "fp32", config)}
        for dtype in ("bf16", "fp16"):
            matmul[dtype] = _matmul_points(config.low_precision_shapes, dtype, config)
        copy_s = measure_memory_time_s(config.copy_bytes, repeats=config.repeats)
        elementwise_s = measure_elementwise_time_s(config.elementwise_elements, repeats=config.repeats)
        return {
            "matmul": matmul, "copy": {"bytes": config.copy_bytes, "time_s": copy_s},
            "elementwise": {"elements": config.elementwise_elements, "passes": 7, "time_s": elementwise_s},
            "op_overhead_s": measure_op_overhead_s(repeats=config.repeats),
            "training_op_overhead_s": measure_training_op_overhead_s(repeats=config.repeats),
            "attention": _attention_points(config),
            "transformer_layer": _layer_points(config),
            "optimizer": {"num_params": config.optimizer_params, "kind": "AdamW", "time_s":
                          measure_optimizer_time_s(config.optimizer_params, repeats=config.repeats)},
            "others_busy_cores": others_busy_cores(since, (os.getpid(),)),
        }


def _busy_rates(rank: int, active: int, seconds: float, work: Callable[[], float]) -> list[float]:
    """Rates of ``work`` (units per call) on this rank in three windows of ``seconds / 3``, each
    opened by a barrier, while ranks ``< active`` all run it (0 on idle ranks)."""
    rates = []
    for _ in range(3):
        dist.barrier()
        done, start = 0.0, time.perf_counter()
        while rank < active and time.perf_counter() - start < seconds / 3:
            done += work()
        rates.append(done / (time.perf_counter() - start) if rank < active else 0.0)
    dist.barrier()
    return rates


def _shares(rank: int, world: int, config: CalibrationConfig) -> list[dict[str, Any]]:
    """Per-process matmul and copy rates with 1…world processes busy at once: of the three windows,
    the one with the best mean over the busy ranks (other users' load only slows a window down)."""
    a, b, out = torch.randn(512, 512), torch.randn(512, 512), torch.empty(512, 512)
    src = torch.ones(8 * MIB)
    dst = torch.empty_like(src)

    def matmul() -> float:
        torch.mm(a, b, out=out)
        return 2 * 512**3

    def copy() -> float:
        dst.copy_(src)
        return 2 * src.numel() * 4

    rows = []
    for active in range(1, world + 1):
        row: dict[str, Any] = {"num_processes": active}
        for key, work in (("matmul_flops_per_s", matmul), ("copy_bytes_per_s", copy)):
            mine = torch.tensor(_busy_rates(rank, active, config.share_seconds, work), dtype=torch.float64)
            every = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(every, mine)
            windows = torch.stack(every[:active])  # (active ranks, 3 windows)
            row[key] = windows[:, int(windows.mean(dim=0).argmax())].tolist()
        rows.append(row)
    return rows


def _repeat_inner(size_bytes: int) -> int:
    return max(1, min(20, int(4 * MIB / size_bytes)))


def measure_collective_time_s(kind: str, size_bytes: int, *, group: Any, repeats: int) -> float:
    """Measured twin of ``comm``'s ``{kind}_time_s`` for a full buffer of ``size_bytes`` on the
    calling ranks of ``group`` (every member must call it): the fastest repeat of the slowest rank."""
    n = dist.get_world_size(group)
    full = torch.ones(max(n, size_bytes // 4 // n * n))
    part = torch.ones(full.numel() // n)
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # renamed in torch 2.13
    scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    ops = {"all_reduce": lambda: dist.all_reduce(full, group=group),
           "all_gather": lambda: gather(full, part, group=group),
           "reduce_scatter": lambda: scatter(part, full, group=group)}
    if kind not in ops:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {list(ops)}")
    return _slowest_rank_s(ops[kind], group=group, repeats=repeats, inner=_repeat_inner(size_bytes))


def measure_p2p_time_s(size_bytes: int, *, peer: int, group: Any, repeats: int) -> float:
    """Measured twin of ``comm.p2p_time_s``: half a send/recv round trip between this rank and
    ``peer`` (the lower rank sends first; both must call it)."""
    buffer = torch.ones(max(1, size_bytes // 4))
    first = dist.get_rank() < peer

    def round_trip() -> None:
        for sending in ((True, False) if first else (False, True)):
            (dist.send if sending else dist.recv)(buffer, peer)

    return _slowest_rank_s(round_trip, group=group, repeats=repeats, inner=_repeat_inner(size_bytes)) / 2


def _slowest_rank_s(fn: Callable[[], Any], *, group: Any, repeats: int, inner: int) -> float:
    fn()
    times = torch.zeros(repeats, dtype=torch.float64)
    for i in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times[i] = (time.perf_counter() - start) / inner
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return float(times.min())


def _collectives(rank: int, world: int, config: CalibrationConfig) -> list[dict[str, Any]]:
    points, repeats = [], config.repeats
    for size in sorted({2, world}):
        group = dist.new_group(list(range(size)))  # collective over the whole world
        if rank < size:
            for kind in _KINDS:
                for size_bytes in config.collective_bytes:
                    time_s = measure_collective_time_s(kind, size_bytes, group=group, repeats=repeats)
                    points.append({"kind": kind, "num_ranks": size, "size_bytes": size_bytes,
                                   "time_s": time_s})
            if size == 2:
                for size_bytes in config.collective_bytes:
                    time_s = measure_p2p_time_s(size_bytes, peer=1 - rank, group=group, repeats=repeats)
                    points.append({"kind": "p2p", "num_ranks": 2, "size_bytes": size_bytes,
                                   "time_s": time_s})
        dist.barrier()
    return points


def group_worker(rank: int, world: int, config: CalibrationConfig, out_path: str) -> None:
    """One spawned rank: process shares, then collectives; rank 0 writes the points, and the cores
    that other processes kept busy meanwhile, as JSON."""
    torch.manual_seed(rank)
    pids: list[int] = [0] * world
    dist.all_gather_object(pids, os.getpid())
    since = cpu_seconds(pids)
    shares = _shares(rank, world, config)
    others = others_busy_cores(since, pids)
    points = _collectives(rank, world, config)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"shares": shares, "collectives": points,
                                              "others_busy_cores_during_shares": others}))


def measure_group(config: CalibrationConfig) -> dict[str, Any]:
    """Spawn ``config.nproc`` gloo processes (autopar's launcher) and return their measurements."""
    from autopar.runtime.launch import spawn

    with tempfile.TemporaryDirectory(prefix="autopar-calibrate-") as folder:
        out = os.path.join(folder, "group.json")
        spawn(group_worker, config.nproc, config, out, timeout_s=config.timeout_s)
        return json.loads(Path(out).read_text())


def _share_rows(rows: list[dict[str, Any]]) -> tuple[ProcessShare, ...]:
    alone = rows[0]
    base_matmul, base_copy = alone["matmul_flops_per_s"][0], alone["copy_bytes_per_s"][0]
    return tuple(ProcessShare(num_processes=row["num_processes"],
                              matmul_fraction=statistics.fmean(row["matmul_flops_per_s"]) / base_matmul,
                              copy_fraction=statistics.fmean(row["copy_bytes_per_s"]) / base_copy)
                 for row in rows)


def build_profile(single: dict[str, Any], group: dict[str, Any], *, quick: bool, elapsed_s: float
                  ) -> LocalProfile:
    """The fits of :mod:`this module <autopar.cost_models.calibrate>` over raw measurements."""
    def shaped(points: list[dict[str, Any]]) -> list[tuple[Shape, float]]:
        return [((p["m"], p["k"], p["n"]), p["flops_per_s"]) for p in points]

    matmul, points = single["matmul"], group["collectives"]
    peak = fit_matmul_peak(shaped(matmul["fp32"]))
    attention = statistics.median(p["train_flops_per_s"] for p in single["attention"])
    curve_peak, tile = fit_matmul_curve(shaped(matmul["fp32"]))
    sizes = sorted({p["num_ranks"] for p in points})
    links = tuple(fit_alpha_beta([p for p in points if p["num_ranks"] == n]) for n in sizes)
    by_kind = {f"{n} ranks {kind}": dataclasses.asdict(fit_alpha_beta(mine))
               for n in sizes for kind in (*_KINDS, "p2p")
               if len(mine := [p for p in points if p["num_ranks"] == n and p["kind"] == kind]) >= 2}
    others = {"single_process": single["others_busy_cores"],
              "shares": group["others_busy_cores_during_shares"]}
    fits = {"matmul_curve_fp32": {"peak_flops_per_s": curve_peak, "tile_dim": tile}, "links_by_kind": by_kind}
    return LocalProfile(
        hostname=socket.gethostname(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        num_cores=os.cpu_count() or 1, torch_version=torch.__version__, quick=quick,
        calibration_time_s=round(elapsed_s, 2),
        peak_flops_per_s={d: fit_matmul_peak(shaped(ps)) for d, ps in matmul.items()},
        best_matmul_flops_per_s={d: max(p["flops_per_s"] for p in ps) for d, ps in matmul.items()},
        matmul_tile_dim=max(tile, 1e-3), matmul_curve_peak_flops_per_s=curve_peak,
        memory_bandwidth_bytes_per_s=single["copy"]["bytes"] / single["copy"]["time_s"],
        elementwise_bandwidth_bytes_per_s=7 * 4 * single["elementwise"]["elements"]
        / single["elementwise"]["time_s"],
        op_overhead_s=single["op_overhead_s"],
        attention_flops_per_s=attention,
        layer_matmul_fraction=fit_layer_matmul_fraction(
            single["transformer_layer"], peak_flops_per_s=peak, attention_flops_per_s=attention,
            memory_bytes_per_s=single["copy"]["bytes"] / single["copy"]["time_s"]),
        optimizer_time_s_per_param=single["optimizer"]["time_s"] / single["optimizer"]["num_params"],
        shares=_share_rows(group["shares"]), links=links,
        measurements={**single, "shares": group["shares"], "collectives": points, "fits": fits,
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

