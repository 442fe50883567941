"""Per-rank bodies of the checkpoint tests (importable, so spawned ranks can run them).

Each case trains the zoo GPT under Plan A for 4 steps, saving after step 2 (the
uninterrupted reference), then loads that checkpoint into a new ``Compiled`` under
Plan B and trains the last 2 steps again. Both runs write this rank's losses and full
parameters (plain tensors) to ``<folder>/<case>-<run>-rank<r>.pt``; the parent test
compares them.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor

import autopar

STEPS = 4


def _adamw(params):
    # Attention key biases get an exactly-zero gradient (softmax is shift-invariant), so Adam sees
    # only their fp32 rounding noise (~1e-10, different under each Plan) and, with the default
    # eps = 1e-8, turns it into steps of ~1e-4; eps = 1e-5 keeps those below the test's atol.
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-5)


def build(world: int, fix: dict):
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=4)
    inputs, targets = autopar.models.example_batch(model, batch_size=8, seq_len=16, seed=1)
    return autopar.compile(model, f"local:{world}", fix=fix, optimizer=_adamw), inputs, targets


def record(folder: str, name: str, rank: int, compiled, losses: list[float]) -> None:
    params = {fqn: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for fqn, p in compiled.engine.named_parameters()}
    torch.save({"losses": torch.tensor(losses, dtype=torch.float64), "params": params},
               os.path.join(folder, f"{name}-rank{rank}.pt"))


def train_and_save(rank: int, world: int, folder: str, case: str, fix_a: dict) -> None:
    """Plan A: 2 steps, a checkpoint, 2 more steps; the 4 steps are the uninterrupted reference
    (a save leaves the training state untouched, which the resumed run then checks)."""
    torch.set_num_threads(1)
    compiled, inputs, targets = build(world, fix_a)
    losses = [compiled.step(inputs, targets) for _ in range(STEPS // 2)]
    autopar.save(compiled, os.path.join(folder, case))
    losses += [compiled.step(inputs, targets) for _ in range(STEPS - STEPS // 2)]
    record(folder, f"{case}-reference", rank, compiled, losses)


def resume(rank: int, world: int, folder: str, case: str, fix_b: dict, after_step: bool = False) -> None:
    """Plan B: load the checkpoint (building the engine from an example batch, or after
    a throwaway step) and train the second half."""
    torch.set_num_threads(1)
    compiled, inputs, targets = build(world, fix_b)
    if after_step:
        compiled.step(inputs, targets)
        autopar.load(compiled, os.path.join(folder, case))
    else:
        try:
            autopar.load(compiled, os.path.join(folder, case))
        except ValueError as err:
            assert "after the first compiled.step" in str(err) and "example_inputs" in str(err), err
        else:
            raise AssertionError("load before the engine exists must ask for example_inputs")
        autopar.load(compiled, os.path.join(folder, case), example_inputs=inputs)
    assert compiled.num_steps == STEPS // 2, compiled.num_steps
    losses = [compiled.step(inputs, targets) for _ in range(STEPS - STEPS // 2)]
    record(folder, f"{case}-resumed", rank, compiled, losses)
    try:  # every rank raises, none is left waiting in a collective
        autopar.load(compiled, os.path.join(folder, "nowhere"))
    except ValueError as err:
        assert "nowhere" in str(err) and "autopar.save" in str(err), err
    else:
        raise AssertionError("loading a missing checkpoint must raise ValueError")


def two_rank_cases(rank: int, world: int, folder: str) -> None:
    """pp2 → dp2 (FSDP2, ZeRO-3); dp2 (replicate) → pp2."""
    train_and_save(rank, world, folder, "pp2-dp2z3", {"pp": 2, "num_microbatches": 2})
    resume(rank, world, folder, "pp2-dp2z3", {"dp": 2, "zero": 3, "num_microbatches": 2})
    train_and_save(rank, world, folder, "dp2z0-pp2", {"dp": 2, "zero": 0, "num_microbatches": 2})
    resume(rank, world, folder, "dp2z0-pp2", {"pp": 2, "num_microbatches": 2}, after_step=True)


def four_rank_save(rank: int, world: int, folder: str) -> None:
    train_and_save(rank, world, folder, "pp2dp2-tp2", {"pp": 2, "dp": 2, "zero": 3, "num_microbatches": 2})


def two_rank_resume(rank: int, world: int, folder: str) -> None:
    resume(rank, world, folder, "pp2dp2-tp2", {"tp": 2, "num_microbatches": 2})


def two_rank_resume_then_two_rank_cases(rank: int, world: int, folder: str) -> None:
    two_rank_resume(rank, world, folder)
    two_rank_cases(rank, world, folder)
