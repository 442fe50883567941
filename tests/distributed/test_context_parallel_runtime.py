"""Context parallelism through the distributed Engine (issue 18) on real gloo processes, against one
process: cp2 on the zoo GPT, a hand-written attention model and HF Llama, with full and selective
recomputation and with fused attention; cp2 × pp2 (1F1B, zero-bubble), cp2 × dp2 with ZeRO-3,
cp2 × tp2 with sequence parallelism and cp2 × dp2 × ep2 with MoE layers on 4 ranks; a checkpoint
saved under cp2 resumed under cp1 (tests/helpers/distributed/cp_workers.py)."""

import pytest

from autopar.runtime import spawn
from tests.helpers.distributed import cp_workers


def test_cp2_two_ranks_and_a_checkpoint_saved_under_cp2_loads_under_cp1(tmp_path):
    pytest.importorskip("transformers")
    spawn(cp_workers.two_ranks, 2, str(tmp_path), timeout_s=90)


def test_cp2_with_pp2_and_dp2_zero3():
    spawn(cp_workers.four_ranks, 4, timeout_s=120)
