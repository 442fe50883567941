"""Runtime speed on CPU: step time of each plan kind on 2 and 4 local gloo ranks, and the
overhead of autopar's runtime against the same 1F1B pipeline written by hand.

Run: ``.venv/bin/python -m benchmarks.runtime_cpu`` (writes
``benchmarks/results/runtime_cpu.json`` and ``.md``). One row per case: a zoo GPT
(8 layers, hidden 256, 8 heads, vocabulary 4096, sequence 128, untied embeddings so a
hand split needs no tied-weight sync), global batch 16, trained with AdamW through
``autopar.compile(..., fix=...)``. Step time is the median over ``--repeats`` fresh runs
of ``--steps`` steps (after ``--warmup`` steps each; cases round-robin, so a burst of
other load on the machine hits one run of several cases rather than all of one case),
each step's time being the slowest rank's. One thread per rank.

The overhead case splits the same GPT by hand into two ``nn.Module`` stages (embeddings
and the first half of the blocks; the second half and the head), runs them with
``PipelineStage`` + ``Schedule1F1B`` and the same microbatches, and alternates rounds
of autopar and hand-written steps so that machine load drifts affect both alike.
Timings here, never in tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

import autopar
from autopar.compile import default_optimizer
from autopar.runtime import spawn
from benchmarks.common import RESULTS, dp_and_pp_cases, slowest_rank_times_s, with_recompute
from benchmarks.common import environment as common_environment

MODEL = dict(num_layers=8, hidden_size=256, num_heads=8, vocab_size=4096, seq_len=128, tie_embeddings=False)
GLOBAL_BATCH = 16
NUM_MICROBATCHES = 4
TARGET_OVERHEAD_PCT = 5.0


def plan_cases(world: int) -> list[tuple[str, dict[str, Any]]]:
    """(case name, fix) for every plan kind on ``world`` ranks, without and with full recomputation."""
    base = dp_and_pp_cases(world, schedules=("gpipe", "1f1b", "interleaved", "zero_bubble"),
                           num_microbatches=NUM_MICROBATCHES)
    if world >= 4:
        base.append(("pp×dp 1f1b", {"pp": 2, "dp": world // 2, "schedule": "1f1b",
                                    "num_microbatches": NUM_MICROBATCHES}))
    return [with_recompute(case, r) for case in base for r in ("none", "full")]


def _batch(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return autopar.models.example_batch(model, GLOBAL_BATCH, seed=1)


def _build() -> nn.Module:
    torch.manual_seed(0)
    return autopar.models.build("gpt", **MODEL)


def bench_plan(world: int, fix: dict[str, Any], warmup: int,
               steps: int) -> tuple[dict[str, Any], list[float]]:
    """The plan's shape and ``steps`` step times of a freshly compiled model, after ``warmup`` steps."""
    model = _build()
    inputs, targets = _batch(model)
    compiled = autopar.compile(model, f"local:{world}", fix=fix)
    slowest_rank_times_s(lambda: compiled.step(inputs, targets), warmup)
    times = slowest_rank_times_s(lambda: compiled.step(inputs, targets), steps)
    plan = compiled.plan
    par, sched = plan.parallelism, plan.schedule
    shape = {"dp": par.dp, "pp": par.pp, "tp": par.tp, "schedule": sched.name,
             "num_microbatches": sched.num_microbatches, "virtual_stages": sched.virtual_stages,
             "zero": plan.zero, "recompute": fix["recompute"]}
    return shape, times


def _row(world: int, name: str, shape: dict[str, Any], times: list[float]) -> dict[str, Any]:
    median = statistics.median(times)
    return {"world_size": world, "case": name, **shape, "step_median_s": round(median, 4),
            "step_min_s": round(min(times), 4), "step_max_s": round(max(times), 4),
            "tokens_per_s": round(GLOBAL_BATCH * MODEL["seq_len"] / median), "num_steps": len(times)}


class HandStage(nn.Module):
    """Blocks ``[lo, hi)`` of a zoo GPT, with the embeddings on the first stage and the head on the last."""

    def __init__(self, gpt: nn.Module, lo: int, hi: int) -> None:
        super().__init__()
        self.first, self.last = lo == 0, hi == len(gpt.blocks)
        if self.first:
            self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop
        self.blocks = nn.ModuleList(gpt.blocks[lo:hi])
        if self.last:
            self.ln_f, self.lm_head = gpt.ln_f, gpt.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            positions = torch.arange(x.size(1), device=x.device)  # (s,)
            x = self.drop(self.wte(x) + self.wpe(positions))  # (b, s, h)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)) if self.last else x  # (b, s, V) on the last stage


def _token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def hand_written_step(world: int) -> Callable[[], float | None]:
    """The same GPT split into ``world`` stages by hand, one per rank, under Schedule1F1B."""
    rank, model = dist.get_rank(), _build()
    inputs, targets = _batch(model)
    per_stage = len(model.blocks) // world
    stage_module = HandStage(model, rank * per_stage, (rank + 1) * per_stage)
    stage = PipelineStage(stage_module, rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, NUM_MICROBATCHES, loss_fn=_token_loss)
    optimizer = default_optimizer(stage_module.parameters())

    def step() -> float | None:
        optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        if stage_module.first:
            schedule.step(inputs)
        else:
            schedule.step(target=targets, losses=losses)
        optimizer.step()
        return float(torch.stack(losses).detach().mean()) if losses else None

    return step


def bench_overhead(world: int, warmup: int, steps: int, rounds: int) -> dict[str, Any]:
    """autopar's 1F1B pipeline vs the hand-written one, in alternating rounds of ``steps`` steps."""
    model = _build()
    inputs, targets = _batch(model)
    compiled = autopar.compile(model, f"local:{world}",
                               fix={"pp": world, "schedule": "1f1b", "num_microbatches": NUM_MICROBATCHES})
    ours: Callable[[], Any] = lambda: compiled.step(inputs, targets)  # noqa: E731
    hand = hand_written_step(world)
    first = torch.tensor([compiled.step(inputs, targets), hand() or 0.0], dtype=torch.float64)
    dist.all_reduce(first[1:])  # the hand-written loss lives on the last stage only
    slowest_rank_times_s(ours, warmup)
    slowest_rank_times_s(hand, warmup)
    ours_s, hand_s = [], []
    for _ in range(rounds):
        ours_s += slowest_rank_times_s(ours, steps)
        hand_s += slowest_rank_times_s(hand, steps)
    ours_median, hand_median = statistics.median(ours_s), statistics.median(hand_s)
    return {
        "world_size": world, "case": f"pp{world} 1f1b: autopar vs hand-written", "schedule": "1f1b",
        "num_microbatches": NUM_MICROBATCHES, "autopar_step_median_s": round(ours_median, 4),
        "hand_step_median_s": round(hand_median, 4),
        "overhead_pct": round(100 * (ours_median / hand_median - 1), 2), "num_steps": len(ours_s),
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "first_loss_autopar": round(float(first[0]), 6), "first_loss_hand": round(float(first[1]), 6),
    }


def bench_rank(rank: int, world: int, out: str, warmup: int, steps: int, repeats: int, rounds: int,
               only: str) -> None:
    """One rank of one world size: every plan case ``repeats`` times (round-robin, so a burst of
    other load hits one repeat of several cases rather than all steps of one), then on 2 ranks
    the overhead comparison."""
    cases = [(name, fix) for name, fix in plan_cases(world) if not only or only in name]
    shapes: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(repeats):
        for name, fix in cases:
            shapes[name], more = bench_plan(world, fix, warmup, steps)
            times[name] += more
            if rank == 0:
                print(f"  {world} ranks  {name:28s} {statistics.median(more):.3f} s", flush=True)
            gc.collect()
            dist.barrier()
    rows = [_row(world, name, shapes[name], times[name]) for name, _ in cases]
    wanted = not only or only in "overhead"
    overhead = bench_overhead(world, warmup, steps, rounds) if world == 2 and wanted else None
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows, "overhead": overhead}))


def environment() -> dict[str, Any]:
    return common_environment() | {"threads_per_rank": 1, "model": MODEL, "global_batch": GLOBAL_BATCH}


def _header(env: dict[str, Any]) -> list[str]:
    return [
        f"# runtime on CPU ({env['cores']} cores, torch {env['torch']}, commit {env['autopar_commit']})", "",
        f"Command: `.venv/bin/python -m benchmarks.runtime_cpu`. GPT {env['model']}, global batch "
        f"{env['global_batch']}, AdamW, gloo, one thread per rank. Step = median over {env['num_steps']} "
        f"steps ({env['repeats']} fresh runs of each case, round-robin, {env['warmup_steps']} warm-up steps "
        "each) of the slowest rank's step time. Load average "
        f"{env['load_average_before']} before and {env['load_average_after']} after: other work shared "
        "the machine, and 4 ranks on 2 cores are oversubscribed.", "",
    ]


def write(rows: list[dict[str, Any]], overhead: list[dict[str, Any]], env: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {"environment": env, "rows": rows, "overhead": overhead}
    (RESULTS / "runtime_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = _header(env) + [
        "| ranks | case | dp×pp | schedule | microbatches | zero | recompute | step s (median) | min s "
        "| max s | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['case']} | {r['dp']}×{r['pp']} | {r['schedule']} | "
                     f"{r['num_microbatches']} | {r['zero']} | {r['recompute']} | {r['step_median_s']:.3f} | "
                     f"{r['step_min_s']:.3f} | {r['step_max_s']:.3f} | {r['tokens_per_s']} |")
    lines += ["", "## autopar runtime overhead vs the same schedule by hand "
              f"(target ≤ {TARGET_OVERHEAD_PCT:g} %)", "",
              "| ranks | case | microbatches | steps each | first loss (autopar / hand) | autopar s "
              "| hand-written s | overhead % |", "|---|---|---|---|---|---|---|---|"]
    for o in overhead:
        lines.append(f"| {o['world_size']} | {o['case']} | {o['num_microbatches']} | {o['num_steps']} | "
                     f"{o['first_loss_autopar']:.4f} / {o['first_loss_hand']:.4f} | "
                     f"{o['autopar_step_median_s']:.3f} | {o['hand_step_median_s']:.3f} | "
                     f"{o['overhead_pct']:+.1f} |")
    (RESULTS / "runtime_cpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="fresh runs of each case, round-robin")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds in the overhead case")
    parser.add_argument("--only", default="", help="run only cases whose name contains this (no write)")
    args = parser.parse_args()
    from benchmarks import runtime_cpu  # spawned ranks import the body by its module name

    env = environment() | {"load_average_before": [round(x, 2) for x in os.getloadavg()],
                           "num_steps": args.steps * args.repeats, "warmup_steps": args.warmup,
                           "repeats": args.repeats}
    rows, overhead = [], []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "rows.json")
            spawn(runtime_cpu.bench_rank, world, out, args.warmup, args.steps, args.repeats, args.rounds,
                  args.only, timeout_s=300)
            result = json.loads(Path(out).read_text())
        rows += result["rows"]
        overhead += [result["overhead"]] if result["overhead"] else []
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.only:
        print(json.dumps({"rows": rows, "overhead": overhead}, indent=1))
        return
    write(rows, overhead, env)
    print((RESULTS / "runtime_cpu.md").read_text())


if __name__ == "__main__":
    main()
