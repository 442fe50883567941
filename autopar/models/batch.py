"""Example batches for zoo models: token ids and the targets their loss expects.

``autopar.models.example_batch`` feeds ``autopar.capture``, ``autopar.compile`` and
the demo. GPT: next-token targets. BERT: 15 % of positions replaced by a [MASK] id,
targets the original ids there and -100 (ignored) elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from autopar.models.configs import BertConfig, GPTConfig

MASK_FRACTION = 0.15


def _config_of(model: nn.Module) -> GPTConfig | BertConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, (GPTConfig, BertConfig)):
        raise TypeError(
            f"example_batch needs a zoo model (built by autopar.models.build), got "
            f"{type(model).__name__}; build example inputs for other models yourself"
        )
    return config


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def example_batch(
    model: nn.Module, batch_size: int, seq_len: int | None = None, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` on the model's device, deterministic under ``seed``.

    ``loss = cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)``.
    """
    config = _config_of(model)
    seq = config.seq_len if seq_len is None else seq_len
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} is invalid: expected an int >= 1")
    if type(seq) is not int or not 1 <= seq <= config.seq_len:
        raise ValueError(f"seq_len = {seq!r} is invalid: expected 1 <= seq_len <= {config.seq_len} "
                         "(the model's maximum length)")
    device = _device_of(model)
    if device.type == "meta":
        ids = torch.empty(batch_size, seq, dtype=torch.long, device=device)
        return ids, torch.empty_like(ids)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(config, GPTConfig):
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq + 1), generator=generator)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    return _masked(config, batch_size, seq, generator, device)


def _masked(config: BertConfig, batch_size: int, seq: int, generator: torch.Generator,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mask_id = config.vocab_size - 1
    if mask_id < 1:
        raise ValueError(f"BertConfig.vocab_size = {config.vocab_size} is too small for masked-LM "
                         "batches: expected >= 2 (the last id is [MASK])")
    original = torch.randint(0, mask_id, (batch_size, seq), generator=generator)
    masked = torch.rand(batch_size, seq, generator=generator) < MASK_FRACTION
    masked[torch.arange(batch_size), torch.randint(0, seq, (batch_size,), generator=generator)] = True
    inputs = torch.where(masked, torch.full_like(original, mask_id), original)
    targets = torch.where(masked, original, torch.full_like(original, -100))
    return inputs.to(device), targets.to(device)
