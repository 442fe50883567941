"""The whole model back after distributed training: full, plain tensors on every rank.

Data flow: an executor's ``parameter_copies()`` (this rank's parameters under the original model's
names; DTensors sharded by FSDP2 over dp × cp or by tensor parallelism over tp, plain tensors
otherwise; each pipeline rank holds only its stages') → :func:`full_state_dict`:
``DTensor.full_tensor()`` within each stage's mesh (the same names in the same order on every rank
of that mesh), then every rank learns which ranks hold which names (their names, shapes and dtypes
as JSON bytes, no pickling) and each tensor is broadcast from the lowest rank that holds it → one
``{name: tensor}`` dict, on the CPU, equal on every rank → ``Compiled.full_state_dict()`` and
``Compiled.gather_module()`` (a plain ``nn.Module`` to run, save or export).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def full_state_dict(copies: dict[str, list[torch.Tensor]], *,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Every parameter of the model, full and plain, on the CPU (collective: every rank)."""
    mine = {name: _full(tensors[0]) for name, tensors in sorted(copies.items())}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {name: t.cpu() for name, t in mine.items()}
    shapes = {name: (list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in mine.items()}
    holders = _holders(shapes, device=device)
    result = {}
    for name in sorted(holders):
        source, shape, dtype = holders[name]
        tensor = mine[name].to(device).contiguous() if name in mine and dist.get_rank() == source else \
            torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(tensor, src=source)
        result[name] = tensor.cpu()
    return result


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _holders(mine: dict[str, tuple[list[int], str]], *,
             device: torch.device) -> dict[str, tuple[int, list[int], str]]:
    """Name → (lowest rank holding it, shape, dtype), from every rank's own names."""
    texts = _all_gather_text(json.dumps(mine), device=device)
    holders: dict[str, tuple[int, list[int], str]] = {}
    for rank, text in enumerate(texts):
        for name, (shape, dtype) in json.loads(text).items():
            holders.setdefault(name, (rank, shape, dtype))
    return holders


def _all_gather_text(text: str, *, device: torch.device) -> list[str]:
    """Every rank's ``text``, in rank order (UTF-8 bytes in tensors)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    return [bytes(t.tolist()).decode() for t in all_gather_1d(data)]


def all_gather_1d(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ), in rank order (collective: padded to the
    longest, then cut back)."""
    device, world = tensor.device, dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.numel()], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
    padded[:tensor.numel()] = tensor
    gathered = [torch.empty(longest, dtype=tensor.dtype, device=device) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:int(s.item())] for g, s in zip(gathered, sizes, strict=True)]
