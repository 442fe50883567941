"""Hugging Face models built from configs run under every plan kind on gloo processes and equal
one process (issue 16): GPT-2, BERT (masked LM), Llama, Mistral, Qwen2 × dp2, tp2, pp2 (2 ranks),
pp2 × tp2 and dp4 ZeRO-3 (4 ranks), and the planner's own choice on 2 and 4 ranks."""

import pytest

from autopar.runtime import spawn
from tests.helpers.distributed import hf_matrix

pytest.importorskip("transformers")


@pytest.mark.parametrize("model", hf_matrix.MODELS)
def test_two_ranks(model):
    spawn(hf_matrix.two_ranks, 2, (model,), timeout_s=90)


@pytest.mark.parametrize("model", hf_matrix.MODELS)
def test_four_ranks(model):
    spawn(hf_matrix.four_ranks, 4, (model,), timeout_s=120)
