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
  layer's saved tensors again (recomputed, counted as ``ACT``: MemTracker's checkpoint region);
* an MoE layer: its MLP part replaced by ``moe.expert_activation_bytes``' routed copies (each the
  expert's input and its two ``f``-wide tensors), plus per routed copy the ``h``-wide tensors the
  runtime's dispatch keeps (:func:`routed_copies_bytes`): COUNTED with MemTracker (GPT 4 layers,
  h 128, f 512, s 64, b 8, 4 experts top-2 on layers 1 and 3, 2 gloo ranks): dp 2 keeps 3 ``(n_e, h)``
  tensors per local expert (the model counted 1; measured 110.7 sbh ACT against 100.4), dp 2 × ep 2
  keeps 2 per expert and the returned and received all-to-all rows (measured 113.2 against 101.3).

Context parallelism (cp > 1): every count at ``s/cp`` tokens with the fused count (the ring saves
q, k, v, its output and the log-sum-exp, like the CPU flash kernel), plus one ``sbh`` per layer: the
ring's output is ``(b, heads, s, d)``, so merging the heads copies it; under tp as well, q, k, v
gathered on every head (COUNTED cp 2 × tp 2 + SP, 4 gloo ranks, GPT h 192, 6 heads, s 256, b 4: 8 sbh
per layer besides the MLP's 4: QKV 3, ring output 1, merged copy 1, LayerNorm outputs 2, two
sequence-shard inputs ½ each; the unfused count said 10.5). The ring's backward working
set (:func:`ring_backward_bytes`) competes with the layer's for the ``TEMP`` peak. Sequence
parallelism (tp > 1): the two LayerNorms' inputs are sequence shards (``1/t``) and their outputs are
all-gathered for the column-parallel linears, which save the gathered copy: ``−2(1 − 1/t)`` sbh per
layer, and the final norm's input ``1/t`` (MEASURED tp2 + SP, 4 layers × 128, s 64: 69.6 sbh against
74.2 without SP; the count says 4.5 fewer).

Around the layers: a stage that sends keeps its output per microbatch in flight (the schedule's
``fwd_cache``, 1 sbh); the last stage keeps, per microbatch in flight, the final LayerNorm's input and
output (2 sbh), the cross-entropy's log-probabilities (``L = 4·b·s·V``) and its fp32 logits, which
the schedule's ``fwd_cache`` holds until that microbatch's backward (under t > 1 the local shard too,
but not under cp × tp: COUNTED, cp 2 × tp 2 + SP, GPT h 192, s 256, V 8192, b 4: one logits-sized
``ACT`` tensor beside the log-probabilities). The engine asks the schedule for no merged output
(``return_outputs=False``), so no stage keeps every microbatch's logits to concatenate them at the
step's end (MEASURED with them kept: pp 4 1F1B, shape B, last stage 259 MiB of ``ACT`` at that moment;
pp 2 1F1B below, rank 1: 77.2 sbh, now 53.2).

The peak is the largest of these moments (gradients already allocated count: the peak is over
everything the tracker holds, and gradients exist from the first microbatch's backward on):

* the loss backward on the last stage: the log-softmax backward holds two logits-sized tensors
  (``TEMP = 2L``);
* a layer's backward (:func:`layer_backward_moments`), first the stage's last layer: its MLP's
  second linear's input gradient (``f/(h t)`` sbh) beside its weight gradient (``h f/t`` elements:
  an allocation counts as ``TEMP`` until the gradient hook re-tags it), or later the first linear's,
  once the GELU's tensors are freed; beside them the gradient entering the layer (1 sbh), and in a
  one-stage plan with a tied LM head that weight's gradient (``V h``), which waits as ``TEMP`` until
  the embedding's backward accumulates it (COUNTED with MemTracker on 2 gloo ranks, GPT 4 layers,
  h 128, f 512, s 64, b 4, V 64, dp 2: TEMP 7.25 sbh = 4 + 2 + 1 + 0.25);
* with unfused attention (every head, under tensor parallelism) the softmax's backward can be wider:
  the probabilities' and the scores' gradients (``a·s/h`` sbh each), dV and the residual stream's
  gradient, once most of the layer's saved tensors are freed (COUNTED, tp 2 × pp 2 1F1B on 4 gloo
  ranks, b 4: h 192, 6 heads, s 256: TEMP 21 sbh = 8 + 8 + 1 + 1 + 3 received; h 256, 8 heads,
  s 128, first backward: ACT −8 sbh and TEMP +7 from the MLP's moment, later ones stay below it);
* on a pipeline stage that is not the last, the received output gradients: torch.distributed.
  pipelining receives each microbatch's into a buffer of its own, allocated before the step, that
  MemTracker first meets in backward (``TEMP``, 1 sbh each, kept): one per microbatch whose backward
  began; a stage that is not the first also still holds its previous input gradient until its send
  completes (1 sbh). COUNTED (same GPT, 8 layers, pp 4 1F1B, 4 microbatches): TEMP 7 / 9 / 10 sbh
  on ranks 0 / 1 / 2 = 4 + 2 + (1 / 2 / 3 received) + (0 / 1 / 1 sending); rank 3 (the loss) 17.

Buffers the pipeline runtime keeps (torch.distributed.pipelining): a stage that receives its input
receives each microbatch's into a buffer of its own, which stays (``ACT``, 1 sbh per microbatch
received, beyond those in flight: COUNTED pp 2 1F1B + recomputation, last stage, 4 × ½ MiB beside
the logits); under
ScheduleInterleaved1F1B (:func:`_interleaved_moments`) the sends are waited only at the step's end,
so every output sent (``ACT``) and every input gradient sent (``TEMP``) stays until then. Its peak is
the last backward that starts with the warm-up's chunk-microbatches in flight
(:func:`interleaved_peak`; COUNTED pp 2, 2 chunks of 1 layer, 4 microbatches, GPT h 128, s 64, b 4,
V 1024: rank 0 ``TEMP`` 12 sbh = 4 + 2 + 4 received + 2 sent, ``ACT`` 90.4 = 5 × 16.06 + 8 outputs +
2 received inputs; rank 1 at the last chunk's loss backward ``TEMP`` 23 = 16 + 2 received + 5 sent).

Zero-bubble schedules split a stage's backward into an input-gradient step (I, ``torch.autograd.grad``
with ``retain_graph``) and a weight step (W) later (:func:`zero_bubble_moments`). Between them a
microbatch keeps its whole graph (every saved tensor: ``ACT``) and the gradients of the outputs of
the ops that hold weights (``TEMP``, :func:`weight_step_kept_bytes`: ``3/t + f/(h t) + 4`` sbh per
layer, on the last stage also the logits' gradient and the final LayerNorm's two). The first stage
has no input gradient to compute: its W runs the whole backward, as in 1F1B. COUNTED with MemTracker
(pp 2, GPT 4 layers, h 128, s 64, b 4, V 1024, 4 microbatches), rank 1 at ``I_3``: ``TEMP`` 67 sbh
(this count: 2 × (2 × 11 + 8 + 2) + 3 for dq, dk, dv + 1 input gradient being sent = 68), ``ACT``
the logits of the microbatches whose input step is still to come, the current log-probabilities and
two microbatches' graphs.

A one-stage plan with full recomputation and several microbatches also peaks late in the first
microbatch's backward, as one microbatch does (the GELU's moment of its first layer, that layer's
and the embedding's gradients still to come), with the other microbatches' checkpoints and heads
held (COUNTED dp 2 + full recomputation, GPT 8 × 256, V 4096, 2 × 4 on 2 gloo ranks: ACT 70.10 sbh
= 42.02 + 28.08, TEMP 17, GRAD 44.18 of 56.46).

A one-stage plan with a tied LM head has one more moment: the first microbatch's embedding
backward, at the end of its backward. The head's contribution to the tied weight's gradient has
waited since the loss (``TEMP``), the embedding's dense gradient joins it and their sum is
allocated (3 tied-weight-sized ``TEMP`` tensors) while every other gradient exists (``GRAD``
without the tied one); the other microbatches' activations are still held, and this one's output
until its backward ends. With full recomputation's small checkpoints the gradients outweigh the
activations a first loss backward holds, so this moment is the peak of several microbatches
(COUNTED with MemTracker, cp 2 × dp 2 + full recomputation on 4 gloo ranks: GPT h 256, s 128,
V 4096, 2 × 4: ACT 58.10 sbh = 8 checkpoints + 34 head + 16 output, TEMP 48 = 3 × 16, GRAD 16 sbh
short; h 192, s 256, V 8192, 4 × 2: ACT 328.96 = 3 × 95.33 + 42.67, TEMP 96 = 3 × 32, GRAD 32 sbh
short; the model counted 48 / 39 and 381.3 / 85.3, the first loss backward).

With one microbatch and full recomputation the gradients grow through the backward faster than
the checkpoints are freed, so the peak comes late, in the first layer's backward, before its and the
embedding's gradients exist (:func:`_first_gradients_share`; COUNTED dp 2 + recomputation, GPT 8 ×
256, b 4: GRAD 44.2 of 56.5 MiB at the peak). There the GELU's backward is the peak, one fc2 bias
gradient (``h`` elements) above fc2's own (:func:`layer_backward_moments`).

MEASURED on 2 gloo ranks (GPT 4 layers, h 128, a 4, s 64, V 1024, batch 16 in 4 microbatches;
``report()``, units of one microbatch's sbh), model vs MemTracker, ACT and TEMP: pp 2 GPipe rank 0
132.5 vs 132.58, 7 vs 7, rank 1 200.5 vs 200.67, 16 vs 16; 1F1B rank 0 66.25 vs 67.32, 9 vs 9, rank 1
53.12 vs 53.2, 17 vs 17; zero bubble rank 1 84.25 vs 86.36, 68 vs 67; interleaved rank 0 90.31 vs
90.39, 12 vs 12, rank 1 75.19 vs 75.27, 23 vs 23 (``tests/cost_models/test_local_memory_peaks.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.cost_models.context_parallel import sequence_shard_profile
from autopar.cost_models.moe import expert_activation_bytes, load_imbalance

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
    if ring:  # q, k, v (gathered under tp), the ring's (b, heads, s, d) output and the merged heads' copy
        units = 9 + a / h
    elif tp == 1 and fused_attention:
        units = 8 + a / h
    elif tp == 1:
        units = 8 + a * s / h
    else:
        units = 7 + 1 / tp + a * s / h
    if sequence_parallel and tp > 1:  # the two norms' inputs are sequence shards (their outputs are gathered)
        units -= 2 * (1 - 1 / tp)
    saved = sbh * (units + statistics + mlp)
    if layer.moe is not None:  # the routed copies beyond the dense MLP's (``moe``)
        saved += expert_activation_bytes(layer, microbatch_size=microbatch_size, tp=tp, ep=ep,
                                         bytes_per_element=bytes_per_element)
    return saved


def layer_backward_moments(layer: LayerProfile, *, microbatch_size: int, tp: int, bytes_per_element: int,
                           accumulating: bool, saved: float, ring: bool = False,
                           sequence_parallel: bool = False, unfused: bool = False, recomputed: bool = False
                           ) -> list[tuple[float, float, float]]:
    """(activations, temporaries, gradients) bytes a layer's backward adds at its widest moments
    (module docstring; activations negative where freed; ``saved``: what the layer saved): the MLP's
    second linear's backward, its input gradient (``f/(h t)`` sbh) beside its weight gradient
    (``h f/t`` elements, ``TEMP`` until accumulated); then the first linear's, after the GELU's input
    and output are freed: the GELU's gradient, the LayerNorm output's (1 sbh) and the first weight's,
    the second weight's gradient a gradient now (``accumulating``: added into the existing one and
    freed). Under context parallelism (``ring``) also ring attention's backward, once all but the
    layer's input, its first LayerNorm's output, q, k, v and the ring's output are freed: its working
    set (:func:`ring_backward_bytes`) and the gradient of the merged heads (``1/t`` sbh). With
    ``unfused`` attention (tensor parallelism runs it on every head, ``local.compute``) also its
    softmax's backward, once all but the layer's input, its first LayerNorm's output, q, k and the
    probabilities are freed: the probabilities' gradient and the scores' (``a·s/h`` sbh each), dV and
    the residual stream's gradient (1 each). A ``recomputed`` layer's first backward also has the
    GELU's: fc2's saved input freed (``−f/(h t)`` sbh), its input gradient and the GELU's (``f/(h t)``
    each) held, fc2's weight and bias gradients landed — one bias gradient above the MLP's second
    linear's moment, so MemTracker reports it (COUNTED, dp 4 + full recomputation, GPT 8 × 256,
    s 128, b 4: ACT 28.08 and TEMP 17 sbh, 1 KiB above fc2's moment at ACT 32.08, TEMP 15).
    A layer of unknown shape: what its forward writes, ÷ t."""
    h, f, s = layer.hidden_size, layer.ffn_size, layer.seq_len
    if h is None or f is None or s is None:
        return [(0.0, layer.activation_bytes * microbatch_size / tp, 0.0)]
    sbh = microbatch_size * s * h * bytes_per_element
    wide, weight = sbh * f / (h * tp), h * f / tp * bytes_per_element
    moments = [(0.0, wide + weight, 0.0), (-2 * wide, wide + sbh + weight, 0.0 if accumulating else weight)]
    if recomputed and not accumulating:  # the GELU's backward, fc2's input freed, its gradients landed
        moments.append((-wide, 2 * wide, weight + h * bytes_per_element))
    later = 0.0 if accumulating else (2 * h * f + h * h) / tp * bytes_per_element  # MLP, projection
    if unfused and layer.num_heads is not None:
        scores = sbh * layer.num_heads * s / h
        kept = sbh * (2 + (2 if tp > 1 else 3)) + scores  # input, LN 1 out, q and k (one QKV at t = 1), P
        moments.append((min(0.0, kept - saved), 2 * scores + 2 * sbh, later))
    if ring:
        kept = sbh * ((1 / tp if sequence_parallel else 1) + 1 + 4 / tp)  # input, LN 1 out, q, k, v, out
        working = ring_backward_bytes(layer, microbatch_size=microbatch_size, tp=tp,
                                      bytes_per_element=bytes_per_element)
        moments.append((min(0.0, kept - saved), working + sbh / tp, later))
    return moments


def ring_backward_bytes(layer: LayerProfile, *, microbatch_size: int, tp: int, bytes_per_element: int
                        ) -> float:
    """What ring attention's backward allocates at its widest (``layer`` at ``s/cp``;
    ``runtime/context_parallel._ring_backward`` with the torch block kernel), in units of one q's
    elements: the output gradient made contiguous, K/V stacked and the block arriving (1 + 4, at the
    model's dtype), the fp32 dQ accumulator, dK/dV accumulator and the one arriving (1 + 4), the
    block's dQ, dK, dV and the latter two summed over head groups (5, fp32), and the block's scores,
    probabilities and their gradient (3 × ``a·s/h``, fp32). COUNTED with MemTracker (cp 2, GPT h 256,
    8 heads, s 128, b 8, fp32): 21.03 sbh, 15 + 3 × 2 of them."""
    h, a, s = layer.hidden_size, layer.num_heads, layer.seq_len
    if h is None or a is None or s is None:
        return 0.0
    local = microbatch_size * s * h / tp  # elements of q (or k, or v) on this rank
    fp32 = RING_ACCUMULATOR_BYTES
    scores = microbatch_size * a / tp * s * s * fp32
    return local * (5 * bytes_per_element + 10 * fp32) + 3 * scores


def routed_copies_bytes(layer: LayerProfile, *, microbatch_size: int, ep: int, bytes_per_element: int
                        ) -> float:
    """The ``h``-wide routed copies an MoE layer's CPU runtime keeps beyond the expert input that
    ``moe.expert_activation_bytes`` counts, per microbatch (module docstring): each expert's output
    and the combine's weighted copy (``run_local_experts``, ep = 1: 2 per routed copy), or with
    experts over ``ep`` ranks the expert's output, the tokens received and the outputs returned
    (``AllToAllExperts``: 3); as many routed copies as ``moe`` prices on the busiest rank."""
    moe, h, s = layer.moe, layer.hidden_size, layer.seq_len
    if moe is None or h is None or s is None:
        return 0.0
    tokens = microbatch_size * s
    copies = moe.top_k * load_imbalance(tokens=tokens, num_experts=moe.num_experts, top_k=moe.top_k,
                                        capacity_factor=moe.capacity_factor, ep=ep, dropless=moe.dropless)
    return (3 if ep > 1 else 2) * copies * tokens * h * bytes_per_element


def weight_step_kept_bytes(layer: LayerProfile, *, microbatch_size: int, tp: int, bytes_per_element: int
                           ) -> float:
    """What a zero-bubble input-gradient step (I) keeps of one layer per microbatch for its weight
    step (W), beside the retained graph (module docstring): the gradients of the outputs of the ops
    that hold weights, QKV's (``3/t`` sbh), the first MLP linear's (``f/(h t)``), the residual
    stream's at the projection and the second MLP linear (2) and the two LayerNorms' outputs (2). A
    layer of unknown shape: what its forward writes, ÷ t."""
    h, f, s = layer.hidden_size, layer.ffn_size, layer.seq_len
    if h is None or f is None or s is None:
        return layer.activation_bytes * microbatch_size / tp
    return microbatch_size * s * h * bytes_per_element * (3 / tp + f / (h * tp) + 4)


def zero_bubble_moments(*, rank: int, pp: int, num_microbatches: int, stored: float, kept: float,
                        log_probs: float, output: float, received: float, sending: float, transient: float,
                        gradients_bytes: float) -> list[tuple[float, float, float]]:
    """(activations, temporaries, gradients) bytes at the input-gradient steps of a zero-bubble rank
    holding one stage other than the first (module docstring). torch's ScheduleInterleavedZeroBubble
    runs rank ``r``'s weight step of microbatch ``j`` after its input step of ``j + r`` (printed
    ``pipeline_order``, pp 2 and 4, 4 microbatches), so at the input step ``I_k``: ``min(m, k + p − r)``
    microbatches forwarded, ``max(0, k − r)`` weighed (their graphs freed), the others' graphs
    retained (``stored`` each) and ``kept`` for each one whose input step is done; at the end of
    ``I_k``, its own ``kept`` and the attention's input gradients (``transient``), or on the last
    stage its loss backward (two logits-sized tensors) with its ``log_probs``."""
    r, p, m = rank, pp, num_microbatches
    moments = []
    for k in range(m):
        forwarded, weighed = min(m, k + p - r), max(0, k - r)
        grads = gradients_bytes if k > r else 0.0
        act = (forwarded - weighed) * stored + (forwarded - k) * output + log_probs
        temp = (k - weighed) * kept + (k + 1) * received + (sending if k else 0.0)
        moments.append((act, temp + kept + transient, grads))
        if log_probs:
            moments.append((act, temp + 2 * log_probs, grads))
    return moments


def interleaved_backward_order(*, pp: int, virtual_stages: int, num_microbatches: int
                               ) -> list[tuple[int, int]]:
    """(local chunk, microbatch) of a rank's backwards under torch's ScheduleInterleaved1F1B: per
    group of ``pp`` microbatches, its last chunk first (printed ``pipeline_order``: pp 2, 2 chunks,
    4 microbatches, rank 0 runs stage 2's backwards of microbatches 0, 1, then stage 0's)."""
    order = []
    for start in range(0, num_microbatches, pp):
        group = range(start, min(start + pp, num_microbatches))
        order += [(chunk, mb) for chunk in reversed(range(virtual_stages)) for mb in group]
    return order


def interleaved_peak(*, rank: int, pp: int, virtual_stages: int, num_microbatches: int
                     ) -> tuple[list[int], list[int], list[int], int]:
    """At a rank's widest moment under ScheduleInterleaved1F1B, the last backward that starts with
    its warm-up's count of chunk-microbatches in flight (every forward done by then): (in flight,
    backwards begun, backwards done, per local chunk; the chunk whose backward runs)."""
    p, v, m = pp, virtual_stages, num_microbatches
    warmup = min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v)
    order = interleaved_backward_order(pp=p, virtual_stages=v, num_microbatches=m)
    done = [sum(1 for chunk, _ in order[:m * v - warmup] if chunk == c) for c in range(v)]
    current = order[m * v - warmup][0]
    begun = [d + (c == current) for c, d in enumerate(done)]
    return [m - d for d in done], begun, done, current


def _first_gradients_share(plan: Plan, profile: ModelProfile, stage_indices: tuple[int, ...]) -> float:
    """The share of the rank's parameters whose gradients its backward accumulates last: its first
    layer's, and on the first stage the embedding's (a tied LM head's weight is the embedding's on
    a one-stage plan, counted once; a pipelined plan's last stage holds a copy, whose gradient the
    head's backward makes first)."""
    stages = [plan.stages[i] for i in stage_indices]
    layers = [layer for stage in stages for layer in profile.layers[stage.layers[0]:stage.layers[1]]]
    embedding = profile.embedding_params if 0 in stage_indices else 0
    last = len(plan.stages) - 1
    head = (profile.head_params + (profile.tied_head_params if profile.tied_embeddings and last > 0 else 0)
            if last in stage_indices else 0)
    total = sum(layer.param_count for layer in layers) + embedding + head
    return (embedding + (layers[0].param_count if layers else 0)) / total if total else 0.0


def _interleaved_moments(plan: Plan, stage_indices: tuple[int, ...], *, stored: dict[int, float],
                         head: float, logits: float, sbh: float, gradients_bytes: float
                         ) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """(loss-backward moments, layer-backward bases) of a rank holding several chunks under
    ScheduleInterleaved1F1B (:func:`interleaved_peak`; module docstring): each chunk's in-flight
    microbatches, every microbatch's received input and sent output (the runtime's buffers, kept),
    the received output gradients of the backwards begun and the input gradients of those done,
    still held by their sends (``stored``: per stage, without its output)."""
    par, sched, last = plan.parallelism, plan.schedule, len(plan.stages) - 1
    m, stages = sched.num_microbatches, sorted(stage_indices)
    in_flight, begun, done, current = interleaved_peak(rank=stages[0] % par.pp, pp=par.pp,
                                                       virtual_stages=len(stages), num_microbatches=m)
    act = sum(n * stored[i] + (n * head if i == last else 0.0) + (m - n) * sbh * (i > 0)
                     + m * sbh * (i < last) for i, n in zip(stages, in_flight, strict=True))
    temp = sbh * sum(b * (i < last) + d * (i > 0) for i, b, d in zip(stages, begun, done, strict=True))
    grads = gradients_bytes if sum(done) else 0.0
    if stages[current] == last:  # the loss backward, then the layers' with its log-probabilities freed
        return [(act, temp + 2 * logits, grads)], [(act - logits, temp, grads)]
    return [], [(act, temp, grads)]


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
    recomputed = kept = 0.0
    by_stage: dict[int, float] = {}  # what each stage keeps per microbatch in flight, its output aside
    fresh: list[tuple[float, float, float]] = []  # a layer's backward moments before any gradient exists
    adding: list[tuple[float, float, float]] = []  # ... and once gradients exist
    for stage in (plan.stages[i] for i in stage_indices):
        by_stage[stage.index] = 0.0
        for layer in profile.layers[stage.layers[0]:stage.layers[1]]:
            saved = saved_layer_bytes(layer, microbatch_size=b, tp=t, ep=par.ep, bytes_per_element=e,
                                      fused_attention=profile.fused_attention, sequence_parallel=sp,
                                      ring=ring)
            full = stage.recompute == "full" and stage.index != plain and layer.is_transformer
            saved += routed_copies_bytes(layer, microbatch_size=b, ep=par.ep, bytes_per_element=e)
            by_stage[stage.index] += sbh if full else saved
            recomputed = max(recomputed, saved if full else 0.0)
            shape = dict(microbatch_size=b, tp=t, bytes_per_element=e, saved=saved, ring=ring,
                         sequence_parallel=sp, unfused=not ring and (t > 1 or not profile.fused_attention),
                         recomputed=full)
            fresh += layer_backward_moments(layer, accumulating=False, **shape)
            adding += layer_backward_moments(layer, accumulating=True, **shape)
            kept += weight_step_kept_bytes(layer, microbatch_size=b, tp=t, bytes_per_element=e)
    # with the output each stage but the last keeps to send
    stored = sum(by_stage.values()) + sbh * sum(1 for i in stage_indices if i < last)
    n, has_head = in_flight, last in stage_indices and profile.vocab_size > 0
    logits = LOGIT_BYTES * b * profile.seq_len * profile.vocab_size if has_head else 0.0
    shard = vocab_parallel(plan) and not ring  # tp keeps the logits' shard beside the gathered; cp × tp not
    output = logits * (1 + (1 / t if shard else 0.0))
    norm_input = sbh / t if sp else sbh  # under sequence parallelism a shard; its output is gathered
    # per microbatch in flight: final LayerNorm in/out, log-probabilities, and the output the schedule
    # keeps until the microbatch's backward (the engine asks for no merged output)
    head = (norm_input + sbh + logits + output) if has_head else 0.0
    grads_then = gradients_bytes if m > n else 0.0  # 1F1B's steady state: after a first backward
    received = sbh if any(i < last for i in stage_indices) else 0.0  # a received output gradient
    # the gradient entering the layer, when not a received one; a one-stage plan's tied head weight's
    # gradient waits (TEMP) for the embedding's backward to be accumulated
    tied = profile.tied_head_params * e / (t if vocab_parallel(plan) else 1) if last == 0 else 0.0
    entering = (0.0 if received else sbh) + tied
    sending = sbh if any(i > 0 for i in stage_indices) else 0.0  # the last input gradient, until sent
    inputs = sbh if stage_indices and min(stage_indices) > 0 else 0.0  # a received input's buffer, kept
    # (activations, temporaries, gradients) before the layer's own backward: the first backward, or
    # 1F1B's last in its steady state (every forward done), then one microbatch fewer in flight
    first = n * (stored + head) + (inputs * (m - n) if grads_then else 0.0)
    moments = [(first, 2 * logits + (sending if grads_then else 0.0), grads_then)] if has_head else []
    steady = m - n + 1 if grads_then else 1
    bases = [(first - logits + recomputed, steady * received + (sending if grads_then else 0.0), grads_then)]
    if n > 1 or recomputed:  # one microbatch's backward done: its gradients exist, one fewer in flight;
        # with one microbatch: late in its backward, the first layer's and the embedding's still to come
        late = gradients_bytes if m > 1 else gradients_bytes * (1 - _first_gradients_share(plan, profile,
                                                                                             stage_indices))
        current = output if n == 1 else 0.0  # one microbatch in flight: its output, until its backward ends
        bases.append(((n - 1) * (stored + head) + current + recomputed + inputs * (m - n + 1),
                      min(m - n + 2, m) * received + (sending if m > 1 else 0.0), late))
    first_late = []  # a one-stage plan's first backward of several, late: others held, its first layer next
    if recomputed and m > 1 and last == 0:
        first_late.append(((n - 1) * (stored + head) + output + recomputed, entering,
                           gradients_bytes * (1 - _first_gradients_share(plan, profile, stage_indices))))
    if tied:  # the first microbatch's embedding backward (module docstring)
        moments.append(((n - 1) * (stored + head) + output, 3 * tied,
                        max(0.0, gradients_bytes - tied / (par.dp * par.cp if plan.zero >= 2 else 1))))
    if sched.name == "interleaved" and len(stage_indices) > 1:
        moments, bases = _interleaved_moments(plan, stage_indices, stored=by_stage, head=head, logits=logits,
                                              sbh=sbh, gradients_bytes=gradients_bytes)
    for act, temp, grads in bases:
        # one microbatch: the layer's own gradients are new even late in the backward
        layer_moments = (adding if grads and m > 1 else fresh) or [(0.0, 0.0, 0.0)]
        moments += [(act + d_act, temp + entering + d_temp, grads + d_grads)
                    for d_act, d_temp, d_grads in layer_moments]
    moments += [(act + d_act, temp + d_temp, grads + d_grads)
                for act, temp, grads in first_late for d_act, d_temp, d_grads in fresh]
    if sched.name == "zero_bubble" and len(stage_indices) == 1 and stage_indices[0] > 0:
        moments = zero_bubble_moments(
            rank=stage_indices[0], pp=par.pp, num_microbatches=m, stored=stored + head - logits - output,
            kept=kept + ((logits + 2 * sbh) if has_head else 0.0), log_probs=logits, output=output,
            received=received, sending=sending, transient=3 * sbh / t, gradients_bytes=gradients_bytes)
    activations, temporaries, _ = max(moments, key=sum)
    return activations, temporaries
