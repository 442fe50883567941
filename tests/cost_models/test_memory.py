"""Memory model: Korthikanti's activation formulas, ZeRO model states, in-flight microbatches, plans."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.cost_models import megatron_plan
from autopar.cost_models.megatron import megatron_profile
from autopar.cost_models.memory import (
    WORKSPACE_BYTES,
    activation_bytes_per_layer,
    in_flight_microbatches,
    model_state_bytes,
    peak_memory_bytes,
    plan_memory,
)

S, B, H, A = 2048, 4, 6144, 64  # Korthikanti et al.'s 22B layer


def _act(**kw) -> float:
    return activation_bytes_per_layer(seq_len=S, microbatch_size=B, hidden_size=H, num_heads=A, **kw)


@pytest.mark.parametrize("t", [1, 2, 8])
def test_korthikanti_activation_formulas_exactly(t: int) -> None:
    sbh, scores = S * B * H, 5 * A * S / (H * t)
    assert _act(tp=t) == pytest.approx(sbh * (10 + 24 / t + scores), rel=1e-15)
    assert _act(tp=t, sequence_parallel=True) == pytest.approx(sbh * (34 / t + scores), rel=1e-15)
    assert _act(tp=t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t), rel=1e-15)
    assert _act(tp=t, recompute="selective", sequence_parallel=True) == pytest.approx(sbh * 34 / t)
    assert _act(tp=t, recompute="full") == 2 * sbh
    if t == 1:
        assert _act() == pytest.approx(sbh * (34 + 5 * A * S / H), rel=1e-15)
    assert _act(tp=t, fused_attention=True) == pytest.approx(sbh * (10 + 24 / t))
    assert _act(tp=t, bytes_per_element=4) == pytest.approx(2 * _act(tp=t))


def test_model_states_per_zero_level() -> None:
    p, d = 1e9, 8
    assert model_state_bytes(p) == 16 * p
    assert model_state_bytes(p, zero=1, dp=d) == pytest.approx(4 * p + 12 * p / d)
    assert model_state_bytes(p, zero=2, dp=d) == pytest.approx(2 * p + 14 * p / d)
    assert model_state_bytes(p, zero=3, dp=d) == pytest.approx(16 * p / d)
    with pytest.raises(ValueError, match="zero"):
        model_state_bytes(p, zero=4)


def test_in_flight_microbatches_per_schedule() -> None:
    p, m, v = 8, 32, 4
    assert in_flight_microbatches("gpipe", pp=p, rank=3, num_microbatches=m) == m
    assert [in_flight_microbatches("1f1b", pp=p, rank=r, num_microbatches=m) for r in range(p)] == [
        8, 7, 6, 5, 4, 3, 2, 1]
    assert in_flight_microbatches("1f1b", pp=p, rank=0, num_microbatches=3) == 3
    assert in_flight_microbatches("zero_bubble", pp=p, rank=2, num_microbatches=m) == p - 2
    first = in_flight_microbatches("interleaved", pp=p, rank=0, num_microbatches=m, virtual_stages=v)
    assert first == pytest.approx(p * (1 + (p - 1) / (p * v)))  # Korthikanti's interleaving factor
    with pytest.raises(ValueError, match="schedule"):
        in_flight_microbatches("dualpipe", pp=p, rank=0, num_microbatches=m)


def test_megatron_145b_fits_and_stages_are_skewed() -> None:
    plan = megatron_plan("megatron-145b", num_gpus=1536, tp=8, pp=8, global_batch_size=2304)
    profile = megatron_profile("megatron-145b")
    memory = plan_memory(plan, profile)
    peaks = peak_memory_bytes(plan, profile)
    assert len(peaks) == plan.world_size == 1536
    assert max(peaks) < 80 * 2**30
    first, last = memory[plan.stages[0].devices[0]], memory[plan.stages[-1].devices[0]]
    assert first.logits_bytes == 0 < last.logits_bytes
    assert last.logits_bytes == 4 * 2048 * 51200 / 8
    assert first.activations_bytes > last.activations_bytes  # 1F1B: the first rank holds the most
    layers = profile.num_layers // plan.parallelism.pp
    stored = _act_for(profile, recompute="full") * layers
    working = _act_for(profile, recompute="none")
    p, v = plan.parallelism.pp, plan.schedule.virtual_stages
    assert first.activations_bytes == pytest.approx(stored * p * (1 + (p - 1) / (p * v)) + working)
    assert min(peaks) > WORKSPACE_BYTES


def _act_for(profile, *, recompute: str) -> float:
    layer = profile.layers[0]
    return activation_bytes_per_layer(seq_len=layer.seq_len, microbatch_size=1, hidden_size=layer.hidden_size,
                                      num_heads=layer.num_heads, tp=8, recompute=recompute)


def test_zero_shards_model_states() -> None:
    plan = megatron_plan("megatron-7.5b", num_gpus=128, tp=4, pp=1, global_batch_size=512)
    profile = megatron_profile("megatron-7.5b")
    peaks = {zero: max(peak_memory_bytes(dataclasses.replace(plan, zero=zero), profile)) for zero in range(4)}
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]
