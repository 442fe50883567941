"""Command-line options for graph passes: ``--random-ltd min_tokens=N,num_steps=N,...`` and
``--moe num_experts=8,top_k=2,layers=every_other,...``.

Data flow: a subcommand's parser (``autopar run``, ``autopar demo``, ``autopar plan``) calls
:func:`add_pass_arguments`; after parsing, :func:`passes_from_args` turns the options into
``autopar.passes`` objects, or raises one ``ValueError`` line saying what to fix (the CLI
prints it and exits 2). The command hands the passes to ``autopar.compile``/``autopar.plan``;
``autopar run`` hands them to its script through the environment (``autopar.runtime.pass_state``).
"""

from __future__ import annotations

import argparse
from typing import Any

from autopar.cli.moe_args import MOE_HELP, check_count, check_one_line, parse_moe
from autopar.passes import GraphPass, RandomLTD

RANDOM_LTD_EXAMPLE = "--random-ltd min_tokens=128,num_steps=1000,granularity=16,layers=1-10"
RANDOM_LTD_INTS = ("min_tokens", "num_steps", "granularity", "seed")
RANDOM_LTD_KEYS = (*RANDOM_LTD_INTS, "layers")
DEEPSPEED_NAMES = {"min_value": "min_tokens", "require_steps": "num_steps", "seq_per_step": "granularity",
                   "random_ltd_layer_id": "layers"}


def add_pass_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--random-ltd`` to ``parser`` (in a "graph passes" group)."""
    group = parser.add_argument_group("graph passes")
    group.add_argument(
        "--random-ltd", nargs="?", const="", default=None,
        metavar="min_tokens=N,num_steps=N[,granularity=N][,layers=A-B][,seed=N]",
        help="random layerwise token dropping on the middle layers: each keeps min_tokens tokens per "
             "sample at step 0, growing linearly to the full sequence over num_steps steps in multiples of "
             "granularity (default 1); layers: inclusive ranges joined by '+', e.g. 1-10 or 1-4+6 (default: "
             "all but the first and last layer); seed of the token choices (default 0). DeepSpeed's "
             f"min_value/require_steps/seq_per_step. Example: {RANDOM_LTD_EXAMPLE}")
    group.add_argument("--moe", nargs="?", const="", default=None, metavar="K=V,...", help=MOE_HELP)


def passes_from_args(args: argparse.Namespace) -> list[GraphPass]:
    """The passes the parsed options ask for, in the order they run (MoE before random-LTD:
    the MoE pass finds the MLPs in the captured graph before token dropping rewires the layers)."""
    passes: list[GraphPass] = []
    moe = getattr(args, "moe", None)
    if moe is not None:
        passes.append(parse_moe(moe))
    text = getattr(args, "random_ltd", None)
    if text is not None:
        passes.append(parse_random_ltd(text))
    return passes


def parse_random_ltd(text: str) -> RandomLTD:
    """``min_tokens=128,num_steps=1000,granularity=16,layers=1-10`` → ``RandomLTD(...)``."""
    if not text.strip():
        raise ValueError(f"--random-ltd needs at least min_tokens and num_steps (the schedule depends on the "
                         f"sequence length and the training length), e.g. {RANDOM_LTD_EXAMPLE}")
    check_one_line("--random-ltd", text)
    config: dict[str, Any] = {}
    for part in text.split(","):
        key, equals, value = (s.strip() for s in part.partition("="))
        key = key.replace("-", "_")
        if not equals or not key or not value:
            raise ValueError(f"--random-ltd: {part.strip()!r} is not KEY=VALUE; "
                             f"expected e.g. {RANDOM_LTD_EXAMPLE}")
        if key in DEEPSPEED_NAMES:
            raise ValueError(f"--random-ltd: {key} is DeepSpeed's name; here it is {DEEPSPEED_NAMES[key]}="
                             f"{value}")
        if key not in RANDOM_LTD_KEYS:
            raise ValueError(f"--random-ltd: unknown key {key!r}; expected {', '.join(RANDOM_LTD_KEYS)}")
        if key in config:
            raise ValueError(f"--random-ltd: {key} is given twice")
        config[key] = _layers(value) if key == "layers" else _int(key, value)
    missing = [key for key in ("min_tokens", "num_steps") if key not in config]
    if missing:
        raise ValueError(f"--random-ltd: {' and '.join(missing)} missing; expected e.g. {RANDOM_LTD_EXAMPLE}")
    try:
        return RandomLTD(**config)
    except ValueError as err:
        raise ValueError(f"--random-ltd: {err}") from None


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--random-ltd: {key}={value} is not an integer") from None


def _layers(value: str) -> tuple[int, ...]:
    """``1-10`` (inclusive), ``3``, ``1-4+6+8-9`` → layer indices."""
    layers: list[int] = []
    for piece in value.split("+"):
        first, dash, last = piece.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"--random-ltd: layers={value} is invalid: expected inclusive ranges of layer "
                             "indices joined by '+', e.g. layers=1-10 or layers=1-4+6") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"--random-ltd: layers={value} has the range {piece!r}: expected A-B with "
                             "0 <= A <= B")
        check_count(f"--random-ltd: layers={value}", len(layers) + hi - lo + 1)
        layers += range(lo, hi + 1)
    if len(set(layers)) != len(layers):
        raise ValueError(f"--random-ltd: layers={value} names a layer twice")
    return tuple(layers)
