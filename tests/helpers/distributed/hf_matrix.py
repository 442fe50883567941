"""Per-rank bodies of the Hugging Face runtime matrix (issue 16): GPT-2, BERT (masked LM), Llama,
Mistral and Qwen2 built from tiny configs, each under dp2, tp2 and pp2 on 2 ranks, pp2 × tp2 and dp4
with ZeRO-3 on 4 (BERT also pp2 × dp2 ZeRO-3), and under the plan the planner chooses on 2 and 4
ranks; every case trains 3 steps and is compared with one process (losses, then every gradient
and parameter: ``workers.run_case``). All models of one world size run in turn in one spawn (one
process start-up, one gloo group); a failure names its model and plan."""

from __future__ import annotations

import copy

import torch

import autopar
from tests.helpers.distributed.workers import build_case, case_named, run_case, sgd, train_and_compare

MODELS = ("hf-gpt2", "hf-bert", "hf-llama", "hf-mistral", "hf-qwen2")
TWO_RANKS = ({"dp": 2, "num_microbatches": 2}, {"tp": 2, "num_microbatches": 2},
             {"pp": 2, "num_microbatches": 2})
FOUR_RANKS = ({"pp": 2, "tp": 2, "num_microbatches": 2}, {"dp": 4, "num_microbatches": 2, "zero": 3})
EXTRA = {4: {"hf-bert": ({"pp": 2, "dp": 2, "num_microbatches": 2, "zero": 3},)}}
"""Cases for one model: BERT's decoder bias has two names and its word embedding is tied across
stages; under pp2 × dp2 ZeRO-3 FSDP2 drops what a stage's graph never uses, so the first stage must
not hold the bias's unused name (``split._place_inputs``)."""


def run_planned(world: int, name: str) -> None:
    """The planner chooses every degree (no pins); the run still equals one process."""
    model, inputs, targets = build_case(name)
    reference = copy.deepcopy(model)
    compiled = autopar.compile(model, f"local:{world}", optimizer=sgd, time_limit_s=30)
    train_and_compare(compiled, reference, inputs, targets, name)


def _matrix(world: int, fixes: tuple[dict, ...], models: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    for name in models:
        for fix in fixes + EXTRA.get(world, {}).get(name, ()):
            with case_named(name, fix):
                run_case(world, name, dict(fix))
        with case_named(name, "planned"):
            run_planned(world, name)


def two_ranks(rank: int, world: int, models: tuple[str, ...] = MODELS) -> None:
    _matrix(world, TWO_RANKS, models)


def four_ranks(rank: int, world: int, models: tuple[str, ...] = MODELS) -> None:
    _matrix(world, FOUR_RANKS, models)
