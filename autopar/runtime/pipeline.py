"""Pipeline stages and schedules from a Plan, on ``torch.distributed.pipelining``.

Data flow: stage GraphModules (``split.py``) → recomputation (``recompute.py``) →
data-parallel wrapping (``data_parallel.py``) → ``PipelineStage`` per local stage →
the Plan's schedule class. With one stage the same schedule machinery splits the
batch into microbatches and accumulates gradients exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule

from autopar.plans import Schedule

SINGLE_STAGE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI_STAGE = {"interleaved": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}


def make_schedule(
    schedule: Schedule,
    stages: list[PipelineStage],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    scale_grads: bool,
) -> _PipelineSchedule:
    """The torch.distributed.pipelining schedule the Plan names, over this rank's stages."""
    n = schedule.num_microbatches
    if schedule.name in SINGLE_STAGE:
        assert len(stages) == 1, f"{schedule.name} runs one stage per rank, got {len(stages)}"
        return SINGLE_STAGE[schedule.name](stages[0], n, loss_fn=loss_fn, scale_grads=scale_grads)
    return MULTI_STAGE[schedule.name](stages, n, loss_fn=loss_fn, scale_grads=scale_grads)


class _Stage(PipelineStage):
    """A PipelineStage that says when torch's shape inference is done: on the first step it
    runs the stage forward and backward once on real tensors before the microbatches, and
    passes that count their calls (random-LTD's sample indices) must forget those runs."""

    def __init__(self, *args: Any, after_shape_inference: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._after_shape_inference = after_shape_inference

    def _post_metadata_inference_cleanup(self) -> None:  # torch 2.13's hook after the inference runs
        super()._post_metadata_inference_cleanup()
        if self._after_shape_inference is not None:
            self._after_shape_inference()


def make_stage(
    module: nn.Module, index: int, num_stages: int, device: torch.device, group: Any, *,
    after_shape_inference: Callable[[], None] | None = None,
) -> PipelineStage:
    """Wrap one stage module for the schedule (shapes are inferred at the first step, after
    which ``after_shape_inference`` is called)."""
    return _Stage(module, index, num_stages, device, group=group, after_shape_inference=after_shape_inference)
