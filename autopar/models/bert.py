"""A BERT-style encoder with a masked-LM head, written for clarity.

Part of the built-in zoo (``autopar.models``), which feeds ``autopar.capture``, the
benchmarks and ``autopar capture MODEL``. Word + position + token-type
embeddings, post-LayerNorm layers as in BERT (Devlin et al. 2019), a padding mask
from ``attention_mask``, and the MLM head (dense, GELU, LayerNorm, decoder tied to
the word embeddings). The layers live in one ``nn.ModuleList`` (``layers``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.attention import SelfAttention
from autopar.models.configs import BertConfig
from autopar.models.init import embedding, init_weights


class Layer(nn.Module):
    """One post-LN encoder layer: ln(x + attn(x)), then ln(x + mlp(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config.hidden_size, config.num_heads, config.dropout, causal=False)
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.fc = nn.Linear(config.hidden_size, config.ffn_size)
        self.out = nn.Linear(config.ffn_size, config.hidden_size)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, mask)))  # (b, s, h)
        return self.ln_2(x + self.drop(self.out(F.gelu(self.fc(x)))))  # (b, s, h)


class Bert(nn.Module):
    """``forward(input_ids[b, s], attention_mask=None, token_type_ids=None) -> logits[b, s, V]``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = embedding(config.vocab_size, h)
        self.position_embeddings = embedding(config.seq_len, h)
        self.token_type_embeddings = embedding(config.type_vocab_size, h)
        self.ln_emb = nn.LayerNorm(h, eps=1e-12)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head_dense = nn.Linear(h, h)
        self.head_ln = nn.LayerNorm(h, eps=1e-12)
        self.decoder = nn.Linear(h, config.vocab_size)
        self.decoder.weight = self.word_embeddings.weight
        init_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (s,)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.drop(self.ln_emb(x + self.token_type_embeddings(token_type_ids)))  # (b, s, h)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].to(torch.bool)  # (b, 1, 1, s): True = attend
        for layer in self.layers:
            x = layer(x, mask)
        x = self.head_ln(F.gelu(self.head_dense(x)))  # (b, s, h)
        return self.decoder(x)  # (b, s, V)
