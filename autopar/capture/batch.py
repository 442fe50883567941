"""Reading and reshaping batches of inputs: shared by capture, lowering, compile and the runtime.

Data flow: the user's inputs (a tensor, a tuple of positional arguments, or a dict of keyword
arguments) → :func:`split_inputs` → ``(args, kwargs)``; :func:`leading_dims` reads the batch and
sequence length of the first batched tensor; :func:`resize_batch` cuts or repeats a batch to a
microbatch size (``autopar.lower``'s runtime capture).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """A tensor becomes a 1-tuple; a tuple/list is the positional arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of forward's positional arguments, got "
        f"{type(example_inputs).__name__}; pass keyword arguments through example_kwargs={{...}}"
    )


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A step's inputs as ``(args, kwargs)``: a dict is keyword arguments, anything else positional."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return normalize_inputs(inputs), {}


def _batched(values: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]


def leading_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int | None]:
    """(batch, sequence length or None) of the first tensor input with a batch dimension."""
    tensors = _batched((args, kwargs))
    if not tensors:
        raise ValueError("the inputs hold no tensor with a batch dimension; pass tensors whose first "
                         "dimension is the batch")
    first = tensors[0]
    return int(first.shape[0]), (int(first.shape[1]) if first.dim() > 1 else None)


def resize_batch(values: Any, size: int) -> Any:
    """Rows ``0, 1, …, size − 1`` (mod the batch) of every tensor whose first dimension is the
    batch of the first batched tensor in ``values``."""
    if type(size) is not int or size < 1:
        raise ValueError(f"microbatch_size = {size!r} is invalid: expected an int >= 1")
    tensors = _batched(values)
    if not tensors or tensors[0].shape[0] == size:
        return values
    batch = int(tensors[0].shape[0])

    def resize(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            rows = torch.arange(size, device=value.device) % batch
            return value.index_select(0, rows)
        return value

    return tree_map(resize, values)
