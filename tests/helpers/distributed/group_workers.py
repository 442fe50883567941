"""Per-rank body of the shared-groups test: plans compiled one after another in the same processes
reuse their process groups (``runtime/groups.py``) and still train as a fresh compile does."""

from __future__ import annotations

import json
import os

import torch
from torch.distributed.distributed_c10d import _world

import autopar
from autopar.passes import MoE

SHAPE = dict(num_layers=2, hidden_size=32, num_heads=2, vocab_size=64, seq_len=16)
PLANS = {"pp2 tied": ({"pp": 2, "num_microbatches": 2}, []),
         "dp2 moe ep2": ({"dp": 2, "ep": 2}, ["moe"])}


def _losses(fix: dict, passes: list[str]) -> list[float]:
    torch.manual_seed(0)
    model = autopar.models.build("gpt", **SHAPE)
    inputs, targets = autopar.models.example_batch(model, 8, seed=1)
    made = [MoE(num_experts=2, top_k=1, layers="every_other", seed=0) for name in passes if name == "moe"]
    compiled = autopar.compile(model, "local:2", fix=fix, passes=made)
    return [float(compiled.step(inputs, targets)) for _ in range(2)]


def compile_in_turn(rank: int, world: int, out: str) -> None:
    """pp2 (tied-weight groups), dp2 + MoE ep2 (expert groups), then both again: the number of
    process groups and of threads after each compile, and each compile's losses."""
    torch.set_num_threads(1)
    rows = []
    for name in [*PLANS, *PLANS]:
        losses = _losses(*PLANS[name])
        rows.append({"plan": name, "losses": losses, "groups": len(_world.pg_map),
                     "threads": len(os.listdir("/proc/self/task"))})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
