"""New memory beyond glibc's mmap threshold: ``CpuRates.fresh_s`` (the page faults of a tensor
mapped afresh), its measured twin, and where the CPU model prices it (the LM head's logits)."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.cost_models.local.compute import head_part
from autopar.cost_models.local.measure import measure_fresh_page_s_per_byte
from autopar.cost_models.local.rates import LOSS_GRADIENT_REFAULT_BYTES, MMAP_THRESHOLD_BYTES, CpuRates
from autopar.cost_models.profile import LayerProfile, ModelProfile

NS = 1e-9


def test_only_tensors_beyond_the_mmap_threshold_pay_and_old_profiles_pay_nothing() -> None:
    rates = dataclasses.replace(CpuRates.placeholders(2), fresh_page_s_per_byte=0.3 * NS)
    assert rates.fresh_s(MMAP_THRESHOLD_BYTES - 4096) == 0.0  # the heap reuses freed memory below it
    assert rates.fresh_s(MMAP_THRESHOLD_BYTES) == pytest.approx(MMAP_THRESHOLD_BYTES * 0.3 * NS)  # mapped
    assert rates.fresh_s(2 * MMAP_THRESHOLD_BYTES) == pytest.approx(2 * MMAP_THRESHOLD_BYTES * 0.3 * NS)
    old = {k: v for k, v in rates.to_dict().items() if k != "fresh_page_s_per_byte"}
    assert CpuRates.from_dict(old).fresh_s(1e9) == 0.0


def test_the_measured_cost_is_a_nonnegative_rate_per_byte() -> None:
    rate = measure_fresh_page_s_per_byte(seconds=0.2)
    assert 0.0 <= rate < 1e-7  # seconds per byte: well below 100 ns, the cost of a 4 KiB page fault each


def _profile(vocab: int) -> ModelProfile:
    layer = LayerProfile(name="block", flops_fwd=0.0, flops_bwd=0.0, param_count=0, hidden_size=64,
                         num_heads=4, seq_len=256, ffn_size=256)
    return ModelProfile(name="gpt", layers=(layer,), seq_len=256, hidden_size=64, vocab_size=vocab,
                        embedding_params=0, embedding_flops_fwd=0.0, head_params=0, head_flops_fwd=0.0,
                        head_flops_bwd=0.0, tied_embeddings=False, dtype="fp32")


@pytest.mark.parametrize("tp", [1, 2])
def test_the_head_pays_for_every_new_logits_tensor_it_writes(tp: int) -> None:
    rate = 0.3 * NS
    rates = dataclasses.replace(CpuRates.placeholders(2), fresh_page_s_per_byte=rate)
    profile, b = _profile(vocab=16384), 6  # logits 6 × 256 × 16384 fp32 = 96 MiB per microbatch
    logit_bytes = 4 * b * 256 * 16384  # a tp = 2 shard: 48 MiB, beyond the threshold too

    def head(r: CpuRates) -> tuple[float, float]:
        times = head_part(profile, rates=r, microbatch_size=b, tp=tp).times
        return times.forward_s, times.backward_input_s

    (fwd, bwd), (fwd0, bwd0) = head(rates), head(dataclasses.replace(rates, fresh_page_s_per_byte=0.0))
    # forward: the head's output (a vocabulary shard under tp); under tp the gathered logits'
    # concatenation; backward: the loss's gradient of the whole logits (the step's trimmed heap,
    # ``loss_gradient_refault_s``) and under tp this rank's slice of it (no merged output: the
    # engine asks the schedule for none)
    expected_fwd = rate * (logit_bytes / tp + (logit_bytes if tp > 1 else 0))
    assert fwd - fwd0 == pytest.approx(expected_fwd)
    assert bwd - bwd0 == pytest.approx(rate * (logit_bytes + (logit_bytes / tp if tp > 1 else 0.0)))


def test_the_loss_gradient_refaults_from_half_the_mmap_threshold() -> None:
    rates = dataclasses.replace(CpuRates.placeholders(2), fresh_page_s_per_byte=0.3 * NS)
    assert rates.loss_gradient_refault_s(LOSS_GRADIENT_REFAULT_BYTES - 4096) == 0.0
    assert rates.loss_gradient_refault_s(LOSS_GRADIENT_REFAULT_BYTES) == pytest.approx(
        LOSS_GRADIENT_REFAULT_BYTES * 0.3 * NS)
    assert LOSS_GRADIENT_REFAULT_BYTES == MMAP_THRESHOLD_BYTES // 2
