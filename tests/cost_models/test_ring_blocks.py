"""Ring attention priced from its measured block kernel: ``CpuRates.ring_blocks`` (the torch block
kernel of ``autopar.kernels.ring_blocks`` timed by ``measure_ring_block_s``), the interpolation of
:meth:`CpuRates.ring_block_s`, its fallback for older profiles, and the ring's layer cost."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.cost_models.local.compute import transformer_layer_part
from autopar.cost_models.local.measure import measure_ring_block_s
from autopar.cost_models.local.rates import CpuRates, ring_block_points
from autopar.cost_models.profile import LayerProfile

NS = 1e-9
POINTS = ((1e4, 1.0, 10 * NS, 20 * NS), (1e6, 1.0, 30 * NS, 40 * NS), (1e4, 0.0, 4 * NS, 6 * NS))


def test_blocks_are_priced_per_score_between_the_measured_sizes_and_clamped_beyond() -> None:
    rates = dataclasses.replace(CpuRates.placeholders(2), ring_blocks=POINTS)
    assert rates.ring_block_s(1e4, causal=True) == pytest.approx((1e4 * 10 * NS, 1e4 * 20 * NS))
    halfway = rates.ring_block_s(1e5, causal=True)  # halfway in log size
    assert halfway == pytest.approx((1e5 * 20 * NS, 1e5 * 30 * NS))
    assert rates.ring_block_s(1e8, causal=True) == pytest.approx((1e8 * 30 * NS, 1e8 * 40 * NS))
    assert rates.ring_block_s(1e2, causal=False) == pytest.approx((1e2 * 4 * NS, 1e2 * 6 * NS))
    assert rates.ring_block_s(0, causal=True) == (0.0, 0.0)


def test_a_profile_without_blocks_prices_math_attention_and_its_recompute() -> None:
    rates = CpuRates.placeholders(2)  # math attention 4 ns forward, 12 ns forward + backward
    assert rates.ring_blocks == ()
    assert rates.ring_block_s(1e6, causal=True) == pytest.approx((4e-3, 8e-3 + 4e-3))
    old = {k: v for k, v in rates.to_dict().items() if k != "ring_blocks"}  # saved before the measurement
    assert CpuRates.from_dict(old).ring_blocks == ()
    assert CpuRates.from_dict(dataclasses.replace(rates, ring_blocks=POINTS).to_dict()).ring_blocks == POINTS


def test_the_measured_block_is_what_the_points_and_the_layer_price() -> None:
    fwd, bwd = measure_ring_block_s(2, 2, 32, 16, causal=True, seconds=0.05)
    half_fwd, half_bwd = measure_ring_block_s(2, 2, 32, 16, causal=False, seconds=0.05)
    assert min(fwd, bwd, half_fwd, half_bwd) > 0
    points = ring_block_points([
        {"scores": 2 * 2 * 32 * 32, "causal": True, "forward_s": fwd, "backward_s": bwd},
        {"scores": 2 * 2 * 32 * 16, "causal": False, "forward_s": half_fwd, "backward_s": half_bwd}])
    rates = dataclasses.replace(CpuRates.placeholders(2), ring_blocks=points)
    assert rates.ring_block_s(2 * 2 * 32 * 32, causal=True) == pytest.approx((fwd, bwd))
    # a cp = 3 causal ring over a 96-token layer: per rank 32 tokens, its own block and two half blocks
    layer = LayerProfile(name="block", flops_fwd=0.0, flops_bwd=0.0, param_count=0, hidden_size=32,
                         num_heads=2, seq_len=32, ffn_size=128)
    without = dataclasses.replace(rates, ring_blocks=())
    new, old = (transformer_layer_part(layer, rates=r, microbatch_size=2, tp=1, bytes_per_element=4,
                                       cp=3).times for r in (rates, without))
    math_fwd, math_bwd = rates.math_attention_s(2 * 2 * 32 * 32 * 2)  # own block and two halves
    merge = rates.elementwise_s("add", 2 * 32 * 32)[0] * 3 * 2  # 3 ops per step after the first
    assert new.forward_s - old.forward_s == pytest.approx(fwd + 2 * half_fwd - math_fwd - merge)
    recomputed = math_bwd + math_fwd  # without measurements the backward recomputes the forward
    assert new.backward_input_s - old.backward_input_s == pytest.approx(bwd + 2 * half_bwd - recomputed)
