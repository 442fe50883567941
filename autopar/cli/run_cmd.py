"""``autopar run script.py --nproc N [-- script args]``: run a training script on N local processes.

Data flow: the CLI → :func:`autopar.runtime.launch.spawn` (N processes, a gloo process
group with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set) → in each rank
:func:`run_script` runs the file as ``__main__`` with ``sys.argv`` set, so the script
just calls ``autopar.compile(model, "local:N", fix=...)`` and ``.step(...)``. Graph-pass
options (``--random-ltd ...``, ``--moe ...``, :mod:`autopar.cli.pass_args`) reach every ``autopar.compile``
in the script that gives no ``passes=`` itself, through the environment. Only rank 0's
output is shown unless ``--all-ranks``. A rank whose script raises shows that rank's traceback
(the script's files and lines; the launcher's own frames left out) above one line naming the rank
(:class:`ScriptFailed`, exit code 1, like ``python script.py``); a user mistake that autopar itself
reports (a ``ValueError``/``TypeError`` raised inside autopar, such as a bad ``fix=``) stays one
line, exit code 2, unless ``--debug`` asks for the whole traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import pydoc
import re
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from autopar.cli.pass_args import add_pass_arguments, passes_from_args
from autopar.passes import GraphPass, PassError
from autopar.quiet import quiet_logger

USER_MISTAKES = (ValueError, TypeError, FileNotFoundError, ImportError, PassError)
"""What autopar reports as a user's mistake: one line, exit code 2 (``autopar.cli.main``), also when
raised inside autopar in a rank of ``autopar run``."""


class ScriptFailed(Exception):
    """A rank raised outside autopar's user-mistake errors: ``str(self)`` is one line naming the rank,
    ``traceback_text`` that rank's traceback (the CLI prints both, exit code 1)."""

    def __init__(self, message: str, traceback_text: str) -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


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
                  timeout_s=options.timeout, passes=passes, full_traceback=getattr(args, "debug", False))
    return 0


def launch_script(path: str, argv: list[str], *, nproc: int, all_ranks: bool = False,
                  timeout_s: float | None = None, passes: Sequence[GraphPass] = (),
                  full_traceback: bool = False) -> None:
    """Run ``path`` as ``__main__`` in ``nproc`` ranks; a failed rank raises as :func:`run_ranks` says.
    ``passes`` apply to the script's ``autopar.compile`` calls that give no ``passes=``."""
    from autopar.runtime.pass_state import passes_to_json

    handed = passes_to_json(passes) if passes else None
    run_ranks(run_script, nproc, path, argv, all_ranks, handed, timeout_s=timeout_s,
              full_traceback=full_traceback)


def run_ranks(fn: Callable[..., Any], nproc: int, *args: Any, timeout_s: float | None = None,
              full_traceback: bool = False) -> None:
    """``spawn(fn, nproc, *args)``; a failed rank raises :class:`ScriptFailed` with its traceback, or a
    one-line ValueError naming it when autopar reported a user mistake there (``full_traceback``:
    always the traceback, launcher frames included).

    ``timeout_s`` None: the launcher's default collective timeout.
    """
    from autopar.runtime.launch import DEFAULT_TIMEOUT_S, spawn  # the runtime is slow to import

    try:
        with quiet_logger("torch.multiprocessing.spawn", logging.ERROR):  # the failed rank is reported once
            spawn(fn, nproc, *args, timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    except ProcessRaisedException as error:
        raise _rank_failure(error.error_index, str(error), full_traceback=full_traceback) from None
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


_FRAME = re.compile(r'^  File "(?P<file>[^"]*)", line \d+')


def _rank_failure(rank: int, text: str, *, full_traceback: bool) -> Exception:
    """The error for a rank whose traceback (as ``torch.multiprocessing`` sends it) is ``text``."""
    _, marker, rest = text.partition("terminated with the following error:\n")
    trace = (rest if marker else text).strip("\n")
    lines = trace.splitlines()
    frames = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    after = frames[-1] + 1 if frames else 0
    while after < len(lines) and lines[after].startswith("    "):
        after += 1  # the innermost frame's source line and carets
    exception = next((line.strip() for line in lines[after:] if line.strip()), "unknown error")
    message = f"rank {rank} failed: {exception}"
    innermost = _FRAME.match(lines[frames[-1]]).group("file") if frames else ""  # type: ignore[union-attr]
    if not full_traceback and _reported_by_autopar(exception, innermost):
        return ValueError(message)
    return ScriptFailed(message, trace if full_traceback else _without_launcher(lines))


def _reported_by_autopar(exception: str, innermost_file: str) -> bool:
    """One of :data:`USER_MISTAKES` raised inside autopar, or a failure of this launcher itself (such
    as the script's non-zero ``sys.exit``)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.abspath(innermost_file).startswith(package + os.sep):
        return False
    if os.path.abspath(innermost_file) == os.path.abspath(__file__):
        return True
    kind = pydoc.locate(exception.partition(":")[0].strip())
    return isinstance(kind, type) and issubclass(kind, USER_MISTAKES)


def _without_launcher(lines: list[str]) -> str:
    """The traceback without the frames of the spawner, ``runpy`` and this module (with their source
    lines): what ``python script.py`` would have shown."""
    from autopar.runtime import launch

    spawner = sys.modules[ProcessRaisedException.__module__]  # torch.multiprocessing.spawn
    files = (__file__, launch.__file__, spawner.__file__, runpy.__file__)
    launchers = {os.path.abspath(f) for f in files if f}
    kept, skipping = [], False
    for line in lines:
        frame = _FRAME.match(line)
        if frame:
            name = frame.group("file")
            skipping = name == "<frozen runpy>" or os.path.abspath(name) in launchers
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept)
