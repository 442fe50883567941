"""FlashAttention-2 backward for keys and values (Dao 2023) in Triton: dK, dV (and dMask).

Data flow: ``attention.py``'s backward op → :func:`flash_backward_kv` →
``_flash_bwd_kv_kernel``, one program per (key block, batch·key-head). The program keeps its
key/value block resident, streams every query block of every query head in its GQA group,
recomputes ``P = exp(s − lse)`` from the forward's saved logsumexp, and accumulates
``dV = Pᵀ·dO`` and ``dK = scale·dSᵀ·Q`` with ``dS = P∘(dP − δ)``, ``δ = rowsum(dO∘O)``. No
atomics: each key block belongs to one program. When an additive mask needs a gradient
(T5's learned position bias) it also writes ``dS`` (b, h, seq_q, seq_k) — the only s² buffer,
and only then. dQ is ``flash_bwd_q.py``.
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
def _flash_bwd_kv_kernel(Q, K, V, Mask, DO, Lse, Delta, DK, DV, DMask, Seed,
                         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                         num_heads, group, seq_q, seq_k, head_dim, scale, dropout_p,
                         MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr, CAUSAL: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    num_kv_heads = num_heads // group
    b = bhk // num_kv_heads
    hk = bhk % num_kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    kv_ok = (offs_n[:, None] < seq_k) & d_ok
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # query rows above this key block cannot see it
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    inv_keep = 1.0 / (1.0 - dropout_p)
    for g in range(0, group):
        h = hk * group + g
        bh = b * num_heads + h
        mask_base = Mask + b * smb + h * smh
        for start_m in range(lo, seq_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_q
            q_ok = row_ok[:, None] & d_ok
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=q_ok, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                         mask=q_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + bh * seq_q + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * seq_q + offs_m, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: P = 0
            s = score_tile(q, k, mask_base, smm, smn, offs_m, offs_n, seq_q, seq_k, scale,
                           MASK_KIND, CAUSAL, PRECISION)
            p = tl.exp2((s - lse[:, None]) * LOG2E)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            p_used = p
            if DROPOUT:
                rows = (bh * seq_q + offs_m).to(tl.int64) * seq_k
                keep = dropout_keep(seed, rows, offs_n, dropout_p)
                p_used = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            dv += tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if MASK_GRAD:
                ds_rows = (bh.to(tl.int64) * seq_q + offs_m) * seq_k  # int64: b·h·s² may pass 2³¹
                tl.store(DMask + ds_rows[:, None] + offs_n[None, :], ds,
                         mask=row_ok[:, None] & (offs_n[None, :] < seq_k))
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    out_offsets = (bhk.to(tl.int64) * seq_k + offs_n[:, None]) * head_dim + offs_d[None, :]
    tl.store(DK + out_offsets, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_ok)


def flash_backward_kv(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: torch.Tensor | None, lse: torch.Tensor, delta: torch.Tensor, *,
                      causal: bool, scale: float, dropout_p: float, seed: torch.Tensor, mask_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dk, dv, ds)``: dk, dv contiguous like k; ds (b, h, seq_q, seq_k) fp32 when ``mask_grad``."""
    b, h, seq_q, d = q.shape
    hk, seq_k = k.shape[1], k.shape[2]
    interpreted = interpreting()
    cfg = launch_config(d, interpreted=interpreted, kind="bwd_kv")
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    ds = torch.zeros((b, h, seq_q, seq_k), device=q.device, dtype=torch.float32) if mask_grad else None
    mask = mask_view(attn_mask, (b, h, seq_q, seq_k), q)
    grid = (triton.cdiv(seq_k, cfg.block_n), b * hk)
    with launchable(_flash_bwd_kv_kernel, interpret=interpreted) as kernel:
        kernel[grid](
            q, k, v, mask.tensor, dout, lse, delta, dk, dv, ds if ds is not None else lse, seed,
            *q.stride(), *k.stride(), *v.stride(), *mask.strides, *dout.stride(),
            h, h // hk, seq_q, seq_k, d, scale, dropout_p,
            MASK_KIND=mask.kind, MASK_GRAD=mask_grad, CAUSAL=causal, DROPOUT=dropout_p > 0.0,
            PRECISION=dot_precision(q.dtype), UPCAST=upcast_dots(q.dtype, interpreted=interpreted),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dk, dv, ds
