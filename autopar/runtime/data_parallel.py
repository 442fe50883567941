"""Data parallelism of a stage module over the mesh's ``dp`` axis, as the Plan says.

``zero`` 0: FSDP2-based ``replicate`` (DDP semantics: full parameters on every rank,
gradients all-reduced and averaged over dp; classic ``DistributedDataParallel``
mis-rebuilds its buckets when a pipelining schedule runs several microbatch
forwards before their backwards, torch 2.13).
``zero`` 1–3: FSDP2 ``fully_shard`` — parameters, gradients and optimizer states
sharded over dp (ZeRO-3); with ``zero`` < 3 parameters stay gathered between
forward and backward (``reshard_after_forward=False``, ZeRO-2-like). Each layer of the stage
(a ``recompute.LayerUnit``: the engine regroups the stage by layer) is its own FSDP2 unit, then the
stage root holds the rest (embedding, head, norms outside layers): each layer's all-gather is
prefetched behind the previous layer's compute and its gradients reduce-scattered as its backward
ends, and only the layers in flight are unsharded — what ``cost_models.fsdp`` prices. Both are
torch.distributed's own FSDP2 machinery, which pipelining schedules drive (gradient
reduction deferred to the last microbatch).

With context parallelism the ranks of one dp × cp slice all hold the same parameters (each cp
rank trains on its part of the sequence), so the mesh of this module is the flattened dp × cp
mesh (:func:`gradient_mesh`): gradients are averaged, and ZeRO shards states, over ``dp · cp``
ranks. The engine scales each rank's loss by ``dp · cp`` so that the average is the global sum.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from autopar.runtime.recompute import LayerUnit


def gradient_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks that hold replicas of one parameter: the ``dp`` axis, flattened with ``cp`` when
    cp > 1 (collective: every rank calls it)."""
    if mesh["cp"].size() == 1:
        return mesh["dp"]
    return mesh["dp", "cp"]._flatten("dp_cp")


def apply_data_parallel(module: nn.Module, *, zero: int, dp_mesh: DeviceMesh,
                        ignored: Iterable[nn.Parameter] = ()) -> nn.Module:
    """``module`` replicated (DDP) or sharded (FSDP2) over ``dp_mesh``; unchanged if dp = 1.
    ``ignored`` parameters (expert-parallel experts) are left alone: their owner reduces them."""
    if dp_mesh.size() == 1:
        return module
    ignored_params = set(ignored) or None
    if zero == 0:
        return replicate(module, mesh=dp_mesh, ignored_params=ignored_params)
    for unit in [m for m in module.modules() if isinstance(m, LayerUnit)]:
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=zero >= 3, ignored_params=ignored_params)
    return fully_shard(module, mesh=dp_mesh, reshard_after_forward=zero >= 3, ignored_params=ignored_params)
