"""The Mixture-of-Experts layer that :mod:`autopar.passes.moe` puts in place of a dense MLP.

Data flow: ``MoE`` pass → :class:`MoELayer` (a leaf ``call_module`` in the transformed graph) →
its last forward's losses (``last_aux_loss``, read by :func:`autopar.passes.moe.moe_aux_loss`
into the training loss) and load statistics (:class:`MoEStats`, for reports and the planner).

Routing (TECHNIQUES.md §7): router logits ``W_r x`` in fp32, ``p = softmax``; each token goes to
its top-k experts with weights renormalized over the k chosen (they sum to 1). Expert e takes at
most ``capacity = ceil(capacity_factor · T · k / E)`` of the T·k assignments, first choices of all
tokens before second choices (GShard), in token order; an assignment over capacity is dropped
and contributes 0, so a token that loses every assignment passes through the layer's residual.
Losses: Switch load balancing ``E · Σ_i f_i P_i`` (f_i the fraction of the T·k assignments routed
to expert i before dropping, P_i the mean router probability; 1 when balanced, for any k) and the
router z-loss ``mean_t logsumexp(logits_t)²``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    """One forward's routing of T tokens: everything detached except ``weights`` and ``probs``."""

    logits: torch.Tensor  # (T, E) fp32
    probs: torch.Tensor  # (T, E) fp32
    experts: torch.Tensor  # (T, k) chosen expert per slot, best first
    weights: torch.Tensor  # (T, k) renormalized gate weights
    kept: torch.Tensor  # (T, k) bool: the assignment fits in its expert's capacity
    capacity: int


@dataclass(frozen=True)
class MoEStats:
    """Load of one MoE layer in its last forward."""

    tokens: int
    capacity: int
    routed_per_expert: tuple[int, ...]  # assignments routed to each expert, before dropping
    tokens_per_expert: tuple[int, ...]  # assignments each expert computed (≤ capacity)
    dropped_assignments: int  # (token, expert) assignments over capacity
    dropped_tokens: int  # tokens that lost every assignment (output 0: residual only)


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor · tokens · top_k / num_experts)``: assignments one expert may take."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def route(logits: torch.Tensor, top_k: int, capacity: int) -> Routing:
    """Top-k routing of ``logits`` (T, E) with per-expert ``capacity`` (see the module docstring)."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    top, experts = probs.topk(top_k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True)
    num_experts = logits.shape[-1]
    slots = F.one_hot(experts.t().reshape(-1), num_experts)  # (k·T, E): all first choices, then second …
    position = (slots.cumsum(dim=0) - 1).mul(slots).sum(dim=-1)  # place in its expert's queue
    kept = (position < capacity).reshape(top_k, -1).t()
    return Routing(logits=logits, probs=probs, experts=experts, weights=weights, kept=kept, capacity=capacity)


def balance_loss(routing: Routing) -> torch.Tensor:
    """Switch load-balancing loss ``E · Σ_i f_i P_i`` (gradient through P only)."""
    num_experts = routing.probs.shape[-1]
    counts = torch.bincount(routing.experts.reshape(-1), minlength=num_experts).to(routing.probs.dtype)
    fraction = counts / counts.sum()
    return num_experts * (fraction * routing.probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: ``mean over tokens of logsumexp(logits)²``."""
    return logits.float().logsumexp(dim=-1).square().mean()


class MoELayer(nn.Module):
    """``forward(x[..., h]) -> [..., h]``: top-k routed experts in place of one feed-forward block.

    ``experts`` are modules mapping (n, h) → (n, h) (the pass copies the dense MLP into each);
    the router is an fp32 ``Linear(h, E, bias=False)``. After each forward, ``last_aux_loss``
    (``aux_loss_weight · balance + z_loss_weight · z``, in the autograd graph), ``last_balance_loss``,
    ``last_z_loss`` and ``stats`` describe it.
    """

    def __init__(self, experts: list[nn.Module], hidden_size: int, *, top_k: int, capacity_factor: float,
                 eval_capacity_factor: float, aux_loss_weight: float, z_loss_weight: float,
                 seed: int = 0, layer: int | None = None) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.layer = layer
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.empty(self.num_experts, hidden_size).normal_(0.0, 0.02, generator=generator)
            self.router.weight.copy_(weight)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None
        self.stats: MoEStats | None = None
        # Set by the runtime (never by the pass): gradient scale of the attached aux loss, and the
        # expert-parallel dispatcher ``(layer, tokens, routing) -> (T, h) fp32`` that replaces
        # the local expert loop (autopar.runtime.expert_parallel).
        self.aux_loss_scale: float | None = None
        self.expert_parallel: Callable[[MoELayer, torch.Tensor, Routing], torch.Tensor] | None = None

    def capacity(self, tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(tokens, self.num_experts, self.top_k, factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, h)
        logits = F.linear(tokens.float(), self.router.weight.float())  # (T, E), fp32
        routing = route(logits, self.top_k, self.capacity(tokens.shape[0]))
        if self.expert_parallel is None:
            out = run_local_experts(self.experts, tokens, routing)
        else:
            out = self.expert_parallel(self, tokens, routing)
        balance, z = balance_loss(routing), z_loss(logits)
        self.last_balance_loss, self.last_z_loss = balance, z
        self.last_aux_loss = self.aux_loss_weight * balance + self.z_loss_weight * z
        self.stats = _stats(routing, self.num_experts)
        if self.aux_loss_scale is not None and self.training and torch.is_grad_enabled():
            out = AttachAuxLoss.apply(out, self.last_aux_loss * self.aux_loss_scale)
        return out.to(x.dtype).reshape(*shape[:-1], out.shape[-1])


def run_local_experts(experts: nn.ModuleList, tokens: torch.Tensor, routing: Routing,
                      first_expert: int = 0) -> torch.Tensor:
    """``Σ_slots weight · expert(token)`` over the kept assignments, in fp32, (T, h_out);
    ``experts[i]`` is expert ``first_expert + i`` (an expert-parallel rank holds a slice)."""
    out = None
    for i, expert in enumerate(experts):
        token_index, slot = torch.nonzero((routing.experts == first_expert + i) & routing.kept, as_tuple=True)
        if token_index.numel() == 0:
            continue
        weight = routing.weights[token_index, slot].unsqueeze(-1)  # fp32: combine in fp32
        y = expert(tokens[token_index]).float() * weight
        out = y.new_zeros(tokens.shape[0], y.shape[-1]) if out is None else out
        out = out.index_add(0, token_index, y)
    return tokens.new_zeros(tokens.shape, dtype=torch.float32) if out is None else out


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out`` whose backward also sends gradient 1 into ``aux`` (a scalar).

    Adds ``aux`` to the training loss without carrying it to the last pipeline stage: the
    runtime sets ``MoELayer.aux_loss_scale`` and the auxiliary losses' gradients flow from
    each MoE layer's output (the device-local equivalent of ``loss + scale · aux``)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


def _stats(routing: Routing, num_experts: int) -> MoEStats:
    experts, kept = routing.experts.detach(), routing.kept
    routed = torch.bincount(experts.reshape(-1), minlength=num_experts)
    computed = torch.bincount(experts[kept], minlength=num_experts)
    return MoEStats(tokens=experts.shape[0], capacity=routing.capacity,
                    routed_per_expert=tuple(routed.tolist()), tokens_per_expert=tuple(computed.tolist()),
                    dropped_assignments=int((~kept).sum()), dropped_tokens=int((~kept.any(dim=-1)).sum()))
