"""Single-process calibration measurements: one operation at a time, one thread, as a rank runs.

Data flow: ``calibrate.calibrate`` → ``calibrate.single_process_tasks`` → the measurements here and
the shared ones of ``autopar.cost_models.local.measure`` (nn.Linear, attention, training ops, copy,
AdamW; also what the quick built-in measurement runs) → raw points (no fits) → ``fits`` →
``LocalProfile`` / ``CpuRates``. Each ``measure_*`` is the measured twin of a cost-model function:
``compute.matmul_time_s`` (cold operands), ``CpuRates.elementwise_s``,
``cpu_compute.transformer_layer_part`` (zoo GPT blocks, ``measure.measure_gpt_stack_time_s``).

Every measurement is bounded by time (``seconds``), never by a repeat count: ``measure.timed_s``
(one warm-up, then calls until the slot is spent, the median on the thread's CPU clock — a rank's
work on its own core, which other users of a shared machine do not inflate by taking the core
away; the cores they kept busy are recorded, :func:`others_busy_cores`). A matmul shape whose one
call the dtype's measured rate says would not fit its slot is skipped, and says so
(:func:`matmul_call_s`): an emulated bf16 matmul on a CPU without AVX-512 runs at a few GFLOP/s.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from autopar.cost_models.local.measure import (
    MIB,
    TORCH_DTYPES,
    attention_flops,
    gpt_stack_work,
    measure_attention_time_s,
    measure_fresh_page_s_per_byte,
    measure_gpt_stack_pair_s,
    measure_gpt_stack_time_s,
    measure_linear_curve_s,
    measure_linear_time_s,
    measure_memory_time_s,
    measure_op_time_s,
    measure_optimizer_time_s,
    measure_ring_block_s,
    measure_train_time_s,
    measure_training_op_overhead_s,
    one_thread,
    timed_s,
)

__all__ = [
    "COLD_WORKING_SET_BYTES", "MIB", "PROBE_DIM", "TORCH_DTYPES", "attention_flops", "cpu_seconds",
    "matmul_call_s", "measure_attention_time_s", "measure_gpt_stack_pair_s", "measure_linear_curve_s",
    "measure_machine_speed",
    "measure_fresh_page_s_per_byte", "measure_elementwise_time_s", "measure_linear_time_s",
    "measure_matmul_time_s", "measure_memory_time_s", "measure_op_overhead_s", "measure_op_time_s",
    "measure_optimizer_time_s", "measure_probe_flops_per_s", "measure_ring_block_s", "measure_train_time_s",
    "measure_gpt_stack_time_s", "measure_training_op_overhead_s", "one_thread", "others_busy_cores",
    "timed_s",
]

COLD_WORKING_SET_BYTES = 96 * MIB
"""Operand bytes a cold matmul cycles through: beyond this machine's ~32–64 MB of effective cache
(a large copy slows from ~28 to ~14 GB/s between 32 and 64 MB here)."""
PROBE_DIM = 256
"""The probe: one warm PROBE_DIM³ matmul (34 MFLOP), whose rate predicts the cost of the shapes
after it — under 0.1 s even at the 0.5 GFLOP/s of a scalar bf16 fallback."""


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


SPEED_PROBE_S = 0.4


def measure_machine_speed(*, seconds: float = SPEED_PROBE_S) -> float:
    """This core's speed now, in probe units per WALL second: one unit is a GPT-block forward +
    backward (``gpt_stack_work``'s block at the core-sharing shape, 4 × 128 × 192) plus a 64 MiB
    copy (memory bandwidth), each timed for half of ``seconds``.

    Calibration records it at its start and end (``calibration_speed``) so that a measurement taken
    later can tell whether the machine runs as it did then: this VM has slow and fast spells that
    no load or steal counter shows (measured: the whole calibration 10–15 % faster at 00:05 than at
    20:08 on the same day, the probe's spread within one minute 3 %). The wall clock, not the
    thread's CPU clock: a spell slows the CPU time too."""
    with one_thread():
        work = gpt_stack_work(4, 128, 192, 6, num_layers=1)
        source = torch.ones(64 * MIB // 4)
        target = torch.empty_like(source)
        block = timed_s(work, seconds=seconds / 2, clock=time.perf_counter)
        copy = timed_s(lambda: target.copy_(source), seconds=seconds / 2, clock=time.perf_counter)
        return 1.0 / (block + copy)


def measure_probe_flops_per_s(dtype: str, *, seconds: float, dim: int = PROBE_DIM) -> float:
    """FLOP/s of one warm ``dim³`` matmul in ``dtype``: what predicts the larger shapes' cost."""
    a, b = (torch.ones(dim, dim, dtype=TORCH_DTYPES[dtype]) for _ in range(2))
    out = torch.empty(dim, dim, dtype=a.dtype)
    return 2 * dim**3 / timed_s(lambda: torch.mm(a, b, out=out), seconds=seconds)


def _cold_sets(m: int, k: int, n: int, pool_elements: int, itemsize: int) -> int:
    """How many operand sets a cold matmul of (m, k, n) cycles through (module docstring)."""
    size = m * k + k * n + m * n
    wanted = math.ceil(COLD_WORKING_SET_BYTES / (size * itemsize))
    return max(1, min(wanted, pool_elements // size))


def matmul_call_s(m: int, k: int, n: int, *, flops_per_s: float, pool_elements: int, itemsize: int) -> float:
    """Predicted seconds of one call of :func:`measure_matmul_time_s` (its cycle over the cold
    operand sets) at ``flops_per_s``."""
    return 2 * m * k * n * _cold_sets(m, k, n, pool_elements, itemsize) / flops_per_s


def measure_matmul_time_s(m: int, k: int, n: int, *, dtype: str = "fp32", seconds: float,
                          pool: torch.Tensor | None = None) -> float:
    """Measured twin of ``compute.matmul_time_s``: one (m×k)(k×n) matmul. With ``pool`` (a flat
    tensor larger than the caches) each call takes fresh operands from it, so they come from
    memory."""
    size = m * k + k * n + m * n
    if pool is None:
        pool = torch.ones(size, dtype=TORCH_DTYPES[dtype])
    assert pool.dtype == TORCH_DTYPES[dtype] and pool.numel() >= size
    count = _cold_sets(m, k, n, pool.numel(), pool.element_size())
    sets = [pool[i * size:(i + 1) * size] for i in range(count)]
    views = [(x[:m * k].view(m, k), x[m * k:size - m * n].view(k, n), x[size - m * n:].view(m, n))
             for x in sets]

    def cycle() -> None:
        for a, b, out in views:
            torch.mm(a, b, out=out)

    return timed_s(cycle, seconds=seconds) / len(views)


def measure_elementwise_time_s(num_elements: int, *, seconds: float) -> float:
    """An add, a scaled copy and a GELU on fp32 tensors of ``num_elements``: 7 element passes."""
    x, y = torch.randn(num_elements), torch.randn(num_elements)
    return timed_s(lambda: F.gelu(torch.add(x, y).mul_(0.5)), seconds=seconds, inner=5)


def measure_op_overhead_s(*, seconds: float) -> float:
    """Dispatch time of one tiny op (a 1-element add): the per-op floor of eager PyTorch on CPU."""
    x = torch.ones(1)
    return timed_s(lambda: torch.add(x, x), seconds=seconds, inner=2000)

