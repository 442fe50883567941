"""Fused attention, as a graph pass: ``autopar.passes.FusedAttention``.

Data flow: ``FusedAttention()`` → ``transform.fused_attention_pass`` finds attention however it is
written (``patterns``: SDPA, softmax(QKᵀ)V, Hugging Face eager and SDPA attention) and replaces each by
one ``autopar.kernels.flash_attention`` node (``rewrite``), recording what it left alone and why.
"""

from autopar.passes.fused_attention.transform import (
    AttentionRecord,
    FusedAttention,
    FusedAttentionRecord,
    fused_attention_nodes,
    fused_attention_pass,
    fused_attention_record,
)

__all__ = ["AttentionRecord", "FusedAttention", "FusedAttentionRecord", "fused_attention_nodes",
           "fused_attention_pass", "fused_attention_record"]
