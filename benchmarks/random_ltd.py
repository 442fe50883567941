"""Random-LTD on CPU: training-step time with and without token dropping against the cost
model's prediction, and the loss curve of a short training with and without it.

Run: ``.venv/bin/python -m benchmarks.random_ltd`` (writes ``benchmarks/results/random_ltd.json``,
``.md`` and ``random_ltd.csv``, the loss curves). The longer loss-curve run through
``autopar.compile(..., passes=[...])``, with plots, is ``benchmarks/random_ltd_loss.py``.
Model: a zoo GPT, 12 layers, hidden 128, 4 heads, vocabulary 512, sequence 512, batch 4, AdamW.

Case ``step time``: the captured graph (no passes) against ``RandomLTD(min_tokens=256)`` held at
step 0 (keep ratio 0.5 on layers 1–10; layers 0 and 11 whole). Rounds alternate the two cases so
that load drifts hit both; step time is the median over every timed step. Predicted saving:
``estimate(plan, ltd_profile(profile, kept))`` against ``estimate(plan, profile)`` for the
``local:1`` single-device plan (the target: measured ≥ 80 % of it), and the FLOP ratio
(``model_flops_per_sequence``), both reported. The estimate uses the calibrated CPU model when
``autopar calibrate`` has written a profile (else placeholder rates); only its ratio is compared
here, the absolute step times are benchmarks/cost_model_cpu.py's subject.

Case ``loss curve``: two identical models (same seed) trained for ``--train-steps`` steps on the same
fixed synthetic corpus (a sparse random Markov chain, 4 successors per token), one with
``RandomLTD(min_tokens=256, num_steps=80, granularity=16)`` advanced every step; the held-out
loss is measured with every token kept. Timings here, never in tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

import autopar
from autopar.cost_models import ModelProfile, estimate
from autopar.cost_models.token_dropping import ltd_profile
from autopar.passes import PassContext, RandomLTD, run_passes
from autopar.passes.random_ltd import kept_fractions, random_ltd_runtime
from autopar.plans import Plan

RESULTS = Path(__file__).parent / "results"
MODEL = dict(num_layers=12, hidden_size=128, num_heads=4, vocab_size=512, seq_len=512)
BATCH = 4
KEEP_RATIO = 0.5
SCHEDULE = dict(min_tokens=256, num_steps=80, granularity=16)
TARGET_RATIO = 0.8


def environment() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"autopar_commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "model": MODEL, "batch": BATCH, "load_average_before": [round(x, 2) for x in os.getloadavg()]}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return autopar.models.build("gpt", **MODEL)


def _step(gm: fx.GraphModule, optimizer: torch.optim.Optimizer, ids: torch.Tensor, targets: torch.Tensor
          ) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(gm(ids).flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def bench_step_time(warmup: int, rounds: int, steps: int, keep_ratio: float = KEEP_RATIO) -> dict[str, Any]:
    model = _model()
    ids, targets = autopar.models.example_batch(model, BATCH, seed=1)
    cap = autopar.capture(model, ids)
    baseline = cap.graph_module
    profile = ModelProfile.from_captured(cap, batch_size=BATCH, dtype="fp32")
    keep = round(keep_ratio * MODEL["seq_len"])
    second = autopar.capture(model, ids)
    dropping = run_passes(second.graph_module, [RandomLTD(min_tokens=keep, num_steps=10**9)],
                          PassContext(captured=second))
    kept = kept_fractions(dropping, step=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {"baseline": [], "random_ltd": []}
    graphs = {"baseline": baseline, "random_ltd": dropping}
    for gm in graphs.values():
        for _ in range(warmup):
            _step(gm, optimizer, ids, targets)
    for _ in range(rounds):
        for name, gm in graphs.items():
            for _ in range(steps):
                start = time.perf_counter()
                _step(gm, optimizer, ids, targets)
                times[name].append(time.perf_counter() - start)
    assert random_ltd_runtime(dropping).last_kept == dict.fromkeys(kept, keep)
    return _step_row(times, profile, ltd_profile(profile, kept), kept) | {"kept_ratio": keep_ratio}


def _step_row(times: dict[str, list[float]], profile: ModelProfile, dropped: ModelProfile,
              kept: dict[int, float]) -> dict[str, Any]:
    cluster = autopar.ClusterSpec.parse("local:1")
    plan = Plan.single_device("gpt", graph_fingerprint="benchmark", cluster=cluster, global_batch_size=BATCH,
                              seq_len=MODEL["seq_len"], num_layers=MODEL["num_layers"])
    base_s, ltd_s = (statistics.median(times[k]) for k in ("baseline", "random_ltd"))
    est_base, est_ltd = estimate(plan, profile).step_time_s, estimate(plan, dropped).step_time_s
    measured = 1 - ltd_s / base_s
    flop_saving = 1 - dropped.model_flops_per_sequence / profile.model_flops_per_sequence
    estimate_saving = 1 - est_ltd / est_base
    return {
        "case": "step time", "kept_ratio": KEEP_RATIO, "ltd_layers": sorted(kept),
        "baseline_step_s": base_s, "random_ltd_step_s": ltd_s,
        "baseline_min_s": min(times["baseline"]), "random_ltd_min_s": min(times["random_ltd"]),
        "num_timed_steps": len(times["baseline"]), "measured_saving": measured,
        "flops_per_step_baseline": BATCH * profile.model_flops_per_sequence,
        "flops_per_step_random_ltd": BATCH * dropped.model_flops_per_sequence,
        "predicted_saving_flops": flop_saving, "estimate_baseline_step_s": est_base,
        "estimate_random_ltd_step_s": est_ltd, "predicted_saving_estimate": estimate_saving,
        "measured_over_predicted_flops": measured / flop_saving,
        "measured_over_predicted_estimate": measured / estimate_saving,
        "target_met": measured / estimate_saving >= TARGET_RATIO,
    }


def _corpus(num_sequences: int, seed: int = 0) -> torch.Tensor:
    """Sequences of one sparse Markov chain (each token has 4 successors with fixed probabilities);
    ``seed`` picks the sequences, not the chain."""
    vocab, length = MODEL["vocab_size"], MODEL["seq_len"] + 1
    successors = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.55, 0.25, 0.15, 0.05])
    tokens = torch.empty(num_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num_sequences,), generator=g)
    for t in range(1, length):
        choice = torch.multinomial(weights, num_sequences, replacement=True, generator=g)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return tokens


def bench_loss_curve(num_steps: int) -> dict[str, Any]:
    corpus, held_out = _corpus(64), _corpus(8, seed=1)
    curves: dict[str, list[float]] = {}
    extra: dict[str, Any] = {}
    for name in ("baseline", "random_ltd"):
        model = _model()
        ids = corpus[:BATCH, :-1]
        passes = [RandomLTD(**SCHEDULE)] if name == "random_ltd" else []
        gm = autopar.transform(model, ids, passes=passes)
        runtime = random_ltd_runtime(gm)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses, kept, start = [], [], time.perf_counter()
        for step in range(num_steps):
            batch = corpus[(step * BATCH) % len(corpus):][:BATCH]
            kept.append(runtime.kept_tokens() if runtime else MODEL["seq_len"])
            losses.append(_step(gm, optimizer, batch[:, :-1], batch[:, 1:]))
            if runtime:
                runtime.advance(BATCH)
        gm.eval()
        with torch.no_grad():
            logits = gm(held_out[:, :-1])
            held = float(F.cross_entropy(logits.flatten(0, 1), held_out[:, 1:].flatten()))
        curves[name], curves[f"{name}_kept_tokens"] = losses, kept
        every_token = MODEL["num_layers"] * BATCH * MODEL["seq_len"] * num_steps
        consumed = runtime.state.consumed_layer_tokens if runtime else every_token
        extra[name] = {"held_out_loss": held, "final_train_loss_mean_last_10": statistics.mean(losses[-10:]),
                       "train_s": time.perf_counter() - start, "consumed_layer_tokens": consumed}
    return {"case": "loss curve", "num_steps": num_steps, "schedule": SCHEDULE, "curves": curves, **extra}


def write(step: dict[str, Any], loss: dict[str, Any], env: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    curves = loss["curves"]
    summary = {k: v for k, v in loss.items() if k != "curves"}
    payload = {"environment": env, "step_time": step, "loss_curve": summary}
    (RESULTS / "random_ltd.json").write_text(json.dumps(payload, indent=2) + "\n")
    with open(RESULTS / "random_ltd.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss_baseline", "loss_random_ltd", "kept_tokens_random_ltd"])
        columns = (curves["baseline"], curves["random_ltd"], curves["random_ltd_kept_tokens"])
        for i, row in enumerate(zip(*columns, strict=True)):
            writer.writerow([i, f"{row[0]:.5f}", f"{row[1]:.5f}", row[2]])
    (RESULTS / "random_ltd.md").write_text("\n".join(_markdown(step, loss, env)) + "\n")


def _markdown(step: dict[str, Any], loss: dict[str, Any], env: dict[str, Any]) -> list[str]:
    b, r = loss["baseline"], loss["random_ltd"]
    curves = loss["curves"]
    marks = [0, 10, 20, 40, 60, 80, loss["num_steps"] - 1]
    return [
        f"# random-LTD on CPU ({env['cores']} cores, {env['threads']} threads, torch {env['torch']}, "
        f"commit {env['autopar_commit']})", "",
        f"Command: `.venv/bin/python -m benchmarks.random_ltd`. Zoo GPT {env['model']}, "
        f"batch {env['batch']}, AdamW, fp32. Load average {env['load_average_before']} before, "
        f"{env['load_average_after']} after "
        "(the machine is shared).", "",
        "## Step time: keep ratio 0.5 on layers 1–10 against no dropping", "",
        "| case | step s (median) | min s | FLOPs/step | cost-model estimate s |", "|---|---|---|---|---|",
        f"| no dropping | {step['baseline_step_s']:.4f} | {step['baseline_min_s']:.4f} | "
        f"{step['flops_per_step_baseline']:.3e} | {step['estimate_baseline_step_s']:.4f} |",
        f"| random-LTD r=0.5 | {step['random_ltd_step_s']:.4f} | {step['random_ltd_min_s']:.4f} | "
        f"{step['flops_per_step_random_ltd']:.3e} | {step['estimate_random_ltd_step_s']:.4f} |", "",
        f"Median over {step['num_timed_steps']} timed steps each (alternating rounds). Measured saving "
        f"**{step['measured_saving']:.1%}**. Predicted by the cost model, `estimate(local:1 plan, "
        f"ltd_profile(profile, kept))` against `estimate(local:1 plan, profile)`: "
        f"{step['predicted_saving_estimate']:.1%} → measured/predicted "
        f"**{step['measured_over_predicted_estimate']:.2f}** (target ≥ {TARGET_RATIO}: "
        f"{'met' if step['target_met'] else 'NOT met'}). Predicted by the FLOP ratio alone: "
        f"{step['predicted_saving_flops']:.1%} → {step['measured_over_predicted_flops']:.2f} (the FLOP "
        "count has attention without the causal saving and no optimizer step, which does not "
        "shrink; the estimate has both). Only the estimate's ratio is compared; its absolute times "
        "(calibrated CPU model if a profile is installed) are `cost_model_cpu.md`'s subject.", "",
        f"## Loss curve: {loss['num_steps']} steps, schedule {loss['schedule']}", "",
        "Full curves in `random_ltd.csv`; a longer run with plots: `random_ltd_loss.md`.", "",
        "| step | " + " | ".join(str(m) for m in marks) + " |", "|---" * (len(marks) + 1) + "|",
        "| loss, no dropping | " + " | ".join(f"{curves['baseline'][m]:.3f}" for m in marks) + " |",
        "| loss, random-LTD | " + " | ".join(f"{curves['random_ltd'][m]:.3f}" for m in marks) + " |",
        "| kept tokens | " + " | ".join(str(curves['random_ltd_kept_tokens'][m]) for m in marks) + " |", "",
        "| run | held-out loss (all tokens) | train loss, last 10 steps | layer-tokens | train s |",
        "|---|---|---|---|---|",
        f"| no dropping | {b['held_out_loss']:.4f} | {b['final_train_loss_mean_last_10']:.4f} | "
        f"{b['consumed_layer_tokens']:.3e} | {b['train_s']:.1f} |",
        f"| random-LTD | {r['held_out_loss']:.4f} | {r['final_train_loss_mean_last_10']:.4f} | "
        f"{r['consumed_layer_tokens']:.3e} | {r['train_s']:.1f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case per round")
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    env = environment()
    step = bench_step_time(args.warmup, args.rounds, args.steps)
    loss = bench_loss_curve(args.train_steps)
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write(step, loss, env)
    print((RESULTS / "random_ltd.md").read_text())


if __name__ == "__main__":
    main()
