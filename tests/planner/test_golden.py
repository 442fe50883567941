"""Golden plans: the planner's JSON for a few model × cluster pairs, byte for byte.

A change to the cost model or the search that moves any of these shows up here; when the
change is intended, regenerate with ``AUTOPAR_UPDATE_GOLDEN=1 .venv/bin/pytest
tests/planner/test_golden.py`` and review the diff of ``tests/planner/golden/``.
"""

import os
from pathlib import Path

import pytest

import autopar

GOLDEN = Path(__file__).parent / "golden"
CASES = [
    ("gpt2", "1x8xA100-80GB", 64),
    ("gpt3-13b", "4x8xA100-80GB", 512),
    ("bert-large", "2x8xH100", 256),
]


@pytest.mark.parametrize(("name", "cluster", "batch"), CASES)
def test_golden_plan(name, cluster, batch):
    model = autopar.models.build(name, device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    plan = autopar.plan(model, inputs, cluster=cluster, global_batch_size=batch)
    path = GOLDEN / f"{name}_{cluster}_{batch}.json"
    if os.environ.get("AUTOPAR_UPDATE_GOLDEN") == "1":
        plan.save(path)
    assert path.exists(), f"no golden file {path.name}; generate it with AUTOPAR_UPDATE_GOLDEN=1"
    assert plan.to_json() == path.read_text(), f"{path.name} changed; see this module's docstring"
    assert autopar.Plan.load(path) == plan
