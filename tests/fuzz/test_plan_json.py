"""Fuzz the plan JSON a user hands autopar: ``Plan.from_json``, ``Plan.load`` and ``Plan.save``.

Inputs are valid plans mutated (the golden plans of ``tests/planner/golden`` and a fresh
``autopar.plan`` of a tiny GPT with MoE and random-LTD on ``local:2``: fields deleted, replaced,
retyped, nudged, added; the text truncated, bytes flipped) and random text. A plan is accepted and
then round-trips byte for byte, or rejected by one ValueError/TypeError line (``strategies``).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autopar import Plan
from tests.fuzz.strategies import (
    accepted,
    at,
    check_refuses_non_str,
    check_rejection,
    fuzz_settings,
    hard_limit,
    json_values,
    mutated_bytes,
    mutated_json,
    mutated_numbers,
    mutated_text,
    paths,
)


def check_plan_text(text: str) -> None:
    plan = accepted(Plan.from_json, text, mention="plan")
    if plan is not None:
        again = Plan.from_json(plan.to_json())
        assert again == plan and again.to_json() == plan.to_json()


@fuzz_settings(150)
@given(data=st.data())
def test_mutated_plan_data(plan_texts, data):
    original = json.loads(plan_texts.draw(data))
    mutated = data.draw(mutated_json(original))
    check_plan_text(json.dumps(mutated, ensure_ascii=False))


@fuzz_settings(60)
@given(data=st.data(), key=st.text(min_size=1, max_size=6).map(lambda text: f"{text}\n{text}"),
       value=json_values)
def test_odd_key_in_any_object(plan_texts, data, key, value):
    """Keys come back in messages (a field path): one with a newline must not split the line."""
    original = json.loads(plan_texts.draw(data))
    objects = [path for path in paths(original) if isinstance(at(original, path), dict)]
    at(original, data.draw(st.sampled_from(objects)))[key] = value
    check_plan_text(json.dumps(original))


@fuzz_settings(80)
@given(data=st.data())
def test_plan_numbers(plan_texts, data):
    """One or two numbers replaced: huge ints (no float holds them), inf, nan, negative, other types.
    Not the cluster's: see test_huge_int_in_the_cluster."""
    original = json.loads(plan_texts.draw(data))
    check_plan_text(json.dumps(data.draw(mutated_numbers(original, skip=("cluster",)))))


def test_huge_int_in_the_cluster(plan_texts):
    """An int larger than any float in the cluster's device record: refused, not an OverflowError."""
    data = json.loads(plan_texts["local:2 with passes"])
    data["cluster"]["device"]["memory_bandwidth_bytes_per_s"] = 10**400
    check_plan_text(json.dumps(data))


@fuzz_settings(60)
@given(data=st.data())
def test_mutated_plan_text(plan_texts, data):
    check_plan_text(data.draw(mutated_text(plan_texts.draw(data))))


@fuzz_settings(60)
@given(text=st.text(max_size=200) | json_values.map(json.dumps))
def test_random_text(text):
    check_plan_text(text)


@fuzz_settings(20)
@given(value=json_values | st.binary(max_size=16) | st.builds(object))
def test_not_a_str(value):
    check_refuses_non_str(Plan.from_json, value)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plans")


@fuzz_settings(60)
@given(data=st.data())
def test_load_mutated_file(plan_texts, folder, data):
    raw = data.draw(mutated_bytes(plan_texts.draw(data).encode()))
    path = folder / "plan.json"
    path.write_bytes(raw)
    plan = accepted(Plan.load, path, mention="plan")
    if plan is not None:
        assert plan == Plan.from_json(raw.decode("utf-8"))
        accepted(Plan.load, path, expect_fingerprint=data.draw(st.text(max_size=8)), mention="plan")


@fuzz_settings(30)
@given(name=st.text(max_size=40))
def test_load_odd_paths(folder, name):
    (folder / "a folder").mkdir(exist_ok=True)
    for path in (name.lstrip("/"), f"{folder}/{name}", f"{folder}/a folder/{name}"):
        accepted(Plan.load, path, mention="plan")


FAULTS = {  # what can go wrong inside Plan.save, and where
    "none": None,
    "dump": ("json.dump", RuntimeError("disk on fire")),
    "fsync": ("os.fsync", OSError(5, "fsync failed")),
    "replace": ("os.replace", OSError(28, "No space left on device")),
    "chmod": ("os.chmod", PermissionError(1, "Operation not permitted")),
    "interrupt": ("os.fsync", KeyboardInterrupt()),
}


@fuzz_settings(60)
@given(data=st.data(), name=st.text(st.characters(blacklist_characters="/"), min_size=1, max_size=30),
       where=st.sampled_from(("folder", "missing folder")),
       existing=st.sampled_from(("nothing", "file", "folder")), fault=st.sampled_from(sorted(FAULTS)))
def test_save_is_atomic(plan_texts, tmp_path_factory, data, name, where, existing, fault):
    """A save either writes a file that loads as the plan, or fails leaving the folder as it was:
    no temp file, an existing file untouched; a bad path is one ValueError line."""
    folder = tmp_path_factory.mktemp("save")
    plan = Plan.from_json(plan_texts.draw(data))
    target = f"{folder}/{name}" if where == "folder" else f"{folder}/missing/{name}"
    if where == "folder" and name not in (".", "..") and "\x00" not in name:
        if existing == "file":
            Path(target).write_text("old plan")
        elif existing == "folder":
            os.mkdir(target)
    before = _listing(folder)
    patch = mock.patch(FAULTS[fault][0], side_effect=FAULTS[fault][1]) if FAULTS[fault] else nullcontext()
    try:
        with hard_limit(), patch:
            plan.save(target)
    except (ValueError, TypeError) as error:
        check_rejection(error)
        failed = True
    except (OSError, RuntimeError, KeyboardInterrupt):
        assert fault != "none", "an OSError where a user mistake should be a ValueError"
        failed = True
    else:
        failed = False
    after = _listing(folder)
    assert not [entry for entry in after if entry.endswith(".tmp")], f"a temp file is left: {sorted(after)}"
    if failed:
        assert after == before
    else:
        assert set(after) - set(before) <= {name} and Plan.load(target) == plan


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Entry → its bytes (None for a folder)."""
    return {entry: (folder / entry).read_bytes() if (folder / entry).is_file() else None
            for entry in os.listdir(folder)}
