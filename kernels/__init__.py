"""Fused kernels (Triton, with plain-PyTorch fallbacks), imported as ``autopar.kernels``.

Data flow: the fused-attention pass (``autopar.passes.FusedAttention``) substitutes
:func:`flash_scaled_dot_product_attention` into captured graphs; the runtime executes it, which
runs the FlashAttention-2 (Dao 2023) Triton kernels where :func:`supports` allows and
``scaled_dot_product_attention`` elsewhere. Importing this package never imports Triton.

Layer: above ``model_source``, ``plans`` and ``capture``, below ``cost_models``; imports nothing
of autopar outside this package.
"""

from autopar.kernels.attention import (
    flash_attention,
    flash_scaled_dot_product_attention,
    interpreting,
    sdpa_fallback,
    supports,
    triton_available,
    unsupported_reason,
)
from autopar.kernels.attention_reference import attention_reference

__all__ = [
    "attention_reference", "flash_attention", "flash_scaled_dot_product_attention", "interpreting",
    "sdpa_fallback", "supports", "triton_available", "unsupported_reason",
]
