"""The built-in model zoo: a GPT and a BERT, from tiny test sizes to 1T parameters.

Data flow: ``build(name)`` → ``nn.Module`` (on any device; ``meta`` allocates
nothing) → ``autopar.capture`` / ``autopar.compile`` / ``autopar capture MODEL`` and
the benchmarks. ``example_batch`` makes matching inputs and targets.

Layer: beside ``plans``, ``hf`` and ``data``, above ``capture``; imports nothing of autopar.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autopar.models.batch import example_batch
from autopar.models.bert import Bert
from autopar.models.configs import (
    REGISTRY,
    BertConfig,
    GPTConfig,
    ModelConfig,
    get_config,
    list_models,
)
from autopar.models.gpt import GPT

ZOO_CONFIG_TYPES = (GPTConfig, BertConfig)

__all__ = [
    "GPT", "REGISTRY", "ZOO_CONFIG_TYPES", "Bert", "BertConfig", "GPTConfig", "build",
    "example_batch", "get_config", "list_models", "param_count",
]


def build(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
          **overrides: Any) -> nn.Module:
    """Build a zoo model by name, e.g. ``build("gpt3-175b", device="meta")`` or
    ``build("gpt", num_layers=24, hidden_size=2304, num_heads=24, device="meta")``."""
    config = get_config(name, **overrides)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype = {dtype!r} is invalid: expected a floating-point torch.dtype "
                         "such as torch.bfloat16, or None for the default")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device = {device!r} is invalid: {err}") from None
    cls = GPT if isinstance(config, GPTConfig) else Bert
    with torch.device(device):  # meta: parameters without storage, init skipped
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def param_count(config: ModelConfig) -> int:
    """Parameters of the model a config builds (tied weights counted once).

    For a GPT this is Megatron-LM's ``12 l h² (1 + 13/(12h) + (V+s)/(12 l h))``
    (Narayanan et al. 2021) plus the final LayerNorm's 2h.
    """
    h, layers, f = config.hidden_size, config.num_layers, config.ffn_size
    attention = 4 * h * h + 4 * h
    mlp = 2 * h * f + f + h
    norms = 4 * h
    embeddings = (config.vocab_size + config.seq_len) * h
    if isinstance(config, GPTConfig):
        head = 0 if config.tie_embeddings else config.vocab_size * h
        return layers * (attention + mlp + norms) + embeddings + 2 * h + head
    types, emb_norm = config.type_vocab_size * h, 2 * h
    mlm_head = h * h + h + 2 * h + config.vocab_size
    return layers * (attention + mlp + norms) + embeddings + types + emb_norm + mlm_head
