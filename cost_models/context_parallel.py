"""Context-parallel cost terms: ring-attention time and the memory cp adds or removes.

Data flow: the cost model of a Plan with ``cp > 1`` prices one layer's attention with these
functions: the whole-sequence attention compute of one device (``compute`` prices it, the causal
half already applied) and a :class:`RingAttentionShape` go in; seconds per microbatch and bytes per
device come out. Communication times come from ``comm`` (``p2p_time_s``, ``Group``). The runtime
these terms describe is ``autopar.runtime.context_parallel``.

Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"): the sequence is
split over ``cp`` ranks; in ``cp`` steps every rank computes its queries against one K/V block and
passes the block to its ring neighbour. With the load-balanced layout (rank r holds chunks r and
2·cp−1−r of 2·cp; the "zigzag" of Llama 3 §3.3.2, Dubey et al. 2024, after Brandon et al. 2023,
"Striped Attention") every step of a causal layer computes half a block, so every rank does
``1/cp`` of the whole attention in ``cp`` equal steps of ``A / cp²`` (``A`` the one-device time).

Time, as the runtime orders it (each transfer posted at the start of a step, waited at its end):
forward ``(cp−1)·max(c, T) + c`` with ``c = A_fwd / cp²`` and ``T`` one K/V block's P2P time,
``2·b·(s/cp)·h_kv·d`` bytes: one step's compute never has a transfer beside it, and a transfer
longer than a step's compute shows by the difference. Backward: K/V rotate again and each block's
dK/dV accumulator travels with it (fp32 in the runtime) over the same link, plus one last hop home
that nothing hides: ``(cp−1)·max(c_b, T + T_grad) + c_b + T_grad`` — about twice the forward
traffic in fp32 (three times with bf16 K/V), slightly over the runtime's first and last steps,
which carry only one of the two. A ring that spans nodes steps at the pace of its inter-node
hop (every rank sends at once; each GPU has its own NIC).

Memory: every sequence-long activation ÷ cp; attention saves no score matrix (blocks are
recomputed from the saved log-sum-exp, like FlashAttention) but saves that log-sum-exp,
``b·heads·(s/cp)`` fp32 per layer; while a layer runs, two K/V buffers (the block computed and the
one arriving), and in backward two fp32 dK/dV buffers and the fp32 dQ accumulator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.activations import activation_bytes_per_layer
from autopar.cost_models.comm import Group, p2p_time_s
from autopar.cost_models.compute import (
    FUSED_ATTENTION_BACKWARD_FLOPS_RATIO,
    device_efficiency,
    roofline_time_s,
)
from autopar.cost_models.profile import LayerProfile, ModelProfile

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec
    from autopar.hardware import DeviceSpec

LSE_BYTES_PER_ELEMENT = 4
"""The log-sum-exp is fp32 (runtime and Triton kernel alike)."""
GRAD_BYTES_PER_ELEMENT = 4
"""The runtime accumulates and sends dK/dV in fp32 (``runtime/context_parallel._ring_backward``)."""


@dataclass(frozen=True, kw_only=True)
class RingAttentionShape:
    """One attention layer's microbatch on one device. ``seq_len`` is the full sequence;
    ``num_heads`` and ``kv_heads`` are the heads on this device (after tensor parallelism)."""

    microbatch_size: int
    seq_len: int
    num_heads: int
    kv_heads: int
    head_dim: int
    cp: int
    bytes_per_element: int = 2

    def __post_init__(self) -> None:
        for name in ("microbatch_size", "seq_len", "num_heads", "kv_heads", "head_dim", "cp",
                     "bytes_per_element"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"RingAttentionShape.{name} = {value!r}: expected an int >= 1")
        if self.seq_len % (2 * self.cp):
            raise ValueError(f"RingAttentionShape: sequence length {self.seq_len} does not split into "
                             f"2·cp = {2 * self.cp} equal chunks (cp {self.cp})")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"RingAttentionShape: {self.num_heads} heads are not a multiple of "
                             f"{self.kv_heads} key/value heads")

    @property
    def local_seq_len(self) -> int:
        return self.seq_len // self.cp

    def _kv_elements(self) -> int:
        return 2 * self.microbatch_size * self.local_seq_len * self.kv_heads * self.head_dim

    @property
    def kv_block_bytes(self) -> float:
        """One ring step's K/V block: ``2·b·(s/cp)·h_kv·d`` elements."""
        return float(self._kv_elements() * self.bytes_per_element)

    @property
    def grad_block_bytes(self) -> float:
        """The dK/dV accumulator travelling with a block in backward (fp32)."""
        return float(self._kv_elements() * GRAD_BYTES_PER_ELEMENT)

    @property
    def lse_bytes(self) -> float:
        """The saved log-sum-exp of this rank's queries: ``b·heads·(s/cp)`` fp32."""
        return float(self.microbatch_size * self.num_heads * self.local_seq_len * LSE_BYTES_PER_ELEMENT)


def ring_overlap_time_s(*, step_compute_s: float, step_transfer_s: float, num_steps: int) -> float:
    """``num_steps`` ring steps, each transfer overlapping one step's compute:
    ``(n−1)·max(c, T) + c`` (one step's compute has no transfer beside it)."""
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps!r}: expected >= 1")
    return (num_steps - 1) * max(step_compute_s, step_transfer_s) + step_compute_s


def ring_step_transfer_time_s(size_bytes: float, *, group: Group, cluster: ClusterSpec) -> float:
    """One ring step: every rank sends ``size_bytes`` to its neighbour at once; the step lasts
    as long as the slowest hop (inter-node when the ring spans nodes)."""
    if group.size <= 1:
        return 0.0
    return p2p_time_s(size_bytes, cluster=cluster, same_node=group.num_nodes == 1)


def _check_group(shape: RingAttentionShape, group: Group) -> None:
    if group.size != shape.cp:
        raise ValueError(f"cp group of {group.size} ranks for a shape with cp {shape.cp}: they must match")


def ring_attention_time_s(shape: RingAttentionShape, *, attention_forward_s: float, group: Group,
                          cluster: ClusterSpec) -> float:
    """Forward attention of one layer and microbatch under cp, compute and exposed ring transfers.

    ``attention_forward_s``: the same attention on one device over the whole sequence (cp 1).
    """
    _check_group(shape, group)
    step = attention_forward_s / shape.cp**2
    transfer = ring_step_transfer_time_s(shape.kv_block_bytes, group=group, cluster=cluster)
    return ring_overlap_time_s(step_compute_s=step, step_transfer_s=transfer, num_steps=shape.cp)


def ring_attention_backward_time_s(shape: RingAttentionShape, *, attention_backward_s: float, group: Group,
                                   cluster: ClusterSpec) -> float:
    """Backward attention under cp: K/V and their dK/dV share each step's link, and the last
    dK/dV hop (to the block's owner) cannot hide. ``attention_backward_s`` as for the forward."""
    _check_group(shape, group)
    if shape.cp == 1:
        return attention_backward_s
    step = attention_backward_s / shape.cp**2
    kv = ring_step_transfer_time_s(shape.kv_block_bytes, group=group, cluster=cluster)
    grad = ring_step_transfer_time_s(shape.grad_block_bytes, group=group, cluster=cluster)
    return ring_overlap_time_s(step_compute_s=step, step_transfer_s=kv + grad, num_steps=shape.cp) + grad


def ring_exposed_time_s(shape: RingAttentionShape, *, attention_forward_s: float, attention_backward_s: float,
                        group: Group, cluster: ClusterSpec) -> float:
    """What the ring adds to forward + backward beyond this rank's share of the attention compute
    (``(A_fwd + A_bwd) / cp``): 0 for cp 1; only the backward's last dK/dV hop when compute hides
    every other transfer."""
    forward = ring_attention_time_s(shape, attention_forward_s=attention_forward_s, group=group,
                                    cluster=cluster)
    backward = ring_attention_backward_time_s(shape, attention_backward_s=attention_backward_s, group=group,
                                              cluster=cluster)
    return forward + backward - (attention_forward_s + attention_backward_s) / shape.cp


def ring_attention_workspace_bytes(shape: RingAttentionShape) -> float:
    """Transient bytes while one layer's ring runs (the backward's peak): two K/V buffers, two
    fp32 dK/dV buffers and the fp32 dQ accumulator; 0 for cp 1 (no ring)."""
    if shape.cp == 1:
        return 0.0
    dq_elements = shape.microbatch_size * shape.num_heads * shape.local_seq_len * shape.head_dim
    return 2 * shape.kv_block_bytes + 2 * shape.grad_block_bytes + dq_elements * GRAD_BYTES_PER_ELEMENT


def context_parallel_activation_bytes_per_layer(shape: RingAttentionShape, *, hidden_size: int, tp: int = 1,
                                                recompute: str = "none", sequence_parallel: bool = False
                                                ) -> float:
    """Saved activations of one transformer layer and microbatch on one cp rank: Korthikanti et
    al.'s bytes at sequence ``s/cp`` without the score matrix (``memory.activation_bytes_per_layer``
    with fused attention: the ring recomputes its blocks), i.e. the cp-1 activations ÷ cp. The
    log-sum-exp is in :func:`context_parallel_extra_bytes`. ``shape.num_heads`` is per device, so
    the model has ``num_heads·tp``."""
    return activation_bytes_per_layer(seq_len=shape.local_seq_len, microbatch_size=shape.microbatch_size,
                                      hidden_size=hidden_size, num_heads=shape.num_heads * tp, tp=tp,
                                      recompute=recompute, sequence_parallel=sequence_parallel,
                                      fused_attention=True, bytes_per_element=shape.bytes_per_element)


def context_parallel_extra_bytes(shape: RingAttentionShape, *, num_layers_in_flight: float,
                                 recompute: str = "none") -> float:
    """Bytes cp adds on a device beyond activations ÷ cp: the saved log-sum-exp of every
    layer-microbatch whose backward is pending (``num_layers_in_flight``; under full recomputation
    only the layer being recomputed keeps one) and one layer's ring workspace; 0 for cp 1."""
    if shape.cp == 1:
        return 0.0
    layers = 1.0 if recompute == "full" else num_layers_in_flight
    return layers * shape.lse_bytes + ring_attention_workspace_bytes(shape)


def check_sequence_split(seq_len: int, cp: int) -> None:
    """The load-balanced layout needs ``2·cp`` equal chunks of the sequence (ValueError otherwise)."""
    if seq_len % (2 * cp):
        raise ValueError(f"cp = {cp} needs the sequence length to split into 2·cp = {2 * cp} equal chunks "
                         f"(load-balanced causal sharding), but it is {seq_len}; pin a cp dividing "
                         f"{seq_len // 2} or another sequence length")


def sequence_shard_profile(profile: ModelProfile, cp: int) -> ModelProfile:
    """What each of ``cp`` ranks computes and stores per microbatch: sequence ``s/cp``, per-sequence
    FLOPs and written bytes ÷ cp (the ring splits every layer evenly, attention included: ``A/cp``
    per rank, as in the module docstring), attention fused (ring blocks keep only the log-sum-exp).
    Parameters are unchanged (cp ranks replicate them). ``profile`` itself when cp is 1."""
    if cp == 1:
        return profile
    check_sequence_split(profile.seq_len, cp)
    return dataclasses.replace(
        profile, layers=tuple(sequence_shard_layer(layer, cp) for layer in profile.layers),
        seq_len=profile.seq_len // cp,
        embedding_flops_fwd=profile.embedding_flops_fwd / cp, head_flops_fwd=profile.head_flops_fwd / cp,
        head_flops_bwd=profile.head_flops_bwd / cp, fused_attention=True)


def sequence_shard_layer(layer: LayerProfile, cp: int) -> LayerProfile:
    """``layer`` as one of ``cp`` ranks runs it (:func:`sequence_shard_profile`)."""
    seq = None if layer.seq_len is None else layer.seq_len // cp
    return dataclasses.replace(layer, flops_fwd=layer.flops_fwd / cp, flops_bwd=layer.flops_bwd / cp,
                               activation_bytes=layer.activation_bytes / cp, seq_len=seq)


def ring_shape(layer: LayerProfile, *, microbatch_size: int, tp: int, cp: int, bytes_per_element: int
               ) -> RingAttentionShape:
    """The :class:`RingAttentionShape` of a transformer ``layer`` (full sequence) on one device of
    ``tp`` tensor-parallel ranks: K/V blocks carry the layer's key/value heads (``kv_heads``: 8 of 32
    under Llama-3's grouped-query attention), ÷ t, at least one (replicated when t exceeds them)."""
    assert layer.num_heads is not None and layer.hidden_size is not None and layer.seq_len is not None
    heads = max(1, layer.num_heads // tp)
    kv_heads = max(1, (layer.key_value_heads or layer.num_heads) // tp)
    return RingAttentionShape(microbatch_size=microbatch_size, seq_len=layer.seq_len, num_heads=heads,
                              kv_heads=kv_heads if heads % kv_heads == 0 else heads,
                              head_dim=layer.hidden_size // layer.num_heads, cp=cp,
                              bytes_per_element=bytes_per_element)


def ring_step_attention_times_s(shape: RingAttentionShape, *, device: DeviceSpec, dtype: str,
                                causal: bool = True) -> tuple[float, float]:
    """(forward, backward) seconds of one ring step's block attention on one device: ``s/cp``
    queries against one K/V block of ``s/cp`` keys, half of it masked when causal (every step of
    the load-balanced layout), run as a flash kernel (FlashAttention-2, Dao 2023): ``4·b·(s/cp)²·
    heads·d`` FLOPs (× ½ causal) at the device's fused-attention efficiency, q/k/v/o read and
    written; backward recomputes the scores (× :data:`compute.FUSED_ATTENTION_BACKWARD_FLOPS_RATIO`)
    — how ``compute`` prices fused attention over a sequence of ``s/cp``, so a chunk's own step is
    what the compute model already counts."""
    b, s, width = shape.microbatch_size, shape.local_seq_len, shape.num_heads * shape.head_dim
    flops = 4 * b * s * s * width * (0.5 if causal else 1.0)
    tensor_bytes = b * s * width * shape.bytes_per_element
    fraction = device_efficiency(device).fused_attention_peak_fraction

    def run(flops_: float, bytes_: float) -> float:
        return roofline_time_s(flops=flops_, num_bytes=bytes_, device=device, dtype=dtype,
                               peak_fraction=fraction)

    return run(flops, 4 * tensor_bytes), run(FUSED_ATTENTION_BACKWARD_FLOPS_RATIO * flops, 8 * tensor_bytes)


@dataclass(frozen=True, kw_only=True)
class RingLayerTimes:
    """What ring attention adds to one layer of ``s/cp`` tokens per microbatch on one device: the
    other ``cp − 1`` steps' block compute (``compute_*``) and the transfers no block hides
    (``exposed_*``)."""

    compute_forward_s: float
    compute_backward_s: float
    exposed_forward_s: float
    exposed_backward_s: float


def ring_layer_times(shape: RingAttentionShape, *, device: DeviceSpec, dtype: str, causal: bool, group: Group,
                     cluster: ClusterSpec) -> RingLayerTimes:
    """:class:`RingLayerTimes` from :func:`ring_attention_time_s` and
    :func:`ring_attention_backward_time_s` with one step's compute from
    :func:`ring_step_attention_times_s`: the whole-sequence one-device attention is ``cp²`` steps."""
    cp = shape.cp
    step_fwd, step_bwd = ring_step_attention_times_s(shape, device=device, dtype=dtype, causal=causal)
    forward = ring_attention_time_s(shape, attention_forward_s=cp**2 * step_fwd, group=group, cluster=cluster)
    backward = ring_attention_backward_time_s(shape, attention_backward_s=cp**2 * step_bwd, group=group,
                                              cluster=cluster)
    return RingLayerTimes(compute_forward_s=(cp - 1) * step_fwd, compute_backward_s=(cp - 1) * step_bwd,
                          exposed_forward_s=max(0.0, forward - cp * step_fwd),
                          exposed_backward_s=max(0.0, backward - cp * step_bwd))
