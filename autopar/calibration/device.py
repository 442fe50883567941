"""GPU calibration: ``autopar calibrate`` on a machine with CUDA (``--device cuda``, the default there).

Data flow: :func:`calibrate_gpu` → :func:`device_tasks` (one process, the first GPU: matmul
efficiency by shape per dtype, attention — SDPA and autopar's Triton kernel, forward and forward +
backward —, copy and elementwise bandwidth) and, with two GPUs or more, :func:`measure_nccl`
(spawned processes over NCCL: all-reduce, all-gather, reduce-scatter) → :func:`build_gpu_profile`
(the fits: the matmul peak FITTED under the compute model's roll-off, ``fits.fit_matmul_peak``;
NCCL α–β, ``fits.fit_alpha_beta``) → two files, written atomically: the profile (every raw point,
default ``~/.cache/autopar/gpu-profile-<hostname>.json``) and, beside it, a cluster file
(``…-cluster.json``, the keys ``autopar.cluster`` reads) with this GPU's measured peaks — each
divided by the compute model's ``matmul_peak_fraction`` so that the model's own efficiency curve
reproduces the measured rates — and the measured NCCL link. The planner uses it as
``autopar plan MODEL --cluster <that file>``; a plan records the file as its cluster's ``text``
and, in its device's ``source``, that the peaks were "overridden by" it.

Everything is bounded by time: ``seconds`` (default 120 s, quick 60 s; a GPU runs the whole of it
in under 3 minutes, processes and Triton's compilation included) split over the measurements
(``progress.run_tasks``); each times calls until its slot is spent (:func:`device_timed_s`,
synchronised wall clock, batches of calls long enough to hide the launch cost). Not measured on a
GPU here: nothing (the repository's CI has none) — the code runs on CPU tensors in the tests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from autopar.calibration.fits import fit_alpha_beta, fit_matmul_peak
from autopar.calibration.progress import Progress, Skip, Task, run_tasks
from autopar.cost_models.compute import FUSED_ATTENTION_BACKWARD_FLOPS_RATIO, device_efficiency
from autopar.hardware import DEVICE_ALIASES, DEVICE_CATALOG, get_device

FORMAT = "autopar-gpu-profile"
VERSION = 1
GPU_SECONDS = 120.0
GPU_QUICK_SECONDS = 60.0
MIB = 2**20
Shape = tuple[int, int, int]


def _transformer(tokens: Sequence[int], hidden: Sequence[int]) -> tuple[Shape, ...]:
    return tuple((t, k, n) for t in tokens for h in hidden for k, n in ((h, h), (h, 4 * h), (4 * h, h)))


@dataclass(frozen=True, kw_only=True)
class GpuConfig:
    """What :func:`calibrate_gpu` measures within ``seconds`` (``nccl_fraction`` of them for the
    NCCL group when there is one). Shapes: matmul ``(m, k, n)`` per dtype (``tf32``: fp32 tensors
    with TF32 matmuls allowed); attention ``(batch, heads, seq, head_dim)`` in bf16, causal."""

    seconds: float = GPU_SECONDS
    device: str = "cuda"
    nproc: int = 8
    nccl_fraction: float = 0.3
    matmul_shapes: dict[str, tuple[Shape, ...]] = None  # type: ignore[assignment]
    attention_shapes: tuple[tuple[int, int, int, int], ...] = (
        (4, 16, 1024, 128), (2, 16, 2048, 128), (1, 32, 4096, 128), (1, 16, 8192, 128))
    copy_bytes: int = 1024 * MIB
    collective_bytes: tuple[int, ...] = (1 * MIB, 8 * MIB, 64 * MIB, 256 * MIB, 1024 * MIB)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.matmul_shapes is None:
            wide = _transformer((2048, 8192), (1024, 2048, 4096, 8192))
            object.__setattr__(self, "matmul_shapes", {"bf16": wide, "fp16": wide[::2],
                                                       "tf32": wide[::3], "fp32": wide[::6]})
        if type(self.seconds) not in (int, float) or not 0 < self.seconds <= 3600:
            raise ValueError(f"seconds = {self.seconds!r} is invalid: expected a time budget in (0, 3600]")

    @classmethod
    def preset(cls, *, quick: bool, nproc: int = 8, seconds: float | None = None) -> GpuConfig:
        if not quick:
            return cls(nproc=nproc, seconds=GPU_SECONDS if seconds is None else seconds)
        small = _transformer((4096,), (1024, 4096))
        return cls(nproc=nproc, seconds=GPU_QUICK_SECONDS if seconds is None else seconds,
                   matmul_shapes={"bf16": small, "fp16": small[:3], "tf32": small[:3], "fp32": small[:1]},
                   attention_shapes=((4, 16, 1024, 128), (1, 32, 4096, 128)),
                   collective_bytes=(1 * MIB, 64 * MIB, 512 * MIB))


# --- timing ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_timed_s(fn: Callable[[], Any], *, seconds: float, device: torch.device,
                   min_batch_s: float = 2e-3) -> float:
    """Seconds per call of ``fn`` on ``device``: one warm-up, then synchronised batches of calls
    (each at least ``min_batch_s`` long, hiding the launch latency) until ``seconds`` of wall
    clock have passed; the median batch per call, as ``measure.timed_s`` keeps (a step sees an
    operation's typical time, not its best). A warm-up longer than the slot is the result."""
    start = time.perf_counter()
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    warm = time.perf_counter() - began
    if time.perf_counter() - start >= seconds:
        return warm
    inner, batches = max(1, min(1000, int(min_batch_s / max(warm, 1e-7)))), []
    while True:
        _sync(device)
        began = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        batches.append((time.perf_counter() - began) / inner)
        if time.perf_counter() - start >= seconds:
            return statistics.median(batches)


# --- single-GPU measurements ----------------------------------------------------------------------
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}


def measure_device_matmul_s(m: int, k: int, n: int, *, dtype: str, device: torch.device,
                            seconds: float) -> float:
    """One (m×k)(k×n) matmul in ``dtype`` (``tf32``: fp32 with TF32 allowed) on ``device``."""
    a = torch.randn(m, k, dtype=_DTYPES[dtype], device=device)
    b = torch.randn(k, n, dtype=_DTYPES[dtype], device=device)
    out = torch.empty(m, n, dtype=_DTYPES[dtype], device=device)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        return device_timed_s(lambda: torch.mm(a, b, out=out), seconds=seconds, device=device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def measure_device_attention_s(batch: int, heads: int, seq: int, head_dim: int, *, kind: str,
                               device: torch.device, seconds: float, dtype: torch.dtype = torch.bfloat16
                               ) -> tuple[float, float]:
    """(forward, forward + backward) seconds of causal attention: ``sdpa`` (PyTorch's choice of
    backend, flash where it runs) or ``triton`` (autopar's kernel; :class:`Skip` with the kernel's
    own reason where it cannot run)."""
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))
    if kind == "triton":
        from autopar.kernels import flash_attention, unsupported_reason

        reason = unsupported_reason(q, k, v)
        if reason is not None:
            raise Skip(f"autopar's Triton kernel cannot run here: {reason}")

        def attend() -> torch.Tensor:
            return flash_attention(q, k, v, causal=True)
    else:
        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad = torch.randn_like(q)

    def train() -> None:
        for t in (q, k, v):
            t.grad = None
        attend().backward(grad)

    return (device_timed_s(attend, seconds=seconds / 2, device=device),
            device_timed_s(train, seconds=seconds / 2, device=device))


def measure_device_copy_s(num_bytes: int, *, device: torch.device, seconds: float) -> float:
    """A copy that reads and writes ``num_bytes`` in all (the compute model's ``memory_time_s``)."""
    src = torch.ones(max(1, num_bytes // 8), device=device)
    dst = torch.empty_like(src)
    return device_timed_s(lambda: dst.copy_(src), seconds=seconds, device=device)


def measure_device_elementwise_s(num_bytes: int, *, device: torch.device, seconds: float) -> float:
    """``x + y`` in bf16 over tensors of ``num_bytes / 3`` each (reads two, writes one)."""
    x = torch.ones(max(1, num_bytes // 6), dtype=torch.bfloat16, device=device)
    y, out = torch.ones_like(x), torch.empty_like(x)
    return device_timed_s(lambda: torch.add(x, y, out=out), seconds=seconds, device=device)


def _gflops(value: float) -> str:
    return f"{value / 1e12:,.1f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:,.1f} GFLOP/s"


def device_tasks(config: GpuConfig, raw: dict[str, Any], device: torch.device) -> list[Task]:
    """The one-GPU measurements as tasks filling ``raw``."""
    raw.update(matmul={d: [] for d in config.matmul_shapes}, attention=[])
    tasks: list[Task] = []
    for dtype, shapes in config.matmul_shapes.items():
        for m, k, n in shapes:
            def matmul(slot: float, m: int = m, k: int = k, n: int = n, dtype: str = dtype) -> float:
                time_s = measure_device_matmul_s(m, k, n, dtype=dtype, device=device, seconds=slot)
                raw["matmul"][dtype].append({"m": m, "k": k, "n": n, "time_s": time_s,
                                             "flops_per_s": 2 * m * k * n / time_s})
                return 2 * m * k * n / time_s
            tasks.append(Task(f"matmul {dtype} {m}×{k}×{n}", matmul, show=_gflops))
    for shape in config.attention_shapes:
        for kind in ("sdpa", "triton"):
            def attention(slot: float, shape: tuple[int, int, int, int] = shape, kind: str = kind) -> str:
                b, a, s, d = shape
                fwd, both = measure_device_attention_s(b, a, s, d, kind=kind, device=device, seconds=slot)
                flops = 2 * b * a * s * s * d  # causal forward, as ``compute`` counts it
                raw["attention"].append({"kind": kind, "batch": b, "heads": a, "seq": s, "head_dim": d,
                                         "dtype": "bf16", "causal": True, "forward_s": fwd,
                                         "forward_backward_s": both, "forward_flops_per_s": flops / fwd,
                                         "train_flops_per_s": (1 + FUSED_ATTENTION_BACKWARD_FLOPS_RATIO)
                                         * flops / both})
                return (f"forward {_gflops(flops / fwd)}, forward+backward "
                        f"{_gflops(raw['attention'][-1]['train_flops_per_s'])}")
            b, a, s, d = shape
            tasks.append(Task(f"attention {kind} bf16 causal (b {b}, heads {a}, seq {s}, d {d})", attention,
                              weight=2.0))

    def copy(slot: float) -> str:
        raw["copy"] = {"bytes": config.copy_bytes,
                       "time_s": measure_device_copy_s(config.copy_bytes, device=device, seconds=slot)}
        return f"{config.copy_bytes / raw['copy']['time_s'] / 1e9:,.0f} GB/s"

    def elementwise(slot: float) -> str:
        raw["elementwise"] = {"bytes": config.copy_bytes, "time_s": measure_device_elementwise_s(
            config.copy_bytes, device=device, seconds=slot)}
        return f"{config.copy_bytes / raw['elementwise']['time_s'] / 1e9:,.0f} GB/s"

    tasks += [Task(f"copy {config.copy_bytes // MIB} MiB", copy),
              Task(f"elementwise add bf16 ({config.copy_bytes // MIB} MiB moved)", elementwise)]
    return tasks


# --- NCCL --------------------------------------------------------------------------------------------
def _nccl_worker(rank: int, world: int, init_file: str, sizes: tuple[int, ...], seconds: float,
                 out_path: str, progress: Progress) -> None:
    import datetime

    import torch.distributed as dist

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=device)
    progress.enabled = progress.enabled and rank == 0
    points = []
    try:
        slot = seconds / (3 * len(sizes))
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            for size in sizes:
                call = _nccl_call(kind, size, world, device)
                mine = torch.tensor([device_timed_s(call, seconds=slot, device=device)], device=device)
                dist.all_reduce(mine, op=dist.ReduceOp.MAX)
                points.append({"kind": kind, "num_ranks": world, "size_bytes": size, "time_s": float(mine)})
                progress.line(f"nccl {kind} on {world} GPUs, {size // MIB} MiB: {float(mine) * 1e3:.3f} ms")
        if rank == 0:
            Path(out_path).write_text(json.dumps(points))
    finally:
        dist.destroy_process_group()


def _nccl_call(kind: str, size_bytes: int, world: int, device: torch.device) -> Callable[[], Any]:
    import torch.distributed as dist

    full = torch.ones(max(world, size_bytes // 2 // world * world), dtype=torch.bfloat16, device=device)
    part = torch.ones(full.numel() // world, dtype=full.dtype, device=device)
    return {"all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: dist.all_gather_into_tensor(full, part),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full)}[kind]


def measure_nccl(num_gpus: int, sizes: tuple[int, ...], *, seconds: float, progress: Progress
                 ) -> list[dict[str, Any]]:
    """Collectives over NCCL among ``num_gpus`` spawned processes, one per GPU (wall clock of the
    slowest rank, each point's share of ``seconds``)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="autopar-nccl-") as folder:
        out = os.path.join(folder, "points.json")
        args = (num_gpus, os.path.join(folder, "rendezvous"), sizes, seconds, out, progress)
        mp.start_processes(_nccl_worker, args=args, nprocs=num_gpus, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


# --- the profile -------------------------------------------------------------------------------------
def catalog_name(device_name: str) -> str | None:
    """The catalog entry a GPU's name (``torch.cuda.get_device_name``) names, e.g. "NVIDIA H100 80GB
    HBM3" → "H100-80GB" (an alias of H100-SXM): the longest name whose parts all occur in it."""
    names = [n for n in (*DEVICE_CATALOG, *DEVICE_ALIASES) if n != "CPU"]
    found = [n for n in names if all(part in device_name.upper() for part in n.upper().split("-"))]
    return max(found, key=len) if found else None


def build_gpu_profile(raw: dict[str, Any], *, device_name: str, num_gpus: int, memory_bytes: int,
                      elapsed_s: float) -> dict[str, Any]:
    """The profile (raw points, fits, identity) and the cluster-file keys derived from it."""
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:12]
    fitted = {d: fit_matmul_peak([((p["m"], p["k"], p["n"]), p["flops_per_s"]) for p in ps])
              for d, ps in raw["matmul"].items() if ps}
    best = {d: max(p["flops_per_s"] for p in ps) for d, ps in raw["matmul"].items() if ps}
    collectives = raw.get("collectives") or []
    link = fit_alpha_beta(collectives) if len(collectives) >= 2 else None
    name = catalog_name(device_name)
    cluster: dict[str, Any] | None = None
    if name is not None:
        fraction = device_efficiency(get_device(name)).matmul_peak_fraction
        cluster = {"nodes": 1, "devices_per_node": num_gpus, "device": name,
                   "memory_gib": round(memory_bytes / 2**30, 3),
                   "peak_tflops": {d: round(p / fraction / 1e12, 3) for d, p in fitted.items()}}
        if link is not None:
            cluster |= {"intra_node_bandwidth_gb_per_s": round(link.bandwidth_bytes_per_s / 1e9, 3),
                        "intra_node_latency_us": round(link.latency_s * 1e6, 3)}
    copy = raw["copy"]["bytes"] / raw["copy"]["time_s"] if "copy" in raw else None
    return {"format": FORMAT, "version": VERSION, "id": digest, "hostname": socket.gethostname(),
            "created": created, "device_name": device_name, "catalog_name": name, "num_gpus": num_gpus,
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "calibration_time_s": round(elapsed_s, 2),
            "fits": {"matmul_peak_flops_per_s": fitted, "best_matmul_flops_per_s": best,
                     "copy_bytes_per_s": copy,
                     "nccl": None if link is None else {"bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
                                                        "latency_s": link.latency_s,
                                                        "rms_relative_error": link.rms_relative_error}},
            "cluster": cluster, "measurements": raw}


def default_gpu_profile_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "autopar" / f"gpu-profile-{socket.gethostname()}.json"


def cluster_path(profile_path: Path) -> Path:
    """The cluster file beside a GPU profile: ``<stem>-cluster.json``."""
    return profile_path.with_name(f"{profile_path.stem}-cluster.json")


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=1, sort_keys=True)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def calibrate_gpu(*, out: str | os.PathLike[str] | None = None, config: GpuConfig | None = None,
                  progress: Progress | None = None) -> tuple[dict[str, Any], Path, Path | None]:
    """Measure this machine's GPUs within ``config.seconds`` and write the profile and its cluster
    file (module docstring): ``(profile, profile path, cluster path or None when the GPU is not in
    autopar's catalog)``."""
    config = config or GpuConfig()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    start = time.perf_counter()
    progress = progress or Progress(start=start, enabled=config.progress)
    num_gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    world = max(1, min(config.nproc, num_gpus))
    share = config.nccl_fraction if world > 1 else 0.0
    progress.line(f"measuring {torch.cuda.get_device_name(device) if device.type == 'cuda' else device} "
                  f"within {config.seconds:.0f} s (one line per measurement)")
    raw: dict[str, Any] = {}
    _, timings = run_tasks(device_tasks(config, raw, device), seconds=config.seconds * (1 - share),
                           progress=progress)
    raw["timings"] = timings
    if world > 1:
        left = max(config.seconds - (time.perf_counter() - start), 0.3 * share * config.seconds)
        raw["collectives"] = measure_nccl(world, config.collective_bytes, seconds=left, progress=progress)
    else:
        progress.line("nccl collectives: skipped: one GPU, no process group to measure")
        raw["collectives"] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    profile = build_gpu_profile(raw, device_name=name, num_gpus=world, memory_bytes=memory,
                                elapsed_s=time.perf_counter() - start)
    target = Path(out) if out is not None else default_gpu_profile_path()
    _write(target, profile)
    beside = None
    if profile["cluster"] is not None:
        beside = cluster_path(target)
        _write(beside, profile["cluster"])
    return profile, target, beside
