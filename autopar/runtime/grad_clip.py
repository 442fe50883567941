"""Gradient clipping by the norm of the WHOLE model's gradient, across tp, pp, dp and cp ranks.

Data flow: ``autopar.compile(..., max_grad_norm=1.0)`` → after every training step's backward (and
the gradient reductions), before the optimizer step → :class:`GradClipper` over the executor's
``parameter_copies()`` → the total 2-norm ``sqrt(Σ g²)`` over every parameter of the model, each
element counted once → every gradient scaled by ``min(1, max_norm / (norm + 1e-6))``, as
``torch.nn.utils.clip_grad_norm_`` does on one process.

Counting each element once: a rank's piece of a parameter is a plain tensor (replicated over the
data-parallel ranks, or the only copy) or a DTensor whose ``Shard`` mesh dimensions say which
slice it is and whose ``Replicate`` dimensions hold equal copies. Each piece is keyed by
(parameter name, its shard coordinates); the first clipping step gathers every rank's keys (hashes
in int64 tensors, no pickling) and counts how many ranks (and copies on one rank: a tied weight
whose stages share a rank) hold each key. A rank then adds ``Σ g² / holders`` per piece and one
all-reduce gives the total. ``Partial`` gradients are reduced first. Expert-parallel experts (each
rank a different subset under the same names) cannot be told apart this way: ``Compiled`` refuses
clipping with ep > 1.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from autopar.runtime.gather import all_gather_1d

EPS = 1e-6


def check_max_norm(max_norm: float) -> float:
    """``max_norm`` as a float, or a ValueError naming it: a finite number > 0."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not max_norm > 0 \
            or not math.isfinite(max_norm):
        raise ValueError(f"max_grad_norm = {max_norm!r} is invalid: expected a finite number > 0, e.g. 1.0 "
                         "(or None for no clipping)")
    return float(max_norm)


class GradClipper:
    """Clips the gradients of ``copies()`` (name → this rank's tensors) to a total norm of ``max_norm``."""

    def __init__(self, copies: Callable[[], dict[str, list[torch.Tensor]]], *, max_norm: float,
                 device: torch.device) -> None:
        self.copies, self.max_norm, self.device = copies, check_max_norm(max_norm), device
        self._weights: dict[tuple[int, int], float] | None = None
        self.last_norm: float | None = None

    def clip(self) -> float:
        """Scale every gradient in place; returns the total norm before clipping (collective)."""
        pieces = self._pieces()
        if self._weights is None:
            self._weights = _weights([key for key, _ in pieces], self.device)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for key, grad in pieces:
            total += grad.double().pow(2).sum() * self._weights[key]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        norm = float(total.sqrt())
        scale = min(1.0, self.max_norm / (norm + EPS))
        if scale < 1.0:
            for tensors in self.copies().values():
                for param in tensors:
                    if param.grad is not None:
                        param.grad.mul_(scale)
        self.last_norm = norm
        return norm

    def _pieces(self) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """(key, this rank's local gradient) per parameter copy with a gradient."""
        result = []
        for name, tensors in sorted(self.copies().items()):
            for index, param in enumerate(tensors):
                grad = param.grad
                if grad is None:
                    continue
                key = _key(name, grad)
                result.append(((key, index), _local(grad)))
        return result


def _key(name: str, grad: torch.Tensor) -> int:
    """An int64 hash of the parameter name and, for a DTensor, its coordinates on the Shard dims."""
    text = name
    if isinstance(grad, DTensor):
        coordinate = grad.device_mesh.get_coordinate() or []
        placements = zip(coordinate, grad.placements, strict=True)
        text += "".join(f"|{dim}:{c}" for dim, (c, p) in enumerate(placements) if isinstance(p, Shard))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


def _local(grad: torch.Tensor) -> torch.Tensor:
    if not isinstance(grad, DTensor):
        return grad
    if any(isinstance(p, Partial) for p in grad.placements):
        reduced = [Replicate() if isinstance(p, Partial) else p for p in grad.placements]
        grad = grad.redistribute(placements=reduced)
    return grad.to_local()


def _weights(keys: list[tuple[int, int]], device: torch.device) -> dict[tuple[int, int], float]:
    """(key, copy index) → 1 / the number of copies of that key on all ranks together."""
    local = torch.tensor([key for key, _ in keys], dtype=torch.int64, device=device)
    everyone = all_gather_1d(local) if dist.is_initialized() and dist.get_world_size() > 1 else [local]
    counts: dict[int, int] = {}
    for tensor in everyone:
        for value in tensor.tolist():
            counts[value] = counts.get(value, 0) + 1
    return {(key, index): 1.0 / counts[key] for key, index in keys}
