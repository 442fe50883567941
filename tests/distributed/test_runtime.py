"""Equivalence of the distributed runtime with single-process training, on real gloo
processes (file:// rendezvous, short timeouts, one thread per rank, many checks per spawn)."""


import pytest

from autopar.runtime import spawn
from tests.helpers.distributed import workers


def test_two_rank_matrix():
    """dp2 (replicate, FSDP2), pp2 × each schedule, recomputation, uneven stages, BERT,
    HF GPT-2, tp2 on GPT, BERT and HF GPT-2."""
    pytest.importorskip("transformers")
    spawn(workers.two_rank_matrix, 2, timeout_s=60)


def test_four_rank_matrix():
    """pp2 × dp2 with replicate and with FSDP2 + full recomputation; BERT with GPipe;
    pp2 × tp2; dp2 × tp2 with FSDP2."""
    spawn(workers.four_rank_matrix, 4, timeout_s=60)


@pytest.mark.slow
def test_eight_rank_3d():
    """pp2 × dp2 × tp2 on 8 processes."""
    spawn(workers.eight_rank_matrix, 8, timeout_s=120)
