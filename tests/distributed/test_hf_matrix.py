"""Hugging Face models built from configs run under every plan kind on gloo processes and equal
one process (issue 16): GPT-2, BERT (masked LM), Llama, Mistral, Qwen2 × dp2, tp2, pp2 (2 ranks),
pp2 × tp2 and dp4 ZeRO-3 (4 ranks), and the planner's own choice on 2 and 4 ranks. Each test runs
every model in one spawn (process start-up with torch and transformers imports is most of a small
case); a failure names the model and the plan (``workers.case_named``)."""

import pytest

from autopar.runtime import spawn
from tests.helpers.distributed import hf_matrix

pytest.importorskip("transformers")


def test_two_ranks():
    spawn(hf_matrix.two_ranks, 2, timeout_s=90)


def test_four_ranks():
    spawn(hf_matrix.four_ranks, 4, timeout_s=120)
