"""``autopar train``: train a model on a folder of text, resuming from the latest checkpoint in ``--out``.

Data flow: flags and ``--config run.toml`` (flags override the file; every
``autopar.train.TrainConfig`` field is a flag, ``--global-batch-size 8``, ``--fix dp=2,pp=1``,
``--betas 0.9,0.95``) → ``TrainConfig`` → ``autopar.train.launch``: under torchrun each process
trains its rank; otherwise ``--nproc N`` > 1 local gloo ranks are spawned (a rank's user mistake is
one line, exit 2, like ``autopar run``), and one process trains here → a summary line (steps, loss,
held-out loss before → after, tokens/s, checkpoint). Metrics are in ``OUT/metrics.jsonl`` and
``OUT/metrics.csv``.

Examples::

    autopar train --model gpt-tiny --corpus ./src --nproc 2 --steps 200 --out runs/tiny
    autopar train --config run.toml --steps 400          # resumes runs/tiny at its last checkpoint
    torchrun --nproc-per-node 4 -m autopar.cli.main train --model gpt-tiny --corpus ./src \
        --steps 200 --out runs/t
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from rich.console import Console

from autopar.cli.plan_cmd import parse_fix
from autopar.cli.run_cmd import run_ranks
from autopar.runtime.launch import launched_by_torchrun
from autopar.train.config import TrainConfig, field_types
from autopar.train.launch import COLLECTIVE_TIMEOUT_S, preflight, read_result, spawned_rank, train_this_rank
from autopar.train.launch import world_size as needed_processes
from autopar.train.loop import TrainResult
from autopar.train.loop import run as run_here

HELP = {
    "model": "zoo name (gpt-tiny), HF config.json or module:factory",
    "corpus": "folder of text or source files (or 'stdlib': the Python standard library)",
    "out": "output folder: metrics.jsonl, metrics.csv, checkpoints/ (resumed when present)",
    "nproc": "local processes (default 1; ignored under torchrun)",
    "steps": "total steps (a resumed run continues to this step)",
    "fix": "pins for autopar.compile, e.g. dp=2,pp=1,num_microbatches=2",
    "betas": "AdamW betas, e.g. 0.9,0.95",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on a folder of text (checkpoints, metrics, resume)",
        description="Train MODEL on the text files of CORPUS with the plan autopar chooses; a second run "
                    "with the same --out and a larger --steps resumes from the latest checkpoint.",
    )
    p.add_argument("--config", help="a TOML file whose keys are the options below (flags override it)")
    for name, kind in field_types().items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parse = {int: int, float: float}.get(kind, str)
            p.add_argument(flag, dest=name, type=parse, default=None, metavar=name.upper(),
                           help=HELP.get(name))
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The file's values (if ``--config``), then every flag given."""
    flags: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        if field.name == "fix":
            value = parse_fix(value)
        elif field.name == "betas":
            value = _betas(value)
        flags[field.name] = value
    if args.config:
        return TrainConfig.from_toml(args.config, **flags)
    return TrainConfig.from_mapping(flags, source="the command line")


def run(args: argparse.Namespace, console: Console) -> int:
    config = config_from_args(args)
    if launched_by_torchrun():
        result = train_this_rank(config)
    else:
        preflight(config)
        world = needed_processes(config)
        if world == 1:
            result = run_here(config)
        else:
            run_ranks(spawned_rank, world, config.to_json(), timeout_s=COLLECTIVE_TIMEOUT_S,
                      full_traceback=getattr(args, "debug", False))
            result = read_result(config)
    if not launched_by_torchrun() or _rank() == 0:
        console.print(summary(result), soft_wrap=True)
    return 0


def summary(result: TrainResult) -> str:
    """One line about a finished run."""
    parts = [f"trained steps {result.first_step} → {result.last_step}"]
    if result.final_loss is not None:
        parts.append(f"loss {result.final_loss:.4f}")
    if result.eval_loss_before is not None and result.eval_loss_after is not None:
        parts.append(f"held-out loss {result.eval_loss_before:.4f} → {result.eval_loss_after:.4f}")
    if result.tokens_per_s:
        parts.append(f"{result.tokens_per_s:,.0f} tokens/s")
    if result.measured_step_s and result.predicted_step_s:
        predicted = 1e3 * result.predicted_step_s
        parts.append(f"step {1e3 * result.measured_step_s:.0f} ms (predicted {predicted:.0f})")
    if result.checkpoint:
        parts.append(f"checkpoint {result.checkpoint}")
    return " · ".join(parts)


def _betas(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--betas {text!r} is invalid: expected two numbers such as 0.9,0.95") from None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
