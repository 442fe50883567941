"""Compute model: seconds for FLOPs and bytes on one device, and for one transformer layer.

Data flow: a ``DeviceSpec`` (``hardware``) and a ``ModelProfile`` (``profile``) go in;
per-microbatch forward / backward / recompute seconds of a layer under tensor parallelism
come out for ``estimate`` and the schedule model. Communication is not in here (``comm``).

Each kernel is a roofline, ``max(flops / (peak × η), bytes / (bandwidth × β), floor)``:

* ``η(m, k, n) = η_max / (1 + T (1/m + 1/k + 1/n))`` — a matmul loses efficiency smoothly as
  any dimension shrinks toward the tensor-core tile ``T``; ``η_max`` per device below.
* ``β`` — achievable fraction of HBM bandwidth for elementwise kernels.
* ``floor`` — a kernel never takes less than its launch latency.
* Unfused attention materializes the ``b·a·s²`` scores (softmax and dropout passes over
  them); fused (flash) attention reads and writes only q, k, v, o — ``O(s·h)`` bytes — and
  skips the masked half when causal.

Constants carry their source; FITTED ones say what they were fitted to. None was fitted
to the Megatron-LM weak-scaling table they are validated against (``benchmarks/published``).
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.cost_models.moe import expert_matmuls
from autopar.cost_models.profile import LayerProfile, ModelProfile
from autopar.hardware import DeviceSpec

MATMUL_TILE_DIM = 128.0
"""ASSUMED, not fitted: the matmul-size roll-off scale ``T``, one 128-wide tensor-core tile
(cuBLAS uses 64–256-wide tiles; NVIDIA "Matrix Multiplication Background User's Guide")."""
KERNEL_LAUNCH_FLOOR_S = 5e-6
"""ASSUMED, not fitted: typical CUDA kernel launch latency (a few µs)."""
REFERENCE_MATMUL_DIM = 8192

UNFUSED_SCORE_PASSES_FORWARD = 4.5
"""Element passes over the attention scores, forward: fused scale-mask-softmax reads and writes
them (2), dropout reads, writes and stores a 1-byte mask (2.5)."""
UNFUSED_SCORE_PASSES_BACKWARD = 5.5
"""Backward: dropout (mask, grad in, grad out: 2.5), softmax (y, dy in, dx out: 3)."""
FUSED_ATTENTION_BACKWARD_FLOPS_RATIO = 2.5  # flash backward recomputes scores (TECHNIQUES §8)


@dataclass(frozen=True, kw_only=True)
class DeviceEfficiency:
    """Achievable fractions of a device's datasheet peaks."""

    matmul_peak_fraction: float
    memory_bandwidth_fraction: float
    fused_attention_peak_fraction: float
    source: str


_COPY_FRACTION = 3.0 / 3.35  # H100 device-to-device copy 3.0 TB/s of 3.35 (TECHNIQUES §5)
_FA2_FRACTION = 230 / 312  # FlashAttention-2 on A100: up to 230 TFLOP/s (Dao 2023; TECHNIQUES §8)
_H100_MATMUL = 798 / 989 * (1 + 3 * MATMUL_TILE_DIM / REFERENCE_MATMUL_DIM)
A100_MATMUL_PEAK_FRACTION = 0.757
"""FITTED to one published A100 measurement (Korthikanti et al. 2022, Table 4; TECHNIQUES §2):
a 22B-model layer (h 6144, a 64, s 2048, b 4, t 8) takes 7.7 ms forward + 11.9 ms backward.
With the backward pass's two TP all-reduces hidden (Megatron's asynchronous all-reduce in that
code) this model gives the 19.6 ms sum at this value (``korthikanti_22b_layer_ms`` in
``benchmarks/published/megatron.py``, checked in ``tests/cost_models/test_megatron.py``); the
unfitted split comes out 7.8 + 11.8 ms.
Fitted without the overlap it would be 0.856 (split 7.3 + 12.3 ms). It is a sustained,
in-training efficiency — it absorbs what the kernel model leaves out — hence below the A100's
best-shape matmul, 271.2 of 312 TFLOP/s (stas00/ml-engineering MAMF table). Not fitted to the
Megatron-LM weak-scaling table."""

A100 = DeviceEfficiency(
    matmul_peak_fraction=A100_MATMUL_PEAK_FRACTION, memory_bandwidth_fraction=_COPY_FRACTION,
    fused_attention_peak_fraction=_FA2_FRACTION,
    source="matmul: FITTED to the Korthikanti 22B layer timing; memory: FITTED to the H100 copy "
    "measurement (assumed to transfer); fused attention: FlashAttention-2 on A100 (Dao 2023)")
H100 = DeviceEfficiency(
    matmul_peak_fraction=_H100_MATMUL, memory_bandwidth_fraction=_COPY_FRACTION,
    fused_attention_peak_fraction=_FA2_FRACTION,
    source="matmul: FITTED so that an 8192³ bf16 matmul runs at the measured 798 of 989 TFLOP/s "
    "(TECHNIQUES §5); memory: H100 copy 3.0 of 3.35 TB/s; fused attention: assumed as FA2 on A100")
PLACEHOLDER = DeviceEfficiency(
    matmul_peak_fraction=1.0, memory_bandwidth_fraction=1.0, fused_attention_peak_fraction=1.0,
    source="placeholder: the CPU peaks are placeholders already; `autopar calibrate` replaces them")
EFFICIENCY: dict[str, DeviceEfficiency] = {
    "A100-40GB": A100, "A100-80GB": A100, "H100-SXM": H100, "H200": H100, "CPU": PLACEHOLDER,
}


def device_efficiency(device: DeviceSpec) -> DeviceEfficiency:
    """The catalog's efficiencies for ``device`` (an unknown GPU gets the H100 fractions)."""
    return EFFICIENCY.get(device.name, H100)


def matmul_efficiency(m: float, k: float, n: float, *, device: DeviceSpec) -> float:
    """η(m, k, n): the fraction of peak a (m×k)(k×n) matmul reaches when compute-bound."""
    roll_off = 1 + MATMUL_TILE_DIM * (1 / m + 1 / k + 1 / n)
    return device_efficiency(device).matmul_peak_fraction / roll_off


def roofline_time_s(*, flops: float, num_bytes: float, device: DeviceSpec, dtype: str,
                    peak_fraction: float) -> float:
    """One kernel: the slower of compute and memory traffic, never below the launch floor."""
    if flops <= 0 and num_bytes <= 0:
        return 0.0
    compute_s = flops / (device.peak_flops_per_s_for(dtype) * peak_fraction)
    bandwidth = device.memory_bandwidth_bytes_per_s * device_efficiency(device).memory_bandwidth_fraction
    return max(compute_s, num_bytes / bandwidth, KERNEL_LAUNCH_FLOOR_S)


def memory_time_s(num_bytes: float, *, device: DeviceSpec) -> float:
    """A memory-bound (elementwise) kernel moving ``num_bytes`` (read + written)."""
    return roofline_time_s(flops=0.0, num_bytes=num_bytes, device=device, dtype="fp32",
                           peak_fraction=1.0)


def matmul_time_s(m: float, k: float, n: float, *, device: DeviceSpec, dtype: str = "bf16",
                  batch: float = 1, bytes_per_element: int = 2) -> float:
    """A (batched) (m×k)(k×n) matmul: ``2mkn`` FLOPs, reads both inputs, writes the output."""
    return roofline_time_s(flops=2 * m * k * n * batch,
                           num_bytes=(m * k + k * n + m * n) * bytes_per_element * batch,
                           device=device, dtype=dtype,
                           peak_fraction=matmul_efficiency(m, k, n, device=device))


def flops_time_s(flops: float, *, device: DeviceSpec, dtype: str = "bf16") -> float:
    """FLOPs of unknown shape, at the efficiency of an 8192³ matmul."""
    ref = REFERENCE_MATMUL_DIM
    return roofline_time_s(flops=flops, num_bytes=0.0, device=device, dtype=dtype,
                           peak_fraction=matmul_efficiency(ref, ref, ref, device=device))


@dataclass(frozen=True, kw_only=True)
class LayerTimes:
    """Compute seconds per microbatch on one device (no communication).

    ``recompute_s`` is the extra forward work redone before the backward pass.
    """

    forward_s: float = 0.0
    backward_input_s: float = 0.0
    backward_weight_s: float = 0.0
    recompute_s: float = 0.0

    def __add__(self, other: LayerTimes) -> LayerTimes:
        return LayerTimes(forward_s=self.forward_s + other.forward_s,
                          backward_input_s=self.backward_input_s + other.backward_input_s,
                          backward_weight_s=self.backward_weight_s + other.backward_weight_s,
                          recompute_s=self.recompute_s + other.recompute_s)

    @property
    def backward_s(self) -> float:
        return self.backward_input_s + self.backward_weight_s


@dataclass(frozen=True, kw_only=True)
class Kernels:
    """What the layer runs on one device: microbatch b, tensor-parallel degree t, expert-parallel
    degree ep (MoE layers: ``cost_models.moe``)."""

    device: DeviceSpec
    dtype: str
    bytes_per_element: int
    microbatch_size: int
    tp: int
    ep: int = 1

    def matmul(self, m: float, k: float, n: float, batch: float = 1) -> float:
        return matmul_time_s(m, k, n, device=self.device, dtype=self.dtype, batch=batch,
                             bytes_per_element=self.bytes_per_element)

    def memory(self, elements: float) -> float:
        return memory_time_s(elements * self.bytes_per_element, device=self.device)


def transformer_layer_times(layer: LayerProfile, *, kernels: Kernels, recompute: str = "none",
                            fused_attention: bool = True, causal: bool = True,
                            sequence_parallel: bool = False) -> LayerTimes:
    """One pre-LN transformer layer (QKV, attention, projection, 2-matmul MLP) per microbatch.
    An MoE layer's MLP is its experts and router on the busiest rank, not tensor-parallel
    (``moe.expert_matmuls``)."""
    if not layer.is_transformer:
        return generic_layer_times(layer, kernels=kernels, recompute=recompute)
    h, f = layer.hidden_size, layer.ffn_size
    t, tokens = kernels.tp, kernels.microbatch_size * layer.seq_len
    linear: tuple[tuple[float, float, float, float], ...] = ((tokens, h, 3 * h / t, 1), (tokens, h / t, h, 1))
    mlp_elements: float | None = None  # dense: the GeLU's 2·b·s·f/t, below
    if layer.moe is None:
        linear += ((tokens, h, f / t, 1), (tokens, f / t, h, 1))
    else:
        experts, mlp_elements = expert_matmuls(layer, tokens=tokens, ep=kernels.ep)
        linear += experts
    forward = sum(kernels.matmul(m, k, n, g) for m, k, n, g in linear)
    backward_input = sum(kernels.matmul(m, n, k, g) for m, k, n, g in linear)
    backward_weight = sum(kernels.matmul(k, m, n, g) for m, k, n, g in linear)
    attention_fwd, attention_bwd = _attention_times(layer, kernels, fused_attention, causal)
    passes = (4 + 7) / (t if sequence_parallel else 1)  # 2 LayerNorms, 2 bias-dropout-adds
    sbh = tokens * h
    if mlp_elements is None:
        mlp_elements = 2 * f / h / t * sbh
    elementwise_fwd = 2 * kernels.memory(passes / 2 * sbh) + kernels.memory(mlp_elements)
    extra: float | None = 0.0  # None: full recomputation
    if recompute == "full":
        extra = None
    elif recompute == "selective" and not fused_attention:  # flash backward recomputes anyway
        extra = attention_fwd
    times = LayerTimes(forward_s=forward + attention_fwd + elementwise_fwd,
                       backward_input_s=backward_input + attention_bwd + 2 * elementwise_fwd,
                       backward_weight_s=backward_weight)
    return _with_recompute(times, extra)


def _with_recompute(times: LayerTimes, extra_s: float | None) -> LayerTimes:
    """``extra_s`` None means full recomputation: the whole forward runs again."""
    return LayerTimes(forward_s=times.forward_s, backward_input_s=times.backward_input_s,
                      backward_weight_s=times.backward_weight_s,
                      recompute_s=times.forward_s if extra_s is None else extra_s)


def _attention_times(layer: LayerProfile, kernels: Kernels, fused: bool, causal: bool
                     ) -> tuple[float, float]:
    b, s, h, t = kernels.microbatch_size, layer.seq_len, layer.hidden_size, kernels.tp
    heads = b * layer.num_heads / t
    d = h / layer.num_heads
    if fused:
        flops = 4 * b * s * s * h / t * (0.5 if causal else 1.0)
        fraction = device_efficiency(kernels.device).fused_attention_peak_fraction
        sbh_bytes = b * s * h / t * kernels.bytes_per_element

        def run(flops_: float, bytes_: float) -> float:
            return roofline_time_s(flops=flops_, num_bytes=bytes_, device=kernels.device,
                                   dtype=kernels.dtype, peak_fraction=fraction)

        return run(flops, 4 * sbh_bytes), run(FUSED_ATTENTION_BACKWARD_FLOPS_RATIO * flops, 8 * sbh_bytes)
    scores = heads * s * s
    forward = (kernels.matmul(s, d, s, heads) + kernels.matmul(s, s, d, heads)
               + kernels.memory(UNFUSED_SCORE_PASSES_FORWARD * scores))
    backward = (kernels.matmul(s, d, s, heads) + 3 * kernels.matmul(s, s, d, heads)
                + kernels.memory(UNFUSED_SCORE_PASSES_BACKWARD * scores))
    return forward, backward


def generic_layer_times(layer: LayerProfile, *, kernels: Kernels, recompute: str = "none") -> LayerTimes:
    """A layer of unknown shape: its FLOPs ÷ t at the 8192³ matmul efficiency."""
    scale = kernels.microbatch_size / kernels.tp

    def run(flops: float) -> float:
        return flops_time_s(flops * scale, device=kernels.device, dtype=kernels.dtype)

    times = LayerTimes(forward_s=run(layer.flops_fwd), backward_input_s=run(layer.flops_bwd / 2),
                       backward_weight_s=run(layer.flops_bwd / 2))
    return _with_recompute(times, 0.0 if recompute != "full" else None)


def embedding_times(profile: ModelProfile, *, kernels: Kernels) -> LayerTimes:
    """Token + position embedding: a gather and an add forward, a dense V×h/t gradient backward."""
    sbh = kernels.microbatch_size * profile.seq_len * profile.hidden_size
    extra = flops_time_s(profile.embedding_flops_fwd * kernels.microbatch_size / kernels.tp,
                         device=kernels.device, dtype=kernels.dtype)
    table = profile.vocab_size * profile.hidden_size / kernels.tp
    return LayerTimes(forward_s=kernels.memory(5 * sbh) + extra,
                      backward_weight_s=kernels.memory(table + 2 * sbh) + 2 * extra)


def head_times(profile: ModelProfile, *, kernels: Kernels) -> LayerTimes:
    """Final norm, the vocabulary-parallel LM head (M × h × V/t) and the fp32 cross-entropy."""
    b, s, h, vocab, t = (kernels.microbatch_size, profile.seq_len, profile.hidden_size,
                         profile.vocab_size, kernels.tp)
    tokens, lm_flops = b * s, 2 * s * h * vocab
    rest = max(0.0, profile.head_flops_fwd - lm_flops) * b / t
    other = flops_time_s(rest, device=kernels.device, dtype=kernels.dtype)
    norm = kernels.memory(2 * tokens * h)
    if vocab == 0 or profile.head_flops_fwd < lm_flops:
        return LayerTimes(forward_s=norm + other, backward_input_s=2 * (norm + other))
    logits = tokens * vocab / t
    fp32 = 4 / kernels.bytes_per_element  # the loss keeps fp32 probabilities
    return LayerTimes(
        forward_s=norm + other + kernels.matmul(tokens, h, vocab / t)
        + kernels.memory(logits * (1 + 2 * fp32)),
        backward_input_s=2 * (norm + other) + kernels.matmul(tokens, vocab / t, h)
        + kernels.memory(logits * (1 + fp32)),
        backward_weight_s=kernels.matmul(h, tokens, vocab / t))
