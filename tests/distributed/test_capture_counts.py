"""A planned multi-process compile lowers the model at most twice per rank (rank 0: the example
batch for the planner and the runtime's microbatch; the others: the microbatch) and runs each
pass once per capture (issue 15's spine: nothing is captured again downstream)."""

from autopar.runtime import spawn
from tests.helpers.distributed import capture_counts


def test_planned_compile_captures_at_most_twice_per_rank():
    spawn(capture_counts.planned_compile_counts, 2, timeout_s=120)
