"""A training script as torchrun runs it: no init_process_group, only ``autopar.train`` (issue 19).

Usage: ``torchrun ... train_torchrun.py CORPUS OUT CACHE FIX STEPS``; every rank writes
``OUT/rank<R>.json`` with the training rows its loader read, its steps and final loss (FIX is
``autopar train``'s ``--fix`` text, e.g. ``dp=2,pp=2``)."""

import json
import sys
from pathlib import Path

import torch

import autopar


def main() -> None:
    torch.set_num_threads(1)
    corpus, out, cache, fix, steps = sys.argv[1:6]
    pins = {key: int(value) for key, value in (part.split("=") for part in fix.split(","))}
    result = autopar.train(model="gpt-tiny", corpus=corpus, out=out, cache_dir=cache, fix=pins,
                           steps=int(steps), global_batch_size=4, seq_len=16, vocab_size=300,
                           eval_interval=2, eval_batches=1, checkpoint_interval=2, log_interval=1,
                           plan_time_limit_s=10.0)
    rank = torch.distributed.get_rank()
    report = {"samples_read": result.samples_read, "steps": [result.first_step, result.last_step],
              "loss": result.final_loss}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
