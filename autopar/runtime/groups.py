"""Process groups and device meshes shared by every engine of this process.

Data flow: :class:`~autopar.runtime.layout.Layout` (the plan's mesh), the engine's tied-weight
groups and :class:`~autopar.runtime.expert_parallel.ExpertGroups` ask here for the groups of a rank
set; an engine built for a later plan in the same process (a sweep, a benchmark, a notebook that
compiles twice) gets the same groups back instead of new ones.

Why: torch frees no process group that is not destroyed, and a gloo group keeps its worker and
transport threads and its connections for the life of the process. Before this module every compile
added three or four groups and nine to twelve threads to each rank (MEASURED, 2 gloo ranks: 14 → 74
threads, 4 → 24 groups over seven compiles), and a 4-rank shape-B random-LTD step measured 0.72 s in
fresh processes and 1.20 s after twelve other plans had run in the same ones. Destroying a group when
its engine dies is not an option: the engine's tensors (DTensor meshes, FSDP2 states) may outlive it.

Reuse is safe because ``dist.new_group`` is collective in call order: every rank makes the same
calls with the same rank lists, so every rank's cache holds the same groups in the same order and a
hit on one rank is a hit on all. The cache belongs to one default process group: after
``destroy_process_group`` and a new ``init_process_group`` it starts empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

_SHARED: dict[str, Any] = {"world": None, "groups": {}, "meshes": {}}


def _cache(kind: str) -> dict[Any, Any]:
    """The cache of ``kind`` for the current default process group (emptied when it changed)."""
    world = dist.distributed_c10d._get_default_group()
    if _SHARED["world"] is not world:
        _SHARED.update(world=world, groups={}, meshes={})
    return _SHARED[kind]


def shared_group(ranks: Sequence[int]) -> dist.ProcessGroup:
    """The process group over ``ranks`` (collective like ``dist.new_group``: every rank calls it
    with the same lists in the same order), made once per process."""
    key = tuple(int(r) for r in ranks)
    groups = _cache("groups")
    if key not in groups:
        groups[key] = dist.new_group(list(key))
    return groups[key]


def shared_mesh(device_type: str, grid: torch.Tensor, names: tuple[str, ...]) -> DeviceMesh:
    """The ``DeviceMesh`` over ``grid`` (ranks) with axes ``names``, made once per process (its
    groups with it; flattened sub-meshes are cached by the mesh itself)."""
    key = (device_type, tuple(grid.shape), tuple(int(r) for r in grid.flatten()), tuple(names))
    meshes = _cache("meshes")
    if key not in meshes:
        meshes[key] = DeviceMesh(device_type, grid, mesh_dim_names=names)
    return meshes[key]
