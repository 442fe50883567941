"""FlashAttention-2 forward (Dao 2023) in Triton: tiled exact attention with online softmax.

Data flow: ``attention.py``'s custom op → :func:`flash_forward` → ``_flash_fwd_kernel``, one
program per (query block, batch·head) → ``out`` and the per-row logsumexp that the backward
kernels (``flash_bwd_kv.py``, ``flash_bwd_q.py``) recompute probabilities from. The
``seq_q × seq_k`` score matrix is never stored. Grouped-query attention reads key/value head
``h // group``; masks are read through broadcast strides; dropout keeps ``P·Z/(1−p)`` with
``Z`` from Philox numbers the backward regenerates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autopar.kernels.flash_common import (
    LOG2E,
    dot_precision,
    dropout_keep,
    launch_config,
    launchable,
    mask_view,
    score_tile,
    upcast_dots,
)
from autopar.kernels.interpreter import interpreting


@triton.jit
def _flash_fwd_kernel(Q, K, V, Mask, Out, Lse, Seed,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      smb, smh, smm, smn, sob, soh, som, sod,
                      num_heads, group, seq_q, seq_k, head_dim, scale, dropout_p,
                      MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < seq_q) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = Mask + b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M)
    seed = 0
    rows = offs_m.to(tl.int64)
    if DROPOUT:
        seed = tl.load(Seed)
        rows = (bh * seq_q + offs_m).to(tl.int64) * seq_k
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < seq_k) & d_ok
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = score_tile(q, k, mask_base, smm, smn, offs_m, offs_n, seq_q, seq_k, scale,
                       MASK_KIND, CAUSAL, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far stays 0
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(dropout_keep(seed, rows, offs_n, dropout_p), p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # every key masked: output 0 and lse −inf (SDPA's convention)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & d_ok)
    tl.store(Lse + bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, *,
                  causal: bool, scale: float, dropout_p: float, seed: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out (b, h, seq_q, d) in q's dtype, lse (b, h, seq_q) fp32 natural log."""
    b, h, seq_q, d = q.shape
    hk, seq_k = k.shape[1], k.shape[2]
    assert k.shape == v.shape and h % hk == 0 and k.shape[-1] == d, (q.shape, k.shape, v.shape)
    interpreted = interpreting()
    cfg = launch_config(d, interpreted=interpreted, kind="fwd")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, seq_q), device=q.device, dtype=torch.float32)
    mask = mask_view(attn_mask, (b, h, seq_q, seq_k), q)
    grid = (triton.cdiv(seq_q, cfg.block_m), b * h)
    with launchable(_flash_fwd_kernel, interpret=interpreted) as kernel:
        kernel[grid](
            q, k, v, mask.tensor, out, lse, seed,
            *q.stride(), *k.stride(), *v.stride(), *mask.strides, *out.stride(),
            h, h // hk, seq_q, seq_k, d, scale, dropout_p,
            MASK_KIND=mask.kind, CAUSAL=causal, DROPOUT=dropout_p > 0.0,
            PRECISION=dot_precision(q.dtype), UPCAST=upcast_dots(q.dtype, interpreted=interpreted),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse
