"""Plain-PyTorch attention, the reference the FlashAttention-2 kernels (Dao 2023) are tested against.

Data flow: tests (``tests/kernels``) and the benchmark's "unfused PyTorch" row call
:func:`attention_reference`; nothing in the training path does. It materializes the
(b, h, seq_q, seq_k) scores in fp32 and follows ``scaled_dot_product_attention``'s semantics:
boolean masks keep ``True``, additive masks are added, ``causal`` is top-left aligned, key/value
heads are repeated for grouped-query attention, and a row whose every key is masked gives 0.
"""

from __future__ import annotations

import math

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        attn_mask: torch.Tensor | None = None, scale: float | None = None,
                        dropout_p: float = 0.0, dropout_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of (b, h, seq_q, d) queries over (b, h_kv, seq_k, d) keys/values, in q's dtype.

    ``dropout_keep`` (broadcastable to the scores, True = kept) replays a given dropout pattern
    with ``dropout_p``; without it, ``dropout_p > 0`` draws one with ``torch.nn.functional.dropout``.
    """
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=-3)
        v = v.repeat_interleave(heads // kv_heads, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (b, h, seq_q, seq_k)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    total = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(total == 0, torch.ones_like(total), total)
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    elif dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    return (p @ v.float()).to(q.dtype)
