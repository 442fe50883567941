"""Model states: the bytes of weights, gradients and optimizer state per parameter under ZeRO.

Data flow: a parameter count, the ZeRO stage, the data-parallel degree and how the runtime trains
(:func:`training_states`) → bytes per device; read by the memory model (``memory``), the MoE cost
model (``moe``: expert states), the planner's probes and bounds, and the intra-op ILP's memory row.

Two regimes, as autopar's runtime trains:
* GPU clusters, mixed precision (the Megatron-LM setting the GPU profiles price): 2 bytes of bf16
  weight, 2 of bf16 gradient, 12 of fp32 master weight and Adam's two moments (ZeRO, Rajbhandari
  et al. 2020).
* CPU processes (``local`` clusters): the parameters' own dtype throughout, as ``torch.optim.AdamW``
  keeps its two moments in the parameter dtype: ``b`` bytes of weight, ``b`` of gradient, ``2b`` of
  optimizer state (``b`` = 4 for fp32). Measured on 2 gloo ranks with torch's MemTracker (the
  report's measured twin): parameters, gradients and optimizer state equal to the byte.

ZeRO stage 1 shards the optimizer bytes over ``dp``, 2 also the gradient, 3 also the weight.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of its weight, its gradient and its optimizer state."""

    weight: float
    gradient: float
    optimizer: float


MIXED_PRECISION = StateBytes(weight=2, gradient=2, optimizer=12)
WEIGHT_BYTES_PER_PARAM = MIXED_PRECISION.weight
GRADIENT_BYTES_PER_PARAM = MIXED_PRECISION.gradient
OPTIMIZER_BYTES_PER_PARAM = MIXED_PRECISION.optimizer


def training_states(*, gpu: bool, element_bytes: float) -> StateBytes:
    """How the runtime holds model states: mixed precision on GPUs; on CPUs the parameters' own
    dtype, ``element_bytes`` each (``ModelProfile.bytes_per_element``)."""
    if gpu:
        return MIXED_PRECISION
    return StateBytes(weight=element_bytes, gradient=element_bytes, optimizer=2 * element_bytes)


def state_parts_bytes(num_params: float, *, zero: int = 0, dp: int = 1,
                      states: StateBytes = MIXED_PRECISION) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes of ``num_params`` parameters under ZeRO ``zero``
    over ``dp`` replicas."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero = {zero!r}: expected 0, 1, 2 or 3")
    return (num_params * states.weight / (dp if zero >= 3 else 1),
            num_params * states.gradient / (dp if zero >= 2 else 1),
            num_params * states.optimizer / (dp if zero >= 1 else 1))


def model_state_bytes(num_params: float, *, zero: int = 0, dp: int = 1,
                      states: StateBytes = MIXED_PRECISION) -> float:
    """Weights + gradients + optimizer states of ``num_params`` parameters under ZeRO ``zero`` over ``dp``."""
    return sum(state_parts_bytes(num_params, zero=zero, dp=dp, states=states))
