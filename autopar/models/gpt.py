"""A GPT (causal language model) written for clarity: GPT-2 / nanoGPT shape.

Part of the built-in zoo (``autopar.models``), which feeds ``autopar.capture``, the
benchmarks and ``autopar capture MODEL``. Pre-LayerNorm blocks with learned position
embeddings and a GELU MLP of width 4h; the blocks live in one ``nn.ModuleList``
(``blocks``) so capture finds the repeated layers. Forward matmul FLOPs per layer are
exactly Megatron-LM's ``24 b s h² + 4 b s² h``, the LM head ``2 b s h V``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.attention import SelfAttention
from autopar.models.configs import GPTConfig
from autopar.models.init import embedding, init_weights


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.ffn_size)
        self.proj = nn.Linear(config.ffn_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # (b, s, ffn_size) -> (b, s, h)


class Block(nn.Module):
    """One pre-LN transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = SelfAttention(config.hidden_size, config.num_heads, config.dropout, causal=True)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))  # (b, s, h)
        return x + self.drop(self.mlp(self.ln_2(x)))  # (b, s, h)


class GPT(nn.Module):
    """``forward(input_ids[b, s]) -> logits[b, s, V]``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = embedding(config.vocab_size, config.hidden_size)
        self.wpe = embedding(config.seq_len, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_weights(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (s,)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))  # (b, s, h)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (b, s, V)
