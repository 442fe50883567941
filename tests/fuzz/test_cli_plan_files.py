"""Fuzz the plan files handed to ``autopar show``, ``autopar explain`` and ``autopar diff``.

Valid plans (the golden plans, a fresh ``local:2`` plan) mutated as data and as bytes, odd
paths and explain targets: each command exits 0 with nothing on stderr, or exits 2 with exactly
one ``autopar: error:`` line; no traceback, no hang.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import (
    check_cli,
    fuzz_settings,
    mutated_bytes,
    mutated_json,
    mutated_numbers,
    run_cli,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


COMMANDS = (("show",), ("show", "--format", "json"), ("show", "--format", "dot"), ("explain",))


def check_commands(path: Path, other: Path, command: tuple[str, ...]) -> None:
    code, _, err = run_cli(command[0], str(path), *command[1:])
    check_cli(code, err)
    code, _, err = run_cli("diff", str(path), str(other))
    check_cli(code, err)


@fuzz_settings(80)
@given(data=st.data(), command=st.sampled_from(COMMANDS))
def test_mutated_plan_data(plan_texts, folder, data, command):
    original = json.loads(plan_texts.draw(data))
    path, other = folder / "mutated.json", folder / "other.json"
    mutated = data.draw(mutated_json(original))
    path.write_text(json.dumps(mutated, ensure_ascii=False), encoding="utf-8")
    other.write_text(plan_texts.draw(data), encoding="utf-8")
    check_commands(path, other, command)


@fuzz_settings(60)
@given(data=st.data(), command=st.sampled_from(COMMANDS))
def test_plan_numbers(plan_texts, folder, data, command):
    """Numbers the views format: huge, tiny, zero, negative, non-finite (the cluster's: see
    test_plan_json.test_huge_int_in_the_cluster)."""
    original = json.loads(plan_texts.draw(data))
    path, other = folder / "numbers.json", folder / "other.json"
    path.write_text(json.dumps(data.draw(mutated_numbers(original, skip=("cluster",)))), encoding="utf-8")
    other.write_text(plan_texts.draw(data), encoding="utf-8")
    check_commands(path, other, command)


@fuzz_settings(50)
@given(data=st.data(), command=st.sampled_from(COMMANDS))
def test_mutated_plan_bytes(plan_texts, folder, data, command):
    path, other = folder / "mutated.json", folder / "other.json"
    path.write_bytes(data.draw(mutated_bytes(plan_texts.draw(data).encode())))
    other.write_text(plan_texts.draw(data), encoding="utf-8")
    check_commands(path, other, command)
    check_commands(other, path, ("explain",))


@fuzz_settings(60)
@given(data=st.data(), target=st.text(max_size=30) | st.sampled_from(
    ("0", "-1", "999", "1.5", "blocks", "blocks.0", "blocks.99.attn", "layers.0.mlp", ".", "..", "*", "\n")))
def test_explain_target(plan_texts, folder, data, target):
    path = folder / "plan.json"
    path.write_text(plan_texts.draw(data), encoding="utf-8")
    code, _, err = run_cli("explain", str(path), "--", target)
    check_cli(code, err)


@fuzz_settings(20)
@given(name=st.text(max_size=20), kind=st.sampled_from(("missing", "folder", "empty", "binary")))
def test_odd_plan_paths(folder, name, kind):
    path = f"{folder}/{kind}-{name}".replace("\x00", "")
    if kind == "folder":
        Path(path).mkdir(parents=True, exist_ok=True)
    elif kind == "empty" and "/" not in name:
        Path(path).write_bytes(b"")
    elif kind == "binary" and "/" not in name:
        Path(path).write_bytes(bytes(range(256)))
    for argv in (("show", path), ("explain", path), ("diff", path, path), ("show", f"{path}\x00")):
        code, _, err = run_cli(*argv)
        check_cli(code, err)
        assert code == 2
