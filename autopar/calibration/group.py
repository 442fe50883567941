"""Group calibration measurements: N spawned gloo processes, one thread each.

Data flow: ``calibrate.calibrate`` → :func:`measure_group` spawns ``config.nproc`` processes
(``autopar.runtime.launch.spawn``) running :func:`group_worker` → raw points → ``calibrate_fits``.
Measured here, in order:

* shares: each process's matmul, copy and transformer-layer rate with 1…N processes busy at
  once (wall clock; the layer's also per CPU second);
* collectives: the measured twins of ``comm``'s ``all_reduce_time_s`` / ``all_gather_time_s`` /
  ``reduce_scatter_time_s`` / ``p2p_time_s`` and of ``CpuRates.collective_time_s``, on groups of
  2 and N ranks (wall clock: the fastest repeat of the slowest rank);
* DTensor: the dispatch overhead of one op on a replicated DTensor (forward + backward, minus the
  same op on a plain tensor) and of one AdamW tensor step on DTensor parameters — what the
  runtime's tensor- and data-parallel wrappers add per op (thread CPU time);
* runtime: one step of a tiny zoo GPT (no compute to speak of) through ``autopar.compile`` on all
  N ranks, pipelined with ``m`` and ``3m`` microbatches: the per-step and per-microbatch cost of
  the runtime's own machinery (CPU time of the busiest rank).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from autopar.calibration.ops import MIB, cpu_seconds, fastest_s, others_busy_cores

if TYPE_CHECKING:
    from autopar.calibration.calibrate import CalibrationConfig

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def _busy_rates(rank: int, active: int, seconds: float, work: Callable[[], float]) -> list[list[float]]:
    """Rates of ``work`` (units per call) on this rank in three windows of ``seconds / 3``, each
    opened by a barrier, while ranks ``< active`` all run it (0 on idle ranks): per wall-clock
    second and per second of the thread's CPU time."""
    rates = []
    for _ in range(3):
        dist.barrier()
        done, start, cpu = 0.0, time.perf_counter(), time.thread_time()
        while rank < active and time.perf_counter() - start < seconds / 3:
            done += work()
        wall, used = time.perf_counter() - start, time.thread_time() - cpu
        busy = rank < active
        rates.append([done / wall if busy else 0.0, done / used if busy and used > 0 else 0.0])
    dist.barrier()
    return rates


def _layer_work(batch: int, seq: int, hidden: int, heads: int) -> Callable[[], float]:
    """Forward + backward of a stack of four zoo GPT blocks: the training op mix, whose slowdown
    when processes share caches and memory is what the step model's compute share needs (a small
    matmul lives in one core's cache and barely notices)."""
    from autopar.models.configs import GPTConfig
    from autopar.models.gpt import Block

    torch.manual_seed(0)
    config = GPTConfig(num_layers=1, hidden_size=hidden, num_heads=heads, seq_len=seq, vocab_size=8)
    stack = torch.nn.Sequential(*[Block(config) for _ in range(4)])
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    grad = torch.randn(batch, seq, hidden)

    def layer() -> float:
        for p in stack.parameters():
            p.grad = None
        stack(x).backward(grad)
        return 1.0

    return layer


def _shares(rank: int, world: int, config: CalibrationConfig) -> list[dict[str, Any]]:
    """Per-process matmul, copy and layer rates with 1…world processes busy at once: of the three
    windows, the one with the best mean over the busy ranks (other users' load only slows a window
    down); the layer's also per CPU second (cache and memory contention without time slicing)."""
    a, b, out = torch.randn(512, 512), torch.randn(512, 512), torch.empty(512, 512)
    src = torch.ones(8 * MIB)
    dst = torch.empty_like(src)

    def matmul() -> float:
        torch.mm(a, b, out=out)
        return 2 * 512**3

    def copy() -> float:
        dst.copy_(src)
        return 2 * src.numel() * 4

    works = (("matmul_flops_per_s", matmul), ("copy_bytes_per_s", copy),
             ("layers_per_s", _layer_work(*config.share_layer_shape)))
    rows = []
    for active in range(1, world + 1):
        row: dict[str, Any] = {"num_processes": active}
        for key, work in works:
            mine = torch.tensor(_busy_rates(rank, active, config.share_seconds, work), dtype=torch.float64)
            every = [torch.zeros(3, 2, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(every, mine)
            windows = torch.stack(every[:active])  # (active ranks, 3 windows, wall | cpu)
            row[key] = windows[:, int(windows[:, :, 0].mean(dim=0).argmax()), 0].tolist()
            if key == "layers_per_s":
                row["layers_per_cpu_s"] = windows[:, int(windows[:, :, 1].mean(dim=0).argmax()), 1].tolist()
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
            for kind in KINDS:
                for size_bytes in config.collective_bytes:
                    time_s = measure_collective_time_s(kind, size_bytes, group=group, repeats=repeats)
                    points.append({"kind": kind, "num_ranks": size, "size_bytes": size_bytes,
                                   "time_s": time_s})
            if size == 2:
                for size_bytes in config.collective_bytes:
                    time_s = measure_p2p_time_s(size_bytes, peer=1 - rank, group=group, repeats=repeats)
                    points.append({"kind": "p2p", "num_ranks": 2, "size_bytes": size_bytes, "time_s": time_s})
        dist.barrier()
    return points


def measure_dtensor_overhead_s(world: int, *, repeats: int, num_ops: int = 50, num_tensors: int = 64
                               ) -> dict[str, float]:
    """Per-op DTensor dispatch (forward + backward of a tiny multiply, replicated minus plain) and
    the extra AdamW time per DTensor parameter; thread CPU time, no communication involved."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mesh = init_device_mesh("cpu", (world,))

    def chain(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            y = x
            for _ in range(num_ops):
                y = y * 1.0
            y.sum().backward()
        return run

    plain = torch.ones(4, requires_grad=True)
    shared = DTensor.from_local(torch.ones(4), mesh, [Replicate()]).requires_grad_(True)
    per_op = (fastest_s(chain(shared), repeats=repeats) - fastest_s(chain(plain), repeats=repeats)) / num_ops

    def adamw(make: Callable[[torch.Tensor], torch.Tensor]) -> float:
        params = [torch.nn.Parameter(make(torch.randn(256))) for _ in range(num_tensors)]
        for p in params:
            p.grad = make(torch.randn(256))
        return fastest_s(torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01).step, repeats=repeats)

    extra = adamw(lambda t: DTensor.from_local(t, mesh, [Replicate()])) - adamw(lambda t: t)
    return {"dispatch_s": max(per_op, 0.0), "optimizer_s_per_tensor": max(extra / num_tensors, 0.0)}


def measure_runtime_overhead_s(rank: int, world: int, *, microbatches: int, repeats: int) -> float:
    """CPU seconds of one step, on the busiest rank, of a tiny zoo GPT (4 layers, hidden 16)
    pipelined over all ``world`` ranks with ``microbatches`` microbatches (1F1B)."""
    from autopar import models
    from autopar.compile import compile as autopar_compile

    torch.manual_seed(0)
    model = models.build("gpt", num_layers=max(4, world), hidden_size=16, num_heads=2,
                                 vocab_size=32, seq_len=8)
    inputs, targets = models.example_batch(model, microbatches, seed=1)
    fix = {"pp": world, "num_microbatches": microbatches, "schedule": "1f1b"}
    compiled = autopar_compile(model, f"local:{world}", fix=fix)
    compiled.step(inputs, targets)
    times = torch.tensor(fastest_s(lambda: compiled.step(inputs, targets), repeats=repeats,
                                   clock=time.process_time), dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return float(times)


def group_worker(rank: int, world: int, config: CalibrationConfig, out_path: str) -> None:
    """One spawned rank: process shares, then collectives, DTensor and the runtime; rank 0 writes
    the points, and the cores that other processes kept busy meanwhile, as JSON."""
    torch.manual_seed(rank)
    pids: list[int] = [0] * world
    dist.all_gather_object(pids, os.getpid())
    since = cpu_seconds(pids)
    shares = _shares(rank, world, config)
    others = others_busy_cores(since, pids)
    points = _collectives(rank, world, config)
    dtensor = measure_dtensor_overhead_s(world, repeats=config.repeats)
    steps = {m: measure_runtime_overhead_s(rank, world, microbatches=m, repeats=config.repeats)
             for m in ((world, 3 * world) if config.measure_runtime else ())}
    if rank == 0:
        Path(out_path).write_text(json.dumps({
            "shares": shares, "collectives": points, "dtensor": dtensor,
            "runtime": {"num_ranks": world, "step_s_by_microbatches": steps},
            "others_busy_cores_during_shares": others}))


def measure_group(config: CalibrationConfig) -> dict[str, Any]:
    """Spawn ``config.nproc`` gloo processes (autopar's launcher) and return their measurements."""
    from autopar.runtime.launch import spawn

    with tempfile.TemporaryDirectory(prefix="autopar-calibrate-") as folder:
        out = os.path.join(folder, "group.json")
        spawn(group_worker, config.nproc, config, out, timeout_s=config.timeout_s)
        return json.loads(Path(out).read_text())
