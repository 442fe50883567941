"""The single-process reference that the random-LTD tests compare ``autopar.compile`` with, on one
device (tests/test_compile_passes.py) and on spawned ranks (distributed/pass_workers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

import autopar
from autopar.passes import RandomLTD
from autopar.passes.random_ltd import random_ltd_runtime
from tests.helpers.distributed.workers import reference_step


def random_ltd_reference(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                         config: RandomLTD,
                         optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                         num_steps: int) -> list[float]:
    """Each step's loss of training ``model`` (in place) on ``autopar.transform``'s graph with the
    pass ``config``, the schedule set to each step's number."""
    gm = autopar.transform(model, inputs, passes=[config])
    runtime = random_ltd_runtime(gm)
    opt = optimizer(model.parameters())
    losses = []
    for step in range(num_steps):
        runtime.set_step(step)
        losses.append(reference_step(gm, opt, inputs, targets))
    return losses
