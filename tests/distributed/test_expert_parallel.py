"""Expert parallelism on real gloo processes (file:// rendezvous, short timeouts, one thread per
rank, several cases per spawn): MoE layers with their experts split over ``ep`` ranks and
all-to-all dispatch equal one process routing each (data-parallel shard, microbatch) group
separately — losses of 3 steps and every parameter after them (see
``tests.helpers.distributed.moe_workers``)."""


import pytest

from autopar.runtime import spawn
from tests.helpers.distributed import moe_workers


@pytest.mark.hf
def test_expert_parallel_two_ranks(tmp_path):
    """ep2 = dp2 (experts 0–1 on rank 0, 2–3 on rank 1; 2 microbatches; ZeRO-3 for the dense part),
    and tp2 (Megatron's layout for the dense layers around replicated MoE layers); a checkpoint saved
    with experts split over 2 ranks resumes with every rank holding all experts (ep1); then, in the
    same processes (start-up costs more than a case), Mixtral built from a config, its own experts
    split over ep2 (with and without recomputation)."""
    pytest.importorskip("transformers")
    spawn(moe_workers.two_rank_ep_then_mixtral, 2, str(tmp_path), timeout_s=90)


def test_expert_parallel_four_ranks():
    """ep2 × dp4 (expert gradients reduced over 2 replicas); ep2 × dp2 × pp2 with full recomputation
    and with the zero-bubble schedule; ep2 × dp2 × tp2."""
    spawn(moe_workers.four_rank_ep, 4, timeout_s=90)
