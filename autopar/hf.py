"""Hugging Face transformers models from a ``config.json``, with random weights.

The CLI's MODEL argument may be a path to a Hugging Face ``config.json`` (or a
folder holding one): :func:`model_from_config` builds the architecture the config
names, on any device (``meta`` allocates nothing), and :func:`example_inputs`
makes a batch of the right kind. Nothing is downloaded: weights are random.
Requires the ``hf`` extra (``pip install autopar[hf]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "building a model from a Hugging Face config needs transformers: "
            "pip install 'autopar[hf]'"
        ) from None
    return transformers


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config dict at ``path`` (a ``config.json`` file or a folder with one)."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ValueError(f"no Hugging Face config at {str(path)!r}: expected a config.json file")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{str(file)!r} is not a Hugging Face config: it has no 'model_type' key")
    return data


def model_from_config(path: str | os.PathLike[str], *, device: str = "meta") -> nn.Module:
    """Build the model a config names (``architectures[0]``, else the base model)."""
    tf = _transformers()
    data = read_config(path)
    model_type = data.pop("model_type")
    try:
        config = tf.AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ValueError(f"transformers does not know model_type {model_type!r}: {err}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    architectures = data.get("architectures") or []
    cls = getattr(tf, architectures[0], None) if architectures else None
    with torch.device(device):
        if cls is not None:
            return cls(config)
        return tf.AutoModel.from_config(config)


CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")
"""Config fields that hold a transformers model's context length, the first one set wins."""
FALLBACK_SEQ_LEN = 128


def context_length(config: Any) -> int:
    """The model's own context length (like a zoo model's ``seq_len``), or 128 when the config
    names none."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_SEQ_LEN


def example_inputs(
    model: nn.Module, batch_size: int, seq_len: int | None, *, device: str | torch.device = "cpu"
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword example inputs for a transformers model; ``seq_len`` None: the
    model's context length (:func:`context_length`)."""
    config = model.config
    seq_len = context_length(config) if seq_len is None else seq_len
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return (torch.randn(batch_size, channels, size, size, device=device),), {}
    vocab = int(getattr(config, "vocab_size", 32000))
    ids = torch.randint(0, vocab, (batch_size, seq_len), device="cpu").to(device)
    if getattr(config, "is_encoder_decoder", False):
        return (), {"input_ids": ids, "decoder_input_ids": ids.clone()}
    return (ids,), {}
