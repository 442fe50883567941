"""The Mixture-of-Experts layer that :mod:`autopar.passes.moe` puts in place of a dense MLP.

Data flow: ``MoE`` pass → :class:`MoELayer` (a leaf ``call_module`` in the transformed graph;
its gate, :func:`route` or a :mod:`~autopar.passes.moe.gates` gate, makes a :class:`Routing`
that :func:`run_local_experts` or the expert-parallel runtime consumes) → its last forward's
losses (``last_aux_loss``, read by :func:`autopar.passes.moe.moe_aux_loss`
into the training loss) and load statistics (:class:`MoEStats`, for reports and the planner).

Routing (TECHNIQUES.md §7): router logits ``W_r x`` in fp32, ``p = softmax``; each token goes to
its top-k experts with weights renormalized over the k chosen (they sum to 1). Expert e takes at
most ``capacity = ceil(capacity_factor · T · k / E)`` of the T·k assignments, first choices of all
tokens before second choices (GShard), in token order; an assignment over capacity is dropped
and contributes 0, so a token that loses every assignment passes through the layer's residual.
Losses: Switch load balancing ``E · Σ_i f_i P_i`` (f_i the fraction of the T·k assignments routed
to expert i before dropping, P_i the mean router probability; 1 when balanced, for any k) and the
router z-loss ``mean_t logsumexp(logits_t)²``. ``dropless`` layers (adopted Mixtral blocks) give
every expert capacity T. Residual-MoE (DeepSpeed-MoE): a ``dense`` branch (the dense MLP) runs on
every token and the layer returns ``c₀ · dense(x) + c₁ · moe(x)``, ``(c₀, c₁) = softmax(W_c x + b_c)``
in fp32; with experts that copy the dense MLP and top-1 weight 1 this is the dense function.
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
    kept: torch.Tensor  # (T, k) bool: the assignment is made and fits in its expert's capacity
    capacity: int
    routed: torch.Tensor | None = None  # (T, k) bool: the gate made it (DTS: above threshold); None: all


def routed_mask(routing: Routing) -> torch.Tensor:
    """(T, k) bool: the assignments the gate made, before capacity."""
    return torch.ones_like(routing.kept) if routing.routed is None else routing.routed


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
    routed = routing.experts[routed_mask(routing)]
    counts = torch.bincount(routed.reshape(-1), minlength=num_experts).to(routing.probs.dtype)
    fraction = counts / counts.sum()
    return num_experts * (fraction * routing.probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: ``mean over tokens of logsumexp(logits)²``."""
    return logits.float().logsumexp(dim=-1).square().mean()


Gate = Callable[["MoELayer", torch.Tensor], Routing]  # (layer, logits (T, E) fp32) -> routing


class MoELayer(nn.Module):
    """``forward(x[..., h]) -> [..., h]``: top-k routed experts in place of one feed-forward block.

    ``experts`` are modules mapping (n, h) → (n, h) (the pass copies the dense MLP into each);
    the router is an fp32 ``Linear(h, E, bias=False)``. ``gate`` routes the router logits (None:
    :func:`route` with ``top_k`` and :meth:`capacity`; :class:`~autopar.passes.moe.gates.DTSGate`);
    ``dropless`` gives every expert capacity T; ``dense`` adds the Residual-MoE branch (see the
    module docstring) with its fp32 mixing ``coefficient = Linear(h, 2)``. After each forward,
    ``last_aux_loss`` (``aux_loss_weight · balance + z_loss_weight · z``, in the autograd graph),
    ``last_balance_loss``, ``last_z_loss`` and ``stats`` describe it.
    """

    def __init__(self, experts: list[nn.Module], hidden_size: int, *, top_k: int, capacity_factor: float,
                 eval_capacity_factor: float, aux_loss_weight: float, z_loss_weight: float,
                 seed: int = 0, layer: int | None = None, gate: Gate | None = None, dropless: bool = False,
                 dense: nn.Module | None = None) -> None:
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
        self.gate = gate
        self.dropless = dropless
        generator = torch.Generator().manual_seed(seed)
        self.router = _seeded_linear(hidden_size, self.num_experts, generator, bias=False)
        self.dense = dense
        self.coefficient = None if dense is None else _seeded_linear(hidden_size, 2, generator, bias=True)
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
        if self.dropless:
            return tokens
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(tokens, self.num_experts, self.top_k, factor)

    def route(self, logits: torch.Tensor) -> Routing:
        """This layer's routing of router ``logits`` (T, E)."""
        if self.gate is not None:
            return self.gate(self, logits)
        return route(logits, self.top_k, self.capacity(logits.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, h)
        logits = F.linear(tokens.float(), self.router.weight.float())  # (T, E), fp32
        routing = self.route(logits)
        if self.expert_parallel is None:
            out = run_local_experts(self.experts, tokens, routing)
        else:
            out = self.expert_parallel(self, tokens, routing)
        if self.dense is not None:
            out = self._mix_dense(tokens, out)
        balance, z = balance_loss(routing), z_loss(logits)
        self.last_balance_loss, self.last_z_loss = balance, z
        self.last_aux_loss = self.aux_loss_weight * balance + self.z_loss_weight * z
        self.stats = _stats(routing, self.num_experts)
        if self.aux_loss_scale is not None and self.training and torch.is_grad_enabled():
            out = AttachAuxLoss.apply(out, self.last_aux_loss * self.aux_loss_scale)
        return out.to(x.dtype).reshape(*shape[:-1], out.shape[-1])

    def _mix_dense(self, tokens: torch.Tensor, experts_out: torch.Tensor) -> torch.Tensor:
        """Residual-MoE: ``c₀ · dense(x) + c₁ · experts(x)``, mixed in fp32."""
        assert self.dense is not None and self.coefficient is not None
        mixer = self.coefficient
        c = F.linear(tokens.float(), mixer.weight.float(), mixer.bias.float()).softmax(dim=-1)  # (T, 2)
        return self.dense(tokens).float() * c[:, :1] + experts_out * c[:, 1:]


def _seeded_linear(in_features: int, out_features: int, generator: torch.Generator, *, bias: bool
                   ) -> nn.Linear:
    """An fp32 Linear with weights ~ N(0, 0.02²) from ``generator`` and a zero bias."""
    linear = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(torch.empty(out_features, in_features).normal_(0.0, 0.02, generator=generator))
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


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
    experts, kept, made = routing.experts.detach(), routing.kept, routed_mask(routing)
    routed = torch.bincount(experts[made], minlength=num_experts)
    computed = torch.bincount(experts[kept], minlength=num_experts)
    return MoEStats(tokens=experts.shape[0], capacity=routing.capacity,
                    routed_per_expert=tuple(routed.tolist()), tokens_per_expert=tuple(computed.tolist()),
                    dropped_assignments=int((made & ~kept).sum()),
                    dropped_tokens=int((~kept.any(dim=-1)).sum()))
