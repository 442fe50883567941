"""CPU compute model: seconds per microbatch of a layer, the embedding and the LM head on one
process of a local cluster, as autopar's runtime executes them there.

Data flow: ``CpuRates`` (``cpu_rates``, measured by ``autopar calibrate``) + a ``ModelProfile``
(``profile``) → :class:`CpuPart` per layer / embedding / head → ``cpu_step`` adds them into
per-stage costs and runs the step on the machine's cores. The GPU model is ``compute``.

A layer is a sum of measured operations, not a roofline: four linear layers (forward + backward
on the FITTED linear curve), attention, two LayerNorms, two residual adds, the GELU and the
head-merging transpose (each at its measured per-element rate), plus the backward's re-read of
the layer's saved activations, which later layers have evicted from the caches. Under tensor parallelism
(``t > 1``) the runtime runs the stage on DTensors (``autopar/runtime/tensor_parallel.py``), and
this model follows what that execution does on CPU (:data:`DTENSOR_TP`): linear layers are
sharded, but the fused QKV output is all-gathered because splitting it into q, k, v crosses the
shards, so attention runs on every head on every rank with the unfused MATH backend (DTensor has
no strategy for the CPU flash kernel); LayerNorms and residual adds run replicated; every op pays
the DTensor dispatch; the LM head's logits are all-gathered (``full_tensor``) and the loss runs on
all of them on every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autopar.cost_models.compute import LayerTimes
from autopar.cost_models.local.memory import RING_ACCUMULATOR_BYTES, saved_layer_bytes
from autopar.cost_models.local.rates import CpuRates
from autopar.cost_models.profile import LayerProfile, ModelProfile
from autopar.cost_models.stages import NO_COMM, CommTimes


@dataclass(frozen=True, kw_only=True)
class DTensorCounts:
    """What torch's DTensor does per transformer layer and per step for autopar's Megatron
    shardings (colwise QKV and MLP-in, rowwise projections, vocabulary-parallel embedding and
    colwise LM head). COUNTED, not fitted, and not timings: ``torch.profiler`` events
    (``_c10d_functional`` collectives with their shapes, ``PythonSubclass`` dispatches) of one step
    of the zoo GPT (hidden 256, 8 heads, t = 2; torch 2.13), 4 layers minus 2 layers; the
    collectives recounted as ``gloo:`` events (hidden 128, 4 heads, one microbatch): 4 all-reduces
    and 3 all-gathers per layer (an earlier count of 6 all-reduces included events outside the
    layers). The counts
    follow from the graph and DTensor's sharding rules, not from sizes; another layer structure
    or torch version can differ."""

    all_reduces_forward: int = 2  # the two rowwise outputs (Partial → Replicate)
    all_reduces_backward: int = 2  # the input gradients of both colwise layers
    all_gathers_forward: int = 1  # the fused QKV output (3bsh), to split it into q, k, v
    all_gathers_backward: int = 2  # b·s·h each, attention-shaped
    dispatches_per_layer: int = 234
    dispatches_outside_layers: int = 58  # embedding, LM head, loss
    whole_attention_weight_gradients: bool = True
    """The QKV and attention-output weights' gradients are ``Replicate`` DTensors of the full shape
    on every rank (measured: ``param.grad.placements`` after a step of the zoo GPT at t = 2, torch
    2.13; their gradient storages 1.28× the sharded parameters')."""


DTENSOR_TP = DTensorCounts()


@dataclass(frozen=True, kw_only=True)
class SequenceParallelCounts:
    """Collectives per transformer layer under the runtime's sequence parallelism
    (``runtime/tensor_parallel.sequence_parallel_pass``), COUNTED like :class:`DTensorCounts`
    (``torch.profiler`` gloo events of one step of the zoo GPT, h 128, 4 heads, s 64, t = 2, 4 layers
    minus 2 layers; torch 2.13). On gloo a reduce-scatter runs as an all-reduce of the whole
    ``b·s·h`` buffer (the events show ``gloo:all_reduce`` of the unscattered shape), so it is priced
    as one. Each replicated parameter used on sequence shards (norm weights and biases) gets an
    all-reduce of its ``h``-element partial gradient per microbatch."""

    reduce_scatters_forward: int = 2  # the two row-parallel outputs
    all_gathers_forward: int = 2  # the two column-parallel inputs (q/k/v share one)
    reduce_scatters_backward: int = 2  # the gathers' backward
    all_gathers_backward: int = 4  # the reduce-scatters' backward, and two attention-shaped ones


DTENSOR_SP = SequenceParallelCounts()
RING_MERGE_OPS = 3
"""COUNTED in ``runtime/context_parallel.merge_partial_attention``: two rescaling products and a sum
over the output rows per ring step after the first."""
BACKWARD_DISPATCH_FRACTION = 2 / 3
"""ASSUMED: the share of a layer's dispatches in its backward (about two ops per forward op)."""


@dataclass(frozen=True, kw_only=True)
class Sync:
    """``count`` blocking collectives per microbatch of ``size_bytes`` each among ``group`` ranks of
    the ``axis`` mesh dimension, waited for in ``phase`` (``forward``, ``backward``, ``recompute``):
    the points where ranks meet, each priced beyond its transfer by ``CpuRates.sync_wait_s``
    (``step`` docstring)."""

    axis: str
    phase: str
    group: int
    size_bytes: float
    count: float

    @property
    def key(self) -> tuple[str, str, int, float]:
        return self.axis, self.phase, self.group, self.size_bytes


def merge_syncs(*groups: tuple[Sync, ...]) -> tuple[Sync, ...]:
    """The syncs of ``groups`` with equal ``key`` counted together, in first-seen order."""
    counts: dict[tuple[str, str, int, float], float] = {}
    for sync in (s for group in groups for s in group):
        counts[sync.key] = counts.get(sync.key, 0.0) + sync.count
    return tuple(Sync(axis=a, phase=p, group=g, size_bytes=b, count=n) for (a, p, g, b), n in counts.items())


def _syncs(axis: str, group: int, *phases: tuple[str, float, float]) -> tuple[Sync, ...]:
    """Syncs of ``(phase, size_bytes, count)`` triples, those with a count and a size."""
    return merge_syncs(tuple(Sync(axis=axis, phase=phase, group=group, size_bytes=size, count=count)
                             for phase, size, count in phases if count > 0 and size > 0))


@dataclass(frozen=True, kw_only=True)
class CpuPart:
    """Seconds per microbatch on one process: compute (``times``), tensor- and context-parallel
    collectives, and where the ranks meet (``syncs``)."""

    times: LayerTimes = LayerTimes()
    tp: CommTimes = NO_COMM
    cp: CommTimes = NO_COMM
    syncs: tuple[Sync, ...] = ()

    def __add__(self, other: CpuPart) -> CpuPart:
        return CpuPart(times=self.times + other.times, tp=self.tp + other.tp, cp=self.cp + other.cp,
                       syncs=merge_syncs(self.syncs, other.syncs))


def _linear(rates: CpuRates, m: float, k: float, n: float) -> LayerTimes:
    third = rates.linear_s(m, k, n) / 3  # forward, input gradient, weight gradient: one matmul each
    return LayerTimes(forward_s=third, backward_input_s=third, backward_weight_s=third)


def _attention_linears(rates: CpuRates, tokens: float, h: float, t: int) -> LayerTimes:
    """The QKV and attention-output projections. Under the runtime's DTensor tensor parallelism their
    weight gradients come out whole (``Replicate``) on every rank, because the QKV output is
    all-gathered before attention (:data:`DTENSOR_TP`): each rank computes the full weight-gradient
    matmuls, ``t`` times the sharded ones."""
    times = _linear(rates, tokens, h, 3 * h / t) + _linear(rates, tokens, h / t, h)
    if t == 1 or not DTENSOR_TP.whole_attention_weight_gradients:
        return times
    whole = (rates.linear_s(tokens, h, 3 * h) + rates.linear_s(tokens, h, h)) / 3
    return dataclasses.replace(times, backward_weight_s=whole)


def _op(rates: CpuRates, op: str, num_elements: float, count: float = 1.0) -> LayerTimes:
    fwd, bwd = rates.elementwise_s(op, num_elements)
    return LayerTimes(forward_s=count * fwd, backward_input_s=count * bwd)


def _dispatch(rates: CpuRates, count: float) -> LayerTimes:
    seconds = count * rates.dtensor_dispatch_s
    return LayerTimes(forward_s=(1 - BACKWARD_DISPATCH_FRACTION) * seconds,
                      backward_input_s=BACKWARD_DISPATCH_FRACTION * seconds)


def _recompute(times: LayerTimes, recompute: str) -> LayerTimes:
    """Full recomputation repeats the forward before the backward (selective: nothing on CPU,
    where attention is recomputed only inside the fused kernel)."""
    return LayerTimes(forward_s=times.forward_s, backward_input_s=times.backward_input_s,
                      backward_weight_s=times.backward_weight_s,
                      recompute_s=times.forward_s if recompute == "full" else 0.0)


def _attention(rates: CpuRates, layer: LayerProfile, *, b: int, tp: int, fused: bool, causal: bool
               ) -> LayerTimes:
    s, h, heads = layer.seq_len, layer.hidden_size, layer.num_heads
    assert s is not None and h is not None and heads is not None
    if fused and tp == 1:
        flops = 4 * b * s * s * h * (0.5 if causal else 1.0)
        fwd, bwd = rates.flash_attention_s(flops, seq_len=s, head_dim=h / heads)
    else:  # unfused, and under DTensor on every head (see the module docstring)
        fwd, bwd = rates.math_attention_s(b * heads * s * s)
    return LayerTimes(forward_s=fwd, backward_input_s=bwd)


def transformer_layer_part(layer: LayerProfile, *, rates: CpuRates, microbatch_size: int, tp: int,
                           bytes_per_element: int, recompute: str = "none", fused_attention: bool = True,
                           causal: bool = True, sequence_parallel: bool = False, cp: int = 1) -> CpuPart:
    """One pre-LN transformer layer per microbatch on one process (module docstring); under context
    parallelism ``layer`` is what one rank runs (``s/cp`` tokens) and attention is the ring's."""
    if not layer.is_transformer:
        return generic_layer_part(layer, rates=rates, microbatch_size=microbatch_size, tp=tp,
                                  recompute=recompute)
    h, f, t = layer.hidden_size, layer.ffn_size, tp
    assert h is not None and f is not None and layer.seq_len is not None
    tokens = microbatch_size * layer.seq_len
    sp = sequence_parallel and t > 1
    norm_tokens = tokens / t if sp else tokens  # norms and residual adds on sequence shards
    attention = (_ring_block_attention(rates, layer, b=microbatch_size, cp=cp, causal=causal) if cp > 1 else
                 _attention(rates, layer, b=microbatch_size, tp=t, fused=fused_attention, causal=causal))
    times = (_attention_linears(rates, tokens, h, t)
             + _linear(rates, tokens, h, f / t) + _linear(rates, tokens, f / t, h) + attention
             + _op(rates, "layer_norm", norm_tokens * h, 2) + _op(rates, "add", norm_tokens * h, 2)
             + _op(rates, "gelu", tokens * f / t) + _op(rates, "copy", tokens * h))
    # the backward reads the layer's activations whether saved or just recomputed: under full
    # recomputation they are as large, written a whole layer's forward earlier (measured on the zoo
    # GPT, 8 layers × 256, one process: +0.155 s for full recomputation where the recomputed
    # forward alone was priced at +0.092 s)
    saved = saved_layer_bytes(
        layer, microbatch_size=microbatch_size, tp=t, fused_attention=fused_attention or cp > 1,
        bytes_per_element=bytes_per_element, sequence_parallel=sp, ring=cp > 1)
    reread = _activation_reread(rates, saved, recompute=recompute)
    ring = _ring_transfers(rates, tokens * h / t, bytes_per_element=bytes_per_element, cp=cp,
                           recompute=recompute)
    ring_syncs = _ring_syncs(tokens * h / t, bytes_per_element=bytes_per_element, cp=cp, recompute=recompute)
    if t == 1:
        return CpuPart(times=_recompute(times, recompute) + reread, cp=ring, syncs=ring_syncs)
    sbh_bytes = tokens * h * bytes_per_element
    norms = (layer_norm_params(layer), h * bytes_per_element)
    part = _under_dtensor(times, rates=rates, sbh_bytes=sbh_bytes, tp=t, recompute=recompute,
                          sequence_parallel=sp, norm_gradients=norms)
    return dataclasses.replace(part, times=part.times + reread, cp=ring,
                               syncs=merge_syncs(part.syncs, ring_syncs))


def _activation_reread(rates: CpuRates, saved_bytes: float, *, recompute: str) -> LayerTimes:
    """What a layer's ``saved_bytes`` of activations cost inside a step beyond the layer alone
    (FITTED per byte, ``rates.fit_activation_reread_s_per_byte``): the forward that writes them
    (its caches evicted; under full recomputation the recomputed forward, the first one keeps
    only the checkpoint) and the backward that reads them back."""
    written = saved_bytes * rates.activation_reread_forward_s_per_byte
    read = saved_bytes * rates.activation_reread_s_per_byte - written
    if recompute == "full":
        return LayerTimes(recompute_s=written, backward_input_s=read)
    return LayerTimes(forward_s=written, backward_input_s=read)


MOE_OPS_PER_EXPERT = 8
"""COUNTED in ``passes/moe/layer.run_local_experts`` (and ``runtime/expert_parallel._run_received``):
the autograd ops per local expert and microbatch besides its MLP — the two masks, ``nonzero``, the
weight and row gathers, the combine weight's product, the zeros and the out-of-place
``index_add``/``index_copy``."""
MOE_OPS_PER_LAYER = 25
"""COUNTED in ``MoELayer.forward`` and its gate: the router's casts, softmax, top-k and capacity
mask, the load-balancing and z losses, the statistics' bincounts, and the auxiliary loss's attach."""


def moe_dispatch_part(layer: LayerProfile, *, rates: CpuRates, tokens: int, imbalance: float, ep: int,
                      recompute: str) -> LayerTimes:
    """What an MoE layer costs on one process beyond :func:`transformer_layer_part` of its
    dense equivalent (``step._moe_as_dense``: one MLP ``imbalance·k`` times wider): its local
    experts' MLPs at their own row counts (``imbalance·T·k / (E/ep)`` each, smaller matmuls run
    slower) instead of one wide MLP, the router ``Linear(h, E)``, and the dispatch — the counted
    ops (:data:`MOE_OPS_PER_EXPERT`, :data:`MOE_OPS_PER_LAYER`) at the per-op autograd overhead,
    and the rows they copy: forward the gathered, weighted and combined rows (``3·imbalance·T·k·h``)
    plus one out-of-place ``T·h`` combine per local expert; backward the scatter of each expert's
    row gradients into a ``T·h`` zero buffer and the gradients of the gathers and products
    (``4·imbalance·T·k·h``)."""
    moe, h, f = layer.moe, layer.hidden_size, layer.ffn_size
    assert moe is not None and h is not None and f is not None
    local = max(1, moe.num_experts // ep)
    routed = imbalance * tokens * moe.top_k
    rows = routed / local

    def mlp_s(m: float, width: float) -> float:
        gelu_fwd, gelu_bwd = rates.elementwise_s("gelu", m * width)
        return rates.linear_s(m, h, width) + rates.linear_s(m, width, h) + gelu_fwd + gelu_bwd

    router = rates.linear_s(tokens, h, moe.num_experts)
    experts = local * mlp_s(rows, f) - mlp_s(tokens, routed / tokens * f) + router
    ops = (MOE_OPS_PER_EXPERT * local + MOE_OPS_PER_LAYER) * rates.op_overhead_s
    forward_bytes = 2 * 4 * (local * tokens * h + 3 * routed * h)
    backward_bytes = 2 * 4 * (local * tokens * h + 4 * routed * h)
    forward = max(experts, 0.0) / 3 + ops / 2 + rates.copy_s(forward_bytes)
    backward = 2 * max(experts, 0.0) / 3 + ops / 2 + rates.copy_s(backward_bytes)
    return LayerTimes(forward_s=forward, backward_input_s=backward,
                      recompute_s=forward if recompute == "full" else 0.0)


def _ring_block_attention(rates: CpuRates, layer: LayerProfile, *, b: int, cp: int, causal: bool
                          ) -> LayerTimes:
    """Ring attention's blocks on one rank (``layer`` at ``s/cp``; ``runtime/context_parallel``):
    the torch block kernel of ``kernels/ring_blocks`` (scores materialised, fp32), priced at its
    MEASURED rates (:meth:`CpuRates.ring_block_s`: forward with the log-sum-exp merge, backward
    recomputing the scores). Causal: the own step is the masked block over all ``s/cp`` local
    tokens, each other step an unmasked block half that size (one of the two chunks against the
    other's two, or both against one); not causal: ``cp`` unmasked full blocks. A profile without
    block measurements prices the math attention rate and counts the merge's ops
    (:data:`RING_MERGE_OPS`)."""
    s, heads, h = layer.seq_len, layer.num_heads, layer.hidden_size
    assert s is not None and heads is not None and h is not None
    full = b * heads * s * s
    own = rates.ring_block_s(full, causal=causal)
    other = rates.ring_block_s(full / 2 if causal else full, causal=False)
    merge = 0.0 if rates.ring_blocks else _op(rates, "add", b * s * h, RING_MERGE_OPS * (cp - 1)).forward_s
    return LayerTimes(forward_s=own[0] + (cp - 1) * other[0] + merge,
                      backward_input_s=own[1] + (cp - 1) * other[1])


def _ring_transfers(rates: CpuRates, elements: float, *, bytes_per_element: int, cp: int, recompute: str
                    ) -> CommTimes:
    """The ring's P2P on gloo per layer and microbatch: forward ``cp − 1`` K/V blocks (``2·b·(s/cp)·h``
    elements), backward the same plus the fp32 dK/dV accumulator at every one of the ``cp`` steps
    (the last hop brings it home). Gloo moves them with this machine's cores, which the block
    compute also needs, so none is hidden (``step`` docstring); a full recomputation replays the
    forward's."""
    if cp == 1:
        return NO_COMM
    kv = rates.collective_work_s("p2p", 2 * elements * bytes_per_element, 2)
    grads = rates.collective_work_s("p2p", 2 * elements * RING_ACCUMULATOR_BYTES, 2)
    forward = (cp - 1) * kv
    return CommTimes(forward_s=forward, backward_s=forward + cp * grads,
                     recompute_s=forward if recompute == "full" else 0.0)


def _ring_syncs(elements: float, *, bytes_per_element: int, cp: int, recompute: str) -> tuple[Sync, ...]:
    """Where :func:`_ring_transfers`' ranks meet: each K/V hop and each accumulator hop is a
    send to one neighbour and a receive from the other."""
    if cp == 1:
        return ()
    kv, grads = 2 * elements * bytes_per_element, 2 * elements * RING_ACCUMULATOR_BYTES
    return _syncs("cp", 2, ("forward", kv, cp - 1), ("backward", kv, cp - 1), ("backward", grads, cp),
                  ("recompute", kv, (cp - 1) if recompute == "full" else 0))


def layer_norm_params(layer: LayerProfile) -> int:
    """Replicated parameter tensors of a transformer layer that see sequence shards under sequence
    parallelism: each gets one all-reduce of its partial gradient per microbatch
    (``runtime/tensor_parallel``; COUNTED: four ``h``-element all-reduces per GPT layer, its two
    LayerNorms' weights and biases). A layer of another layout: its two norms' weights."""
    return 4 if layer.param_tensors in (0, 12) else 2


def _under_dtensor(times: LayerTimes, *, rates: CpuRates, sbh_bytes: float, tp: int, recompute: str,
                   sequence_parallel: bool = False, norm_gradients: tuple[int, float] = (0, 0.0)) -> CpuPart:
    """A layer's compute plus what DTensor adds under tensor parallelism (:data:`DTENSOR_TP`, with
    sequence parallelism :data:`DTENSOR_SP`): its dispatches, its collectives, and the
    concatenations of the all-gathered (non-leading) dims."""
    counts = DTENSOR_TP
    times += _dispatch(rates, counts.dispatches_per_layer) + LayerTimes(
        forward_s=rates.copy_s(2 * 3 * sbh_bytes), backward_input_s=rates.copy_s(2 * 2 * sbh_bytes))

    def all_reduces(n: int) -> float:
        return n * rates.collective_work_s("all_reduce", sbh_bytes, tp)

    def all_gathers(n: int) -> float:
        return n * rates.collective_work_s("all_gather", sbh_bytes, tp)

    qkv_gather = counts.all_gathers_forward * rates.collective_work_s("all_gather", 3 * sbh_bytes, tp)
    syncs = _tp_layer_syncs(sbh_bytes, tp=tp, recompute=recompute, sequence_parallel=sequence_parallel,
                            norm_gradients=norm_gradients)
    if sequence_parallel:
        sp = DTENSOR_SP
        forward = (all_reduces(sp.reduce_scatters_forward) + all_gathers(sp.all_gathers_forward)
                   + qkv_gather)
        count, size_bytes = norm_gradients  # one all-reduce per replicated parameter on shards
        norms = count * rates.collective_work_s("all_reduce", size_bytes, tp)
        backward = (all_reduces(sp.reduce_scatters_backward) + all_gathers(sp.all_gathers_backward)
                    + norms)
    else:
        forward = all_reduces(counts.all_reduces_forward) + qkv_gather
        backward = all_reduces(counts.all_reduces_backward) + all_gathers(counts.all_gathers_backward)
    times = _recompute(times, recompute)
    if recompute == "full":  # the recomputed forward repeats its collectives
        times = LayerTimes(forward_s=times.forward_s, backward_input_s=times.backward_input_s,
                           backward_weight_s=times.backward_weight_s, recompute_s=times.recompute_s + forward)
    return CpuPart(times=times, tp=CommTimes(forward_s=forward, backward_s=backward), syncs=syncs)


def _tp_layer_syncs(sbh_bytes: float, *, tp: int, recompute: str, sequence_parallel: bool,
                    norm_gradients: tuple[int, float]) -> tuple[Sync, ...]:
    """Where :func:`_under_dtensor`'s collectives make a layer's tensor-parallel ranks meet."""
    tp_counts, sp = DTENSOR_TP, DTENSOR_SP
    if sequence_parallel:
        forward = [(sbh_bytes, sp.reduce_scatters_forward + sp.all_gathers_forward)]
        backward = [(sbh_bytes, sp.reduce_scatters_backward + sp.all_gathers_backward),
                    (norm_gradients[1], norm_gradients[0])]
    else:
        forward = [(sbh_bytes, tp_counts.all_reduces_forward)]
        backward = [(sbh_bytes, tp_counts.all_reduces_backward + tp_counts.all_gathers_backward)]
    forward.append((3 * sbh_bytes, tp_counts.all_gathers_forward))
    again = forward if recompute == "full" else []
    phases = [("forward", b, n) for b, n in forward] + [("backward", b, n) for b, n in backward]
    return _syncs("tp", tp, *phases, *[("recompute", b, n) for b, n in again])


def generic_layer_part(layer: LayerProfile, *, rates: CpuRates, microbatch_size: int, tp: int,
                       recompute: str = "none") -> CpuPart:
    """A layer of unknown shape: its FLOPs ÷ t on the linear curve at a 1024-wide square shape."""
    rate_s = rates.linear_s(1024, 1024, 1024) / (6 * 1024**3)
    scale = microbatch_size / tp * rate_s
    times = LayerTimes(forward_s=layer.flops_fwd * scale, backward_input_s=layer.flops_bwd / 2 * scale,
                       backward_weight_s=layer.flops_bwd / 2 * scale)
    return CpuPart(times=_recompute(times, recompute))


def embedding_part(profile: ModelProfile, *, rates: CpuRates, microbatch_size: int, tp: int,
                   vocab_parallel: bool, sequence_parallel: bool = False) -> CpuPart:
    """Token + position lookup and their sum; backward zeroes and scatters the table gradient.
    Vocabulary-parallel (``t > 1``): masked lookup on the table shard, all-reduced (with sequence
    parallelism reduce-scattered, which gloo runs as the same all-reduce, :class:`SequenceParallelCounts`;
    backward all-gathers the gradient and all-reduces the position table's partial gradient)."""
    tokens = microbatch_size * profile.seq_len
    sbh = tokens * profile.hidden_size
    shards = tp if vocab_parallel else 1
    table_bytes = profile.vocab_size * profile.hidden_size / shards * profile.bytes_per_element
    times = _op(rates, "add", sbh) + LayerTimes(
        forward_s=rates.copy_s(2 * sbh * profile.bytes_per_element),
        backward_weight_s=rates.copy_s(table_bytes) + rates.copy_s(2 * sbh * profile.bytes_per_element))
    if tp == 1:
        return CpuPart(times=times)
    times += _op(rates, "add", sbh, 2) + _dispatch(rates, DTENSOR_TP.dispatches_outside_layers / 2)
    sbh_bytes = sbh * profile.bytes_per_element
    reduce = rates.collective_work_s("all_reduce", sbh_bytes, tp) if vocab_parallel else 0.0
    syncs = _syncs("tp", tp, ("forward", sbh_bytes, int(vocab_parallel)))
    if not sequence_parallel:
        return CpuPart(times=times, tp=CommTimes(forward_s=reduce), syncs=syncs)
    positions = profile.seq_len * profile.hidden_size * profile.bytes_per_element
    backward = (rates.collective_work_s("all_gather", sbh_bytes, tp)
                + rates.collective_work_s("all_reduce", positions, tp))
    syncs = merge_syncs(syncs, _syncs("tp", tp, ("backward", sbh_bytes, 1), ("backward", positions, 1)))
    return CpuPart(times=times, tp=CommTimes(forward_s=reduce, backward_s=backward), syncs=syncs)


def head_part(profile: ModelProfile, *, rates: CpuRates, microbatch_size: int, tp: int,
              sequence_parallel: bool = False, vocab_parallel: bool = True) -> CpuPart:
    """Final LayerNorm, the LM head (colwise under TP: logits all-gathered) and the cross-entropy
    over all logits (the engine asks the schedule for no merged output: no copy of the step's logits
    at its end). Every logits-sized tensor the head writes is new memory: its
    page faults (:meth:`CpuRates.fresh_s`, from glibc's mmap threshold on) are priced where it is
    written; the cross-entropy's own are in its measured rates, and its gradient of the whole logits
    refaults inside a step from half that size on (:meth:`CpuRates.loss_gradient_refault_s`).
    With sequence parallelism the norm runs on a sequence shard, its output is all-gathered for the
    head (backward: reduce-scattered, an all-reduce on gloo) and its two parameters' partial
    gradients are all-reduced. Not ``vocab_parallel`` (a pipelined plan keeps only the layers'
    shardings): the head is a replicated DTensor, whole on every tp rank (its dispatches, no
    gather)."""
    tokens, h, vocab = microbatch_size * profile.seq_len, profile.hidden_size, profile.vocab_size
    logits = tokens * vocab
    times = _op(rates, "layer_norm", tokens * h)
    if vocab == 0:
        return CpuPart(times=times + _op(rates, "add", tokens * h))
    logit_bytes = 4 * logits  # the loss reads fp32 logits
    head_t = tp if vocab_parallel else 1
    written = LayerTimes(forward_s=rates.fresh_s(logits / head_t * profile.bytes_per_element))
    # the loss's gradient of the whole logits
    refault = LayerTimes(backward_input_s=rates.loss_gradient_refault_s(logit_bytes))
    times += (_linear(rates, tokens, h, vocab / head_t) + written + _op(rates, "cross_entropy", logits)
              + refault)
    if tp == 1:
        return CpuPart(times=times)
    times += _dispatch(rates, DTENSOR_TP.dispatches_outside_layers / 2)
    if not vocab_parallel:
        return CpuPart(times=times)
    times += LayerTimes(  # the gathered shards concatenated; backward, this rank's slice of the gradient
        forward_s=rates.copy_s(2 * logit_bytes) + rates.fresh_s(logit_bytes),
        backward_input_s=rates.copy_s(2 * logit_bytes / tp) + rates.fresh_s(logit_bytes / tp))
    gather = rates.collective_work_s("all_gather", logit_bytes, tp)
    syncs = _syncs("tp", tp, ("forward", logit_bytes, 1))
    if not sequence_parallel:
        return CpuPart(times=times, tp=CommTimes(forward_s=gather), syncs=syncs)
    sbh_bytes = tokens * h * profile.bytes_per_element
    norm_bytes = h * profile.bytes_per_element
    norm = 2 * rates.collective_work_s("all_reduce", norm_bytes, tp)
    syncs = merge_syncs(syncs, _syncs("tp", tp, ("forward", sbh_bytes, 1), ("backward", sbh_bytes, 1),
                                      ("backward", norm_bytes, 2)))
    return CpuPart(times=times, syncs=syncs, tp=CommTimes(
        forward_s=gather + rates.collective_work_s("all_gather", sbh_bytes, tp),
        backward_s=rates.collective_work_s("all_reduce", sbh_bytes, tp) + norm))
