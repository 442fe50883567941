"""``autopar demo``: train a small code GPT on the Python standard library on 4 local CPU processes.

The main job of the README's Quick start (``make demo``). Data flow: a
:class:`~autopar.train.TrainConfig` for the zoo's ``gpt-demo`` (4 layers, hidden 128, 4 heads,
128 positions) on the ``stdlib`` corpus (the running interpreter's standard-library source, split
into train and held-out by module; byte-level BPE of 4,096 tokens, trained and cached on the first
run) with nothing pinned → the trainer (``autopar.train``: :func:`autopar.cli.run_cmd.run_ranks`
spawns ``--nproc`` gloo ranks, each runs ``autopar.train.loop.run``: the planner chooses the plan,
each rank reads its rows, rank 0 prints the curve and, with ``report``, the measured step beside the
plan's predictions, time by phase and memory by category) → back here, from ``OUT/result.json`` and
``OUT/metrics.jsonl``: the plan the planner chose (the ``autopar show`` view), the loss curve, the
held-out loss before and after, tokens/s, MFU, predicted vs measured step time → the parity check:
the same initial model (``autopar.train.model.build_model``, same seed) trained here for the first
``PARITY_STEPS`` global batches (a one-rank ``TokenLoader`` reads the union of the ranks' rows in
the same order) with plain PyTorch — AdamW, the trainer's warm-up + cosine ``LambdaLR``,
``clip_grad_norm_``, fp32 — and its losses compared with the distributed run's.

With graph-pass options (``--random-ltd ...``, ``--moe ...``) the ranks train with the passes and
the reference trains ``autopar.transform``'s graph (the same parameters) with the pass schedules
at each step's number; MoE layers route each (data-parallel shard, microbatch) group alone, so the
reference runs the plan's dp × microbatches groups one after another.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console, Group
from rich.table import Table
from torch import fx, nn

from autopar.cli.pass_args import add_pass_arguments, passes_from_args
from autopar.cli.run_cmd import run_ranks
from autopar.passes import GraphPass, MoE
from autopar.plans import Plan
from autopar.train import checkpoints
from autopar.train.config import TrainConfig
from autopar.train.launch import COLLECTIVE_TIMEOUT_S, preflight, read_result, spawned_rank
from autopar.train.loop import TrainResult
from autopar.train.metrics import JSONL, read_rows

DEMO_MODEL = "gpt-demo"  # autopar/models/configs.py: 4 layers, hidden 128, 4 heads, 128 positions
DEMO_STEPS = 300  # about 2 minutes of training on 4 CPU processes sharing 2 busy cores
SEQ_LEN, VOCAB, BATCH, LR = 128, 4096, 16, 2e-3
PARITY_STEPS = 10
# fp32 on CPU: the pipelined program sums the same terms in another order (microbatch means, the
# gradient norm over stages); measured on the default demo (pp4, 2 microbatches) the first 10
# losses differ by at most 1.9e-6 at losses near 8, 2.4e-7 relative.
LOSS_RTOL = 1e-5
SPARK = "▁▂▃▄▅▆▇█"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="train a small code GPT on the standard library on 4 local CPU processes",
        description="Train a small GPT on the Python standard library's source on --nproc local CPU "
                    "processes with the plan autopar's planner chooses; print the loss curve, held-out "
                    "loss before and after, tokens/s, predicted vs measured time and memory, and check "
                    "that the first steps equal one-process training.")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default {DEMO_STEPS})")
    p.add_argument("--nproc", type=int, default=4, help="local processes (default 4)")
    p.add_argument("--out", help="output folder: metrics, checkpoint, result (default: a new temporary "
                                 "folder); must not hold an earlier run")
    p.add_argument("--corpus", default="stdlib",
                   help="folder of text or source files (default: stdlib, the Python standard library)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"global batch in sequences (default {BATCH})")
    p.add_argument("--seed", type=int, default=0)
    add_pass_arguments(p)
    p.set_defaults(run=run)


def demo_config(args: argparse.Namespace, out: str, passes: Sequence[GraphPass]) -> TrainConfig:
    """The trainer's configuration for the demo: nothing pinned, the planner chooses."""
    steps = args.steps
    return TrainConfig(model=DEMO_MODEL, corpus=args.corpus, out=out, nproc=args.nproc, steps=steps,
                       global_batch_size=args.batch, seq_len=SEQ_LEN, vocab_size=VOCAB, lr=LR,
                       warmup_steps=min(20, steps // 10), min_lr_ratio=0.1, eval_interval=max(1, steps // 6),
                       eval_batches=8, checkpoint_interval=steps, log_interval=max(1, steps // 15),
                       seed=args.seed, heldout_fraction=0.05, passes=tuple(passes), report=True)


def run(args: argparse.Namespace, console: Console) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for flag in ("nproc", "batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    passes = passes_from_args(args)
    if args.out and checkpoints.latest(Path(args.out)) is not None:
        raise ValueError(f"--out {args.out!r} already holds a training run; the demo trains from scratch: "
                         "pass a new folder (or leave --out out)")
    preflight(demo_config(args, args.out or "unused", passes))  # the corpus, the batch: before any folder
    out = args.out or tempfile.mkdtemp(prefix="autopar-demo-")
    config = demo_config(args, out, passes)
    corpus = "the Python standard library's source" if args.corpus == "stdlib" else f"{args.corpus!r}"
    with_passes = f" with passes {[p.name for p in passes]}" if passes else ""
    console.print(
        f"[bold]autopar demo[/]: trains {DEMO_MODEL} (4 layers, hidden 128, 4 heads, byte-level BPE of "
        f"{VOCAB:,} tokens) on {corpus} on {args.nproc} local CPU processes{with_passes}, {args.steps} steps "
        f"of {args.batch} × {SEQ_LEN} tokens, with the plan the planner chooses (nothing pinned); held-out "
        f"loss on modules it never trains on; then the measured step beside the plan's prediction, and the "
        f"first {min(PARITY_STEPS, args.steps)} steps re-run in one process with plain PyTorch. Output "
        f"in {out}", soft_wrap=True)
    start = time.perf_counter()
    run_ranks(spawned_rank, args.nproc, config.to_json(), timeout_s=COLLECTIVE_TIMEOUT_S,
              full_traceback=getattr(args, "debug", False))
    trained_s = time.perf_counter() - start
    result = read_result(config)
    _show_plan(result.plan, console)
    rows = read_rows(Path(out) / JSONL)
    console.print(_curve(result, rows))
    for line in _summary(result, trained_s):
        console.print(line, soft_wrap=True)
    equal = _parity(config, result, console)
    console.print(f"done in {time.perf_counter() - start:.0f} s · metrics in {Path(out) / JSONL}",
                  soft_wrap=True)
    return 0 if equal else 1


def _show_plan(plan: Plan, console: Console) -> None:
    """The plan the planner chose, as ``autopar show`` prints it: the summary, the stages and the
    alternatives it weighed (the predicted breakdown is in the measured report above)."""
    from autopar.views import build_view
    from autopar.views.text import alternatives_table, describe_config, header, passes_line, stage_table

    view = build_view(plan, timeline=False)
    chosen = describe_config(plan.parallelism, plan.schedule, plan.zero)
    console.print(f"\n[bold]the plan the planner chose[/]: {chosen}", soft_wrap=True)
    parts = [header(view), stage_table(view, width=console.width), alternatives_table(plan),
             passes_line(plan)]
    for part in parts:
        if part is not None:
            console.print(part)


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """``values`` as at most ``width`` block characters, each the mean of its bucket, low to high."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = []
    for i in range(buckets):
        part = values[i * len(values) // buckets:(i + 1) * len(values) // buckets]
        means.append(sum(part) / len(part))
    low, high = min(means), max(means)
    scale = (len(SPARK) - 1) / (high - low) if high > low else 0.0
    return "".join(SPARK[round((m - low) * scale)] for m in means)


def _curve(result: TrainResult, rows: list[dict[str, Any]]) -> Group:
    """The training loss as a sparkline (each character the mean of a few steps) and a table at the
    held-out evaluations."""
    losses = list(result.losses)
    line = f"\n[bold]training loss[/] {losses[0]:.2f} {sparkline(losses, width=40)} {losses[-1]:.2f}"
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1),
                  caption="train loss: mean over the steps since the previous row · held-out: modules "
                          "never trained on")
    for column in ("step", "train loss", "held-out loss", "tokens seen"):
        table.add_column(column, justify="right", no_wrap=True)
    before = result.eval_loss_before
    table.add_row("0", "–", "–" if before is None else f"{before:.3f}", "0")
    previous = result.first_step
    for row in rows:
        if "eval_loss" not in row:
            continue
        step = row["step"]
        window = losses[previous - result.first_step:step - result.first_step]
        mean = sum(window) / len(window) if window else row["loss"]
        table.add_row(str(step), f"{mean:.3f}", f"{row['eval_loss']:.3f}", f"{row['tokens']:,}")
        previous = step
    return Group(line, table)


def _summary(result: TrainResult, trained_s: float) -> list[str]:
    lines = []
    before, after = result.eval_loss_before, result.eval_loss_after
    if before is not None and after is not None:
        verdict = "falls" if after < before else "does NOT fall"
        lines.append(f"held-out loss {verdict}: {before:.3f} before training → {after:.3f} after "
                     f"{result.last_step} steps (mean nats per token on held-out modules)")
    if result.tokens_per_s:
        mfu = f" · MFU {100 * result.mfu:.1f}% (of the cost model's CPU peak)" if result.mfu else ""
        lines.append(f"throughput: {result.tokens_per_s:,.0f} tokens/s over all processes{mfu}")
    if result.measured_step_s and result.predicted_step_s:
        error = (result.predicted_step_s - result.measured_step_s) / result.measured_step_s
        lines.append(f"step time: measured {1e3 * result.measured_step_s:.0f} ms (median) · predicted "
                     f"{1e3 * result.predicted_step_s:.0f} ms ({error:+.0%})")
    lines.append(f"processes started, planned, trained, evaluated and measured in {trained_s:.0f} s")
    return lines


def _parity(config: TrainConfig, result: TrainResult, console: Console) -> bool:
    """The first steps trained again in this process with plain PyTorch; prints the parity line."""
    count = min(PARITY_STEPS, len(result.losses))
    if result.first_step != 0 or count == 0:
        console.print("parity check skipped: the run did not start at step 0")
        return True
    start = time.perf_counter()
    expected = reference_losses(config, result.plan, count)
    differences = [abs(a - b) for a, b in zip(result.losses[:count], expected, strict=True)]
    worst = max(differences)
    tolerance = LOSS_RTOL * max(1.0, max(abs(v) for v in expected))
    equal = worst <= tolerance
    how = "the transformed graph in plain PyTorch" if config.passes else "plain PyTorch"
    console.print(f"first {count} steps equal one process ({how}, same initial weights, same batches): max "
                  f"|Δloss| {worst:.1e} ({'equal' if equal else 'DIFFERENT'}, fp32 tolerance {LOSS_RTOL:g} "
                  f"relative; reference trained in {time.perf_counter() - start:.0f} s)", soft_wrap=True)
    if not equal:
        pairs = ", ".join(f"{a:.6f}/{b:.6f}" for a, b in zip(result.losses[:count], expected, strict=True))
        console.print(f"distributed/one-process losses: {pairs}", soft_wrap=True)
    return equal


def reference_losses(config: TrainConfig, plan: Plan, steps: int) -> list[float]:
    """The training losses of the first ``steps`` steps of ``config`` on one process, in plain PyTorch."""
    from autopar.data import Corpus, TokenLoader, stdlib_corpus, train_tokenizer
    from autopar.losses import cross_entropy
    from autopar.passes.moe import moe_aux_loss
    from autopar.runtime.pass_state import pass_runtimes
    from autopar.train.loop import lr_factor
    from autopar.train.model import build_model
    from autopar.transform import transform

    corpus = stdlib_corpus(heldout_fraction=config.heldout_fraction) if config.corpus == "stdlib" else \
        Corpus.from_folder(config.corpus, heldout_fraction=config.heldout_fraction)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size, cache_dir=config.cache_dir)
    built = build_model(config.model, vocab_size=tokenizer.vocab_size, seed=config.seed)
    # dp_degree 1: the whole global batch, which is the ranks' rows in rank order (tested)
    loader = TokenLoader(corpus, tokenizer, global_batch_size=config.global_batch_size,
                         seq_len=config.seq_len, seed=config.seed, max_seq_len=built.max_seq_len,
                         fim_rate=config.fim_rate, cache_dir=config.cache_dir)
    passes = config.graph_passes
    model: nn.Module = built.model
    if passes:
        model = transform(model, torch.zeros(config.global_batch_size, config.seq_len, dtype=torch.long),
                          passes=passes)
    groups = plan.parallelism.dp * plan.schedule.num_microbatches if any(isinstance(p, MoE) for p in passes) \
        else 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
    losses = []
    for step in range(steps):
        batch = next(loader)
        if isinstance(model, fx.GraphModule):
            for runtime in pass_runtimes(model, [p.name for p in passes]).values():
                runtime.set_step(step)
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for x, y in zip(batch.inputs.chunk(groups), batch.targets.chunk(groups), strict=True):
            loss = cross_entropy(model(x), y)
            parts.append(loss + moe_aux_loss(model) if isinstance(model, fx.GraphModule) else loss)
        loss = torch.stack(parts).mean()
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses

