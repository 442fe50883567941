"""Model states: the bytes of weights, gradients and optimizer state per parameter under ZeRO.

Data flow: a parameter count, the ZeRO stage and the data-parallel degree → bytes per device; read by
the memory model (``memory``), the MoE cost model (``moe``: expert states) and the planner's bounds.
Mixed-precision Adam: 2 bf16 weight, 2 bf16 gradient, 12 fp32 master weight and two moments (ZeRO,
Rajbhandari et al. 2020); ZeRO stage 1 shards the optimizer bytes over ``dp``, 2 also the gradient,
3 also the weight.
"""

from __future__ import annotations

WEIGHT_BYTES_PER_PARAM = 2
GRADIENT_BYTES_PER_PARAM = 2
OPTIMIZER_BYTES_PER_PARAM = 12


def state_parts_bytes(num_params: float, *, zero: int = 0, dp: int = 1) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes of ``num_params`` parameters under ZeRO ``zero``
    over ``dp`` replicas."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero = {zero!r}: expected 0, 1, 2 or 3")
    return (num_params * WEIGHT_BYTES_PER_PARAM / (dp if zero >= 3 else 1),
            num_params * GRADIENT_BYTES_PER_PARAM / (dp if zero >= 2 else 1),
            num_params * OPTIMIZER_BYTES_PER_PARAM / (dp if zero >= 1 else 1))


def model_state_bytes(num_params: float, *, zero: int = 0, dp: int = 1) -> float:
    """Weights + gradients + Adam states of ``num_params`` parameters under ZeRO ``zero`` over ``dp``."""
    return sum(state_parts_bytes(num_params, zero=zero, dp=dp))
