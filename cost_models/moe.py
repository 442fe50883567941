"""Mixture-of-Experts costs: expert compute under load imbalance, the expert-parallel all-to-all,
and expert parameters sharded over ``ep``.

Data flow: the MoE pass's annotations (``node.meta["autopar_moe"]``, ``autopar.passes.moe``) →
``ModelProfile.from_captured`` (or :func:`moe_profile` for an analytic profile) →
``LayerProfile.moe`` (:class:`MoELayerProfile`) → ``compute`` (the experts' matmuls),
``estimate`` (all-to-all → ``breakdown["ep_comm"]``, expert gradient sync), ``memory`` (expert
states, activations) and the planner (which ``ep`` to try).

Layout (DeepSpeed-MoE, Rajbhandari et al. 2022, arXiv 2201.05596, §4; as the runtime's
``expert_parallel``): ``ep`` divides ``dp`` and every layer's ``E``; ``ep`` consecutive
data-parallel ranks form an expert-parallel group, each rank holding ``E/ep`` experts. Dense
parameters are data-parallel over ``dp`` ranks, expert parameters over the ``dp/ep`` ranks
holding the same experts. Each rank routes its own ``T = b·s`` tokens per microbatch (capacity
and top-k per rank, GShard, Lepikhin et al. 2021).

Tensor parallelism leaves an MoE layer whole: the intra-op solver (``autopar.planner``) shards
only ``nn.Linear`` nodes and the runtime runs the MoE layer on plain tensors
(``runtime/expert_parallel.LocalTensors``), so the experts, the router and Residual-MoE's dense
branch are replicated on the ``t`` ranks, which each run them on the same tokens, and the layer
has one tensor-parallel all-reduce each way (the attention's) instead of Megatron-LM's two. With
``ep > 1`` and ``t > 1`` every tensor-parallel coordinate has its own expert-parallel groups (the
runtime's ``ExpertGroups``): the ``t`` copies of a token exchange concurrently, each in its group.

Formulas (``k`` top-k, ``h`` hidden, ``f`` expert width, ``c`` capacity factor):

* Load imbalance (:func:`load_imbalance`): a rank of the ep group computes the assignments its
  ``E/ep`` experts receive from the ``ep`` ranks. With a balanced router (what the Switch
  load-balancing loss drives towards; Fedus et al. 2022) the ``ep·T·k`` assignments of a group
  fall on each rank with probability ``1/ep``: mean ``μ = T·k``, variance
  ``T·k·(1 − 1/ep)`` (multinomial). The busiest of ``ep`` ranks is bounded by the Gaussian
  tail ``μ + σ·√(2 ln ep)``, and never exceeds the capacity every source rank allows its
  experts, ``E·⌈c·T·k/E⌉``: ``imbalance = min(E·⌈c T k/E⌉/(T k), 1 + √(2 ln(ep)(1 − 1/ep)/(T k)))``.
  With ``ep = 1`` a rank runs every expert on its own tokens: no imbalance (``min(cap, 1)``).
* Expert compute (:func:`expert_matmuls`): the busiest rank runs ``R = imbalance·T·k`` rows
  through its ``g = E/ep`` experts: ``g`` matmuls ``(R/g)×h×f`` and ``(R/g)×f×h`` (one
  batched GEMM each), plus the router ``T×h×E``. The FLOPs equal the pass's ``k ×`` dense MLP
  (times the imbalance); the matmul shapes shrink with ``E/ep`` (``compute``'s efficiency).
* All-to-all (:func:`all_to_all_bytes`, ``comm.all_to_all_time_s``): per MoE layer and
  microbatch, forward dispatch and combine, backward their two reverses (and the forward two
  again under full recomputation); each moves ``S = imbalance·T·k·h·bytes`` per rank (the
  busiest receiver bounds the exchange), of which ``(ep−1)/ep`` leaves the rank:
  ``(ep−1)/ep · S/B + (ep−1)α`` inside a node, intra- and inter-node parts concurrently when the
  group spans nodes (TECHNIQUES §4).
* Model states (:func:`layer_state_bytes`, ``memory``), as autopar's runtime holds them
  (``runtime/expert_parallel``: experts stay out of its ZeRO/FSDP wrapper): expert parameters
  ``E·P_e/ep`` per device with their gradients and optimizer states UNSHARDED
  (:data:`EXPERT_ZERO`), replicated over the ``dp/ep`` ranks holding the same experts, whatever
  the plan's ZeRO stage: ``E/ep · P_e · (2 + 2 + 12)`` bytes. Dense parameters ``÷ t`` with the
  plan's ZeRO over ``dp``; the MoE layer's non-expert parameters (router, Residual-MoE's dense
  MLP and coefficient) are dense, ZeRO over ``dp``, but not ``÷ t`` (:func:`layer_params`).
  (DeepSpeed-MoE would shard the expert states with ZeRO over ``dp/ep``; autopar does not.)
* Gradient sync (``estimate``): dense gradients over the ``dp`` group with the plan's ZeRO
  stage (``comm.dp_sync_time_s``); expert gradients all-reduced over the ``dp/ep`` group
  (``zero = 0`` whatever the plan's), once per step after the last backward
  (``ExpertGroups.reduce_gradients``), so none of it overlaps the backward pass
  (``CostOptions.dp_overlap`` does not apply to it). The optimizer step updates the unsharded
  expert states on every replica.
* Activations (:func:`expert_activation_bytes`): Korthikanti et al.'s MLP terms, input ``2sbh``
  and the two ``f``-wide tensors ``4sbf/t`` (16-bit), are kept once per routed row on every tp
  rank: ``imbalance·k·(2sbh + 4sbf)`` replaces them, plus the router's fp32 logits and
  probabilities ``8sbE``.
* Variants the pass records: dropless routing (no capacity cap on the imbalance), Residual-MoE
  (one more dense MLP per token, its weights dense), Pyramid-MoE (E per layer; ``ep`` divides
  their gcd). The DTS gate (``gate="dts"``, EvoMoE) is priced after its dense phase, with the
  sparse ``top_k``: for its first ``dts_anneal_steps`` steps it runs every token through all
  ``E`` experts (``E/k`` times the expert compute, all-to-all and expert activations priced
  here), so the prediction holds for the sparse steps that follow, not for the dense warm-up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.states import MIXED_PRECISION, StateBytes, model_state_bytes

if TYPE_CHECKING:
    from autopar.cost_models.profile import LayerProfile, ModelProfile

ALL_TO_ALLS_PER_LAYER = 2
"""Per MoE layer and microbatch in each direction: dispatch and combine (DeepSpeed-MoE §4)."""
EXPERT_ZERO = 0
"""The ZeRO stage expert states and gradients get, whatever the plan's: the runtime keeps experts
out of its ZeRO/FSDP wrapper and all-reduces their gradients (``runtime/expert_parallel``)."""
ROUTER_BYTES_PER_LOGIT = 8  # fp32 logits and fp32 probabilities, kept for backward


@dataclass(frozen=True, kw_only=True)
class MoELayerProfile:
    """The MoE part of one repeated layer (torch-free; from ``node.meta["autopar_moe"]``).

    ``expert_param_count``: one expert's parameters; ``router_param_count``: the router's;
    ``residual_param_count``: Residual-MoE's dense MLP and its mixing coefficient ``Linear(h, 2)``.
    ``dropless``: no capacity (every assignment computed); ``residual``: Residual-MoE's dense MLP
    runs beside the experts on every token (DeepSpeed-MoE), a dense, data-parallel parameter.
    ``gate``: ``"topk"``, or ``"dts"`` (priced after its dense phase, module docstring).
    """

    num_experts: int
    top_k: int
    capacity_factor: float
    expert_param_count: int
    router_param_count: int = 0
    dropless: bool = False
    residual: bool = False
    residual_param_count: int = 0
    gate: str = "topk"

    def __post_init__(self) -> None:
        if type(self.num_experts) is not int or self.num_experts < 1:
            raise ValueError(f"MoELayerProfile.num_experts = {self.num_experts!r}: expected an int >= 1")
        if type(self.top_k) is not int or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoELayerProfile.top_k = {self.top_k!r}: expected an int in [1, num_experts]")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoELayerProfile.capacity_factor = {self.capacity_factor!r}: expected > 0")
        if self.gate not in ("topk", "dts"):
            raise ValueError(f"MoELayerProfile.gate = {self.gate!r}: expected 'topk' or 'dts'")

    @property
    def expert_params_total(self) -> int:
        """Parameters of all ``E`` experts."""
        return self.num_experts * self.expert_param_count

    @property
    def shared_params(self) -> int:
        """The layer's non-expert MoE parameters (router, Residual-MoE's branch): dense, data-parallel
        over every ``dp`` rank, held whole on every tensor-parallel rank."""
        return self.router_param_count + self.residual_param_count


def expert_params(layer: LayerProfile) -> int:
    """Parameters of ``layer``'s experts (0 for a dense layer)."""
    return 0 if layer.moe is None else layer.moe.expert_params_total


def layer_params(layer: LayerProfile, *, tp: int, ep: int) -> tuple[float, float]:
    """(dense, expert) parameters of ``layer`` on one device: dense ``÷ t`` except the MoE layer's
    router and Residual-MoE branch (whole on every tp rank), the experts ``E/ep`` (not ``÷ t``)."""
    if layer.moe is None:
        return layer.param_count / tp, 0.0
    experts, shared = layer.moe.expert_params_total, layer.moe.shared_params
    return (layer.param_count - experts - shared) / tp + shared, experts / ep


def num_experts_gcd(profile: ModelProfile) -> int:
    """The gcd of the MoE layers' expert counts (0 without MoE layers): ``ep`` must divide it."""
    return math.gcd(*(layer.moe.num_experts for layer in profile.layers if layer.moe is not None))


def load_imbalance(*, tokens: int, num_experts: int, top_k: int, capacity_factor: float, ep: int,
                   dropless: bool = False) -> float:
    """Busiest rank's routed rows ÷ the mean ``T·k`` (module docstring). Dropless routing has no
    capacity: the cap is every assignment of the group that can reach one rank,
    ``ep·min(k, E/ep)/k``."""
    assignments = tokens * top_k
    if dropless:
        cap = ep * min(top_k, num_experts // ep) / top_k
    else:
        cap = num_experts * math.ceil(capacity_factor * assignments / num_experts) / assignments
    tail = math.sqrt(2 * math.log(ep) * (1 - 1 / ep) / assignments) if ep > 1 else 0.0
    return min(cap, 1.0 + tail)


def _imbalance(layer: LayerProfile, tokens: int, ep: int) -> float:
    moe = layer.moe
    assert moe is not None
    return load_imbalance(tokens=tokens, num_experts=moe.num_experts, top_k=moe.top_k,
                          capacity_factor=moe.capacity_factor, ep=ep, dropless=moe.dropless)


def expert_matmuls(layer: LayerProfile, *, tokens: int, ep: int
                   ) -> tuple[tuple[tuple[float, float, float, float], ...], float]:
    """``((m, k, n, batch), …)`` of the experts and router on the busiest rank per microbatch, and
    the elements its elementwise kernels move (GeLU over the expert rows ``2 R f``, dispatch
    gather and combine scatter ``4 R h``, router softmax and top-k ``3 T E``). Residual-MoE adds
    its dense MLP on the ``T`` tokens."""
    moe, h, f = layer.moe, layer.hidden_size, layer.ffn_size
    assert moe is not None and h is not None and f is not None
    rows = _imbalance(layer, tokens, ep) * tokens * moe.top_k
    local = moe.num_experts // ep
    per_expert = rows / local
    matmuls = ((per_expert, h, f, local), (per_expert, f, h, local), (tokens, h, moe.num_experts, 1))
    elementwise = 2 * rows * f + 4 * rows * h + 3 * tokens * moe.num_experts
    if moe.residual:
        matmuls += ((tokens, h, f, 1), (tokens, f, h, 1))
        elementwise += 2 * tokens * f
    return matmuls, elementwise


def all_to_all_bytes(layer: LayerProfile, *, tokens: int, ep: int, bytes_per_element: int) -> float:
    """``S = imbalance·T·k·h·bytes``: one dispatch (or combine) buffer per rank (0 if ``ep = 1``)."""
    if layer.moe is None or ep == 1:
        return 0.0
    assert layer.hidden_size is not None
    return _imbalance(layer, tokens, ep) * tokens * layer.moe.top_k * layer.hidden_size * bytes_per_element


def expert_activation_bytes(layer: LayerProfile, *, microbatch_size: int, tp: int, ep: int,
                            bytes_per_element: int) -> float:
    """Activation bytes an MoE layer keeps beyond a dense layer's, per microbatch (docstring)."""
    moe, h, f, s = layer.moe, layer.hidden_size, layer.ffn_size, layer.seq_len
    if moe is None or None in (h, f, s):
        return 0.0
    assert h is not None and f is not None and s is not None
    tokens, scale = microbatch_size * s, bytes_per_element / 2
    dense_mlp = (2 * tokens * h + 4 * tokens * f / tp) * scale
    copies = _imbalance(layer, tokens, ep) * moe.top_k + (1 if moe.residual else 0)
    experts = copies * (2 * tokens * h + 4 * tokens * f) * scale
    return experts - dense_mlp + ROUTER_BYTES_PER_LOGIT * tokens * moe.num_experts


def layer_state_bytes(layer: LayerProfile, *, tp: int, zero: int, dp: int, ep: int,
                      states: StateBytes = MIXED_PRECISION) -> float:
    """Weights, gradients and optimizer states of ``layer`` on one device (module docstring): the
    dense part with ZeRO ``zero`` over ``dp``, the ``E/ep`` experts unsharded (:data:`EXPERT_ZERO`)."""
    dense, experts = layer_params(layer, tp=tp, ep=ep)
    held = model_state_bytes(dense, zero=zero, dp=dp, states=states)
    return held + model_state_bytes(experts, zero=EXPERT_ZERO, states=states) if experts else held


def moe_profile(profile: ModelProfile, *, num_experts: int, top_k: int, capacity_factor: float = 1.25,
                layers: tuple[int, ...] | None = None) -> ModelProfile:
    """An analytic profile with the MLPs of ``layers`` (default every other: 1, 3, …) upcycled
    into MoE layers as ``autopar.passes.MoE`` does: ``E`` copies of the MLP (``2hf + f + h``
    parameters) plus a router ``h×E``; FLOPs ``k ×`` the MLP's ``4shf`` plus the router's
    ``2shE`` forward (twice that backward)."""
    chosen = set(range(1, profile.num_layers, 2) if layers is None else layers)
    new = []
    for i, layer in enumerate(profile.layers):
        if i not in chosen:
            new.append(layer)
            continue
        if not layer.is_transformer:
            raise ValueError(f"layer {i} ({layer.name}) has no recognized MLP to turn into experts")
        h, f, s = layer.hidden_size, layer.ffn_size, layer.seq_len
        assert h is not None and f is not None and s is not None
        mlp_params, mlp_flops, router_flops = 2 * h * f + f + h, 4 * s * h * f, 2 * s * h * num_experts
        moe = MoELayerProfile(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                              expert_param_count=mlp_params, router_param_count=h * num_experts)
        new.append(dataclasses.replace(
            layer, moe=moe,
            flops_fwd=layer.flops_fwd + (top_k - 1) * mlp_flops + router_flops,
            flops_bwd=layer.flops_bwd + (top_k - 1) * 2 * mlp_flops + 2 * router_flops,
            param_count=layer.param_count + (num_experts - 1) * mlp_params + moe.router_param_count))
    return dataclasses.replace(profile, layers=tuple(new))
