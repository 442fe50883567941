"""Graph passes under the distributed runtime, on real gloo processes (file:// rendezvous,
short timeouts, one thread per rank, several checks per spawn): random-LTD through
``autopar.compile(..., passes=[...])`` equals the single-process transformed graph."""


from autopar.runtime import spawn
from tests.helpers.distributed import pass_workers


def test_random_ltd_two_ranks(tmp_path):
    """pp2 (1F1B, 4 microbatches; full recomputation; interleaved), dp2 and tp2 with random-LTD on the
    middle layers equal one process with the same pass and seed; a checkpoint saved under pp2
    resumes under dp2 with the same token choices."""
    spawn(pass_workers.two_rank_random_ltd, 2, str(tmp_path), timeout_s=60)
