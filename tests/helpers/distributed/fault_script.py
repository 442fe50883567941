"""Training script of the fault test, run by ``torchrun`` (also holds a spawn worker).

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1 \\
        fault_script.py FOLDER --steps N [--kill-at K]

Trains the zoo GPT on dp2 (FSDP2, ZeRO-3), checkpointing to ``FOLDER/ckpt`` after
every step and resuming from it at start if it exists. With ``--kill-at K`` rank 1
exits abruptly at step K on the first attempt only (``FOLDER/killed`` marks it), so
torchrun restarts the group. Rank 0 logs each start to ``FOLDER/events.txt`` and
writes the final parameters to ``FOLDER/final.pt`` (plain tensors).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import autopar
from autopar.checkpoint import exists
from autopar.runtime import init_from_env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_from_env(timeout_s=30)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=2)
    compiled = autopar.compile(model, "local:2", fix={"dp": 2, "zero": 3, "num_microbatches": 2},
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    ckpt, marker = os.path.join(args.folder, "ckpt"), os.path.join(args.folder, "killed")
    if exists(ckpt):
        inputs, _ = autopar.models.example_batch(model, batch_size=8, seq_len=16, seed=1)
        autopar.load(compiled, ckpt, example_inputs=inputs)
    if rank == 0:
        with open(os.path.join(args.folder, "events.txt"), "a") as log:
            log.write(f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']} from step {compiled.num_steps}\n")
    for step in range(compiled.num_steps, args.steps):
        if step == args.kill_at and rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        inputs, targets = autopar.models.example_batch(model, batch_size=8, seq_len=16, seed=1 + step)
        compiled.step(inputs, targets)
        autopar.save(compiled, ckpt)
    final = {fqn: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
             for fqn, p in compiled.engine.named_parameters()}
    if rank == 0:
        torch.save(final, os.path.join(args.folder, "final.pt"))
    dist.destroy_process_group()


def skip_collective(rank: int, world: int) -> None:
    """Rank 1 never joins the all-reduce; rank 0 must fail at the group's timeout, not hang."""
    if rank == 1:
        time.sleep(60)  # spawn terminates it once rank 0 has failed
        return
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
    finally:
        assert time.monotonic() - start < 30, f"the all-reduce failed only after {time.monotonic() - start} s"


if __name__ == "__main__":
    main()
