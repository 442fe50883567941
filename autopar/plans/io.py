"""Plan ⇄ JSON: deterministic encoding, strict decoding, atomic save, checked load.

Data flow: the planner and ``autopar.compile`` call ``Plan.to_json``/``Plan.save``; the
runtime, the CLI views and the benchmarks call ``Plan.load``/``Plan.from_json``. JSON
only, never pickle. Decoding checks ``schema_version`` first (a file of an older version is
upgraded by :data:`UPGRADES`, a newer one refused), then every field against the dataclass
annotations (unknown and missing fields are errors), then lets each record validate itself;
errors name the file, the field path and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import types
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from autopar.plans.schema import OLDEST_SCHEMA_VERSION, SCHEMA_VERSION, unsupported_version

if TYPE_CHECKING:
    from autopar.plans.plan import Plan

JSON_OPTIONS: dict[str, Any] = {"sort_keys": True, "indent": 2, "ensure_ascii": False,
                                "allow_nan": False}
REPLAN = "re-plan with `autopar plan`"


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added ``Predicted.stages``, ``memory``, ``dtype`` and ``options``, all with
    empty defaults: a version-1 file is a version-2 plan without per-stage predictions."""
    predicted = data.get("predicted")
    new_fields = {"stages", "memory", "dtype", "options"}
    added = sorted(new_fields.intersection(predicted)) if isinstance(predicted, dict) else []
    if added:
        raise ValueError(f"plan.predicted has field(s) {added}, which schema version 1 does not have; "
                         f"correct schema_version or {REPLAN}")
    return data


def _from_version_2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added ``Parallelism.cp`` and ``sequence_parallel``; a version-2 plan ran neither
    (cp 1, no sequence parallelism, its ``pp × dp × tp`` mesh as it was)."""
    parallelism = data.get("parallelism")
    new_fields = {"cp", "sequence_parallel"}
    added = sorted(new_fields.intersection(parallelism)) if isinstance(parallelism, dict) else []
    if added:
        raise ValueError(f"plan.parallelism has field(s) {added}, which schema version 2 does not have; "
                         f"correct schema_version or {REPLAN}")
    return data


UPGRADES = {1: _from_version_1, 2: _from_version_2}
"""Version → the function that turns its JSON data into the next version's."""


class PlanNotFoundError(FileNotFoundError, ValueError):
    """No file at the plan path (also a ValueError, so the CLI reports it in one line)."""


def to_data(record: Any) -> dict[str, Any]:
    """A Plan (or any of its parts) as plain JSON-able data; pairs become objects."""
    return _encode(record, type(record))


def plan_to_json(plan: Plan) -> str:
    """Deterministic text: the same Plan always gives byte-identical JSON."""
    return json.dumps(to_data(plan), **JSON_OPTIONS) + "\n"


def plan_from_json(text: str, *, record: type[Plan], where: str = "plan JSON") -> Plan:
    """Parse and validate into ``record`` (the Plan class, passed in so that this module, which
    ``plans.plan`` imports, never imports it back); ``where`` names the source in error messages."""
    if not isinstance(text, str):
        raise TypeError(f"Plan.from_json needs a str, got {type(text).__name__}")
    try:
        data = json.loads(text)
    except ValueError as error:  # JSONDecodeError, or an int of more digits than Python converts
        raise ValueError(f"corrupt {where}: not valid JSON ({error}); {REPLAN} "
                         "or restore the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"corrupt {where}: expected a JSON object, got {type(data).__name__}")
    if "schema_version" not in data:
        raise ValueError(f"{where} has no schema_version; this autopar reads versions "
                         f"{OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION} — {REPLAN}")
    version = data["schema_version"]
    if type(version) is not int or not OLDEST_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
        raise ValueError(f"{unsupported_version(version)} ({where})")
    try:
        for old in range(version, SCHEMA_VERSION):
            data = {**UPGRADES[old](data), "schema_version": old + 1}
        return _decode(data, record, "plan")
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid {where}: {error}") from None


def check_fingerprint(plan: Plan, graph_fingerprint: str) -> None:
    """Refuse a plan made for a different graph than the model's current one."""
    if plan.graph_fingerprint != graph_fingerprint:
        raise ValueError(
            f"plan was made for graph fingerprint {_shown(plan.graph_fingerprint)} but the model's "
            f"graph is {graph_fingerprint} — the model changed; {REPLAN}"
        )


def load_plan(path: str | os.PathLike[str], *, record: type[Plan],
              expect_fingerprint: str | None = None) -> Plan:
    """Read, parse and validate a plan file (see ``Plan.load``)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise PlanNotFoundError(f"plan file {name!r} not found — check the path, or make a "
                                "plan with `autopar plan`") from None
    except IsADirectoryError:
        raise ValueError(f"plan file {name!r} is a directory, not a plan file") from None
    except ValueError as error:  # a NUL in the path
        raise ValueError(f"plan file {name!r} is not a valid path ({error})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"corrupt plan file {name!r}: not UTF-8 text ({error}); "
                         f"{REPLAN} or restore the file") from None
    plan = plan_from_json(text, record=record, where=f"plan file {name!r}")
    if expect_fingerprint is not None:
        check_fingerprint(plan, expect_fingerprint)
    return plan


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Atomic write: temp file in the target's folder, fsync, ``os.replace``.

    A failure at any point leaves an existing file untouched and no temp file behind.
    """
    name = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(name))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot save plan to {name!r}: folder {folder!r} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"cannot save plan to {name!r}: it is a directory; give a file name")
    mode = os.stat(name).st_mode & 0o777 if os.path.exists(name) else 0o644
    data = to_data(plan)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(name)}.", suffix=".tmp",
                                    dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, **JSON_OPTIONS)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible everywhere
        folder_handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_handle)
        finally:
            os.close(folder_handle)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_pairs(hint: Any) -> bool:
    """``tuple[tuple[str, X], ...]``: stored as sorted pairs, written as a JSON object."""
    args = get_args(hint)
    return (get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis
            and get_origin(args[0]) is tuple and get_args(args[0])[:1] == (str,))


def _optional_inner(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        (inner,) = [arg for arg in get_args(hint) if arg is not type(None)]
        return inner
    return hint


def _encode(value: Any, hint: Any) -> Any:
    hint = _optional_inner(hint)
    if dataclasses.is_dataclass(value):
        hints = _hints(type(value))
        return {f.name: _encode(getattr(value, f.name), hints[f.name])
                for f in dataclasses.fields(value)}
    if _is_pairs(hint):
        return {key: _encode(item, Any) for key, item in value}
    if isinstance(value, tuple):
        args = get_args(hint)
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args or (Any,) * len(value)
        return [_encode(item, item_hint) for item, item_hint in zip(value, items, strict=True)]
    return value


def _shown(text: str) -> str:
    """Text from the file as is when it prints on one line as one word, else quoted and escaped."""
    return text if text.isprintable() and not any(c.isspace() for c in text) and text else repr(text)


def _wrong(path: str, expected: str, value: Any) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ValueError(f"{path} should be {expected}, got {type(value).__name__} {shown}")


def _decode(value: Any, hint: Any, path: str) -> Any:
    if hint is Any:
        return value
    if get_origin(hint) in (Union, types.UnionType):
        return None if value is None else _decode(value, _optional_inner(hint), path)
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            raise _wrong(path, f"one of {list(get_args(hint))}", value)
        return value
    if dataclasses.is_dataclass(hint):
        return _decode_record(value, hint, path)
    if _is_pairs(hint):
        if not isinstance(value, dict):
            raise _wrong(path, "a JSON object", value)
        item_hint = get_args(get_args(hint)[0])[1]
        return tuple((key, _decode(item, item_hint, f"{path}.{_shown(key)}"))
                     for key, item in sorted(value.items()))
    if get_origin(hint) is tuple:
        return _decode_tuple(value, get_args(hint), path)
    if get_origin(hint) is dict or hint is dict:
        if not isinstance(value, dict):
            raise _wrong(path, "a JSON object", value)
        return value
    kinds = {bool: ((bool,), "a bool"), int: ((int,), "an int"), float: ((int, float), "a number"),
             str: ((str,), "a str")}
    if type(value) not in kinds[hint][0] or (hint is float and abs(value) > sys.float_info.max):
        raise _wrong(path, kinds[hint][1], value)
    return float(value) if hint is float else value


def _decode_tuple(value: Any, args: tuple[Any, ...], path: str) -> tuple[Any, ...]:
    variadic = args[1:] == (Ellipsis,)
    if not isinstance(value, list) or (not variadic and len(value) != len(args)):
        raise _wrong(path, "a JSON list" if variadic else f"a JSON list of {len(args)}", value)
    hints = args[:1] * len(value) if variadic else args
    return tuple(_decode(item, item_hint, f"{path}[{index}]")
                 for index, (item, item_hint) in enumerate(zip(value, hints, strict=True)))


def _decode_record(value: Any, cls: type, path: str) -> Any:
    if not isinstance(value, dict):
        raise _wrong(path, f"a JSON object ({cls.__name__})", value)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{path} has unknown field(s) {unknown}; valid fields: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in value
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{path} is missing field(s) {missing}")
    hints = _hints(cls)
    kwargs = {name: _decode(item, hints[name], f"{path}.{name}") for name, item in value.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
