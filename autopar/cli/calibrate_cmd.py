"""``autopar calibrate [--out PATH] [--nproc N] [--quick] [--seconds S] [--emulate DTYPE]``: measure
this machine for the cost model.

Data flow: the CLI → :func:`autopar.calibration.calibrate` (single-process operations and a gloo
group of N processes, all within ``--seconds``; one progress line per measurement on stderr) → a
versioned JSON profile written atomically (default ``~/.cache/autopar/profile-<hostname>.json``) →
printed here as one table, with the profile's id (what a plan priced by it records in
``predicted.options.local_rates``). The cost model loads it for ``local`` clusters
(``autopar.cost_models.local.step``); without it, it prices them from a quick built-in measurement
(``CpuRates.quick``, a few seconds, cached beside the profile).
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from autopar.cost_models.local.profile import LocalProfile, default_profile_path

DEFAULT_NPROC = 4
LOW_PRECISION = ("bf16", "fp16")
DESCRIPTION = (
    "Measure linear-layer, attention and elementwise training ops, AdamW, memory bandwidth, per-op and "
    "DTensor overheads, how processes share the cores, the runtime's own machinery and gloo collectives "
    "over N local processes (one thread each), and write the profile the cost model uses for local "
    "clusters; within --seconds, one progress line per measurement on stderr. On a GPU: matmul by shape, "
    "SDPA and Triton attention, bandwidth and NCCL, written as a GPU profile and a cluster file.")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="measure this machine (matmul, memory, attention, gloo) for the cost model",
        description=DESCRIPTION)
    p.add_argument("--out", default=None, help=f"profile path (default {default_profile_path()})")
    p.add_argument("--nproc", type=int, default=None,
                   help=f"CPU: processes in the gloo group, groups of 2 and N are timed (default "
                        f"{DEFAULT_NPROC}); GPU: GPUs in the NCCL group (default all)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes, 30 s")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="time budget of the whole calibration, wall clock (default 80, quick 30); every "
                        "measurement gets a slot of it")
    p.add_argument("--emulate", action="append", default=[], choices=LOW_PRECISION, metavar="DTYPE",
                   help="treat DTYPE (bf16, fp16) as emulated by this CPU: measured briefly, as on a CPU "
                        "without native support (repeatable; also $AUTOPAR_EMULATED_DTYPES)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="what to measure: this CPU for local clusters, or the GPUs (matmul by shape, SDPA "
                        "and Triton attention, bandwidth, NCCL; writes a cluster file for `autopar plan "
                        "--cluster`); auto: cuda when a GPU is visible")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.seconds is not None and not 0 < args.seconds <= 3600:
        raise ValueError(f"--seconds {args.seconds:g} is invalid: expected a time budget in (0, 3600]")
    if device == "cuda":
        return run_gpu(args, console)
    import autopar.calibration as calibration  # torch.distributed: import on use

    nproc = DEFAULT_NPROC if args.nproc is None else args.nproc
    profile, path = calibration.calibrate(out=args.out, nproc=nproc, quick=args.quick,
                                          seconds=args.seconds, emulated=tuple(args.emulate))
    console.print(profile_table(profile))
    console.print(f"profile written to {path} ({profile.calibration_time_s:.1f} s); plans priced by it "
                  f"record: {profile.cpu.source}")
    warning = calibration.other_load_warning(profile)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    return 0


def _rate(value: float, unit: str) -> str:
    return f"{value / 1e9:,.1f} G{unit}"


def profile_table(profile: LocalProfile) -> Table:
    """The numbers the cost model takes from ``profile``, per process running alone."""
    table = Table(title=f"{profile.hostname}: {profile.num_cores} cores, torch {profile.torch_version}, "
                        f"one thread per process{' (quick)' if profile.quick else ''}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    best, cpu = dict(profile.best_matmul_flops_per_s), profile.cpu
    emulated = profile.measurements.get("emulated", {})
    points = profile.measurements.get("matmul", {})
    for dtype, peak in profile.peak_flops_per_s:
        probe_only = bool(points.get(dtype)) and all(p.get("warm") for p in points[dtype])
        note = (" (emulated: one warm matmul)" if dtype in emulated else
                " (one warm matmul: its shapes were too slow to fit)" if probe_only else "")
        table.add_row(f"matmul {dtype}: best measured / FITTED peak{note}",
                      f"{_rate(best[dtype], 'FLOP/s')} / {_rate(peak, 'FLOP/s')}")
    rows = "" if cpu.linear_token_tile_dim is None else f", rows {cpu.linear_token_tile_dim:.3g}"
    table.add_row("nn.Linear fwd+bwd curve FITTED: peak, roll-off T",
                  f"{_rate(cpu.linear_peak_flops_per_s, 'FLOP/s')}, {cpu.linear_tile_dim:.3g}{rows}")
    table.add_row("memory: large copy / elementwise",
                  f"{_rate(profile.memory_bandwidth_bytes_per_s, 'B/s')} / "
                  f"{_rate(profile.elementwise_bandwidth_bytes_per_s, 'B/s')}")
    table.add_row("per-op overhead: dispatch / fwd+bwd", f"{profile.op_overhead_s * 1e6:.2f} / "
                  f"{cpu.op_overhead_s * 1e6:.2f} µs")
    table.add_row("fused attention (SDPA fwd+bwd, fp32)", _rate(profile.attention_flops_per_s, "FLOP/s"))
    table.add_row("unfused attention fwd+bwd", f"{cpu.math_attention_s_per_score[1] * 1e9:.2f} ns/score")
    table.add_row("activation re-read FITTED", f"{cpu.activation_reread_s_per_byte * 1e12:.0f} ps/byte")
    table.add_row("AdamW: per parameter, per tensor", f"{cpu.optimizer_s_per_param * 1e9:.2f} ns, "
                  f"{cpu.optimizer_s_per_tensor * 1e6:.1f} µs")
    table.add_row("DTensor: per op, per AdamW tensor", f"{cpu.dtensor_dispatch_s * 1e6:.1f} µs, "
                  f"{cpu.dtensor_optimizer_s_per_tensor * 1e6:.1f} µs")
    table.add_row("runtime: per step, per microbatch", f"{cpu.runtime_step_s * 1e3:.2f} ms, "
                  f"{cpu.runtime_microbatch_s * 1e3:.2f} ms")
    for n, compute, copy in cpu.shares:
        table.add_row(f"share with {n} busy processes: compute, copy", f"{compute:.2f}, {copy:.2f}")
    speed = profile.measurements.get("environment", {}).get("machine_speed") or {}
    if speed:
        table.add_row("machine speed probe at start / end (GPT block + 64 MiB copy per s)",
                      " / ".join(f"{speed[k]:.1f}" if speed.get(k) else "–" for k in ("start", "end")))
    for fit in profile.links:
        table.add_row(f"gloo {fit.num_ranks} ranks FITTED: B, α (rms error)",
                      f"{_rate(fit.bandwidth_bytes_per_s, 'B/s')}, {fit.latency_s * 1e6:.0f} µs "
                      f"({100 * fit.rms_relative_error:.0f} %)")
    return table


def run_gpu(args: argparse.Namespace, console: Console) -> int:
    """``--device cuda``: the GPU calibration (``autopar.calibration.device``)."""
    import torch

    from autopar.calibration.device import GpuConfig, calibrate_gpu

    if args.emulate:
        raise ValueError("--emulate describes a CPU's dtypes; a GPU measures every dtype")
    nproc = torch.cuda.device_count() if args.nproc is None else args.nproc
    config = GpuConfig.preset(quick=args.quick, nproc=nproc, seconds=args.seconds)
    profile, path, cluster = calibrate_gpu(out=args.out, config=config)
    known = profile["catalog_name"] or "not in the catalog"
    table = Table(title=f"{profile['device_name']} × {profile['num_gpus']} ({known}), "
                        f"torch {profile['torch_version']}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    fits = profile["fits"]
    for dtype, peak in fits["matmul_peak_flops_per_s"].items():
        table.add_row(f"matmul {dtype}: best measured / FITTED peak",
                      f"{fits['best_matmul_flops_per_s'][dtype] / 1e12:,.1f} / {peak / 1e12:,.1f} TFLOP/s")
    for point in profile["measurements"]["attention"]:
        table.add_row(f"attention {point['kind']} seq {point['seq']}: fwd / fwd+bwd",
                      f"{point['forward_flops_per_s'] / 1e12:,.1f} / "
                      f"{point['train_flops_per_s'] / 1e12:,.1f} TFLOP/s")
    if fits["copy_bytes_per_s"]:
        table.add_row("copy bandwidth", f"{fits['copy_bytes_per_s'] / 1e9:,.0f} GB/s")
    nccl = fits["nccl"]
    table.add_row("NCCL FITTED: B, α", "not measured (one GPU)" if nccl is None else
                  f"{nccl['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s, {nccl['latency_s'] * 1e6:.1f} µs")
    console.print(table)
    console.print(f"GPU profile {profile['id']} written to {path} ({profile['calibration_time_s']:.1f} s)")
    if cluster is not None:
        console.print(f"plan with it: autopar plan MODEL --cluster {cluster} --batch N")
    else:
        console.print("[yellow]warning:[/] this GPU is not in autopar's catalog: no cluster file written")
    return 0
