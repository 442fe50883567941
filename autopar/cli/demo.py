"""``autopar demo``: train a tiny GPT on 4 local CPU processes with a pinned plan.

The main job of the README's Quick start. Data flow: zoo GPT (4 layers) →
``autopar.compile(model, "local:4", fix=DEMO_FIX)`` in each of the processes that
:func:`autopar.cli.run_cmd.run_ranks` spawns → ``Compiled.step`` on a fixed batch,
rank 0 printing each step's loss beside a single-process reference (a deepcopy of
the model trained with plain PyTorch in rank 0) → the measured report
(``autopar.report``). Nothing is planned yet: the plan is pinned. With graph-pass
options (``--random-ltd ...``, ``--moe ...``) both runs use the pass: the reference trains
``autopar.transform``'s graph with the schedule at each step's number, its loss plus the MoE
layers' auxiliary losses.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from rich.console import Console
from torch import fx, nn

from autopar import models
from autopar.cli.pass_args import add_pass_arguments, passes_from_args
from autopar.cli.run_cmd import run_ranks
from autopar.compile import compile as autopar_compile
from autopar.losses import cross_entropy
from autopar.passes import GraphPass, MoE
from autopar.passes.moe import moe_aux_loss
from autopar.runtime.pass_state import pass_runtimes
from autopar.transform import transform

# The demo's pinned plan: two pipeline stages, each split over two tensor-parallel ranks.
DEMO_FIX: dict[str, Any] = {"pp": 2, "tp": 2, "schedule": "1f1b", "num_microbatches": 4}
# With --moe: two pipeline stages, each data-parallel with experts split over two ranks (the
# runtime runs MoE layers without tensor parallelism).
DEMO_FIX_MOE: dict[str, Any] = {"pp": 2, "tp": 1, "ep": 2, "schedule": "1f1b", "num_microbatches": 4}
DEMO_MODEL = "gpt-tiny"
DEMO_LAYERS = 4
# fp32 on CPU: the pipelined program sums the same terms in another order.
LOSS_RTOL = 1e-5


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a tiny GPT on 4 local CPU processes (pinned plan)")
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--nproc", type=int, default=4, help="local processes (default 4)")
    p.add_argument("--batch", type=int, default=16, help="global batch size (default 16)")
    p.add_argument("--seed", type=int, default=0)
    add_pass_arguments(p)
    p.set_defaults(run=run)


def demo_fix(nproc: int, batch: int, *, moe: bool = False) -> dict[str, Any]:
    """DEMO_FIX (DEMO_FIX_MOE with ``moe``) on ``nproc`` processes: the data-parallel degree fills
    what pp × tp leave; with MoE, experts are split over 2 ranks when dp is even."""
    base = DEMO_FIX_MOE if moe else DEMO_FIX
    per_replica = base.get("pp", 1) * base.get("tp", 1)
    if nproc < 1 or nproc % per_replica:
        raise ValueError(f"--nproc {nproc} does not fit the demo plan: pp({base.get('pp', 1)}) × "
                         f"tp({base.get('tp', 1)}) = {per_replica} must divide it")
    fix = {**base, "dp": nproc // per_replica}
    if "ep" in fix and fix["dp"] % fix["ep"]:
        fix["ep"] = 1
    micro = fix["dp"] * fix["num_microbatches"]
    if batch < 1 or batch % micro:
        raise ValueError(f"--batch {batch} must be a positive multiple of dp({fix['dp']}) × "
                         f"num_microbatches({fix['num_microbatches']}) = {micro}")
    return fix


def run(args: argparse.Namespace, console: Console) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    passes = passes_from_args(args)
    fix = demo_fix(args.nproc, args.batch, moe=any(isinstance(p, MoE) for p in passes))
    with_passes = f", passes={passes}" if passes else ""
    console.print(f"[bold]autopar demo[/]: training {DEMO_MODEL} with {DEMO_LAYERS} layers on {args.nproc} "
                  f"local CPU processes, fix={fix}{with_passes}")
    start = time.perf_counter()
    run_ranks(demo_rank, args.nproc, args.steps, args.batch, args.seed, fix, console.no_color, passes)
    console.print(f"done in {time.perf_counter() - start:.1f} s (processes started, trained, measured)")
    return 0


def _optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _moe_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with ``eps`` 1e-5 for MoE runs. Capacity makes routing discontinuous (a token one
    run keeps, the other drops), and with the default ``eps`` 1e-8 Adam turns fp32 rounding in
    near-zero gradients (a key bias's, an expert's few tokens) into full-size steps: measured on
    this demo, the distributed and single-process losses then part by 4e-5 at step 3 and 1e-2 by
    step 20, while with 1e-5 they stay within 1e-6 (and SGD within 1e-6 with either)."""
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-5)


def demo_rank(rank: int, world: int, steps: int, batch: int, seed: int, fix: dict[str, Any],
              no_color: bool, passes: Sequence[GraphPass] = ()) -> None:
    """One rank of the demo; rank 0 also trains the single-process reference and prints."""
    from autopar.report import report  # the runtime is slow to import; the ranks need it

    console = Console(no_color=no_color, highlight=False)
    torch.manual_seed(seed)
    model = models.build(DEMO_MODEL, num_layers=DEMO_LAYERS)
    inputs, targets = models.example_batch(model, batch, seed=seed)
    reference = _reference(copy.deepcopy(model), inputs, passes) if rank == 0 else None

    # MoE layers route each (data-parallel shard, microbatch) group alone: the reference does too
    groups = fix["dp"] * fix["num_microbatches"] if any(isinstance(p, MoE) for p in passes) else 1
    optimizer = _moe_optimizer if any(isinstance(p, MoE) for p in passes) else _optimizer
    reference_optimizer = optimizer(reference.parameters()) if reference is not None else None
    compiled = autopar_compile(model, f"local:{world}", fix=fix, optimizer=optimizer, passes=list(passes))
    differences = []
    for step in range(steps):
        loss = compiled.step(inputs, targets)
        if reference is None or reference_optimizer is None:
            continue
        for runtime in pass_runtimes(reference, [p.name for p in passes]).values():
            runtime.set_step(step)
        expected = _reference_step(reference, reference_optimizer, inputs, targets, groups)
        differences.append(abs(loss - expected))
        if step == 0:
            console.print(_plan_line(compiled))
        console.print(f"step {step + 1:3d}  loss {loss:.6f}  single-process {expected:.6f}  "
                      f"|Δ| {differences[-1]:.1e}")
    table = report(compiled, inputs, targets)  # a collective: every rank measures its step
    if rank == 0:
        worst = max(differences)
        verdict = "equal" if worst <= LOSS_RTOL * max(1.0, abs(expected)) else "DIFFERENT"
        how = "the transformed graph in plain PyTorch" if passes else "plain PyTorch"
        console.print(f"single-process reference ({how}, same seed): max |Δloss| over {steps} "
                      f"steps = {worst:.1e} ({verdict}, fp32 tolerance {LOSS_RTOL:g})")
        console.print(table)


def _reference(model: nn.Module, inputs: torch.Tensor, passes: Sequence[GraphPass]) -> nn.Module:
    """The single-process reference: the model, or its graph after ``passes`` (same parameters)."""
    return transform(model, inputs, passes=passes) if passes else model


def _reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                    targets: torch.Tensor, groups: int = 1) -> float:
    """One step on the mean loss of ``groups`` equal slices of the batch, run in order (the same
    tokens for random-LTD), each with its MoE layers' auxiliary losses."""
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for x, y in zip(inputs.chunk(groups), targets.chunk(groups), strict=True):
        loss = cross_entropy(model(x), y)
        losses.append(loss + moe_aux_loss(model) if isinstance(model, fx.GraphModule) else loss)
    loss = torch.stack(losses).mean()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _plan_line(compiled: Any) -> str:
    plan = compiled.plan
    par, sched = plan.parallelism, plan.schedule
    stages = "; ".join(f"stage {s.index}: layers {s.layers[0]}–{s.layers[1] - 1} on ranks "
                       f"{', '.join(map(str, s.devices))}" for s in plan.stages)
    return (f"plan: pp{par.pp} × dp{par.dp} × tp{par.tp}, {sched.name}, {sched.num_microbatches} "
            f"microbatches of {sched.microbatch_size}; {stages}")
