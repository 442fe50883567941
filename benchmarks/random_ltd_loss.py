"""Random-LTD loss curve: a short training of a zoo GPT with and without token dropping.

Run: ``.venv/bin/python -m benchmarks.random_ltd_loss`` (about 4 minutes on one thread). Writes
``benchmarks/results/random_ltd_loss.{csv,json,md,png,svg}``.

Every case trains through ``autopar.compile(model, "local:1", ...)`` from the same initial weights
on the same batches, with AdamW and a warm-up + cosine learning-rate schedule. ``baseline``: no
passes. ``random_ltd``: ``passes=[RandomLTD(min_tokens=64, num_steps=200, granularity=16)]``
(layers 1–6 of 8 drop tokens; the schedule follows the compiled step counter and ends at step
200, after which every token is kept), the learning rate by step as in the baseline.
``random_ltd_token_lr``: the same pass, the learning rate driven by consumed layer-tokens
(``layer_token_lr_scheduler``: the baseline's schedule, with a step counted as the layer-tokens
of a full step), as DeepSpeed recommends for random-LTD. Corpus: character-level text generated in
code (:func:`corpus_text`: sentences from a small grammar in which names introduced earlier in a
story come back later, so context matters), deterministic under a seed; the held-out text uses
another seed. Reported: training loss per step, held-out loss (evaluation mode, every token kept)
every ``--eval-every`` steps, and consumed layer-tokens — none of these depends on timing. Wall time
is reported too, but it was taken on a machine shared with other jobs: indicative only.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import autopar
from autopar.losses import cross_entropy
from autopar.passes import RandomLTD
from autopar.passes.random_ltd import random_ltd_runtime
from autopar.passes.random_ltd.schedule import layer_token_lr_scheduler
from benchmarks.common import curve_figure, moving_average, save_figure
from benchmarks.common import environment as common_environment

RESULTS = Path(__file__).parent / "results"
NAME = "random_ltd_loss"
MODEL = dict(num_layers=8, hidden_size=128, num_heads=4, vocab_size=64, seq_len=256)
BATCH = 8
SCHEDULE = dict(min_tokens=64, num_steps=200, granularity=16)
LR, WARMUP_STEPS, MIN_LR_RATIO = 2e-3, 20, 0.1
CASES = ("baseline", "random_ltd", "random_ltd_token_lr")
LABELS = {"baseline": "no dropping", "random_ltd": "random-LTD, LR by step",
          "random_ltd_token_lr": "random-LTD, LR by layer-tokens"}
COLORS = {"baseline": "tab:blue", "random_ltd": "tab:orange", "random_ltd_token_lr": "tab:green"}

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
NOUNS = ("cat", "dog", "bird", "house", "river", "garden", "book", "letter", "boat", "tree")
ADJECTIVES = ("small", "old", "green", "quiet", "bright", "heavy", "cold", "happy")
VERBS = ("saw", "found", "painted", "carried", "wanted", "lost", "opened", "watched")
PLACES = ("in the garden", "near the river", "at home", "by the tree", "on the boat")


def corpus_text(num_chars: int, seed: int) -> str:
    """Stories: two people meet, do things with objects, and one thanks the other by name."""
    rng = random.Random(seed)
    parts: list[str] = []
    while sum(map(len, parts)) < num_chars:
        a, b = rng.sample(NAMES, 2)
        story = [f"{a} met {b} {rng.choice(PLACES)} ."]
        for _ in range(rng.randint(1, 3)):
            who = rng.choice((a, b))
            story.append(f"{who} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} .")
        story.append(f"then {b} thanked {a} and {a} smiled .")
        parts.append(" ".join(story) + "\n")
    return "".join(parts)[:num_chars]


def encode(text: str) -> torch.Tensor:
    """Character ids (the grammar's alphabet, fixed by its word lists)."""
    alphabet = sorted(set(corpus_text(20_000, seed=0)))
    assert len(alphabet) <= MODEL["vocab_size"] and set(text) <= set(alphabet), alphabet
    index = {ch: i for i, ch in enumerate(alphabet)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def batches(tokens: torch.Tensor, num_steps: int, *, seed: int) -> list[torch.Tensor]:
    """``num_steps`` batches of ``BATCH`` random windows of ``seq_len + 1`` tokens."""
    g = torch.Generator().manual_seed(seed)
    length = MODEL["seq_len"] + 1
    starts = torch.randint(0, len(tokens) - length, (num_steps, BATCH), generator=g)
    return [torch.stack([tokens[s:s + length] for s in row.tolist()]) for row in starts]


def _lr_factor(step: float, num_steps: int) -> float:
    """Linear warm-up over WARMUP_STEPS, then cosine to MIN_LR_RATIO at ``num_steps``."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, num_steps - WARMUP_STEPS)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def bench_case(case: str, train: list[torch.Tensor], held_out: torch.Tensor, eval_every: int
               ) -> dict[str, Any]:
    torch.manual_seed(0)
    model = autopar.models.build("gpt", **MODEL)
    passes = [RandomLTD(**SCHEDULE)] if case != "baseline" else []
    compiled = autopar.compile(model, "local:1", passes=passes,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.01))
    num_steps = len(train)
    every_token = MODEL["num_layers"] * BATCH * MODEL["seq_len"]
    if case == "random_ltd_token_lr":
        scheduler = layer_token_lr_scheduler(
            compiled.optimizer, lambda: compiled.consumed_layer_tokens or 0, warmup_layer_tokens=0,
            total_layer_tokens=num_steps * every_token,
            factor=lambda t: _lr_factor(t / every_token, num_steps))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(compiled.optimizer, lambda s: _lr_factor(s, num_steps))
    rows, consumed = [], 0
    for step, batch in enumerate(train):
        start = time.perf_counter()
        loss = compiled.step(batch[:, :-1], batch[:, 1:])
        step_s = time.perf_counter() - start
        scheduler.step()
        kept = _kept(compiled, batch[:, :-1])
        consumed = compiled.consumed_layer_tokens if passes else consumed + every_token
        row = {"step": step, "loss": loss, "kept_tokens": kept, "layer_tokens": consumed, "step_s": step_s,
               "lr": compiled.optimizer.param_groups[0]["lr"]}
        if (step + 1) % eval_every == 0 or step + 1 == num_steps:
            row["held_out_loss"] = _held_out_loss(compiled, held_out)
        rows.append(row)
    assert compiled.passes_applied == tuple(p.name for p in passes)
    return {"case": case, "passes": [repr(p) for p in passes], "rows": rows}


def _kept(compiled: Any, inputs: torch.Tensor) -> int:
    """Tokens the dropping layers kept in the step just taken (the full length without the pass)."""
    runtime = random_ltd_runtime(compiled.captured_for(inputs).graph_module)
    return min(runtime.last_kept.values()) if runtime is not None else MODEL["seq_len"]


def _held_out_loss(compiled: Any, held_out: torch.Tensor) -> float:
    compiled.eval()  # random-LTD keeps every token in evaluation
    with torch.no_grad():
        loss = float(cross_entropy(compiled(held_out[:, :-1]), held_out[:, 1:]))
    compiled.train()
    return loss


def summarize(case: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    rows, base = case["rows"], baseline["rows"]
    held = [r for r in rows if "held_out_loss" in r]
    total, base_total = rows[-1]["layer_tokens"], base[-1]["layer_tokens"]
    matched = next(r for r in base if r["layer_tokens"] >= total)  # baseline after as many layer-tokens
    base_held = [r for r in base if "held_out_loss" in r]
    rise, rise_step = max((b["loss"] - a["loss"], b["step"]) for a, b in itertools.pairwise(rows))
    return {
        "case": case["case"], "passes": case["passes"], "num_steps": len(rows),
        "train_loss_last_20_mean": statistics.mean(r["loss"] for r in rows[-20:]),
        "held_out_loss_final": held[-1]["held_out_loss"],
        "layer_tokens": total, "layer_tokens_saved_vs_baseline": 1 - total / base_total,
        "baseline_step_at_same_layer_tokens": matched["step"],
        "baseline_held_out_loss_at_same_layer_tokens": _interpolate(
            [r["layer_tokens"] for r in base_held], [r["held_out_loss"] for r in base_held], total),
        "lr_end": rows[-1]["lr"],
        "largest_loss_rise": rise, "largest_loss_rise_step": rise_step,
        "median_step_s_under_load": statistics.median(r["step_s"] for r in rows),
        "train_s_under_load": sum(r["step_s"] for r in rows),
    }


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """``y`` at ``x``, linear between the points around it (clamped at the ends)."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def environment() -> dict[str, Any]:
    return common_environment(mark_uncommitted=True) | {
        "threads": torch.get_num_threads(), "model": MODEL, "batch": BATCH, "schedule": SCHEDULE, "lr": LR,
        "warmup_steps": WARMUP_STEPS, "load_average_before": _load()}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write(cases: dict[str, dict[str, Any]], summaries: list[dict[str, Any]], env: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {"environment": env, "cases": summaries,
               "curves": {name: case["rows"] for name, case in cases.items()}}
    (RESULTS / f"{NAME}.json").write_text(json.dumps(payload, indent=1) + "\n")
    with open(RESULTS / f"{NAME}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ("loss", "held_out_loss", "kept_tokens", "layer_tokens", "lr", "step_s")
        writer.writerow(["step"] + [f"{c}_{name}" for name in CASES for c in columns])
        for i, rows in enumerate(zip(*(cases[name]["rows"] for name in CASES), strict=True)):
            writer.writerow([i] + [_cell(row.get(c)) for row in rows for c in columns])
    (RESULTS / f"{NAME}.md").write_text("\n".join(_markdown(summaries, env)) + "\n")
    plot(cases)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.5f}" if isinstance(value, float) else str(value)


def _markdown(summaries: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    base = summaries[0]
    schedule = ", ".join(f"{k}={v}" for k, v in env["schedule"].items())
    lines = [
        f"# random-LTD loss curve ({env['cores']} cores, {env['threads']} thread, torch {env['torch']}, "
        f"commit {env['autopar_commit']})", "",
        f"Command: `.venv/bin/python -m benchmarks.random_ltd_loss`. Zoo GPT {env['model']}, batch "
        f"{env['batch']}, AdamW lr {env['lr']} (warm-up {env['warmup_steps']} steps, cosine to 10 %), fp32, "
        f"{base['num_steps']} steps on generated character-level stories; every case from the same weights "
        "on the same batches, through `autopar.compile(model, 'local:1', passes=...)`. random-LTD: "
        f"`RandomLTD({schedule})` on layers 1–6 of 8 (kept tokens per sample grow from "
        f"{env['schedule']['min_tokens']} to {env['model']['seq_len']} by step "
        f"{env['schedule']['num_steps']}), "
        "with the learning rate by step (as the baseline) or by consumed layer-tokens "
        "(`layer_token_lr_scheduler`). Held-out loss: evaluation mode, every token kept.", "",
        "| case | train loss (last 20 steps) | held-out loss (end) | layer-tokens | saved | "
        "baseline held-out loss at as many layer-tokens | lr at end | largest one-step loss rise | "
        "wall s (under load) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        at_same = "" if s is base else f"{s['baseline_held_out_loss_at_same_layer_tokens']:.4f} " \
            f"(step {s['baseline_step_at_same_layer_tokens']})"
        lines.append(f"| {LABELS[s['case']]} | {s['train_loss_last_20_mean']:.4f} | "
                     f"{s['held_out_loss_final']:.4f} | {s['layer_tokens']:.4e} | "
                     f"{s['layer_tokens_saved_vs_baseline']:.1%} | {at_same} | {s['lr_end']:.2e} | "
                     f"{s['largest_loss_rise']:+.2f} (step {s['largest_loss_rise_step']}) | "
                     f"{s['train_s_under_load']:.0f} |")
    lines += [
        "", "Baseline held-out loss at as many layer-tokens: interpolated between its evaluations, at the "
        "layer-tokens the random-LTD case consumed in all.", "",
        "Reading it: one seed, one small model, a short run. The layer-token learning-rate schedule "
        "counts a dropping step as less than a full one, so it warms up and decays more slowly than the "
        "step schedule (its learning rate at the end is in the table): part of its difference from the "
        "baseline may come from that schedule rather than from dropping tokens; a baseline with the "
        "same learning-rate trajectory was not run. The largest one-step loss rise shows loss spikes.", "",
        "Wall times were taken on a machine shared with other jobs (load average "
        f"{env['load_average_before']} before, {env['load_average_after']} after) and are indicative only; "
        "the loss and layer-token columns do not depend on timing. Curves: `random_ltd_loss.csv`; plot: "
        "`random_ltd_loss.png` / `.svg`.",
    ]
    return lines


def plot(cases: dict[str, dict[str, Any]]) -> None:
    fig, axes = curve_figure(3, width_in=16)
    for name in CASES:
        rows = cases[name]["rows"]
        steps = [r["step"] for r in rows]
        tokens = [r["layer_tokens"] for r in rows]
        losses = [r["loss"] for r in rows]
        smooth = moving_average(losses, 10)
        axes[0].plot(steps, losses, color=COLORS[name], alpha=0.15, linewidth=0.8)
        axes[0].plot(steps, smooth, color=COLORS[name], label=LABELS[name])
        axes[1].plot(tokens, smooth, color=COLORS[name], label=LABELS[name])
        held = [r for r in rows if "held_out_loss" in r]
        axes[2].plot([r["layer_tokens"] for r in held], [r["held_out_loss"] for r in held], marker="o",
                     markersize=3, color=COLORS[name], label=LABELS[name])
    kept = axes[0].twinx()
    ltd = cases["random_ltd"]["rows"]
    kept.step([r["step"] for r in ltd], [r["kept_tokens"] for r in ltd], color="tab:gray", linewidth=0.8,
              where="post", label="kept tokens (random-LTD)")
    kept.set_ylabel("kept tokens per sample, layers 1–6")
    kept.set_ylim(0, MODEL["seq_len"] * 1.05)
    axes[0].set(xlabel="step", ylabel="training loss (10-step mean)", title="training loss per step")
    axes[1].set(xlabel="consumed layer-tokens", ylabel="training loss (10-step mean)",
                title="training loss per layer-token")
    axes[2].set(xlabel="consumed layer-tokens", ylabel="held-out loss (all tokens)", title="held-out loss")
    kept.legend(loc="center right", fontsize=8)
    save_figure(fig, axes, name=NAME, title=f"random-LTD {SCHEDULE} vs no dropping · zoo GPT "
                f"{MODEL['num_layers']} layers, s={MODEL['seq_len']}, batch {BATCH}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two OpenMP threads "
                             "contend with other jobs and run many times slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    tokens, held = encode(corpus_text(400_000, seed=0)), encode(corpus_text(20_000, seed=1))
    train = batches(tokens, args.steps, seed=2)
    held_out = torch.stack(batches(held, 2, seed=3)).flatten(0, 1)
    cases = {name: bench_case(name, train, held_out, args.eval_every) for name in CASES}
    env["load_average_after"] = _load()
    summaries = [summarize(cases[name], cases["baseline"]) for name in CASES]
    write(cases, summaries, env)
    print((RESULTS / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
