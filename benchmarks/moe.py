"""MoE by sparse upcycling on CPU: an upcycled zoo GPT (8 experts, top-1 and top-2, every other
layer) beside its dense parent — step time, parameters, FLOPs per token and a short training.

Run: ``.venv/bin/python -m benchmarks.moe`` (about 2–3 minutes on 2 cores). Writes
``benchmarks/results/moe.{json,md,csv,png,svg}``.

Setup: a zoo GPT (``MODEL``) is pre-trained dense for ``--pretrain-steps`` steps through
``autopar.compile``; its ``compiled.state_dict()`` is loaded into three fresh compiled models before
their first capture — ``dense`` (no passes), ``moe_top1`` (``MoE(num_experts=8, top_k=1)``) and
``moe_top2`` (``MoE(num_experts=8, top_k=2)``), MoE on layers 1 and 3 (every other), capacity
factor 1.25 — so the MoE pass upcycles the pre-trained MLPs (experts = copies, routers fresh).
Each continues for ``--train-steps`` steps with a fresh AdamW (same learning rate) on the same
batches (character-level stories, ``benchmarks.random_ltd_loss.corpus_text``).

Measured, per case:

- **step time**: ``compiled.step`` median over the timed steps after warm-up; the cases alternate in
  rounds so that load drifts hit all three. One torch thread (``--threads``).
- **parameters**: total = unique parameters the compiled model trains (``named_model_parameters``,
  embeddings included, tied ones once); active per token = total − Σ over MoE layers of
  ``(E − k) × one expert``: the router and the k experts a token is routed to (a dropped assignment
  computes less).
- **FLOPs per token**: Σ ``flops_fwd + flops_bwd`` of the capture's node annotations / tokens of the
  batch; an MoE node counts k experts and the router (assignments dropped over capacity included).
- **training**: loss per step (for MoE: cross-entropy + the auxiliary losses, both also recorded
  apart), the step-0 difference to the dense model split into cross-entropy (tokens dropped over
  capacity change the function) and auxiliary loss, dropped assignments, held-out cross-entropy
  every ``--eval-every`` steps (evaluation mode: capacity factor 2.0).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import autopar
from autopar.capture import META_KEY
from autopar.losses import cross_entropy
from autopar.passes import MoE
from autopar.passes.moe import moe_aux_loss
from benchmarks.common import curve_figure, moving_average, save_figure, write_results
from benchmarks.common import environment as common_environment
from benchmarks.random_ltd_loss import corpus_text, encode

RESULTS = Path(__file__).parent / "results"
NAME = "moe"
MODEL = dict(num_layers=4, hidden_size=256, num_heads=4, vocab_size=64, seq_len=128)
BATCH = 8
LR, WARMUP_STEPS = 1e-3, 10
NUM_EXPERTS = 8
CASES = {"dense": None, "moe_top1": MoE(num_experts=NUM_EXPERTS, top_k=1),
         "moe_top2": MoE(num_experts=NUM_EXPERTS, top_k=2)}
LABELS = {"dense": "dense parent", "moe_top1": "upcycled, 8 experts, top-1",
          "moe_top2": "upcycled, 8 experts, top-2"}
COLORS = {"dense": "tab:blue", "moe_top1": "tab:orange", "moe_top2": "tab:green"}


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def batches(tokens: torch.Tensor, num_steps: int, *, seed: int) -> list[torch.Tensor]:
    """``num_steps`` batches of ``BATCH`` random windows of ``seq_len + 1`` tokens."""
    g = torch.Generator().manual_seed(seed)
    length = MODEL["seq_len"] + 1
    starts = torch.randint(0, len(tokens) - length, (num_steps, BATCH), generator=g)
    return [torch.stack([tokens[s:s + length] for s in row.tolist()]) for row in starts]


def _warmup(compiled: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over WARMUP_STEPS (a fresh AdamW's first steps are otherwise full-size)."""
    return torch.optim.lr_scheduler.LambdaLR(compiled.optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))


def pretrain(train: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense parent after ``len(train)`` steps: its compiled state dict."""
    torch.manual_seed(0)
    compiled = autopar.compile(autopar.models.build("gpt", **MODEL), "local:1", optimizer=_optimizer)
    scheduler = _warmup(compiled)
    for batch in train:
        compiled.step(batch[:, :-1], batch[:, 1:])
        scheduler.step()
    return {k: v.detach().clone() for k, v in compiled.state_dict().items()}


def compiled_case(case: str, parent: dict[str, torch.Tensor], inputs: torch.Tensor,
                  config: MoE | None = None) -> Any:
    """A fresh compiled model of ``case`` holding the parent's weights, captured for ``inputs``
    (the MoE pass upcycles the parent's MLPs; the optimizer, built after, holds the MoE layers)."""
    torch.manual_seed(0)
    config = config or CASES[case]
    compiled = autopar.compile(autopar.models.build("gpt", **MODEL), "local:1", optimizer=_optimizer,
                               passes=[config] if config else [])
    compiled.load_state_dict(parent)
    compiled.captured_for(inputs)
    return compiled


def step0_without_dropping(parent: dict[str, torch.Tensor], batch: torch.Tensor) -> dict[str, Any]:
    """First-step loss of the upcycled models with capacity for every assignment (factor E / k) minus
    the dense loss, and their auxiliary loss: equal up to fp32 rounding when upcycling is exact."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    dense = compiled_case("dense", parent, inputs).step(inputs, targets)
    result = {}
    for case, config in CASES.items():
        if config is None:
            continue
        factor = config.num_experts / config.top_k
        no_drop = dataclasses.replace(config, capacity_factor=factor, eval_capacity_factor=factor)
        compiled = compiled_case(case, parent, inputs, no_drop)
        loss = compiled.step(inputs, targets)
        aux = float(moe_aux_loss(compiled.captured_for(inputs).graph_module).detach())
        dropped = sum(s.dropped_assignments for s in compiled.moe_stats().values() if s is not None)
        result[case] = {"loss_minus_dense": loss - dense, "aux_loss": aux,
                        "cross_entropy_minus_dense": loss - aux - dense, "dropped_assignments": dropped}
    return result


def sizes(compiled: Any, inputs: torch.Tensor) -> dict[str, Any]:
    """Total and active parameters, and annotated FLOPs per token, of the capture for ``inputs``."""
    gm = compiled.captured_for(inputs).graph_module
    total = sum(p.numel() for p in gm.parameters())  # the transformed graph's (not the idle dense MLPs)
    inactive = sum((m.num_experts - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
                   for m in compiled.moe.values())
    flops = sum(n.meta[META_KEY].flops_fwd + n.meta[META_KEY].flops_bwd for n in gm.graph.nodes
                if META_KEY in n.meta)
    tokens = inputs.numel()
    return {"params_total": total, "params_active_per_token": total - inactive,
            "flops_per_token": flops / tokens, "moe_layers": sorted(int(k) for k in compiled.moe)}


def bench_step_time(parent: dict[str, torch.Tensor], batch: torch.Tensor, warmup: int, rounds: int,
                    steps: int, configs: dict[str, MoE | None] | None = None) -> dict[str, dict[str, Any]]:
    """Median step time of each case (``configs``: name → MoE config, None for the dense parent;
    default :data:`CASES`), timed in alternating rounds, with its parameters and FLOPs per token."""
    configs = CASES if configs is None else configs
    inputs, targets = batch[:, :-1], batch[:, 1:]
    models = {case: compiled_case(case, parent, inputs, config) for case, config in configs.items()}
    times: dict[str, list[float]] = {case: [] for case in configs}
    dropped: dict[str, list[float]] = {case: [] for case in configs}
    for compiled in models.values():
        for _ in range(warmup):
            compiled.step(inputs, targets)
    for _ in range(rounds):
        for case, compiled in models.items():
            for _ in range(steps):
                start = time.perf_counter()
                loss = compiled.step(inputs, targets)
                times[case].append(time.perf_counter() - start)
                row = _moe_row(compiled, inputs, loss)
                dropped[case].append(row["dropped_assignments"] / max(row["assignments"], 1))
    return {case: {"step_s_median": statistics.median(times[case]), "step_s_min": min(times[case]),
                   "num_timed_steps": len(times[case]),
                   "dropped_fraction_timed": statistics.mean(dropped[case]), **sizes(models[case], inputs)}
            for case in configs}


def moe_vs_dense(*, num_experts: int, top_k: int, warmup: int = 2, rounds: int = 3, steps: int = 2
                 ) -> dict[str, Any]:
    """One sweep row (``autopar sweep --suite passes``): an untrained zoo GPT (:data:`MODEL`)
    upcycled with ``num_experts`` experts and top-``top_k`` on every other layer against the same
    dense model on one batch of random tokens: step time, parameters, FLOPs per token, drops."""
    torch.manual_seed(0)
    parent = autopar.compile(autopar.models.build("gpt", **MODEL), "local:1").state_dict()
    batch = torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["seq_len"] + 1),
                          generator=torch.Generator().manual_seed(1))
    config = MoE(num_experts=num_experts, top_k=top_k)
    result = bench_step_time(parent, batch, warmup, rounds, steps, {"dense": None, "moe": config})
    dense, moe = result["dense"], result["moe"]
    return {"num_experts": num_experts, "top_k": top_k, "dense_step_s": dense["step_s_median"],
            "moe_step_s": moe["step_s_median"], "step_ratio": moe["step_s_median"] / dense["step_s_median"],
            "dense_params": dense["params_total"], "moe_params": moe["params_total"],
            "moe_active_params": moe["params_active_per_token"],
            "dense_flops_per_token": dense["flops_per_token"], "moe_flops_per_token": moe["flops_per_token"],
            "flops_ratio": moe["flops_per_token"] / dense["flops_per_token"],
            "dropped_fraction": moe["dropped_fraction_timed"]}


def bench_training(case: str, parent: dict[str, torch.Tensor], train: list[torch.Tensor],
                   held_out: torch.Tensor, eval_every: int) -> tuple[list[dict[str, Any]], float]:
    """Per-step rows of ``len(train)`` steps from the parent, and the held-out loss before them."""
    compiled = compiled_case(case, parent, train[0][:, :-1])
    scheduler = _warmup(compiled)
    rows: list[dict[str, Any]] = [{"step": -1, "held_out_loss": _held_out_loss(compiled, held_out)}]
    for step, batch in enumerate(train):
        loss = compiled.step(batch[:, :-1], batch[:, 1:])
        scheduler.step()
        row = {"step": step, "loss": loss, **_moe_row(compiled, batch[:, :-1], loss)}
        if (step + 1) % eval_every == 0 or step + 1 == len(train):
            row["held_out_loss"] = _held_out_loss(compiled, held_out)
        rows.append(row)
    return rows[1:], rows[0]["held_out_loss"]


def _moe_row(compiled: Any, inputs: torch.Tensor, loss: float) -> dict[str, Any]:
    """The step's loss split into cross-entropy and auxiliary loss, and its MoE layers' loads."""
    layers = list(compiled.moe.values())
    aux = float(moe_aux_loss(compiled.captured_for(inputs).graph_module).detach()) if layers else 0.0
    stats = [compiled.moe_stats()[m.layer] for m in layers]
    loads = [max(s.tokens_per_expert) * len(s.tokens_per_expert) / max(sum(s.tokens_per_expert), 1)
             for s in stats]
    return {"cross_entropy": loss - aux, "aux_loss": aux,
            "dropped_assignments": sum(s.dropped_assignments for s in stats),
            "assignments": sum(s.tokens * m.top_k for s, m in zip(stats, layers, strict=True)),
            "dropped_tokens": sum(s.dropped_tokens for s in stats),
            "max_load_over_mean": max(loads, default=1.0)}


def _held_out_loss(compiled: Any, held_out: torch.Tensor) -> float:
    compiled.eval()
    with torch.no_grad():
        loss = float(cross_entropy(compiled(held_out[:, :-1]), held_out[:, 1:]))
    compiled.train()
    return loss


def summarize(case: str, rows: list[dict[str, Any]], dense: list[dict[str, Any]], held_before: float
              ) -> dict[str, Any]:
    held = [r for r in rows if "held_out_loss" in r]
    assignments = sum(r["assignments"] for r in rows)
    return {
        "case": case, "config": repr(CASES[case]) if CASES[case] else "none",
        "step0_loss": rows[0]["loss"], "step0_loss_minus_dense": rows[0]["loss"] - dense[0]["loss"],
        "step0_cross_entropy_minus_dense": rows[0]["cross_entropy"] - dense[0]["cross_entropy"],
        "step0_aux_loss": rows[0]["aux_loss"], "step0_dropped_assignments": rows[0]["dropped_assignments"],
        "step0_assignments": rows[0]["assignments"],
        "dropped_assignment_fraction": sum(r["dropped_assignments"] for r in rows) / assignments
        if assignments else 0.0,
        "train_loss_last_10_mean": statistics.mean(r["loss"] for r in rows[-10:]),
        "cross_entropy_last_10_mean": statistics.mean(r["cross_entropy"] for r in rows[-10:]),
        "held_out_loss_before": held_before, "held_out_loss_final": held[-1]["held_out_loss"],
        "max_load_over_mean_last_step": rows[-1]["max_load_over_mean"],
    }


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return common_environment(mark_uncommitted=True) | {
        "threads": torch.get_num_threads(), "model": MODEL, "batch": BATCH, "lr": LR,
        "pretrain_steps": args.pretrain_steps, "train_steps": args.train_steps,
        "load_average_before": _load()}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _markdown(step: dict[str, dict[str, Any]], exact: dict[str, dict[str, Any]],
              summaries: list[dict[str, Any]], env: dict[str, Any], curves: dict[str, list[dict[str, Any]]]
              ) -> str:
    lines = [
        f"# MoE by sparse upcycling on CPU ({env['cores']} cores, {env['threads']} thread, torch "
        f"{env['torch']}, commit {env['autopar_commit']})", "",
        f"Command: `.venv/bin/python -m benchmarks.moe`. Zoo GPT {env['model']}, batch {env['batch']}, fp32, "
        f"AdamW lr {env['lr']} ({WARMUP_STEPS} warm-up steps in each phase). Dense parent pre-trained "
        f"{env['pretrain_steps']} steps, then each case continues {env['train_steps']} steps from it on the "
        "same batches. MoE: 8 experts on layers 1 and 3 (every other), capacity factor 1.25 (eval 2.0), aux "
        f"0.01 · balance + 0.001 · z. Load average {env['load_average_before']} before, "
        f"{env['load_average_after']} after (the machine is shared); wall time {env['wall_s']} s.", "",
    ]
    return "\n".join(lines + _step_lines(step) + _exact_lines(exact) + _training_lines(summaries, curves))


def _step_lines(step: dict[str, dict[str, Any]]) -> list[str]:
    dense = step["dense"]
    lines = ["## Step time, parameters, FLOPs", "",
             "| case | step s (median) | min s | × dense | params total | active params / token | "
             "FLOPs / token (fwd+bwd) | × dense | dropped assignments |", "|---" * 9 + "|"]
    for case, row in step.items():
        lines.append(
            f"| {LABELS[case]} | {row['step_s_median']:.4f} | {row['step_s_min']:.4f} | "
            f"{row['step_s_median'] / dense['step_s_median']:.2f} | {row['params_total'] / 1e6:.3f} M | "
            f"{row['params_active_per_token'] / 1e6:.3f} M | {row['flops_per_token'] / 1e6:.2f} M | "
            f"{row['flops_per_token'] / dense['flops_per_token']:.2f} | "
            f"{row['dropped_fraction_timed']:.1%} |")
    return lines + [
        "", f"Median over {dense['num_timed_steps']} timed steps per case (alternating rounds, after "
        "warm-up). FLOPs from the capture's node annotations (an MoE node: k experts + router); "
        "parameters: unique trained parameters, embeddings included. Dropped assignments (mean over the "
        "timed steps) are computed by no expert: they make an MoE step cheaper than its FLOP count.", ""]


def _exact_lines(exact: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Step 0 without dropping (capacity factor E / k)", "",
             "| case | loss − dense loss | aux loss | CE − dense CE | dropped |", "|---|---|---|---|---|"]
    for case, r in exact.items():
        lines.append(f"| {LABELS[case]} | {r['loss_minus_dense']:+.6f} | {r['aux_loss']:.6f} | "
                     f"{r['cross_entropy_minus_dense']:+.2e} | {r['dropped_assignments']} |")
    return lines + [
        "", "With room for every assignment the upcycled model computes the dense function: its first-step "
        "loss differs from the dense parent's by the auxiliary loss alone (the CE difference is fp32 "
        "rounding).", ""]


def _training_lines(summaries: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["## Training from the dense parent (capacity factor 1.25)", "",
             "| case | step-0 loss | Δ vs dense | of which aux | of which CE | dropped at step 0 | "
             "dropped, all steps | train loss, last 10 | of which CE | held-out CE before → after | "
             "max/mean load, last step |", "|---" * 11 + "|"]
    for s in summaries:
        dropped0 = (f"{s['step0_dropped_assignments']} / {s['step0_assignments']}" if s["step0_assignments"]
                    else "–")
        lines.append(
            f"| {LABELS[s['case']]} | {s['step0_loss']:.4f} | {s['step0_loss_minus_dense']:+.4f} | "
            f"{s['step0_aux_loss']:.4f} | {s['step0_cross_entropy_minus_dense']:+.4f} | {dropped0} | "
            f"{s['dropped_assignment_fraction']:.1%} | {s['train_loss_last_10_mean']:.4f} | "
            f"{s['cross_entropy_last_10_mean']:.4f} | "
            f"{s['held_out_loss_before']:.4f} → {s['held_out_loss_final']:.4f} | "
            f"{s['max_load_over_mean_last_step']:.2f} |")
    num_steps = len(curves["dense"])
    marks = sorted({0, 1, 5, 10, 25, 50, num_steps - 1} & set(range(num_steps)))
    lines += ["", "Training loss (MoE: cross-entropy + aux) at steps:", "",
              "| case | " + " | ".join(str(m) for m in marks) + " |", "|---" * (len(marks) + 1) + "|"]
    for case, rows in curves.items():
        lines.append(f"| {LABELS[case]} | " + " | ".join(f"{rows[m]['loss']:.4f}" for m in marks) + " |")
    return lines + [
        "", "Δ vs dense at step 0 = aux loss + a cross-entropy change: assignments over an expert's capacity "
        "are dropped (the token keeps its residual only), so the upcycled model is not the dense function. "
        "Curves: `moe.csv`; plot: `moe.png` / `.svg`."]


def write_csv(curves: dict[str, list[dict[str, Any]]]) -> None:
    with open(RESULTS / f"{NAME}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ("loss", "cross_entropy", "aux_loss", "dropped_assignments", "held_out_loss")
        writer.writerow(["step", *(f"{c}_{case}" for case in curves for c in columns)])
        for i in range(len(curves["dense"])):
            cells = [curves[case][i].get(c, "") for case in curves for c in columns]
            writer.writerow([i, *(f"{v:.5f}" if isinstance(v, float) else v for v in cells)])


def plot(curves: dict[str, list[dict[str, Any]]], summaries: list[dict[str, Any]]) -> None:
    fig, axes = curve_figure(2, width_in=12)
    for case, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], color=COLORS[case], alpha=0.25, linewidth=0.8)
        axes[0].plot(steps, moving_average([r["loss"] for r in rows], 10), color=COLORS[case],
                     label=LABELS[case])
        before = next(s["held_out_loss_before"] for s in summaries if s["case"] == case)
        held = [(0, before)] + [(r["step"] + 1, r["held_out_loss"]) for r in rows if "held_out_loss" in r]
        axes[1].plot(*zip(*held, strict=True), marker="o", markersize=3, color=COLORS[case],
                     label=LABELS[case])
    axes[0].set(xlabel="step after upcycling", ylabel="training loss (MoE: CE + aux; 10-step mean)",
                title="training loss")
    axes[1].set(xlabel="steps taken after upcycling", ylabel="held-out cross-entropy (eval mode)",
                title="held-out loss")
    title = (f"sparse upcycling of a pre-trained zoo GPT ({MODEL['num_layers']} layers, "
             f"h={MODEL['hidden_size']}, s={MODEL['seq_len']}, batch {BATCH}): MoE on layers 1 and 3")
    save_figure(fig, axes, title=title, name=NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    env = environment(args)
    tokens, held = encode(corpus_text(400_000, seed=0)), encode(corpus_text(20_000, seed=1))
    parent = pretrain(batches(tokens, args.pretrain_steps, seed=2))
    train = batches(tokens, args.train_steps, seed=4)
    held_out = torch.stack(batches(held, 2, seed=3)).flatten(0, 1)
    exact = step0_without_dropping(parent, train[0])
    step = bench_step_time(parent, train[0], args.warmup, args.rounds, args.steps)
    results = {case: bench_training(case, parent, train, held_out, args.eval_every) for case in CASES}
    curves = {case: rows for case, (rows, _) in results.items()}
    summaries = [summarize(case, rows, curves["dense"], before) for case, (rows, before) in results.items()]
    env["load_average_after"] = _load()
    env["wall_s"] = round(time.perf_counter() - started, 1)
    payload = {"environment": env, "step_time": step, "step0_without_dropping": exact, "training": summaries,
               "curves": curves}
    write_results(NAME, payload, _markdown(step, exact, summaries, env, curves))
    write_csv(curves)
    plot(curves, summaries)
    print((RESULTS / f"{NAME}.md").read_text())
    print(f"wall time {env['wall_s']} s")


if __name__ == "__main__":
    main()
