"""One process playing one rank of a large world, on torch's fake process group.

Collectives of the ``"fake"`` backend return at once without moving data: groups, meshes and
DTensor shapes are those of a real run, tensor values are not (a scattered shard holds whatever
its buffer held). Tests here check layouts and shapes at world sizes no machine of ours has;
tests/distributed checks values on real gloo processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """This process is ``rank`` of ``world_size`` until the block ends (then no group is left)."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
