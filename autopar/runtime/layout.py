"""Where each rank sits: the DeviceMesh and the stage-to-rank map, read from a Plan.

Data flow: Plan (``mesh``, ``stages[i].devices``) → :class:`Layout` → the engine
builds its process groups and picks its stages from it. Nothing is decided here:
the mesh axes, their order and the devices of each stage are the Plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from autopar.plans import MESH_AXES, Plan
from autopar.runtime.groups import shared_mesh

AXES = MESH_AXES


def coordinates(plan: Plan) -> dict[int, dict[str, int]]:
    """Device id → its index along every mesh axis (axes the mesh lacks are 0)."""
    coords: dict[int, dict[str, int]] = {}
    for flat, device in enumerate(plan.mesh.device_ids):
        index = []
        for size in reversed(plan.mesh.shape):  # row-major: last axis varies fastest
            flat, position = divmod(flat, size)
            index.append(position)
        coords[device] = {axis: 0 for axis in AXES}
        coords[device].update(dict(zip(plan.mesh.axis_names, reversed(index), strict=True)))
    return coords


@dataclass(frozen=True)
class Layout:
    """This rank's place in the plan's mesh and the process groups it needs."""

    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    cp_rank: int
    mesh: DeviceMesh
    stage_ranks: tuple[int, ...]  # stage index → pp coordinate that runs it

    @classmethod
    def build(cls, plan: Plan, device_type: str) -> Layout:
        world = dist.get_world_size()
        plan.parallelism.check_world_size(world)
        coords = coordinates(plan)
        shape = tuple(getattr(plan.parallelism, axis) for axis in AXES)
        grid = torch.empty(shape, dtype=torch.int64)
        for device, c in coords.items():
            grid[c["pp"], c["dp"], c["cp"], c["tp"]] = device
        mesh = shared_mesh(device_type, grid, AXES)
        rank = dist.get_rank()
        mine = coords[rank]
        stage_ranks = tuple(coords[stage.devices[0]]["pp"] for stage in plan.stages)
        return cls(rank, mine["pp"], mine["dp"], mine["tp"], mine["cp"], mesh, stage_ranks)

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.mesh.get_group(axis)

    def local_stages(self) -> list[int]:
        return [i for i, r in enumerate(self.stage_ranks) if r == self.pp_rank]
