"""Multi-head self-attention shared by the zoo's GPT (causal) and BERT (masked).

One fused QKV projection (h → 3h), ``scaled_dot_product_attention``, and an output
projection (h → h): forward matmul FLOPs ``6bsh² + 4bs²h + 2bsh²`` per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float, *, causal: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).split(h, dim=2)  # 3 × (b, s, h)
        q = q.view(b, s, self.num_heads, h // self.num_heads).transpose(1, 2)  # (b, a, s, h/a)
        k = k.view(b, s, self.num_heads, h // self.num_heads).transpose(1, 2)
        v = v.view(b, s, self.num_heads, h // self.num_heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, s, h))  # (b, s, h)
