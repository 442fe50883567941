"""``autopar calibrate [--out PATH] [--nproc N] [--quick]``: measure this machine for the cost model.

Data flow: the CLI → :func:`autopar.calibration.calibrate` (single-process operations
and a gloo group of N processes) → a versioned JSON profile written atomically (default
``~/.cache/autopar/profile-<hostname>.json``) → printed here as one table. The cost model loads it
for ``local`` clusters (``autopar.cost_models.local.step``); without it, it uses placeholder rates.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from autopar.cost_models.local.profile import LocalProfile, default_profile_path

DEFAULT_NPROC = 4


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="measure this machine (matmul, memory, attention, gloo) for the cost model",
        description="Measure linear-layer, attention and elementwise training ops, AdamW, memory bandwidth, "
                    "per-op and DTensor overheads, how processes share the cores, the runtime's own "
                    "machinery and gloo collectives over N local processes (one thread each), and write the "
                    "profile the cost model uses for local clusters.")
    p.add_argument("--out", default=None, help=f"profile path (default {default_profile_path()})")
    p.add_argument("--nproc", type=int, default=DEFAULT_NPROC,
                   help=f"processes in the gloo group; groups of 2 and N are timed (default {DEFAULT_NPROC})")
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes: about half a minute")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    import autopar.calibration as calibration  # torch.distributed: import on use

    profile, path = calibration.calibrate(out=args.out, nproc=args.nproc, quick=args.quick)
    console.print(profile_table(profile))
    console.print(f"profile written to {path} ({profile.calibration_time_s:.1f} s)")
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
    for dtype, peak in profile.peak_flops_per_s:
        table.add_row(f"matmul {dtype}: best measured / FITTED peak", f"{_rate(best[dtype], 'FLOP/s')} / "
                      f"{_rate(peak, 'FLOP/s')}")
    table.add_row("nn.Linear fwd+bwd curve FITTED: peak, roll-off T",
                  f"{_rate(cpu.linear_peak_flops_per_s, 'FLOP/s')}, {cpu.linear_tile_dim:.3g}")
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
    for fit in profile.links:
        table.add_row(f"gloo {fit.num_ranks} ranks FITTED: B, α (rms error)",
                      f"{_rate(fit.bandwidth_bytes_per_s, 'B/s')}, {fit.latency_s * 1e6:.0f} µs "
                      f"({100 * fit.rms_relative_error:.0f} %)")
    return table
