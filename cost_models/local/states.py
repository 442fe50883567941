"""Model states of a local-cluster rank as the CPU runtime holds them: parameter by parameter.

Data flow: ``memory._stage_set_memory`` asks :func:`cpu_state_parts` for a device of a ``local:N``
plan → (parameters, gradients, optimizer state) bytes, the storages ``report()`` measures after a
step (``autopar/runtime/measure.measure_memory_bytes``: each tensor's local shard). The GPU model
prices states per parameter count (``states.state_parts_bytes``); on CPU each kind of parameter is
held its own way:

* tensor parallelism (``autopar/runtime/tensor_parallel.py``): the Plan's column-parallel linears'
  weights and biases and row-parallel weights are ``÷ t``; every other parameter is a replicated
  DTensor, whole on every rank: the LayerNorms, the row-parallel biases, the position embedding,
  the final norm, and the token embedding unless the Plan shards it (``"vocab"``). The ModelProfile
  keeps no per-parameter records, so a transformer layer is split on the GPT layout its profile
  prices: matrices ``4h² + 2hf``, column-parallel biases ``3h + f`` when the layer has biases
  (its vectors reach ``3h + f + 2h``), the rest replicated;
* without a data-parallel wrapper (``dp·cp = 1``) the QKV and attention-output gradients are whole
  on every rank (``compute.DTENSOR_TP``: ``Replicate`` DTensors of the full shape, biases
  included); FSDP2 (``replicate`` and ``fully_shard`` alike) redistributes every gradient to its
  parameter's placement;
* ZeRO 1–3 run FSDP2 ``fully_shard`` over the ``dp·cp`` ranks (``data_parallel.gradient_mesh``):
  parameters, gradients and optimizer state all ``÷ dp·cp`` at rest — ZeRO 1 and 2 too
  (``reshard_after_forward=False`` only keeps the gathered weights between forward and backward);
  ZeRO 0 (``replicate``) shards nothing;
* AdamW's two moments follow the parameter's placement (``2·b`` bytes per local element); MoE
  experts: ``E/ep`` per device, outside FSDP (``moe``), whole on every tp rank.

MEASURED on 2 gloo ranks (zoo GPT 4 layers × 128, 4 heads, V 1024, s 64, batch 8; torch 2.13;
``report()``): tp2 parameters 1,888,256 B = (sharded)/2 + replicated exactly, gradients 2,415,616 B
= the same plus the whole attention gradients exactly; ZeRO-1 parameters and gradients 1,865,216 B
(half of 3,730,432); cp2 3,730,432 B (nothing sharded: ``dp·cp = 2`` under ``replicate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.cost_models.local.compute import DTENSOR_TP
from autopar.cost_models.local.memory import vocab_parallel
from autopar.cost_models.moe import layer_params
from autopar.cost_models.states import training_states

if TYPE_CHECKING:
    from autopar.cost_models.profile import LayerProfile, ModelProfile
    from autopar.plans import Plan


def layer_state_elements(layer: LayerProfile, *, tp: int, ep: int, whole_attention_gradients: bool
                         ) -> tuple[float, float, float]:
    """(parameter, gradient, expert) elements of one layer on one rank before data-parallel
    sharding (module docstring); the expert part is included in the first two."""
    if layer.moe is not None:
        dense, experts = layer_params(layer, tp=tp, ep=ep)
        return dense + experts, dense + experts, experts
    if tp == 1 or not layer.is_transformer:
        return layer.param_count / tp, layer.param_count / tp, 0.0
    h, f = layer.hidden_size, layer.ffn_size
    assert h is not None and f is not None
    matrices = 4 * h * h + 2 * h * f
    vectors = max(0.0, layer.param_count - matrices)
    biased = vectors >= 3 * h + f + 2 * h
    colwise_biases = 3 * h + f if biased else 0
    replicated = vectors - colwise_biases
    params = (matrices + colwise_biases) / tp + replicated
    if not whole_attention_gradients:
        return params, params, 0.0
    attention = 4 * h * h + (3 * h if biased else 0)  # QKV weight and bias, output projection weight
    return params, params + attention * (1 - 1 / tp), 0.0


def _outside_layers(plan: Plan, profile: ModelProfile, stage_index: int) -> float:
    """Elements of the embedding (first stage) and head (last stage) on one rank."""
    t, last = plan.parallelism.tp, len(plan.stages) - 1
    vocab_table = profile.vocab_size * profile.hidden_size
    elements = 0.0
    if stage_index == 0:
        sharded = t > 1 and any(s.strategy == "vocab" for s in plan.shardings)
        table = min(vocab_table, profile.embedding_params)
        elements += profile.embedding_params - table + table / (t if sharded else 1)
    if stage_index == last:
        # the LM head is colwise only where ``vocab_parallel``; otherwise it (and a tied weight's
        # copy) is replicated (MEASURED tp2 × pp2, zoo GPT 8 × 256, V 4096: the last stage holds
        # the whole tied copy)
        head_t = t if vocab_parallel(plan) else 1
        untied = 0 if profile.tied_embeddings else vocab_table
        elements += profile.head_params - untied + untied / head_t  # final norm replicated
        if stage_index > 0:
            elements += profile.tied_head_params  # the last stage's copy of a tied weight
    return elements


def cpu_state_parts(plan: Plan, profile: ModelProfile, stage_indices: tuple[int, ...]
                    ) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer state) bytes on a local rank holding ``stage_indices``
    (module docstring)."""
    par = plan.parallelism
    replicas = par.dp * par.cp
    whole = DTENSOR_TP.whole_attention_weight_gradients and par.tp > 1 and replicas == 1
    params = grads = experts = 0.0
    for stage in (plan.stages[i] for i in stage_indices):
        for layer in profile.layers[stage.layers[0]:stage.layers[1]]:
            p, g, e = layer_state_elements(layer, tp=par.tp, ep=par.ep, whole_attention_gradients=whole)
            params, grads, experts = params + p, grads + g, experts + e
        outside = _outside_layers(plan, profile, stage.index)
        params, grads = params + outside, grads + outside
    shard = replicas if plan.zero >= 1 else 1
    held = training_states(gpu=False, element_bytes=profile.bytes_per_element)
    dense_params, dense_grads = (params - experts) / shard, (grads - experts) / shard
    return ((dense_params + experts) * held.weight, (dense_grads + experts) * held.gradient,
            (dense_params + experts) * held.optimizer)
