"""Activations and temporaries of a local-cluster rank at its peak, as the CPU runtime holds them.

Data flow: ``memory._stage_set_memory`` (the memory model) asks :func:`cpu_activation_parts` for a
device of a ``local:N`` plan (CPU processes, fp32) → (activations, temporaries) bytes, the
categories torch's ``MemTracker`` reports (``autopar/runtime/measure.py``): ``ACT`` is what exists
outside any module's backward (the forward's saved tensors, a recomputed layer's, the schedule's
held outputs, the loss's tensors), ``TEMP`` what a module's backward allocates.

Per transformer layer and microbatch, the tensors the CPU ops save for backward, in units of
``sbh`` elements (COUNTED with ``torch.autograd.graph.saved_tensors_hooks`` on the zoo GPT block,
torch 2.13, fp32: 16.06 sbh at ``f = 4h``; every tensor below is one the hook saw):

* one rank (``t = 1``), fused SDPA: the input, LayerNorm 1's output, q/k/v (views of the QKV
  output, 3), the attention output (the head merge is a view of it), the second residual input,
  LayerNorm 2's output, the MLP's first output and the GELU's (``f/h`` each):
  ``8 + 2f/h``, plus LayerNorm statistics and the log-sum-exp (``(4 + a)·sb`` elements);
* unfused attention adds the softmax probabilities (``a·s/h``);
* tensor parallelism (the runtime's DTensor execution, ``local.compute``): q/k/v all-gathered
  (3), attention on every head unfused (``a·s/h``), the merged heads sharded (``1/t``), the MLP
  sharded (``2f/(h t)``): ``7 + 1/t + a·s/h + 2f/(h t)`` (the block measured 13.04 at t = 2,
  a = 4, s = 64, h = 128; this count says 13.5);
* full recomputation: the checkpoint's input (1) per layer, and during a layer's backward that
  layer's saved tensors again (recomputed, counted as ``ACT``);
* an MoE layer: its MLP part replaced by ``moe.expert_activation_bytes``' routed copies.

Context parallelism (cp > 1): every count at ``s/cp`` tokens with the fused count (the ring saves
q, k, v, its output and the log-sum-exp, like the CPU flash kernel), plus one ``sbh`` per layer: the
ring's output is ``(b, heads, s, d)``, so merging the heads copies it. The ring's backward working
set (:func:`ring_backward_bytes`) competes with the layer's for the ``TEMP`` peak. Sequence
parallelism (tp > 1): the two LayerNorms' inputs are sequence shards (``1/t``) and their outputs are
all-gathered for the column-parallel linears, which save the gathered copy: ``−2(1 − 1/t)`` sbh per
layer, and the final norm's input ``1/t`` (MEASURED tp2 + SP, 4 layers × 128, s 64: 69.6 sbh against
74.2 without SP; the count says 4.5 fewer).

Around the layers: a stage that sends keeps its output per microbatch in flight (the schedule's
``fwd_cache``, 1 sbh); the last stage keeps the final LayerNorm's input and output (2 sbh), the
fp32 logits of EVERY microbatch until the step ends (torch.distributed.pipelining keeps each
output to merge them; under t > 1 the local shard too), and the cross-entropy's log-probabilities
(``L = 4·b·s·V``) of each microbatch in flight.

The peak is the largest of these moments (gradients already allocated count: the peak is over
everything the tracker holds, and gradients exist from the first microbatch's backward on):

* the step's end on a pipeline's last stage: the held logits of every microbatch and their
  concatenation (``merge_chunks``), ``2·m`` logits (MEASURED pp4 1F1B, 8 microbatches of 2 × 128
  tokens, V 4096: 66.0 MiB ACT at that moment, 64 MiB of it the logits and their copy);

* the loss backward on the last stage: the log-softmax backward holds two logits-sized tensors
  (``TEMP = 2L``);
* a layer's backward: the gradients of the MLP's two wide tensors, the residual stream, the
  LayerNorm output and the incoming gradient, ``(2f/(h t) + 3) sbh`` (``TEMP``); once gradients
  exist (a later microbatch), each weight's gradient is computed apart and then added: at least
  the MLP weight's (``h f/t`` elements) beside ``(f/(h t) + 2) sbh`` (measured on gpt-tiny,
  h 64, 2 tokens × 8: TEMP 22.06 sbh, of which 16 the MLP weight's gradient).

Measured on 2 gloo ranks (GPT 4 layers, h 128, a 4, s 64, V 1024, batch 8; ``report()``, units of
one microbatch's sbh·4 bytes), model vs MemTracker: dp2 ACT 82.25 vs 82.3, TEMP 16 vs 16;
pp2 1F1B (4 microbatches) rank 0 ACT 66.25 vs 67.33, TEMP 11 vs 11.01, rank 1 ACT 75.1 vs 77.2,
TEMP 16 vs 17; pp2 GPipe rank 1 ACT 200.5 vs 200.67, TEMP 16 vs 16; tp2 ACT 76 vs 74.16,
TEMP 16 vs 16; dp2 with full recomputation ACT 20.06 vs 20.1, TEMP 11 vs 13.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.cost_models.context_parallel import sequence_shard_profile
from autopar.cost_models.moe import expert_activation_bytes

if TYPE_CHECKING:
    from autopar.cost_models.profile import LayerProfile, ModelProfile
    from autopar.plans import Plan

LOGIT_BYTES = 4  # the loss reads fp32 logits
RING_ACCUMULATOR_BYTES = 4  # ring attention's dQ, dK/dV and block scores are fp32 (runtime/context_parallel)


def vocab_parallel(plan: Plan) -> bool:
    """Whether the runtime shards the embedding and LM head over tp: only a one-stage plan's are
    (a pipelined plan keeps only the repeated layers' tensor-parallel strategies, so its embedding,
    head and a tied weight's last-stage copy are replicated on every tp rank)."""
    return plan.parallelism.tp > 1 and plan.parallelism.pp == 1


def saved_layer_bytes(layer: LayerProfile, *, microbatch_size: int, tp: int, fused_attention: bool,
                      bytes_per_element: int, ep: int = 1, sequence_parallel: bool = False,
                      ring: bool = False) -> float:
    """Bytes one transformer layer saves for backward per microbatch, without recomputation
    (module docstring; ``layer`` at the sequence each rank runs, ``s/cp`` under context
    parallelism, where ``ring`` adds the merged heads' copy); a layer of unknown shape: what its
    forward writes, ÷ t."""
    if not layer.is_transformer:
        return layer.activation_bytes * microbatch_size / tp
    h, f, a, s = layer.hidden_size, layer.ffn_size, layer.num_heads, layer.seq_len
    assert h is not None and f is not None and a is not None and s is not None
    sbh = microbatch_size * s * h * bytes_per_element
    mlp = 2 * f / (h * tp)
    statistics = 4 / h  # LayerNorm means and reciprocal deviations
    if tp == 1 and fused_attention:
        units = 8 + a / h
    elif tp == 1:
        units = 8 + a * s / h
    else:
        units = 7 + 1 / tp + a * s / h
        if sequence_parallel:  # the two norms' inputs are sequence shards (their outputs are gathered)
            units -= 2 * (1 - 1 / tp)
    if ring and tp == 1:  # the ring's output is (b, heads, s, d): merging the heads copies it
        units += 1
    saved = sbh * (units + statistics + mlp)
    if layer.moe is not None:  # the routed copies beyond the dense MLP's (``moe``)
        saved += expert_activation_bytes(layer, microbatch_size=microbatch_size, tp=tp, ep=ep,
                                         bytes_per_element=bytes_per_element)
    return saved


def backward_working_bytes(layer: LayerProfile, *, microbatch_size: int, tp: int, bytes_per_element: int,
                           accumulating: bool) -> float:
    """What a layer's backward allocates at its widest (module docstring): ``(2f/(h t) + 3) sbh``;
    ``accumulating`` (gradients exist from an earlier microbatch), at least the MLP weight's
    gradient, computed apart before it is added, beside ``(f/(h t) + 2) sbh``."""
    h, f, s = layer.hidden_size, layer.ffn_size, layer.seq_len
    if h is None or f is None or s is None:
        return layer.activation_bytes * microbatch_size / tp
    sbh = microbatch_size * s * h * bytes_per_element
    widest = sbh * (2 * f / (h * tp) + 3)
    return max(widest, sbh * (f / (h * tp) + 2) + h * f / tp * bytes_per_element) if accumulating else widest


def ring_backward_bytes(layer: LayerProfile, *, microbatch_size: int, tp: int, bytes_per_element: int
                        ) -> float:
    """What ring attention's backward allocates at its widest (``layer`` at ``s/cp``; module
    docstring): the fp32 dQ accumulator, K/V and the block arriving, the fp32 dK/dV accumulator and
    the one arriving, and the own step's block scores, probabilities and their gradient (fp32)."""
    h, a, s = layer.hidden_size, layer.num_heads, layer.seq_len
    if h is None or a is None or s is None:
        return 0.0
    local = microbatch_size * s * h / tp  # elements of q (or k, or v) on this rank
    fp32 = RING_ACCUMULATOR_BYTES
    scores = microbatch_size * a / tp * s * s * fp32
    return local * (fp32 + 4 * bytes_per_element + 4 * fp32) + 3 * scores


def cpu_activation_parts(plan: Plan, profile: ModelProfile, stage_indices: tuple[int, ...], *,
                         in_flight: float, gradients_bytes: float, plain: int | None = None
                         ) -> tuple[float, float]:
    """(activations, temporaries) bytes at the peak of a local rank holding ``stage_indices``, with
    ``in_flight`` microbatches' activations alive (``memory.in_flight_microbatches``) and
    ``gradients_bytes`` of gradients once allocated; stage ``plain`` priced without recomputation
    (module docstring)."""
    par, sched = plan.parallelism, plan.schedule
    profile = sequence_shard_profile(profile, par.cp)  # what each cp rank runs: s/cp tokens
    b, t, e, m = sched.microbatch_size, par.tp, profile.bytes_per_element, sched.num_microbatches
    last, sp, ring = len(plan.stages) - 1, plan.sequence_parallel and par.tp > 1, par.cp > 1
    sbh = b * profile.seq_len * profile.hidden_size * e
    stored = recomputed = working = accumulating = 0.0
    for stage in (plan.stages[i] for i in stage_indices):
        for layer in profile.layers[stage.layers[0]:stage.layers[1]]:
            saved = saved_layer_bytes(layer, microbatch_size=b, tp=t, ep=par.ep, bytes_per_element=e,
                                      fused_attention=profile.fused_attention, sequence_parallel=sp,
                                      ring=ring)
            full = stage.recompute == "full" and stage.index != plain and layer.is_transformer
            stored += sbh if full else saved
            recomputed = max(recomputed, saved if full else 0.0)
            ring_bytes = (ring_backward_bytes(layer, microbatch_size=b, tp=t, bytes_per_element=e)
                          if ring else 0.0)
            working, accumulating = (
                max(working, ring_bytes, backward_working_bytes(layer, microbatch_size=b, tp=t,
                                                                bytes_per_element=e, accumulating=False)),
                max(accumulating, ring_bytes, backward_working_bytes(layer, microbatch_size=b, tp=t,
                                                                     bytes_per_element=e, accumulating=True)))
        stored += sbh if stage.index < last else 0.0  # the output the schedule keeps to send
    n, has_head = in_flight, last in stage_indices and profile.vocab_size > 0
    logits = LOGIT_BYTES * b * profile.seq_len * profile.vocab_size if has_head else 0.0
    output = logits * (1 + (1 / t if vocab_parallel(plan) else 0.0))  # the gathered logits, and the shard
    held = m * output if par.pp > 1 else 0.0  # the schedule keeps every output to merge them
    current = 0.0 if par.pp > 1 else output  # one stage: the current microbatch's output
    norm_input = sbh / t if sp else sbh  # under sequence parallelism a shard; its output is gathered
    head = (norm_input + sbh + logits) if has_head else 0.0  # final LayerNorm in/out, log-probabilities
    grads_then = gradients_bytes if m > n else 0.0  # 1F1B's steady state: after a first backward
    moments = [(n * (stored + head) + held + current, 2 * logits, grads_then)] if has_head else []
    freed = logits if sched.name != "gpipe" else 0.0  # the loss backward of this microbatch is done
    moments.append((n * (stored + head) - freed + recomputed + held + current,
                    accumulating if grads_then else working, grads_then))
    if n > 1 or recomputed:  # one microbatch's backward done: its gradients exist, one fewer in flight
        moments.append(((n - 1) * (stored + head) + held + recomputed + (sbh if recomputed else 0.0),
                        accumulating if m > 1 else working, gradients_bytes))
    if held:  # the step's end: torch.distributed.pipelining concatenates the held outputs into one
        moments.append((2 * held + recomputed, 0.0, gradients_bytes))
    activations, temporaries, _ = max(moments, key=sum)
    return activations, temporaries
