"""The model a training run trains, from its MODEL spec, sized to the tokenizer.

Data flow: ``TrainConfig.model`` (a zoo name such as ``gpt-tiny``, a Hugging Face ``config.json``, or
``module:factory``) + the trained tokenizer's vocabulary → :func:`build_model` (seeded, so every rank
builds the same weights) → ``autopar.compile``. A zoo GPT takes the tokenizer's vocabulary size; a
Hugging Face or user model keeps its own and must have at least as many ids. ``max_seq_len`` is
the longest sequence the model takes (its position table), for the "sequence too long" check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from autopar import models
from autopar.model_source import resolve


@dataclass(frozen=True)
class BuiltModel:
    """A freshly initialized model, the name it is logged under and its longest sequence (or None)."""

    model: nn.Module
    name: str
    max_seq_len: int | None


def is_zoo(spec: str) -> bool:
    return spec in models.REGISTRY


def zoo_max_seq_len(spec: str) -> int | None:
    """A zoo model's longest sequence, without building it (None for other specs)."""
    return models.get_config(spec).seq_len if is_zoo(spec) else None


def build_model(spec: str, *, vocab_size: int, seed: int) -> BuiltModel:
    """The model ``spec`` names, with weights initialized from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    if is_zoo(spec):
        config = models.get_config(spec)
        if not isinstance(config, models.GPTConfig):
            raise ValueError(f"model {spec!r} is a masked-language model; the trainer trains causal "
                             "(next-token) models: pick a GPT such as gpt-tiny, or an HF decoder config")
        return BuiltModel(models.build(spec, vocab_size=vocab_size), spec, config.seq_len)
    if not (spec.endswith(".json") or os.path.isdir(spec) or ":" in spec):
        raise ValueError(f"model {spec!r} is not a zoo name ({', '.join(models.REGISTRY)}), an HF "
                         "config.json or module:factory")
    model = resolve(spec, batch_size=1, seq_len=None, device="cpu").model
    _check_vocab(spec, model, vocab_size)
    if hasattr(model, "config") and getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return BuiltModel(model, spec, _max_seq_len(model))


def _max_seq_len(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_vocab(spec: str, model: nn.Module, vocab_size: int) -> None:
    """The model's input embedding must have an id for every token the tokenizer makes."""
    embedding = input_embedding(model)
    if embedding is not None and embedding.num_embeddings < vocab_size:
        raise ValueError(f"model {spec!r} embeds {embedding.num_embeddings} token ids but the tokenizer "
                         f"makes {vocab_size}: pass vocab_size <= {embedding.num_embeddings}")


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding: ``get_input_embeddings()`` of an HF model, else its first
    ``nn.Embedding``."""
    getter = getattr(model, "get_input_embeddings", None)
    found = getter() if callable(getter) else None
    if isinstance(found, nn.Embedding):
        return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
