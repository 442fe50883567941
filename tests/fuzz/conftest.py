"""The valid inputs the fuzz tests mutate, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

import autopar
from autopar.passes import MoE, RandomLTD
from tests.fuzz.strategies import Corpus

GOLDEN = sorted((Path(__file__).parents[1] / "planner" / "golden").glob("*.json"))


@pytest.fixture(scope="session")
def plan_texts() -> Corpus:
    """The golden plans and a fresh plan of a tiny GPT on two local processes with both passes."""
    texts = Corpus({path.stem: path.read_text(encoding="utf-8") for path in GOLDEN})
    model = autopar.models.build("gpt", num_layers=4, hidden_size=32, num_heads=2, vocab_size=128, seq_len=32)
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    plan = autopar.plan(model, inputs, cluster="local:2", global_batch_size=4, fix={"pp": 2},
                        passes=[MoE(num_experts=4, top_k=1), RandomLTD(min_tokens=8, num_steps=10)])
    texts["local:2 with passes"] = plan.to_json()
    return texts
