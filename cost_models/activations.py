"""Activation memory of one transformer layer: Korthikanti et al. 2022's formulas.

Data flow: ``memory`` (a plan's peak bytes) and ``context_parallel`` (activations of a sequence
shard) call :func:`activation_bytes_per_layer`; it sits below both so neither imports the other
for it.
"""

from __future__ import annotations


def activation_bytes_per_layer(*, seq_len: int, microbatch_size: int, hidden_size: int, num_heads: int,
                               tp: int = 1, recompute: str = "none", sequence_parallel: bool = False,
                               fused_attention: bool = False, bytes_per_element: int = 2) -> float:
    """Korthikanti et al.'s activation bytes of one transformer layer for one microbatch
    ("Reducing Activation Recomputation in Large Transformer Models", 2022, §4 and Table 2).

    none ``sbh(10 + 24/t + 5as/(ht))`` (t = 1: ``sbh(34 + 5as/h)``); with sequence parallelism
    ``sbh(34/t + 5as/(ht))``; selective drops the ``5as/(ht)`` term; full keeps only the
    layer input, ``2sbh`` (÷ t with sequence parallelism).
    """
    s, b, h, a, t = seq_len, microbatch_size, hidden_size, num_heads, tp
    sbh, scale = s * b * h, bytes_per_element / 2
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1) * scale
    scores = 0.0 if recompute == "selective" or fused_attention else 5 * a * s / (h * t)
    per_token = 34 / t if sequence_parallel else 10 + 24 / t
    return sbh * (per_token + scores) * scale
