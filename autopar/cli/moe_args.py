"""``--moe K=V,...``: the MoE pass's options on the command line (``autopar plan``, ``run``, ``demo``).

Data flow: :mod:`autopar.cli.pass_args` adds the option with :data:`MOE_HELP` and calls
:func:`parse_moe` on its text → ``autopar.passes.MoE(...)``, or one ``ValueError`` line naming the
key and what to write (the CLI prints it and exits 2). The keys are ``MoE``'s fields; each value
is read by the field's type hint (bool, int, float, a tuple of ints, text, or ``none``), so fields
added to ``MoE`` are options without a change here; ``MoE`` itself validates the values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from autopar.passes import MoE

MOE_EXAMPLE = "--moe num_experts=8,top_k=2,layers=every_other,capacity_factor=1.25"
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
MAX_ITEMS = 100_000  # layers or expert counts in one option: more than any model has, and quick to list
LIST = re.compile(r"^\d+(-\d+)?([;+]\d+(-\d+)?)*$")  # 1;3;5, 1+3+5, 1-3 (ranges for layers only)
# DeepSpeed-MoE's argument names (deepspeed.moe.layer.MoE) that differ here, with what to write instead
DEEPSPEED_NAMES = {
    "k": "k is DeepSpeed's name; here it is top_k={value}",
    "ep_size": "ep_size is not a pass option: expert parallelism is a plan choice, e.g. --fix ep={value}",
    "drop_tokens": "drop_tokens is not an option: capacity_factor sets how many tokens an expert takes "
                   "(num_experts / top_k drops none; dropless=true none at all)",
}
MOE_HELP = (
    "Mixture of Experts by sparse upcycling: the MLPs of the chosen layers become MoE layers whose "
    "experts start as copies of the dense MLP. Keys: the fields of autopar.passes.MoE ("
    + ", ".join(f.name for f in dataclasses.fields(MoE))
    + "); lists as 4;8 or 4+8; layers: every_other (default), second_half, or indices such as 1+3+5, "
    f"'1;3;5' or 1-3. --moe alone takes MoE()'s defaults. Example: {MOE_EXAMPLE}"
)


def parse_moe(text: str) -> MoE:
    """``num_experts=8,top_k=2,layers=1;3`` → ``MoE(num_experts=8, top_k=2, layers=(1, 3))``."""
    check_one_line("--moe", text)
    hints = typing.get_type_hints(MoE)
    keys = [f.name for f in dataclasses.fields(MoE)]
    config: dict[str, Any] = {}
    for part in text.split(",") if text.strip() else []:
        key, equals, value = (s.strip() for s in part.partition("="))
        key = key.replace("-", "_")
        if not equals or not key or not value:
            raise ValueError(f"--moe: {part.strip()!r} is not KEY=VALUE; expected e.g. {MOE_EXAMPLE}")
        if key in DEEPSPEED_NAMES:
            raise ValueError("--moe: " + DEEPSPEED_NAMES[key].format(value=value))
        if key not in keys:
            raise ValueError(f"--moe: unknown key {key!r}; expected {', '.join(keys)}")
        if key in config:
            raise ValueError(f"--moe: {key} is given twice")
        config[key] = _value(key, value, hints[key])
    try:
        return MoE(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--moe: {err}") from None


def _options(hint: Any) -> set[Any]:
    """The types a hint allows: ``int | tuple[int, ...] | None`` → {int, tuple[int, ...], NoneType}."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set(typing.get_args(hint))
    return {hint}


def _value(key: str, value: str, hint: Any) -> Any:
    options = _options(hint)
    textual = str in options or any(typing.get_origin(o) is typing.Literal for o in options)
    listed = any(typing.get_origin(o) is tuple for o in options)
    if value.lower() == "none" and type(None) in options:
        return None
    if bool in options:
        if value.lower() not in TRUE + FALSE:
            raise ValueError(f"--moe: {key}={value} is not true or false")
        return value.lower() in TRUE
    if int in options and re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    if listed and LIST.match(value):
        return _int_tuple(key, value, ranges=key == "layers")
    if float in options:
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            raise ValueError(f"--moe: {key}={value} is not a finite number")
        if number is not None:
            return number
    if textual:
        return value
    nouns = [n for n, t in (("an integer", int), ("a number", float)) if t in options]
    nouns += ["integers joined by ';' or '+'"] if listed else []
    nouns += ["none"] if type(None) in options else []
    either = " or ".join(nouns) if len(nouns) < 3 else f"{', '.join(nouns[:-1])}, or {nouns[-1]}"
    raise ValueError(f"--moe: {key}={value} is not {either}")


def _int_tuple(key: str, value: str, *, ranges: bool) -> tuple[int, ...]:
    """``1;3;5`` or ``1+3+5`` (and inclusive ranges ``1-3`` when ``ranges``) → ``(1, 3, 5)``."""
    items: list[int] = []
    for piece in value.replace("+", ";").split(";"):
        first, dash, last = piece.partition("-")
        if dash and not ranges:
            raise ValueError(f"--moe: {key}={value} has the range {piece!r}; give each value, e.g. 4;8")
        lo, hi = int(first), int(last if dash else first)
        if hi < lo:
            raise ValueError(f"--moe: {key}={value} has the range {piece!r}: expected A-B with A <= B")
        check_count(f"--moe: {key}={value}", len(items) + hi - lo + 1)
        items += range(lo, hi + 1)
    if key == "layers" and len(set(items)) != len(items):
        raise ValueError(f"--moe: {key}={value} names a layer twice")
    return tuple(items)


def check_count(option: str, count: int) -> None:
    """Refuse a list of more than :data:`MAX_ITEMS` values before building it (``0-10**12`` would
    fill the memory)."""
    if count > MAX_ITEMS:
        raise ValueError(f"{option} lists {count} values; at most {MAX_ITEMS:,} (no model has more layers)")


def check_one_line(option: str, text: str) -> None:
    """Refuse a line break inside the option up front, so that each message quoting it is one line."""
    if len(text.strip().splitlines()) > 1:
        raise ValueError(f"{option} {text.strip()!r} holds a line break; write the option on one line")
