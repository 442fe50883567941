"""Fused attention: FlashAttention-2 (Dao 2023) as a ``torch.library`` op, with an SDPA fallback.

Data flow: the fused-attention pass (``passes/fused_attention/transform.py``) puts
:func:`flash_scaled_dot_product_attention` nodes into captured graphs; user code may call
:func:`flash_attention` directly. Either runs ``autopar::flash_attention`` — Triton forward
(``flash_fwd.py``) and backward (``flash_bwd_kv.py``, ``flash_bwd_q.py``) behind one autograd
formula, with a fake implementation so fx capture and ``torch.export`` keep it as one node —
when :func:`supports` says the kernel can run, and
``torch.nn.functional.scaled_dot_product_attention`` otherwise: without Triton, on CPU without
``TRITON_INTERPRET=1``, on ``meta`` tensors, DTensors, or shapes the kernel does not cover.
Triton is imported only when a kernel is about to run; importing autopar never needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from autopar.kernels.interpreter import interpreting

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _plain(t: Tensor) -> bool:
    return type(t) is Tensor or isinstance(t, (FakeTensor, FunctionalTensor, torch.nn.Parameter))


def _device_reason(q: Tensor) -> str | None:
    if not triton_available():
        return "Triton is not installed"
    kind = q.device.type
    if kind == "meta":
        return "meta tensors carry no data"
    if kind == "cpu" and not interpreting():
        return "CPU tensors and TRITON_INTERPRET is not set (no GPU kernel on CPU)"
    if kind not in ("cpu", "cuda"):
        return f"device {kind} has no Triton backend here"
    return None


def kernel_shape_reason(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> str | None:
    """Why the kernel does not cover these shapes and dtypes, whatever the device (None if it does)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected (batch, heads, seq, head_dim) tensors, got {q.dim()}/{k.dim()}/{v.dim()}-D"
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernel takes one of fp16, bf16, fp32"
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not (b, h, s, d)-alike"
    if q.shape[1] % k.shape[1] != 0:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is outside 1..{MAX_HEAD_DIM}"
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask dtype {attn_mask.dtype} is neither bool nor floating"
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, full) != full:
            return f"attn_mask {tuple(attn_mask.shape)} does not broadcast to {full}"
    return None


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                       dropout_p: float = 0.0) -> str | None:
    """Why the Triton kernel cannot run these inputs (None when it can)."""
    tensors = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    odd = [type(t).__name__ for t in tensors if not _plain(t)]
    if odd:
        return f"tensor subclass {odd[0]} (e.g. DTensor) has no kernel rule; SDPA handles it"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p {dropout_p} is outside [0, 1)"
    if len({t.device for t in tensors}) != 1:
        return "tensors on different devices"
    try:
        return _device_reason(q) or kernel_shape_reason(q, k, v, attn_mask)
    except RuntimeError as err:  # broadcast_shapes on incompatible shapes
        return str(err)


def supports(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
             dropout_p: float = 0.0) -> bool:
    """Whether :func:`flash_attention` runs the Triton kernel (else it runs SDPA)."""
    return unsupported_reason(q, k, v, attn_mask, dropout_p=dropout_p) is None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    attn_mask: Tensor | None = None, scale: float | None = None,
                    dropout_p: float = 0.0) -> Tensor:
    """Exact attention of (batch, heads, seq_q, d) queries over (batch, kv_heads, seq_k, d) keys
    and values, as ``scaled_dot_product_attention`` computes it (``kv_heads`` may divide
    ``heads``: grouped-query attention). ``attn_mask``: bool (True = attend) or additive,
    broadcastable to (batch, heads, seq_q, seq_k), a floating mask that requires grad gets one;
    ``causal`` is top-left aligned and may be combined with a mask; ``scale`` defaults to 1/√d.
    ``dropout_p`` drops probabilities as SDPA does; the kernel's pattern comes from a seed drawn
    from torch's generator (a fixed torch seed repeats it) but is not SDPA's pattern."""
    if q.dim() == 3 and k.dim() == 3 and v.dim() == 3:  # (batch·heads, seq, d) as one batch
        mask = attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        return flash_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal=causal,
                               attn_mask=mask, scale=scale, dropout_p=dropout_p).squeeze(0)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if supports(q, k, v, attn_mask, dropout_p=dropout_p):
        out, _, _ = torch.ops.autopar.flash_attention(q, k, v, attn_mask, float(dropout_p), bool(causal),
                                                      scale)
        return out
    return sdpa_fallback(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)


def flash_scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                       attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                       is_causal: bool = False, scale: float | None = None) -> Tensor:
    """``scaled_dot_product_attention``'s signature over :func:`flash_attention` (fewer key heads
    imply GQA): the node the fused-attention pass writes, readable wherever SDPA nodes are."""
    return flash_attention(query, key, value, causal=is_causal, attn_mask=attn_mask, scale=scale,
                           dropout_p=dropout_p)


def sdpa_fallback(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None,
                  scale: float | None, dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention`` with flash_attention's extras (GQA, causal and a mask)."""
    if causal and attn_mask is not None:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, -math.inf)
        causal = False
    gqa = q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=causal, scale=scale, enable_gqa=gqa)


_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool causal, "
               "float scale) -> (Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor out, Tensor lse, "
               "Tensor seed, float dropout_p, bool causal, float scale, bool mask_grad) "
               "-> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("autopar::flash_attention", mutates_args=(), schema=_FWD_SCHEMA)
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                        causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, logsumexp (b, h, seq_q) fp32, dropout seed (1,) int64) from the Triton forward."""
    from autopar.kernels.flash_fwd import flash_forward

    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    else:
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)
    out, lse = flash_forward(q, k, v, attn_mask, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
    return out, lse, seed


@_flash_attention_op.register_fake
def _flash_attention_fake(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                          causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    return out, lse, torch.empty(1, dtype=torch.int64, device=q.device)


@torch.library.custom_op("autopar::flash_attention_backward", mutates_args=(), schema=_BWD_SCHEMA)
def _flash_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                                 out: Tensor, lse: Tensor, seed: Tensor, dropout_p: float, causal: bool,
                                 scale: float, mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask); dmask is empty unless ``mask_grad`` (then it has the mask's shape)."""
    from autopar.kernels.flash_bwd_kv import flash_backward_kv
    from autopar.kernels.flash_bwd_q import flash_backward_q

    delta = (dout.float() * out.float()).sum(dim=-1)  # δ = rowsum(dO∘O), (b, h, seq_q)
    settings: dict[str, Any] = dict(causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
    dq = flash_backward_q(dout, q, k, v, attn_mask, lse, delta, **settings)
    dk, dv, ds = flash_backward_kv(dout, q, k, v, attn_mask, lse, delta, mask_grad=mask_grad, **settings)
    if ds is None or attn_mask is None:
        return dq, dk, dv, q.new_empty(0)
    return dq, dk, dv, ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)


@_flash_attention_backward_op.register_fake
def _flash_attention_backward_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                                   out: Tensor, lse: Tensor, seed: Tensor, dropout_p: float, causal: bool,
                                   scale: float, mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dmask = (torch.empty(attn_mask.shape, dtype=attn_mask.dtype, device=q.device)
             if mask_grad and attn_mask is not None else q.new_empty(0))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    q, k, v, attn_mask, dropout_p, causal, scale = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
    ctx.settings = (dropout_p, causal, scale)


def _backward(ctx: Any, dout: Tensor, _dlse: Tensor, _dseed: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
    dropout_p, causal, scale = ctx.settings
    mask_grad = attn_mask is not None and bool(ctx.needs_input_grad[3])
    dq, dk, dv, dmask = torch.ops.autopar.flash_attention_backward(
        dout, q, k, v, attn_mask, out, lse, seed, dropout_p, causal, scale, mask_grad)
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None


_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.autopar.flash_attention)
def _forward_flops(q_shape: Any, k_shape: Any, v_shape: Any, *_: Any, **__: Any) -> int:
    """As SDPA counts them (2 matmuls; causal not halved), so captures of either form agree."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.autopar.flash_attention_backward)
def _backward_flops(dout_shape: Any, q_shape: Any, k_shape: Any, v_shape: Any, *_: Any, **__: Any) -> int:
    return sdpa_backward_flop_count(dout_shape, q_shape, k_shape, v_shape)
