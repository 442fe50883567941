"""ModelProfile: capture and the analytic GPT agree; Megatron-LM's parameter and FLOP formulas."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopar
from autopar.cost_models import ModelProfile, megatron_plan, stage_costs
from autopar.models import get_config

MEGATRON_NAMES = ("megatron-1.7b", "megatron-18b", "megatron-145b", "megatron-1t")


def _captured(name: str, batch_size: int) -> autopar.Captured:
    model = autopar.models.build(name, device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=batch_size)
    return autopar.capture(model, inputs)


def test_from_captured_matches_the_analytic_gpt() -> None:
    config = get_config("megatron-1.7b")
    captured = ModelProfile.from_captured(_captured("megatron-1.7b", 1), batch_size=1, name="m")
    analytic = ModelProfile.gpt(config, name="m")
    assert len(captured.layers) == config.num_layers
    for got, want in zip(captured.layers, analytic.layers, strict=True):
        fields = ("flops_fwd", "flops_bwd", "param_count", "hidden_size", "num_heads", "seq_len", "ffn_size")
        assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
    for name in ("seq_len", "hidden_size", "vocab_size", "embedding_params", "embedding_flops_fwd",
                 "head_params", "head_flops_fwd", "head_flops_bwd", "tied_embeddings", "fused_attention"):
        assert getattr(captured, name) == getattr(analytic, name), name
    assert captured.param_count == analytic.param_count == autopar.models.param_count(config)
    assert [layer.param_tensors for layer in captured.layers] == [12] * config.num_layers
    assert (captured.embedding_param_tensors, captured.head_param_tensors) == (2, 2)  # the tied head: once
    assert (analytic.embedding_param_tensors, analytic.head_param_tensors) == (2, 2)


def test_an_exported_graph_gives_the_fx_profile() -> None:
    """Exported graphs read weights through ``get_attr`` nodes: their matmuls still own parameters,
    so the MLP width (and with it the transformer pricing) is found as in an fx graph."""
    model = autopar.models.build("megatron-1.7b", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    traced, exported = (ModelProfile.from_captured(autopar.capture(model, inputs, frontend=frontend),
                                                   batch_size=1) for frontend in ("fx", "export"))
    assert exported.layers[0].ffn_size == traced.layers[0].ffn_size == 9216
    shape = ("hidden_size", "num_heads", "seq_len", "ffn_size", "flops_fwd", "flops_bwd", "param_count")
    assert [[getattr(layer, f) for f in shape] for layer in exported.layers] == [
        [getattr(layer, f) for f in shape] for layer in traced.layers]
    assert all(layer.is_transformer for layer in exported.layers)


def test_dtype_comes_from_the_parameters() -> None:
    model = autopar.models.build("gpt-tiny", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    assert ModelProfile.from_captured(autopar.capture(model, inputs), batch_size=1).dtype == "fp32"
    half = autopar.capture(model.to(dtype=torch.bfloat16), inputs)
    assert ModelProfile.from_captured(half, batch_size=1).dtype == "bf16"
    explicit = ModelProfile.from_captured(half, batch_size=1, dtype="fp16")
    assert explicit.dtype == "fp16"  # an explicit choice wins


def test_flops_are_per_sequence_whatever_the_capture_batch() -> None:
    one = ModelProfile.from_captured(_captured("gpt-tiny", 1), batch_size=1)
    three = ModelProfile.from_captured(_captured("gpt-tiny", 3), batch_size=3)
    assert [layer.flops_fwd for layer in one.layers] == [layer.flops_fwd for layer in three.layers]
    assert one.head_flops_fwd == three.head_flops_fwd
    assert dataclasses.replace(one, layers=()) == dataclasses.replace(three, layers=())
    with pytest.raises(ValueError, match="batch_size"):
        ModelProfile.from_captured(_captured("gpt-tiny", 1), batch_size=0)


@pytest.mark.parametrize("name", MEGATRON_NAMES)
def test_megatron_parameter_count(name: str) -> None:
    c = get_config(name)
    n, h, s, vocab = c.num_layers, c.hidden_size, c.seq_len, c.vocab_size
    megatron = 12 * n * h * h * (1 + 13 / (12 * h) + (vocab + s) / (12 * n * h))
    assert ModelProfile.gpt(c).param_count == pytest.approx(megatron + 2 * h, rel=1e-12)  # + final LayerNorm


@pytest.mark.parametrize("name", MEGATRON_NAMES)
def test_megatron_model_and_hardware_flops(name: str) -> None:
    c = get_config(name)
    batch, n, h, s, vocab = 2048, c.num_layers, c.hidden_size, c.seq_len, c.vocab_size
    profile = ModelProfile.gpt(c, fused_attention=False)
    model = 72 * batch * s * n * h * h * (1 + s / (6 * h) + vocab / (12 * n * h))
    assert batch * profile.model_flops_per_sequence == pytest.approx(model, rel=1e-12)
    plan = megatron_plan(name, num_gpus=64, tp=8, pp=2, global_batch_size=batch, recompute="full")
    executed = plan.parallelism.dp * plan.schedule.num_microbatches * sum(
        cost.hardware_flops for cost in stage_costs(plan, profile))
    full_recompute = 96 * batch * s * n * h * h * (1 + s / (6 * h) + vocab / (16 * n * h))
    assert executed == pytest.approx(full_recompute, rel=1e-12)


def test_a_layer_of_unknown_shape_is_not_a_transformer() -> None:
    profile = ModelProfile.gpt(get_config("gpt-tiny"))
    assert all(layer.is_transformer for layer in profile.layers)
    bare = dataclasses.replace(profile.layers[0], num_heads=None)
    assert not bare.is_transformer
    with pytest.raises(ValueError, match="seq_len"):
        dataclasses.replace(profile, seq_len=0)
