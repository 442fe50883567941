"""Entry point of the ``autopar`` console script.

Every user mistake (``ValueError``/``TypeError``, a missing file, an untraceable
model) prints one line and exits with code 2; ``--debug`` shows the traceback. A script that
``autopar run`` ran and that raised shows the failing rank's traceback, then one line naming the
rank, exit code 1 (``run_cmd.ScriptFailed``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from autopar.cli import (
    calibrate_cmd,
    capture_cmd,
    demo,
    diff_cmd,
    explain_cmd,
    plan_cmd,
    run_cmd,
    show_cmd,
    sweep_cmd,
    train_cmd,
)
from autopar.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopar",
        description="autopar: capture, plan and run PyTorch models in parallel.",
    )
    parser.add_argument("--version", action="version", version=f"autopar {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--no-color", action="store_true", help="plain output without colours")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    calibrate_cmd.add_parser(subparsers)
    capture_cmd.add_parser(subparsers)
    demo.add_parser(subparsers)
    run_cmd.add_parser(subparsers)
    plan_cmd.add_parser(subparsers)
    show_cmd.add_parser(subparsers)
    diff_cmd.add_parser(subparsers)
    explain_cmd.add_parser(subparsers)
    sweep_cmd.add_parser(subparsers)
    train_cmd.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    console = Console(no_color=args.no_color, highlight=False)
    try:
        return int(args.run(args, console))
    except run_cmd.ScriptFailed as failed:
        print(failed.traceback_text.rstrip("\n"), file=sys.stderr)
        print(f"autopar: error: {failed}", file=sys.stderr)
        return 1
    except run_cmd.USER_MISTAKES as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())
        print(f"autopar: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
