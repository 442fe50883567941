"""Expert parallelism: the MoE layers of a stage split their experts over ``ep`` ranks.

Data flow: :class:`~autopar.runtime.engine.Engine` → :func:`apply_expert_parallel` on each stage
graph before data parallelism and recomputation wrap it → every
:class:`~autopar.passes.moe.layer.MoELayer` of the stage is replaced (in that stage only) by a
copy that holds ``E / ep`` experts and routes through :class:`AllToAllExperts`; the engine then
keeps those experts out of the data-parallel wrapper and reduces their gradients itself
(:meth:`ExpertGroups.reduce_gradients`).

Layout (DeepSpeed-MoE, Rajbhandari et al. 2022): ``ep`` divides ``dp``; the ``dp`` ranks of one
(pipeline, tensor) position form ``dp / ep`` expert-parallel groups of ``ep`` consecutive
data-parallel ranks. Expert-parallel rank r holds experts ``[r·E/ep, (r+1)·E/ep)``. Dense
parameters stay data-parallel over all ``dp`` ranks; expert parameters are data-parallel over
the ``dp / ep`` ranks that hold the same experts (one per group).

Routing stays local: each rank routes its own tokens with capacity and losses computed over its
microbatch, exactly as one device would route that microbatch, so the program equals a single
process that routes each (data-parallel shard, microbatch) group separately. Dispatch: each kept
(token, expert) assignment is sent to the rank that holds its expert with an uneven
``all_to_all_single`` (autograd-aware, ``torch.distributed.nn.functional``; gloo and NCCL both
take uneven splits), that rank runs its experts on what it received, and a second all-to-all
returns the outputs, which are weighted and summed in fp32 like the local loop
(:func:`~autopar.passes.moe.layer.run_local_experts`). Forward: two all-to-alls per layer and
microbatch; backward: the two reverse ones.

Gradient scale: the engine's loss on each rank is multiplied by ``dp`` so that averaging dense
gradients over ``dp`` gives the global gradient; an expert's gradient collects the
contributions of every rank of its expert-parallel group, so the sum over its ``dp / ep``
replicas divided by ``dp`` is the global gradient.

torch.distributed has no MoE dispatch layer; the all-to-all exchange above is written here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.tensor import DTensor, Replicate

from autopar.passes.moe.layer import MoELayer, Routing
from autopar.runtime.groups import shared_group


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's expert-parallel group and expert-data-parallel group (``None`` when size 1)."""

    ep: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    dp: int

    @classmethod
    def build(cls, grid: torch.Tensor, rank: int, ep: int) -> ExpertGroups:
        """Groups from the (pp, dp, tp) or (pp, dp, cp, tp) grid of ranks; collective: every rank
        calls it. Expert parallelism stays inside one context-parallel slice: ``ep`` consecutive
        data-parallel ranks of the same ``cp`` coordinate exchange tokens; an expert slice's
        replicas (its gradients' all-reduce group) are the ``dp/ep`` ranks holding it in every
        ``cp`` slice, since each cp rank routes its own part of the sequence."""
        grid = grid if grid.dim() == 4 else grid.unsqueeze(2)
        pp, dp, cp, tp = grid.shape
        if dp % ep:
            raise ValueError(f"ep = {ep} must divide dp = {dp}: expert-parallel groups are made of "
                             "data-parallel ranks")
        mine: dict[str, dist.ProcessGroup | None] = {"ep": None, "edp": None}
        ep_rank = 0
        for p in range(pp):
            for t in range(tp):
                ranks = grid[p, :, :, t]  # (dp, cp)
                for c in range(cp):
                    column = [int(r) for r in ranks[:, c]]
                    for g in range(dp // ep):  # ep consecutive dp ranks
                        members = column[g * ep:(g + 1) * ep]
                        group = shared_group(members) if ep > 1 else None
                        if rank in members:
                            mine["ep"], ep_rank = group, members.index(rank)
                for r in range(ep):  # the dp/ep replicas of one expert slice, in every cp slice
                    members = [int(x) for x in ranks[r::ep].flatten()]
                    group = shared_group(members) if len(members) > 1 else None
                    if rank in members:
                        mine["edp"] = group
        return cls(ep=ep, ep_rank=ep_rank, ep_group=mine["ep"], edp_group=mine["edp"], dp=dp)

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Expert gradients: sum over the expert-data-parallel replicas, divided by ``dp``.

        An expert that no token reached on some replica has no gradient there; it joins the sum
        as zeros (the replicas' collectives must match), and an expert no token reached on any
        replica keeps ``grad = None``, as in one process, so the optimizer skips it (no
        momentum or weight-decay step)."""
        if self.edp_group is None:
            for param in params:
                if param.grad is not None:
                    param.grad.div_(self.dp)
            return
        reached = torch.tensor([param.grad is not None for param in params], dtype=torch.int32)
        dist.all_reduce(reached, group=self.edp_group)
        for param, count in zip(params, reached.tolist(), strict=True):
            if count == 0:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=self.edp_group)
            param.grad.div_(self.dp)


class AllToAllExperts:
    """``MoELayer.expert_parallel``: dispatch kept assignments to the ranks holding their experts."""

    def __init__(self, groups: ExpertGroups) -> None:
        self.groups = groups

    def __call__(self, layer: MoELayer, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        ep, group = self.groups.ep, self.groups.ep_group
        per_rank = layer.num_experts // ep
        token_index, slot = torch.nonzero(routing.kept, as_tuple=True)
        expert = routing.experts[token_index, slot]
        order = torch.argsort(expert, stable=True)  # grouped by destination rank, then expert
        token_index, slot, expert = token_index[order], slot[order], expert[order]
        send_counts = torch.bincount(expert // per_rank, minlength=ep)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        sends, recvs = send_counts.tolist(), recv_counts.tolist()
        received = _exchange(tokens[token_index], recvs, sends, group)
        received_expert = torch.empty(sum(recvs), dtype=expert.dtype, device=expert.device)
        dist.all_to_all_single(received_expert, expert, recvs, sends, group=group)
        first = self.groups.ep_rank * per_rank
        computed = _run_received(layer.experts, received, received_expert - first)
        returned = _exchange(computed, sends, recvs, group)
        weight = routing.weights[token_index, slot].unsqueeze(-1)  # fp32: combine in fp32
        out = tokens.new_zeros(tokens.shape[0], returned.shape[-1], dtype=torch.float32)
        return out.index_add(0, token_index, returned.float() * weight)


def _exchange(values: torch.Tensor, recv_counts: list[int], send_counts: list[int],
              group: dist.ProcessGroup | None) -> torch.Tensor:
    """Autograd-aware uneven all-to-all of rows (backward: the reverse exchange)."""
    out = all_to_all_single_autograd(values.contiguous(), recv_counts, send_counts, group or dist.group.WORLD)
    return wait_tensor(out)


def _run_received(experts: nn.ModuleList, received: torch.Tensor, local_expert: torch.Tensor
                  ) -> torch.Tensor:
    """Each local expert on its rows of ``received``. The result always depends on ``received``
    (``received · 0`` as its base), so the backward exchange runs on every rank, even one whose
    experts got no tokens: collectives must match across the group."""
    out = received * 0
    for i, expert in enumerate(experts):
        rows = torch.nonzero(local_expert == i, as_tuple=True)[0]
        if rows.numel():
            out = out.index_copy(0, rows, expert(received[rows]).to(out.dtype))
    return out


def apply_expert_parallel(gm: fx.GraphModule, groups: ExpertGroups, *, aux_loss_scale: float
                          ) -> list[nn.Parameter]:
    """Give ``gm``'s MoE layers this rank's experts and (ep > 1) the all-to-all dispatcher; with
    dp > 1 return the expert parameters: the engine keeps them out of the data-parallel wrapper
    and reduces their gradients with :meth:`ExpertGroups.reduce_gradients` (FSDP2 skips a
    parameter without a gradient, and an expert that no token reached on one rank has none,
    which would desynchronize its collectives; with ep = 1 the replicas are all dp ranks).

    Every MoE layer also gets ``aux_loss_scale`` (its auxiliary loss's gradient is attached at
    the layer). The layers are replaced by shallow copies, so the captured graph keeps its
    own (all experts, local routing); parameters are the same objects, keeping their names.
    """
    experts: list[nn.Parameter] = []
    for name, layer in list(gm.named_modules()):
        if not isinstance(layer, MoELayer):
            continue
        local = copy.copy(layer)
        local._modules = dict(layer._modules)
        local.aux_loss_scale = aux_loss_scale
        if groups.ep > 1:
            if layer.num_experts % groups.ep:
                raise ValueError(f"MoE layer {name} has {layer.num_experts} experts, which ep = "
                                 f"{groups.ep} ranks cannot share evenly: choose ep dividing "
                                 f"{layer.num_experts}")
            per_rank = layer.num_experts // groups.ep
            first = groups.ep_rank * per_rank
            local.experts = nn.ModuleList(list(layer.experts)[first:first + per_rank])
            local.expert_parallel = AllToAllExperts(groups)
        experts.extend(local.experts.parameters())
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, LocalTensors(local))
    return experts if groups.dp > 1 else []


class LocalTensors(nn.Module):
    """Runs an MoE layer on plain tensors inside a tensor-parallel stage.

    Under tensor parallelism the stage's activations are replicated DTensors, which the routing's
    data-dependent ops (``nonzero``, uneven all-to-all) cannot take; the MoE layer's parameters
    stay plain tensors (``shard_parameters`` skips them) and every tensor-parallel rank routes its
    identical copy of the tokens, exchanging them within its own expert-parallel group. Outside
    tensor parallelism this is a pass-through."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, DTensor):
            return self.layer(x)
        mesh = x.device_mesh
        out = self.layer(x.redistribute(mesh, [Replicate()] * mesh.ndim).to_local())
        return DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim)


def has_expert_parallel(module: nn.Module) -> bool:
    """Whether ``module`` holds an MoE layer that exchanges tokens (recomputation must then
    replay the whole layer, collectives included, on every rank)."""
    return any(isinstance(m, MoELayer) and m.expert_parallel is not None for m in module.modules())
