"""``autopar run script.py --nproc N [-- script args]``: run a training script on N local processes.

Data flow: the CLI → :func:`autopar.runtime.launch.spawn` (N processes, a gloo process
group with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set) → in each rank
:func:`run_script` runs the file as ``__main__`` with ``sys.argv`` set, so the script
just calls ``autopar.compile(model, "local:N", fix=...)`` and ``.step(...)``. Graph-pass
options (``--random-ltd ...``, ``--moe ...``, :mod:`autopar.cli.pass_args`) reach every ``autopar.compile``
in the script that gives no ``passes=`` itself, through the environment. Only rank 0's
output is shown unless ``--all-ranks``; a rank that fails is named with the last line of
its exception, in one line, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from autopar.cli.pass_args import add_pass_arguments, passes_from_args
from autopar.passes import GraphPass
from autopar.quiet import quiet_logger

USAGE = ("autopar run SCRIPT --nproc N [--all-ranks] [--timeout S] [--random-ltd K=V,...] [--moe K=V,...] "
         "[-- SCRIPT_ARGS ...]")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, help="number of local processes (required)")
    parser.add_argument("--all-ranks", action="store_true", help="show every rank's output (default: rank 0)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a collective may wait before failing (default: the launcher's, 60)")
    add_pass_arguments(parser)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run a training script on N local CPU processes (gloo)", usage=USAGE,
        description="Run SCRIPT in N local processes joined in a gloo process group; inside, "
                    "autopar.compile(model, 'local:N', ...) trains on all of them.",
    )
    _add_options(p)
    # One REMAINDER from the script on: argparse 3.11 cannot mix a positional, options after
    # it and a `--` tail, so the options after SCRIPT are parsed again in _split().
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="SCRIPT [-- SCRIPT_ARGS]",
                   help="the Python file to run in every process, then its arguments after `--`")
    p.set_defaults(run=run)


def _split(args: argparse.Namespace) -> tuple[Path, argparse.Namespace, list[str]]:
    """SCRIPT, the launcher options (before or after it) and the script's arguments (after `--`)."""
    tokens = list(args.command)
    if not tokens or tokens[0].startswith("-"):
        raise ValueError(f"no script given; usage: {USAGE}")
    rest = tokens[1:]
    cut = rest.index("--") if "--" in rest else len(rest)
    options = argparse.ArgumentParser(prog="autopar run", add_help=False, exit_on_error=False)
    _add_options(options)
    try:
        parsed, unknown = options.parse_known_args(rest[:cut], namespace=argparse.Namespace(**vars(args)))
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    if unknown:
        raise ValueError(f"unexpected argument(s) {unknown}: the script's own arguments go after `--`, "
                         f"as in {USAGE}")
    return Path(tokens[0]), parsed, rest[cut + 1:]


def run(args: argparse.Namespace, console: Console) -> int:
    script, options, script_args = _split(args)
    if options.nproc is None:
        raise ValueError(f"--nproc is required; usage: {USAGE}")
    if not script.is_file():
        raise FileNotFoundError(f"no script {str(script)!r}: give the path of a Python file to run")
    if options.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {options.nproc}")
    if options.timeout is not None and options.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {options.timeout:g}")
    passes = passes_from_args(options)
    sys.stdout.flush()
    launch_script(str(script.resolve()), script_args, nproc=options.nproc, all_ranks=options.all_ranks,
                  timeout_s=options.timeout, passes=passes)
    return 0


def launch_script(path: str, argv: list[str], *, nproc: int, all_ranks: bool = False,
                  timeout_s: float | None = None, passes: Sequence[GraphPass] = ()) -> None:
    """Run ``path`` as ``__main__`` in ``nproc`` ranks; a failed rank raises ValueError naming it.
    ``passes`` apply to the script's ``autopar.compile`` calls that give no ``passes=``."""
    from autopar.runtime.pass_state import passes_to_json

    handed = passes_to_json(passes) if passes else None
    run_ranks(run_script, nproc, path, argv, all_ranks, handed, timeout_s=timeout_s)


def run_ranks(fn: Callable[..., Any], nproc: int, *args: Any, timeout_s: float | None = None) -> None:
    """``spawn(fn, nproc, *args)``, with a failed rank turned into one ValueError line that names it.

    ``timeout_s`` None: the launcher's default collective timeout.
    """
    from autopar.runtime.launch import DEFAULT_TIMEOUT_S, spawn  # the runtime is slow to import

    try:
        with quiet_logger("torch.multiprocessing.spawn", logging.ERROR):  # the failed rank is reported once
            spawn(fn, nproc, *args, timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    except ProcessRaisedException as error:
        raise ValueError(f"rank {error.error_index} failed: {_last_line(str(error))}") from None
    except ProcessExitedException as error:
        how = f"signal {error.signal_name}" if error.signal_name else f"exit code {error.exit_code}"
        raise ValueError(f"rank {error.error_index} died ({how})") from None


def run_script(rank: int, world_size: int, path: str, argv: list[str], all_ranks: bool,
               passes_json: str | None = None) -> None:
    """One rank: run ``path`` like ``python path *argv`` inside the initialized process group,
    with ``passes_json`` (``autopar.runtime.pass_state.passes_to_json``) in the environment."""
    from autopar.runtime.pass_state import PASSES_ENV

    if rank != 0 and not all_ranks:
        _silence()
    if passes_json is not None:
        os.environ[PASSES_ENV] = passes_json
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise RuntimeError(f"the script exited with {exit_.code!r}") from None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _silence() -> None:
    """Send this process's stdout and stderr (Python's and the C++ libraries') to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _last_line(traceback_text: str) -> str:
    lines = [line.strip() for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
