"""The per-block kernel of ring attention and the log-sum-exp merge of partial outputs.

Data flow: ``runtime/context_parallel`` calls a :class:`BlockAttention` once per ring step (the
queries of this rank against the K/V block it holds) and merges each step's output into the
running one with :func:`merge_partial_attention` (as FlashAttention does across key blocks, Dao
2023); the local cost model's calibration (``cost_models/local/measure.measure_ring_block_s``)
times the same functions, so ring attention is priced from what it runs. Two kernels:
:data:`TORCH_BLOCK_ATTENTION`, plain torch math in fp32 (scores materialised, exact), and
:data:`FLASH_BLOCK_ATTENTION`, the Triton FlashAttention-2 kernels of :mod:`autopar.kernels.attention`.
Written here because torch has no block-attention primitive that returns the log-sum-exp on CPU.

Layer: ``kernels``; imports only ``torch`` and :mod:`autopar.kernels.attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import autopar.kernels.attention  # noqa: F401 - registers torch.ops.autopar.flash_attention(_backward)

BlockForward = Callable[..., tuple[Tensor, Tensor]]
BlockBackward = Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True, kw_only=True)
class BlockAttention:
    """The per-block kernel of ring attention.

    ``forward(q, k, v, *, causal, scale) -> (out, lse)``: q (b, h, sq, d), k/v (b, h_kv, sk, d)
    with ``h % h_kv == 0``; out (b, h, sq, d), lse (b, h, sq) fp32 natural log.
    ``backward(dout, q, k, v, out, lse, *, causal, scale) -> (dq, dk, dv)`` where ``out`` and
    ``lse`` are the *merged* output and log-sum-exp of these queries (so ``exp(s − lse)`` is the
    block's share of the full softmax) and dk/dv have k's shape.
    """

    name: str
    forward: BlockForward
    backward: BlockBackward


def _repeat_kv(x: Tensor, heads: int) -> Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _scores(q: Tensor, k: Tensor, *, causal: bool, scale: float) -> Tensor:
    s = (q.float() @ _repeat_kv(k, q.shape[1]).float().transpose(-2, -1)) * scale
    if causal:
        future = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return s


def _torch_block_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
                         ) -> tuple[Tensor, Tensor]:
    s = _scores(q, k, causal=causal, scale=scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ _repeat_kv(v, q.shape[1]).float()
    return out, lse


def _sum_groups(x: Tensor, kv_heads: int) -> Tensor:
    b, h, s, d = x.shape
    return x.view(b, kv_heads, h // kv_heads, s, d).sum(dim=2)


def _torch_block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                          causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dout = dout.float()
    p = torch.exp(_scores(q, k, causal=causal, scale=scale) - lse.unsqueeze(-1))
    dv = p.transpose(-2, -1) @ dout
    dp = dout @ _repeat_kv(v, q.shape[1]).float().transpose(-2, -1)
    delta = (dout * out.float()).sum(dim=-1, keepdim=True)  # rowsum(dO∘O)
    ds = p * (dp - delta) * scale
    dq = ds @ _repeat_kv(k, q.shape[1]).float()
    dk = ds.transpose(-2, -1) @ q.float()
    return dq, _sum_groups(dk, k.shape[1]), _sum_groups(dv, k.shape[1])


TORCH_BLOCK_ATTENTION = BlockAttention(name="torch", forward=_torch_block_forward,
                                       backward=_torch_block_backward)


def _flash_block_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
                         ) -> tuple[Tensor, Tensor]:
    out, lse, _ = torch.ops.autopar.flash_attention(q, k, v, None, 0.0, causal, scale)
    return out, lse


def _flash_block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                          causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    seed = torch.zeros(1, dtype=torch.int64, device=q.device)  # no dropout: the seed is unused
    dq, dk, dv, _ = torch.ops.autopar.flash_attention_backward(  # the kernels read lse as contiguous
        dout.to(q.dtype), q, k, v, None, out.to(q.dtype), lse.contiguous(), seed, 0.0, causal, scale, False)
    return dq, dk, dv



FLASH_BLOCK_ATTENTION = BlockAttention(name="flash", forward=_flash_block_forward,
                                       backward=_flash_block_backward)


def merge_partial_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor
                            ) -> tuple[Tensor, Tensor]:
    """Attention over keys A ∪ B from attention over A (``out``, ``lse``) and over B.

    ``lse' = log(e^lse + e^lse_B)``, ``out' = out·e^(lse−lse') + out_B·e^(lse_B−lse')``; rows that
    saw no key yet (lse −inf) take the other side unchanged. Shapes (…, s, d) and (…, s).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse).unsqueeze(-1)
    merged = out * torch.exp(lse.unsqueeze(-1) - safe) + block_out * torch.exp(block_lse.unsqueeze(-1) - safe)
    return merged, new_lse
