"""Default training loss for ``autopar.compile``: token-level cross-entropy.

``Compiled.step`` calls ``loss_fn(outputs, targets)``; without a user ``loss_fn``
it is :func:`cross_entropy`, which accepts logits or a Hugging Face output with
``.logits`` and ignores targets equal to -100 (unmasked positions in a masked LM).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits tensor of a model output (tensor, ``.logits``, or first element)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"the default loss needs logits, got outputs of type {type(outputs).__name__}; "
        "pass loss_fn=... to autopar.compile"
    )


def cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[..., V]`` against class ids ``[...]``."""
    logits = _matching_logits(outputs, targets)
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def summed_cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """:func:`cross_entropy` summed instead of averaged over the counted tokens: a part of a batch
    (a microbatch, a shard) divides it by the whole batch's count to add up to the batch's mean."""
    logits = _matching_logits(outputs, targets)
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _matching_logits(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    logits = logits_of(outputs)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape "
            f"{tuple(logits.shape)} without its last (class) dimension; pass loss_fn=... "
            "for other output layouts"
        )
    return logits
