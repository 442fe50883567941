"""FlashAttention-2 backward for queries (Dao 2023) in Triton: dQ.

Data flow: ``attention.py``'s backward op → :func:`flash_backward_q` → ``_flash_bwd_q_kernel``,
one program per (query block, batch·head). It streams the key/value blocks, recomputes
``P = exp(s − lse)`` from the saved logsumexp and accumulates ``dQ = scale·dS·K``. A separate
pass rather than FA2's atomic adds from the key-block programs: deterministic, at the price of
recomputing ``q·kᵀ`` once more. dK and dV are ``flash_bwd_kv.py``.
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
def _flash_bwd_q_kernel(Q, K, V, Mask, DO, Lse, Delta, DQ, Seed,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        smb, smh, smm, smn, sdb, sdh, sdm, sdd,
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
    row_ok = offs_m < seq_q
    q_ok = row_ok[:, None] & d_ok
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + bh * seq_q + offs_m, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: P = 0
    delta = tl.load(Delta + bh * seq_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = Mask + b * smb + h * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M)
    seed = 0
    rows = offs_m.to(tl.int64)
    if DROPOUT:
        seed = tl.load(Seed)
        rows = (bh * seq_q + offs_m).to(tl.int64) * seq_k
    inv_keep = 1.0 / (1.0 - dropout_p)
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
        p = tl.exp2((s - lse[:, None]) * LOG2E)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(dropout_keep(seed, rows, offs_n, dropout_p), dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ + (bh.to(tl.int64) * seq_q + offs_m[:, None]) * head_dim + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_ok)


def flash_backward_q(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor | None, lse: torch.Tensor, delta: torch.Tensor, *,
                     causal: bool, scale: float, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """dq, contiguous (b, h, seq_q, d) in q's dtype."""
    b, h, seq_q, d = q.shape
    hk, seq_k = k.shape[1], k.shape[2]
    interpreted = interpreting()
    cfg = launch_config(d, interpreted=interpreted, kind="bwd_q")
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    mask = mask_view(attn_mask, (b, h, seq_q, seq_k), q)
    grid = (triton.cdiv(seq_q, cfg.block_m), b * h)
    with launchable(_flash_bwd_q_kernel, interpret=interpreted) as kernel:
        kernel[grid](
            q, k, v, mask.tensor, dout, lse, delta, dq, seed,
            *q.stride(), *k.stride(), *v.stride(), *mask.strides, *dout.stride(),
            h, h // hk, seq_q, seq_k, d, scale, dropout_p,
            MASK_KIND=mask.kind, CAUSAL=causal, DROPOUT=dropout_p > 0.0,
            PRECISION=dot_precision(q.dtype), UPCAST=upcast_dots(q.dtype, interpreted=interpreted),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq
