"""Compiling plans one after another in the same processes makes no new process groups for rank sets
it already has (``runtime/groups.py``): real gloo ranks, losses equal to the first compile's."""

from __future__ import annotations

import json

import pytest

from autopar.runtime import spawn
from tests.helpers.distributed import group_workers

ATOL = 1e-6  # the same model, batch and plan: the same sums in the same order


def test_a_second_compile_of_the_same_plans_reuses_their_groups(tmp_path) -> None:
    out = tmp_path / "rows.json"
    spawn(group_workers.compile_in_turn, 2, str(out), timeout_s=120)
    first_pp, first_moe, second_pp, second_moe = json.loads(out.read_text())
    assert first_moe["groups"] > first_pp["groups"]  # the expert groups were made: the test sees groups
    assert second_pp["groups"] == second_moe["groups"] == first_moe["groups"]
    assert second_moe["threads"] == first_moe["threads"]
    for first, second in ((first_pp, second_pp), (first_moe, second_moe)):
        assert second["losses"] == pytest.approx(first["losses"], abs=ATOL), first["plan"]
