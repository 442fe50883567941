"""Hand-edited plans and user mistakes under a pipeline: one clear line, not a hang or torch's message."""

from autopar.runtime import spawn
from tests.helpers.distributed import error_workers


def test_pipeline_mistakes_are_named():
    spawn(error_workers.pipeline_mistakes, 2, timeout_s=60)


def test_a_new_shape_under_a_pipeline_is_refused_on_every_rank():
    spawn(error_workers.shape_changes, 2, timeout_s=60)
