"""The zoo models of the compile and runtime tests, built the same way in the test process and in
spawned ranks, so that every process starts from the same weights and batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import autopar


def gpt_and_batch(config: dict[str, Any], *, batch_size: int,
                  seq_len: int | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A zoo GPT of ``config`` initialised under ``torch.manual_seed(0)``, and its example batch
    (seed 1) of ``batch_size`` sequences of ``seq_len`` tokens (default: the model's length)."""
    torch.manual_seed(0)
    model = autopar.models.build("gpt", **config)
    inputs, targets = autopar.models.example_batch(model, batch_size=batch_size, seq_len=seq_len, seed=1)
    return model, inputs, targets
