"""The graph-pass options' CLI tests (``--moe``, ``--random-ltd``): ``autopar`` run in this process,
the options parsed alone, the check that a bad value is one line of error with exit code 2, and a
training script run by ``autopar run`` that reports what its ``autopar.compile`` received."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from autopar.cli.main import main
from autopar.cli.pass_args import add_pass_arguments, passes_from_args


def run_cli(capfd: Any, *argv: str) -> tuple[int, str, str]:
    """``autopar --no-color ARGV`` in this process: exit code, stdout and stderr."""
    code = main(["--no-color", *argv])
    out, err = capfd.readouterr()
    return code, out, err


def parse_passes(*argv: str) -> list[Any]:
    """The passes that the graph-pass options ``argv`` ask for."""
    parser = argparse.ArgumentParser()
    add_pass_arguments(parser)
    return passes_from_args(parser.parse_args(argv))


def assert_one_line_error(capfd: Any, tmp_path: Path, option: list[str], message: str, *,
                          plan: bool = False) -> None:
    """``option`` (the flag, then its value if any) makes ``autopar run`` and ``autopar demo`` (and
    ``autopar plan`` with ``plan``) exit with code 2 and one line of error about the flag that
    contains ``message``; the script is never run."""
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('never run')\n")
    commands = [["run", str(script), "--nproc", "2", *option], ["demo", *option]]
    if plan:
        commands.append(["plan", "gpt-tiny", "--cluster", "8xA100-80GB", "--batch", "8", *option])
    for argv in commands:
        code, out, err = run_cli(capfd, *argv)
        assert code == 2, (argv, out, err)
        assert err.count("\n") == 1 and err.startswith(f"autopar: error: {option[0]}"), err
        assert message in err, err


def run_script(capfd: Any, tmp_path: Path, script: str, *options: str, nproc: int) -> list[dict[str, Any]]:
    """``autopar run`` of ``script`` on ``nproc`` ranks with ``options``, which must succeed; the JSON
    that each rank wrote as ``rank<N>.json`` into the folder its ``--out`` names."""
    path = tmp_path / "train.py"
    path.write_text(script)
    code, out, err = run_cli(capfd, "run", str(path), "--nproc", str(nproc), *options, "--", "--out",
                             str(tmp_path))
    assert code == 0, err
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(nproc)]
