"""``autopar capture MODEL``: capture a model and print what autopar sees.

Reads: ``autopar.model_source`` (MODEL → model + batch) → ``autopar.capture``.
Prints: totals, the repeated layers (identical runs folded into one row) and the
largest activations.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from autopar import fmt
from autopar.capture import Captured, capture
from autopar.model_source import resolve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("capture", help="capture a model and show its layers, FLOPs and activations")
    p.add_argument("model", help="zoo name (gpt3-175b), module:callable, or an HF config.json path")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example batch (default 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto")
    p.add_argument("--top", type=int, default=5, help="how many of the largest activations to list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    resolved = resolve(args.model, batch_size=args.batch, seq_len=args.seq)
    captured = capture(resolved.model, resolved.args, example_kwargs=resolved.kwargs,
                       frontend=args.frontend)
    console.print(summary_table(resolved.name, captured))
    console.print(layer_table(captured))
    console.print(activation_table(captured, args.top))
    for warning in captured.warnings:
        console.print(f"[yellow]note:[/] {warning}")
    return 0


def summary_table(name: str, captured: Captured) -> Table:
    table = Table(title=f"{name} ({captured.model_name}), captured by {captured.frontend} "
                        f"in {captured.capture_time_s:.2f} s", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{fmt.count(captured.param_count)} ({fmt.nbytes(captured.param_bytes)})")
    table.add_row("repeated layers", str(len(captured.layers)))
    table.add_row("graph nodes", str(len(captured.graph_module.graph.nodes)))
    table.add_row("forward FLOPs", fmt.flops(captured.flops_fwd))
    table.add_row("backward FLOPs", fmt.flops(captured.flops_bwd))
    table.add_row("FLOPs per step", fmt.flops(captured.flops_per_step))
    return table


def layer_table(captured: Captured) -> Table:
    """Layers, with runs of identical layers folded into one row."""
    table = Table(title="repeated layers")
    for column in ("layers", "stack", "parameters / layer", "fwd FLOPs / layer", "bwd FLOPs / layer"):
        table.add_column(column, justify="right" if "/" in column else "left")
    runs: list[list] = []
    for layer in captured.layers:
        key = (layer.stack, layer.param_count, layer.flops_fwd, layer.flops_bwd)
        if runs and runs[-1][0] == key and runs[-1][2] == layer.index - 1:
            runs[-1][2] = layer.index
        else:
            runs.append([key, layer.index, layer.index])
    for (stack, params, fwd, bwd), first, last in runs:
        span = str(first) if first == last else f"{first}–{last}"
        table.add_row(span, stack, fmt.count(params), fmt.flops(fwd), fmt.flops(bwd))
    return table


def activation_table(captured: Captured, k: int) -> Table:
    table = Table(title=f"largest activations (top {k})")
    for column in ("node", "module", "shape", "dtype", "bytes"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for node, record in captured.largest_activations(k):
        shape = " ".join("×".join(map(str, s)) for s in record.shapes)
        table.add_row(node.name, record.module_path or "<top>", shape, ",".join(record.dtypes),
                      fmt.nbytes(record.bytes_written))
    return table
