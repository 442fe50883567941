"""Resolve the CLI's MODEL argument into a model and an example batch.

``autopar capture MODEL`` (and later ``autopar plan MODEL``) accept a zoo name
(``gpt3-175b``), ``module:callable`` (a function returning an ``nn.Module``, or an
``nn.Module`` class), or a Hugging Face ``config.json`` path. Models are built on
``meta`` by default so that any size is captured without allocating weights.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopar import hf, models
from autopar.capture import normalize_inputs


@dataclass(frozen=True)
class Resolved:
    """A model built from a MODEL spec, with example inputs for one batch."""

    name: str
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _is_hf_config(spec: str) -> bool:
    return spec.endswith(".json") or os.path.isdir(spec)


def _from_callable(spec: str) -> tuple[nn.Module, Any]:
    """Call ``module:callable``; it returns a model or ``(model, example_inputs)``."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`, MODEL modules resolve from here
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for MODEL {spec!r}: {err}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{module_name!r} has no callable {attr!r} (MODEL {spec!r})")
    result = factory()
    model, inputs = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"MODEL {spec!r} returned {type(model).__name__}; expected an nn.Module or "
            "(nn.Module, example_inputs)"
        )
    return model, inputs


def resolve(spec: str, *, batch_size: int, seq_len: int | None, device: str = "meta") -> Resolved:
    """Build the model named by ``spec`` and an example batch of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")
    if _is_hf_config(spec):
        model = hf.model_from_config(spec, device=device)
        args, kwargs = hf.example_inputs(model, batch_size, seq_len, device=device)
        return Resolved(type(model).__name__, model, args, kwargs)
    if ":" in spec:
        model, inputs = _from_callable(spec)
        model = _move(model, device)
        if inputs is not None:
            return Resolved(spec, model, _on(normalize_inputs(inputs), device), {})
        return Resolved(spec, model, *_known_batch(spec, model, batch_size, seq_len, device))
    model = models.build(spec, device=device)
    inputs, _ = models.example_batch(model, batch_size, seq_len)
    return Resolved(spec, model, (inputs,), {})


def _move(model: nn.Module, device: str) -> nn.Module:
    """``model.to(device)`` with tied parameters still tied. Moving to another kind of device (CPU to
    ``meta``) gives every module its own new Parameter, which would untie an LM head from its
    embedding: the captured graph would then differ from the one of the model the callable built."""
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    model = model.to(device)
    for first, *others in (names for names in shared.values() if len(names) > 1):
        param = model.get_parameter(first)
        for name in others:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)
    return model


def _on(args: tuple[Any, ...], device: str) -> tuple[Any, ...]:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _known_batch(
    spec: str, model: nn.Module, batch_size: int, seq_len: int | None, device: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Zoo and Hugging Face models know their inputs; other models must say."""
    if hasattr(model, "config") and hasattr(model, "main_input_name"):
        return hf.example_inputs(model, batch_size, seq_len, device=device)
    if isinstance(getattr(model, "config", None), models.ZOO_CONFIG_TYPES):
        inputs, _ = models.example_batch(model, batch_size, seq_len)
        return (inputs,), {}
    raise ValueError(
        f"autopar does not know what {type(model).__name__} takes as input; make MODEL "
        f"{spec!r} return (model, example_inputs)"
    )
