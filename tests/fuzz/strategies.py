"""What the fuzz tests share: their settings, strategies that mutate valid inputs, and the checks
that every input autopar rejects must pass.

The property everywhere: an input is accepted, or rejected with a ``ValueError``/``TypeError``
whose message is one non-empty line (the CLI: exit code 2 and exactly one line on stderr); any
other exception fails the test with its traceback; no example runs past :data:`HARD_LIMIT_S`.
Set ``AUTOPAR_FUZZ_SCALE=10`` for ten times the examples (a longer local run; CI uses 1).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HARD_LIMIT_S = 20.0  # an example still running after this is a hang: SIGALRM interrupts it
SCALE = float(os.environ.get("AUTOPAR_FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int, *, deadline_s: float = 2.0) -> settings:
    """Deterministic (``derandomize``: CI runs the same examples every time), no example database,
    ``max_examples`` scaled by ``AUTOPAR_FUZZ_SCALE``; ``deadline_s`` flags a slow example."""
    return settings(max_examples=max(1, round(max_examples * SCALE)), deadline=timedelta(seconds=deadline_s),
                    derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@contextlib.contextmanager
def hard_limit(seconds: float = HARD_LIMIT_S) -> Iterator[None]:
    """Interrupt a hang (a loop the deadline only reports once it ends) with a TimeoutError."""
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"example still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_rejection(error: BaseException, *, mention: str = "") -> None:
    """A rejected input: ValueError/TypeError with a one-line, non-empty message; ``mention``: what
    the library's own messages for this input name (so a bare Python message like "unhashable type"
    is caught too)."""
    assert isinstance(error, ValueError | TypeError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in message and "\r" not in message, f"a multi-line message: {message!r}"
    assert mention in message, f"not a message of autopar's (no {mention!r}): {message!r}"


def check_refuses_non_str(call: Callable[[Any], Any], value: Any) -> None:
    """``call`` (a parser of text) given anything but a str: a one-line TypeError."""
    if isinstance(value, str):
        return
    try:
        call(value)
    except TypeError as error:
        check_rejection(error)
    else:
        raise AssertionError(f"{getattr(call, '__qualname__', call)} accepted a {type(value).__name__}")


def accepted(call: Callable[..., Any], *args: Any, mention: str = "", **kwargs: Any) -> Any:
    """``call(...)``'s result, or None after checking the rejection; other errors propagate."""
    with hard_limit():
        try:
            return call(*args, **kwargs)
        except (ValueError, TypeError) as error:
            check_rejection(error, mention=mention)
            return None


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``autopar --no-color ARGV`` in this process: exit code, stdout, stderr."""
    from autopar.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with hard_limit(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--no-color", *argv])
    return code, out.getvalue(), err.getvalue()


def check_cli(code: int, err: str) -> None:
    """Success prints nothing on stderr; a user error is exit code 2 and one ``autopar: error:`` line."""
    if code == 0:
        assert err == "", f"exit 0 with stderr {err!r}"
        return
    prefix = "autopar: error: "
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert err.startswith(prefix) and err.endswith("\n") and err.count("\n") == 1, f"stderr {err!r}"
    assert err[len(prefix):].strip(), "an empty error message"


class Corpus(dict[str, Any]):
    """Valid inputs by name, shown by their names only in a failing example's report."""

    def __repr__(self) -> str:
        return f"Corpus({sorted(self)})"

    def draw(self, data: st.DataObject) -> Any:
        return self[data.draw(st.sampled_from(sorted(self)), label="valid input")]


# -- values ------------------------------------------------------------------------------------

EDGE_VALUES = (0, -1, 1, 2, 3, 8, 2**31, 2**63, -(2**63), 10**30, 10**400, -(10**400), 0.5, 1.5, -0.0, 1e308,
               1e-320, "", " ", "0", "1", "-1", "x", "gpipe", "1f1b", "none", "\n", "a\nb", "\x00", "ü",
               True, False, None,
               [], {}, [0], [1, 2], {"": 0})
numbers = (st.integers(-(2**70), 2**70) | st.floats()
           | st.sampled_from((10**400, 1e308, 5e-324, 2**63, -0.0)))
"""Numbers a strict parser must bound: huge ints (no float holds them), inf, nan, subnormals."""
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
keys = st.text(max_size=12) | st.sampled_from(("", " ", "a\nb", "\r", "\x00", "compute", "name", "x.y"))
json_values = st.recursive(scalars | st.sampled_from(EDGE_VALUES),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(keys, inner, max_size=4),
                           max_leaves=8)


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every position in a JSON tree: the root, dict keys and list indices, depth first."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from paths(value, (*prefix, key))


def at(tree: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` (of :func:`paths`) in a JSON tree."""
    for key in path:
        tree = tree[key]
    return tree


def retyped(value: Any) -> Any:
    """The same content in another JSON type: 3 → "3", "3" → 3, [a] → {"0": a}, {k: v} → [v]."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return len(value)
    if isinstance(value, list):
        return {str(index): item for index, item in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return False


def nudged(value: Any, change: int) -> Any:
    """A nearby value of the same type: ints ± a step, × 2, negated; floats scaled; text cut."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return (value + change, value * 2, -value, value + 1, value - 1)[abs(change) % 5]
    if isinstance(value, float):
        return value * (1 + change / 4)
    if isinstance(value, str):
        return value[:change % max(1, len(value))] + value[:1]
    return value


MUTATIONS = ("delete", "replace", "edge", "retype", "nudge", "add", "duplicate")


@st.composite
def mutated_json(draw: st.DrawFn, data: Any, *, max_mutations: int = 3) -> Any:
    """``data`` with 1 to ``max_mutations`` changes at random positions: a field deleted, replaced by
    a random or edge value, retyped, nudged, an unknown field added, a list item duplicated."""
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, max_mutations))):
        path = draw(st.sampled_from([*list(paths(data))[1:], ()]))  # the root last: rarely replaced
        operation = draw(st.sampled_from(MUTATIONS))
        if not path:
            data = draw(json_values) if operation in ("replace", "edge") else retyped(data)
            continue
        parent, key = at(data, path[:-1]), path[-1]
        if operation == "delete":
            del parent[key]
        elif operation == "replace":
            parent[key] = draw(json_values)
        elif operation == "edge":
            parent[key] = copy.deepcopy(draw(st.sampled_from(EDGE_VALUES)))
        elif operation == "retype":
            parent[key] = retyped(parent[key])
        elif operation == "nudge":
            parent[key] = nudged(parent[key], draw(st.integers(-3, 3)))
        elif operation == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(json_values)
        elif isinstance(parent, list):  # "add"/"duplicate" on a list item
            parent.insert(key, copy.deepcopy(parent[key]))
        else:  # "duplicate" of a dict entry under another key
            parent[f"{key}_"] = copy.deepcopy(parent[key])
    return data


@st.composite
def mutated_numbers(draw: st.DrawFn, data: Any, *, skip: tuple[str, ...] = ()) -> Any:
    """``data`` with one or two of its numbers (outside the top-level fields ``skip``) replaced by
    :data:`numbers` or any JSON value."""
    data = copy.deepcopy(data)
    places = [path for path in paths(data) if path[:1] not in [(name,) for name in skip]
              and type(at(data, path)) in (int, float)]
    for path in draw(st.sets(st.sampled_from(places), min_size=1, max_size=2)):
        at(data, path[:-1])[path[-1]] = draw(numbers | json_values)
    return data


@st.composite
def mutated_bytes(draw: st.DrawFn, raw: bytes, *, max_mutations: int = 3) -> bytes:
    """``raw`` truncated, with bytes flipped, inserted, deleted or a slice repeated."""
    for _ in range(draw(st.integers(1, max_mutations))):
        at = draw(st.integers(0, len(raw)))
        operation = draw(st.sampled_from(("truncate", "flip", "insert", "delete", "repeat")))
        if operation == "truncate":
            raw = raw[:at]
        elif operation == "flip" and at < len(raw):
            raw = raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1:]
        elif operation == "insert":
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
        elif operation == "delete":
            raw = raw[:at] + raw[at + draw(st.integers(1, 16)):]
        else:
            raw = raw[:at] + raw[at:at + draw(st.integers(1, 64))] * 2 + raw[at + 64:]
    return raw


@st.composite
def mutated_text(draw: st.DrawFn, text: str, *, max_mutations: int = 3) -> str:
    """``text`` truncated, with characters replaced, inserted (any Unicode) or deleted."""
    for _ in range(draw(st.integers(1, max_mutations))):
        at = draw(st.integers(0, len(text)))
        operation = draw(st.sampled_from(("truncate", "replace", "insert", "delete")))
        if operation == "truncate":
            text = text[:at]
        elif operation == "replace":
            text = text[:at] + draw(st.text(min_size=1, max_size=3)) + text[at + 1:]
        elif operation == "insert":
            text = text[:at] + draw(st.text(min_size=1, max_size=6)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
    return text


def to_toml(data: dict[str, Any]) -> str:
    """A flat table (inline tables and arrays for nested values) as TOML; values TOML cannot hold
    (None) are written anyway, which makes the file invalid: also a case to reject cleanly."""
    def value(item: Any) -> str:
        if isinstance(item, bool):
            return str(item).lower()
        if isinstance(item, float) and not math.isfinite(item):
            return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf")
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(v)}" for k, v in item.items()) + " }"
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return "null" if item is None else json.dumps(item, ensure_ascii=False)

    return "".join(f"{json.dumps(key, ensure_ascii=False)} = {value(item)}\n" for key, item in data.items())
