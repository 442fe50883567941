"""Group calibration measurements: N spawned gloo processes, one thread each.

Data flow: ``calibrate.calibrate`` → :func:`measure_group` spawns ``config.nproc`` processes
(``autopar.runtime.launch.spawn``) running :func:`group_worker` → raw points → ``fits``.
Everything runs before the calibration's deadline (an absolute wall-clock time shared by the
ranks, so the processes' start counts): each measurement gets a slot of what is left
(``progress.run_tasks``, rank 0's slot for all ranks) and rank 0 prints one line per measurement.
Measured here, in order:

* shares: each process's matmul, copy and transformer-layer rate with 1…N processes busy at
  once (wall clock; the layer's also per CPU second);
* collectives: the measured twins of ``comm``'s ``all_reduce_time_s`` / ``all_gather_time_s`` /
  ``reduce_scatter_time_s`` / ``p2p_time_s`` and of ``CpuRates.collective_time_s``, on groups of
  2 and N ranks (wall clock: each repeat on freshly written buffers, the median repeat of the
  slowest rank, repeated until the slot is spent — the ranks stop together, on rank 0's clock);
* collectives after compute (``measure.measure_sync_waits``, the twin of
  ``CpuRates.sync_wait_s``): with 2 and with N processes busy, in groups of 2 and of all of them,
  what a small and a 4 MiB all-reduce add to a loop of GPT-block work between them (3 ms to about
  200 ms of it): the arrival skew and wake-up a training step meets at each collective;
* DTensor: the dispatch overhead of one op on a replicated DTensor (forward + backward, minus the
  same op on a plain tensor) and of one AdamW tensor step on DTensor parameters — what the
  runtime's tensor- and data-parallel wrappers add per op (thread CPU time);
* runtime: one step of a tiny zoo GPT (no compute to speak of) through ``autopar.compile`` on all
  N ranks, pipelined with ``m`` and ``3m`` microbatches: the per-step and per-microbatch cost of
  the runtime's own machinery (CPU time of the busiest rank); skipped, and said so, when its slot
  is too short to compile the model.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from autopar.calibration.ops import MIB, cpu_seconds, others_busy_cores
from autopar.calibration.progress import Progress, Skip, Task, run_tasks
from autopar.cost_models.local.measure import (
    SYNC_LAYER_SHAPE,
    gpt_stack_work,
    measure_dtensor_overhead_s,
    measure_sync_waits,
)

if TYPE_CHECKING:
    from autopar.calibration.calibrate import CalibrationConfig

KINDS = ("all_reduce", "all_gather", "reduce_scatter")
RUNTIME_MIN_SLOT_S = 1.0
"""A runtime measurement compiles a tiny model first (about half a second on one core): with a
shorter slot it is skipped."""
FINISH_S = 1.5
"""Seconds kept, before the deadline, for gathering the results and fitting them."""
MIN_GROUP_FRACTION = 0.5
"""However long its processes took to start, the group measures for at least this fraction of its
share of the budget (the calibration then ends that much past its deadline: bounded, and the
measurements keep their slots on a machine slow to start processes)."""


def _busy_rates(rank: int, active: int, seconds: float, work: Callable[[], float]) -> list[list[float]]:
    """Rates of ``work`` (units per call) on this rank in three windows of ``seconds / 3``, each
    opened by a barrier, while ranks ``< active`` all run it (0 on idle ranks): per wall-clock
    second and per second of the thread's CPU time. A busy rank calls ``work`` at least once."""
    rates = []
    for _ in range(3):
        dist.barrier()
        done, start, cpu = 0.0, time.perf_counter(), time.thread_time()
        while rank < active and (done == 0 or time.perf_counter() - start < seconds / 3):
            done += work()
        wall, used = time.perf_counter() - start, time.thread_time() - cpu
        busy = rank < active
        rates.append([done / wall if busy else 0.0, done / used if busy and used > 0 else 0.0])
    dist.barrier()
    return rates


def _layer_work(batch: int, seq: int, hidden: int, heads: int) -> Callable[[], float]:
    """Forward + backward of a stack of four zoo GPT blocks (``measure.gpt_stack_work``): the
    training op mix, whose slowdown when processes share caches and memory is what the step model's
    compute share needs (a small matmul lives in one core's cache and barely notices)."""
    train = gpt_stack_work(batch, seq, hidden, heads)

    def layer() -> float:
        train()
        return 1.0

    return layer


def _share_works(config: CalibrationConfig) -> tuple[tuple[str, Callable[[], float]], ...]:
    a, b, out = torch.randn(512, 512), torch.randn(512, 512), torch.empty(512, 512)
    src = torch.ones(8 * MIB)
    dst = torch.empty_like(src)

    def matmul() -> float:
        torch.mm(a, b, out=out)
        return 2 * 512**3

    def copy() -> float:
        dst.copy_(src)
        return 2 * src.numel() * 4

    return (("matmul_flops_per_s", matmul), ("copy_bytes_per_s", copy),
            ("layers_per_s", _layer_work(*config.share_layer_shape)))


def _share_row(rank: int, world: int, active: int, seconds: float,
               works: tuple[tuple[str, Callable[[], float]], ...]) -> dict[str, Any]:
    """Per-process matmul, copy and layer rates with ``active`` processes busy at once, in
    ``seconds``: of three windows per work, the one with the best mean over the busy ranks (other
    users' load only slows a window down); the layer's also per CPU second (cache and memory
    contention without time slicing)."""
    row: dict[str, Any] = {"num_processes": active}
    for key, work in works:
        mine = torch.tensor(_busy_rates(rank, active, seconds / len(works), work), dtype=torch.float64)
        every = [torch.zeros(3, 2, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(every, mine)
        windows = torch.stack(every[:active])  # (active ranks, 3 windows, wall | cpu)
        row[key] = windows[:, int(windows[:, :, 0].mean(dim=0).argmax()), 0].tolist()
        if key == "layers_per_s":
            row["layers_per_cpu_s"] = windows[:, int(windows[:, :, 1].mean(dim=0).argmax()), 1].tolist()
    return row


def measure_collective_time_s(kind: str, size_bytes: int, *, group: Any, seconds: float) -> float:
    """Measured twin of ``comm``'s ``{kind}_time_s`` for a full buffer of ``size_bytes`` on the
    calling ranks of ``group`` (every member must call it): the median repeat of the slowest rank,
    repeated for ``seconds``. A gather or scatter writes a fresh output each call, as the runtime's
    do (``measure._collective_call``)."""
    n = dist.get_world_size(group)
    full = torch.ones(max(n, size_bytes // 4 // n * n))
    part = torch.ones(full.numel() // n)
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # renamed in torch 2.13
    scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    ops = {"all_reduce": lambda: dist.all_reduce(full, group=group),
           "all_gather": lambda: gather(torch.empty_like(full), part, group=group),
           "reduce_scatter": lambda: scatter(torch.empty_like(part), full, group=group)}
    if kind not in ops:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {list(ops)}")
    source = torch.rand(full.numel())
    return _slowest_rank_s(ops[kind], group=group, seconds=seconds,
                           written=lambda: (full.copy_(source), part.copy_(source[: part.numel()])))


def measure_p2p_time_s(size_bytes: int, *, peer: int, group: Any, seconds: float) -> float:
    """Measured twin of ``comm.p2p_time_s``: half a send/recv round trip between this rank and
    ``peer`` (the lower rank sends first; both must call it)."""
    buffer = torch.ones(max(1, size_bytes // 4))
    source = torch.rand(buffer.numel())
    first = dist.get_rank() < peer

    def round_trip() -> None:
        for sending in ((True, False) if first else (False, True)):
            (dist.send if sending else dist.recv)(buffer, peer)

    return _slowest_rank_s(round_trip, group=group, seconds=seconds, written=lambda: buffer.copy_(source)) / 2


def _slowest_rank_s(fn: Callable[[], Any], *, group: Any, seconds: float,
                    written: Callable[[], Any]) -> float:
    """One warm-up call, then repeats until ``seconds`` have passed on the slowest clock (every rank
    stops after the same repeat), each a barrier, ``written()`` (the buffers rewritten, as a step
    hands a collective a tensor it has just computed), then one timed call: the MEDIAN repeat of
    the slowest rank. As ``measure.timed_s`` for single operations, not the fastest: a step sees a
    collective's typical time. MEASURED on a 2-core KVM Xeon, 2 gloo ranks, 2 MiB all-reduce:
    fastest 0.88 ms, median 2.20 ms, median after rewriting the buffer 2.50 ms; the earlier
    fastest-of-back-to-back-repeats rule gave about 1 ms, while a tp2 step's ``wait_tensor`` events
    averaged 5.1 ms (the rest: the ranks arriving apart after their compute, not measured here)."""
    fn()
    start, repeats = time.perf_counter(), []
    while True:
        dist.barrier(group=group)
        written()
        began = time.perf_counter()
        fn()
        now = time.perf_counter()
        both = torch.tensor([now - began, now - start], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        repeats.append(float(both[0]))
        if float(both[1]) >= seconds:
            return statistics.median(repeats)


def _collective_task(rank: int, size: int, kind: str, group: Any, sizes: tuple[int, ...],
                     points: list[dict[str, Any]]) -> Task:
    def run(slot: float) -> str:
        mine = []
        if rank < size:
            each = slot / len(sizes)
            for size_bytes in sizes:
                if kind == "p2p":
                    time_s = measure_p2p_time_s(size_bytes, peer=1 - rank, group=group, seconds=each)
                else:
                    time_s = measure_collective_time_s(kind, size_bytes, group=group, seconds=each)
                mine.append({"kind": kind, "num_ranks": size, "size_bytes": size_bytes, "time_s": time_s})
        dist.barrier()
        points.extend(mine)
        return ", ".join(f"{_size(p['size_bytes'])} {_duration(p['time_s'])}" for p in mine)

    return Task(f"gloo {kind} on {size} ranks", run, weight=len(sizes) / 4)


def _size(num_bytes: int) -> str:
    return f"{num_bytes // MIB} MiB" if num_bytes >= MIB else f"{num_bytes // 1024} KiB"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def measure_runtime_overhead_s(rank: int, world: int, *, microbatches: int, seconds: float) -> float:
    """CPU seconds of one step, on the busiest rank, of a tiny zoo GPT (4 layers, hidden 16)
    pipelined over all ``world`` ranks with ``microbatches`` microbatches (1F1B). The plan is
    priced with placeholder rates (its prediction plays no part; no quick measurement here)."""
    from autopar import models
    from autopar.compile import compile as autopar_compile
    from autopar.cost_models.local.rates import CpuRates, quick_rates_as

    torch.manual_seed(0)
    model = models.build("gpt", num_layers=max(4, world), hidden_size=16, num_heads=2,
                         vocab_size=32, seq_len=8)
    inputs, targets = models.example_batch(model, microbatches, seed=1)
    fix = {"pp": world, "num_microbatches": microbatches, "schedule": "1f1b"}
    began = time.perf_counter()
    with quick_rates_as(CpuRates.placeholders(os.cpu_count() or 1)):
        compiled = autopar_compile(model, f"local:{world}", fix=fix)
        compiled.step(inputs, targets)
    left = torch.tensor(seconds - (time.perf_counter() - began), dtype=torch.float64)
    dist.all_reduce(left, op=dist.ReduceOp.MIN)  # every rank times the same number of steps
    best, start = math.inf, time.perf_counter()
    while True:
        cpu = time.process_time()
        compiled.step(inputs, targets)
        best = min(best, time.process_time() - cpu)
        done = torch.tensor(float(time.perf_counter() - start >= max(float(left), 0.0)), dtype=torch.float64)
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
        if done:
            break
    times = torch.tensor(best, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return float(times)


def _agree(slot: float) -> float:
    """Rank 0's slot, on every rank."""
    value = torch.tensor(slot if dist.get_rank() == 0 else 0.0, dtype=torch.float64)
    dist.broadcast(value, src=0)
    return float(value)


def group_tasks(rank: int, world: int, config: CalibrationConfig, raw: dict[str, Any]) -> list[Task]:
    """The group's measurements as tasks filling ``raw`` (every rank runs the same tasks)."""
    works = _share_works(config)
    raw.update(shares=[], collectives=[], dtensor={}, sync_waits=[],
               runtime={"num_ranks": world, "step_s_by_microbatches": {}})
    tasks = []
    for active in (*range(1, world + 1), 1):  # one process alone first and again last (``fits.alone_rate``)
        def share(slot: float, active: int = active) -> str:
            row = _share_row(rank, world, active, slot, works)
            raw["shares"].append(row)
            return (f"matmul {sum(row['matmul_flops_per_s']) / active / 1e9:.1f} GFLOP/s, copy "
                    f"{sum(row['copy_bytes_per_s']) / active / 1e9:.1f} GB/s, "
                    f"{sum(row['layers_per_cpu_s']) / active:.1f} layers per CPU second, per process")
        again = " (again)" if tasks and active == 1 else ""
        tasks.append(Task(f"core sharing: {active} of {world} processes busy{again}", share,
                          weight=0.5 if again else 1.0))
    for m in (world, 3 * world) if config.measure_runtime else ():
        def runtime(slot: float, m: int = m) -> str:
            if slot < RUNTIME_MIN_SLOT_S:
                raise Skip(f"its {slot:.2f} s slot is too short to compile the model "
                           f"(needs ~{RUNTIME_MIN_SLOT_S} s)")
            try:
                step_s = measure_runtime_overhead_s(rank, world, microbatches=m, seconds=slot)
            except Exception as error:  # noqa: BLE001 - every rank fails alike (one deterministic plan)
                message = " ".join(str(error).split())[:200]
                raise Skip(f"the runtime failed ({type(error).__name__}: {message}); its overheads "
                           "stay 0") from error
            raw["runtime"]["step_s_by_microbatches"][str(m)] = step_s
            return f"{step_s * 1e3:.2f} ms CPU per step"
        tasks.append(Task(f"runtime: tiny GPT, pp {world}, {m} microbatches", runtime, weight=2.0))

    sync_work = gpt_stack_work(*SYNC_LAYER_SHAPE, num_layers=1)
    for busy in sorted({2, world}) if world >= 2 else ():
        def sync(slot: float, busy: int = busy) -> str:
            points = measure_sync_waits(sync_work, group_sizes=(2, busy), seconds=slot, processes=busy)
            raw["sync_waits"] += points
            beyond = [p["in_step_s"] - p["collective_s"] for p in points]
            return (f"{len(points)} points, {statistics.median(beyond) * 1e3:.1f} ms median beyond the "
                    f"collective alone ({max(beyond) * 1e3:.1f} ms at most), "
                    f"{min(p['interval_s'] for p in points) * 1e3:.0f}–"
                    f"{max(p['interval_s'] for p in points) * 1e3:.0f} ms of work between")
        tasks.append(Task(f"collectives after compute: {busy} of {world} processes busy", sync, weight=3.0))

        def exchange(slot: float, busy: int = busy) -> str:
            points = measure_sync_waits(sync_work, group_sizes=(2,), seconds=slot, processes=busy, kind="p2p")
            raw["sync_waits"] += points
            beyond = [p["in_step_s"] - p["collective_s"] for p in points]
            return (f"{len(points)} points, {statistics.median(beyond) * 1e3:.1f} ms median beyond the "
                    f"exchange alone ({max(beyond) * 1e3:.1f} ms at most)")
        tasks.append(Task(f"ring exchanges after compute: {busy} of {world} processes busy", exchange,
                          weight=1.5))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    measure_dtensor_overhead_s(seconds=0.0, mesh=mesh)  # first use (sharding rules, caches), untimed

    def dtensor(slot: float) -> str:
        raw["dtensor"] = measure_dtensor_overhead_s(seconds=slot, mesh=mesh)
        return (f"{raw['dtensor']['dispatch_s'] * 1e6:.1f} µs per op, "
                f"{raw['dtensor']['optimizer_s_per_tensor'] * 1e6:.1f} µs per AdamW tensor")

    tasks.append(Task("DTensor dispatch overhead", dtensor, weight=1.0))
    for size in sorted({2, world}):
        group = dist.new_group(list(range(size)))  # collective over the whole world
        for kind in (*KINDS, "p2p") if size == 2 else KINDS:
            tasks.append(_collective_task(rank, size, kind, group, config.collective_bytes,
                                          raw["collectives"]))
    return tasks


def group_worker(rank: int, world: int, config: CalibrationConfig, out_path: str, deadline: float,
                 progress: Progress) -> None:
    """One spawned rank: the group's tasks before ``deadline`` (``time.time()``; at least
    :data:`MIN_GROUP_FRACTION` of the group's share); rank 0 prints their lines and writes the
    points, and the cores that other processes kept busy meanwhile, as JSON."""
    torch.manual_seed(rank)
    progress.enabled = progress.enabled and rank == 0
    pids: list[int] = [0] * world
    dist.all_gather_object(pids, os.getpid())
    since = cpu_seconds(pids)
    raw: dict[str, Any] = {}
    tasks = group_tasks(rank, world, config, raw)
    share = config.seconds * (1 - config.single_fraction)
    seconds = _agree(max(deadline - time.time() - FINISH_S, MIN_GROUP_FRACTION * share))
    progress.line(f"gloo group of {world} processes started; {max(seconds, 0):.1f} s left for its "
                  "measurements")
    _, timings = run_tasks(tasks, seconds=max(seconds, 0.0), progress=progress, agree=_agree)
    others = others_busy_cores(since, pids)
    if rank == 0:
        Path(out_path).write_text(json.dumps({
            **raw, "timings": timings, "others_busy_cores_during_shares": others}))
    progress.line("measurements written")


def measure_group(config: CalibrationConfig, *, deadline: float | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Spawn ``config.nproc`` gloo processes (autopar's launcher) and return their measurements,
    taken before ``deadline`` (``time.time()``; default: ``config.seconds`` minus the
    single-process share from now)."""
    from autopar.runtime.launch import spawn

    if deadline is None:
        deadline = time.time() + config.seconds * (1 - config.single_fraction)
    progress = progress or Progress(enabled=config.progress)
    progress.line(f"starting a gloo group of {config.nproc} processes")
    with tempfile.TemporaryDirectory(prefix="autopar-calibrate-") as folder:
        out = os.path.join(folder, "group.json")
        spawn(group_worker, config.nproc, config, out, deadline, progress, timeout_s=config.timeout_s)
        progress.line("gloo group finished")
        return json.loads(Path(out).read_text())

