"""Compute model: roofline kernels, matmul efficiency, transformer layer times."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.cost_models.compute import (
    KERNEL_LAUNCH_FLOOR_S,
    Kernels,
    device_efficiency,
    matmul_efficiency,
    matmul_time_s,
    memory_time_s,
    transformer_layer_times,
)
from autopar.cost_models.profile import ModelProfile
from autopar.hardware import get_device
from autopar.models import get_config

A100, H100 = get_device("A100-80GB"), get_device("H100-SXM")


def _kernels(b: int = 1, t: int = 1, device=A100) -> Kernels:
    return Kernels(device=device, dtype="bf16", bytes_per_element=2, microbatch_size=b, tp=t)


def _layer(name: str = "megatron-18b", **changes):
    return dataclasses.replace(ModelProfile.gpt(get_config(name)).layers[0], **changes)


def test_h100_reproduces_the_measured_8192_cubed_matmul() -> None:
    n = 8192
    achieved = 2 * n**3 / matmul_time_s(n, n, n, device=H100)
    assert achieved == pytest.approx(798e12, rel=1e-9)  # TECHNIQUES §5, the fitting target


def test_matmul_efficiency_is_smooth_and_grows_with_every_dimension() -> None:
    ceiling = device_efficiency(A100).matmul_peak_fraction
    sizes = [64, 128, 512, 2048, 8192, 65536]
    for axis in range(3):
        values = []
        for size in sizes:
            dims = [4096, 4096, 4096]
            dims[axis] = size
            values.append(matmul_efficiency(*dims, device=A100))
        assert values == sorted(values) and values[-1] < ceiling
    assert matmul_efficiency(128, 128, 128, device=A100) == pytest.approx(ceiling / 4)


def test_roofline_memory_bound_and_launch_floor() -> None:
    assert matmul_time_s(1, 1, 1, device=A100) == KERNEL_LAUNCH_FLOOR_S
    bandwidth = A100.memory_bandwidth_bytes_per_s * device_efficiency(A100).memory_bandwidth_fraction
    assert memory_time_s(1e9, device=A100) == pytest.approx(1e9 / bandwidth)
    assert memory_time_s(0, device=A100) == 0.0
    skinny = matmul_time_s(65536, 8192, 1, device=A100)  # a matrix-vector product
    assert skinny == pytest.approx((65536 * 8192 + 8192 + 65536) * 2 / bandwidth)


def test_fused_attention_reads_o_of_s_h_not_s_squared() -> None:
    layer = _layer("megatron-1.7b", seq_len=16384)
    fused = transformer_layer_times(layer, kernels=_kernels(), fused_attention=True)
    unfused = transformer_layer_times(layer, kernels=_kernels(), fused_attention=False)
    assert fused.forward_s < 0.7 * unfused.forward_s
    short = transformer_layer_times(_layer("megatron-1.7b", seq_len=1024), kernels=_kernels(),
                                    fused_attention=False)
    assert unfused.forward_s / short.forward_s > 16  # 16× the tokens, and s² attention on top


def test_recompute_modes() -> None:
    layer, kernels = _layer(), _kernels(t=8)
    none = transformer_layer_times(layer, kernels=kernels, recompute="none", fused_attention=False)
    full = transformer_layer_times(layer, kernels=kernels, recompute="full", fused_attention=False)
    selective = transformer_layer_times(layer, kernels=kernels, recompute="selective", fused_attention=False)
    flash = transformer_layer_times(layer, kernels=kernels, recompute="selective", fused_attention=True)
    assert none.recompute_s == 0 and flash.recompute_s == 0
    assert full.recompute_s == full.forward_s == none.forward_s
    assert 0 < selective.recompute_s < 0.25 * none.forward_s


def test_tensor_parallelism_divides_the_work() -> None:
    layer = _layer("megatron-145b")
    one = transformer_layer_times(layer, kernels=_kernels(t=1))
    eight = transformer_layer_times(layer, kernels=_kernels(t=8))
    assert 6 < one.forward_s / eight.forward_s < 8
    assert one.backward_s == pytest.approx(2 * one.forward_s, rel=0.2)


def test_a_layer_of_unknown_shape_uses_its_flops() -> None:
    layer = _layer(hidden_size=None)
    times = transformer_layer_times(layer, kernels=_kernels(b=2, t=2), recompute="full")
    peak = A100.peak_flops_per_s_for("bf16") * matmul_efficiency(8192, 8192, 8192, device=A100)
    assert times.forward_s == pytest.approx(layer.flops_fwd * 2 / 2 / peak)
    assert times.recompute_s == times.forward_s
