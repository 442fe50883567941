"""Per-rank batches, evaluation, gathering and gradient clipping on 2 real gloo ranks (issue 19 item 1):
each pinned layout (ZeRO-3 data parallel, 2 pipeline stages, tensor parallel, context parallel) equals one
process."""

from autopar.runtime.launch import spawn
from tests.helpers.distributed.train_workers import run_cases


def test_local_steps_evaluate_gather_and_clip_equal_one_process():
    spawn(run_cases, 2, timeout_s=120)
