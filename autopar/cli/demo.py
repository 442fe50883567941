"""``autopar demo``: capture and train a tiny GPT on this machine, printing the loss.

The main job of the README's Quick start. Data flow: zoo GPT → ``autopar.compile``
(one local process) → ``Compiled.step`` on a fixed batch, so the loss must fall.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console

from autopar import models
from autopar.cli.capture_cmd import layer_table, summary_table
from autopar.compile import compile as autopar_compile
from autopar.losses import cross_entropy


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="capture and train a tiny GPT on this machine")
    p.add_argument("--model", default="gpt-tiny", help="zoo model to train (default gpt-tiny)")
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    torch.manual_seed(args.seed)
    model = models.build(args.model)
    inputs, targets = models.example_batch(model, args.batch, seed=args.seed)
    compiled = autopar_compile(
        model, "local:1", optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3)
    )
    console.print(f"[bold]autopar demo[/]: training {args.model} on {compiled.cluster}")
    with torch.no_grad():
        reference = float(cross_entropy(model(inputs), targets))  # eager PyTorch, before step 1
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        losses.append(compiled.step(inputs, targets))
        if step == 0:
            console.print(summary_table(args.model, compiled.captured))
            console.print(layer_table(compiled.captured))
        console.print(f"step {step + 1:3d}  loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    verdict = "equal" if abs(reference - losses[0]) <= 1e-6 * max(1.0, abs(reference)) else "DIFFERENT"
    console.print(f"eager PyTorch loss before step 1: {reference:.6f} (autopar: {losses[0]:.6f}, {verdict})")
    console.print(f"loss {losses[0]:.4f} → {losses[-1]:.4f} in {args.steps} steps ({elapsed:.1f} s)")
    return 0
