"""Held-out loss under the plan: forward only through this rank's pipeline stages.

Data flow: ``Compiled.evaluate(inputs, targets)`` (global batch, or ``local=True`` for this rank's
rows) → the Engine's :class:`~autopar.runtime.rank_batch.BatchLayout` (same checks and slicing as a
training step) → :func:`evaluate_engine`: the stage modules in eval mode, the pipelining schedule's
``eval`` (torch.distributed.pipelining runs the microbatches forward only and computes the loss on
the last stage), no gradients, no optimizer step → the same global reduction as a training step,
so the value equals one process's ``loss_fn(model(inputs), targets)`` on the whole batch (the
default token cross-entropy exactly: summed per microbatch over the global batch's counted
tokens). MoE auxiliary losses are not added: a held-out loss is the task loss.

Nothing changes: parameters, optimizer state, gradients and the step counter stay as they were
(the schedule re-initializes its backward buffers at the next training step, as it does at the
first one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from autopar.runtime.rank_batch import RankBatch
from autopar.runtime.tensor_parallel import implicit_replication

if TYPE_CHECKING:
    from autopar.runtime.engine import Engine


def evaluate_engine(engine: Engine, batch: RankBatch) -> float:
    """The loss of ``batch`` through the engine's stages, forward only (collective: every rank)."""
    if engine.exact:
        engine.loss.count = batch.counted
    modes = [module.training for module in engine.modules]
    for module in engine.modules:
        module.eval()
    losses: list[torch.Tensor] = []
    try:
        with torch.no_grad(), implicit_replication():
            engine.schedule.eval(*batch.inputs, target=batch.target,
                                 losses=losses if engine.has_last else None)
    finally:
        for module, mode in zip(engine.modules, modes, strict=True):
            module.train(mode)
    return global_loss(losses, exact=engine.exact, device=engine.device,
                       replicas=_replicas(engine))


def global_loss(losses: list[torch.Tensor], *, exact: bool, device: torch.device, replicas: int) -> float:
    """One float on every rank: the last stages' microbatch losses summed (exact token loss: each is
    already a share of the global mean) or averaged, added over all ranks, divided by the number of
    ranks that hold a copy of each share (``dp · cp · tp``)."""
    if losses:
        local = torch.stack([loss.detach().float().reshape(()) for loss in losses])
        value = local.sum() if exact else local.mean()
    else:
        value = torch.zeros(())
    value = value.reshape(1).to(device)
    dist.all_reduce(value)
    return float(value) / replicas


def _replicas(engine: Engine) -> int:
    par = engine.plan.parallelism
    return par.dp * par.cp * par.tp
