"""Graph-node and module names in a Plan: folding repeated layers, finding what a user typed.

Data flow: ``plan.shardings`` node names (fx names such as ``blocks_11_attn_qkv``) → :func:`fold`
(one row per name pattern: ``blocks_*_attn_qkv colwise, layers 0–95``) for the HTML report and
``explain``; a user's NODE_OR_MODULE (``blocks.11.attn.qkv``, ``blocks_11_attn_qkv``,
``blocks.11``, ``layer 11``, ``11``) → :func:`lookup` (the layer it names and the shardings it
covers) for ``explain``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from autopar.plans import Plan, Sharding

_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Folded:
    pattern: str
    strategy: str
    numbers: tuple[int, ...]


def fold(shardings: tuple[Sharding, ...]) -> list[Folded]:
    """Group node names that differ only in their first number (the layer index)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for sharding in shardings:
        match = _NUMBER.search(sharding.node)
        pattern = sharding.node if match is None else (
            sharding.node[:match.start()] + "*" + sharding.node[match.end():])
        groups.setdefault((pattern, sharding.strategy), []).extend([int(match.group())] if match else [])
    return [Folded(pattern, strategy, tuple(sorted(numbers)))
            for (pattern, strategy), numbers in groups.items()]


def _normal(name: str) -> str:
    return name.strip().replace(".", "_").replace("/", "_")


@dataclass(frozen=True)
class Match:
    """What NODE_OR_MODULE names: a layer index (or None) and the shardings under it."""

    query: str
    layer: int | None
    shardings: tuple[Sharding, ...]


def lookup(plan: Plan, query: str) -> Match:
    """Resolve ``query`` (see the module docstring); raise ValueError naming the closest
    names when nothing matches."""
    text, num_layers = query.strip(), plan.stages[-1].layers[1]
    bare = re.fullmatch(r"(?:layer\s*)?(\d+)", text, re.IGNORECASE)
    if bare:
        layer = int(bare.group(1))
        if layer >= num_layers:
            raise ValueError(f"layer {layer} is out of range: the plan's model has layers 0–{num_layers - 1}")
        return Match(text, layer, ())
    key = _normal(text)
    shardings = tuple(s for s in plan.shardings if s.node in (text, key) or s.node.startswith(key + "_"))
    number = _NUMBER.search(key)
    layer = int(number.group()) if number and int(number.group()) < num_layers else None
    if shardings or (layer is not None and _names_layer(plan, key)):
        return Match(text, layer, shardings)
    names = sorted({s.node for s in plan.shardings})
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"try a layer index 0–{num_layers - 1}" + (
        f" or a node such as {names[0]}" if names else "")
    raise ValueError(f"{query!r} names no layer or graph node of this plan; {hint}")


def _names_layer(plan: Plan, key: str) -> bool:
    """``blocks_11`` names a layer when it ends in its number and some sharded node starts with
    the same prefix and a number (any prefix when the plan lists no shardings)."""
    match = _NUMBER.search(key)
    if match is None or match.end() != len(key):
        return False
    prefix = re.escape(key[:match.start()])
    return not plan.shardings or any(re.match(prefix + r"\d+_", s.node) for s in plan.shardings)
