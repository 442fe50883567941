"""Grouped-query attention in the profile (``LayerProfile.kv_heads``, read from a captured graph's K/V
projection widths) and in ring attention's transfers (``context_parallel.ring_shape``): a Llama layer
with 8 key/value heads of 32 sends a quarter of the K/V bytes a full-head layer would. The HF model
is built from a config with random weights on ``meta``: nothing is downloaded."""

import dataclasses

import pytest
import torch

from autopar.capture import capture
from autopar.cost_models.context_parallel import ring_shape
from autopar.cost_models.profile import ModelProfile
from autopar.models import get_config

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


def _llama_profile() -> ModelProfile:
    config = tf.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=1000,
                            max_position_embeddings=128, use_cache=False)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    ids = torch.zeros(1, 64, dtype=torch.long, device="meta")
    return ModelProfile.from_captured(capture(model, (ids,)), batch_size=1)


def test_llama_kv_heads_are_read_from_the_graph_and_quarter_the_ring_blocks():
    profile = _llama_profile()
    layer = profile.layers[0]
    assert (layer.num_heads, layer.kv_heads, layer.hidden_size) == (32, 8, 512)
    full = dataclasses.replace(layer, kv_heads=None)  # as priced before: K/V with every query head
    for tp in (1, 2, 4):
        gqa, mha = (ring_shape(x, microbatch_size=2, tp=tp, cp=2, bytes_per_element=2) for x in (layer, full))
        assert gqa.kv_heads == 8 // tp and mha.kv_heads == 32 // tp
        assert gqa.kv_block_bytes == mha.kv_block_bytes / 4
        assert gqa.grad_block_bytes == mha.grad_block_bytes / 4
    # FLOPs unchanged: the narrower K/V stay folded into the GPT-equivalent MLP width
    # f' = (2h² + 2h·kv + 3hf − 4h²) / 2h with h 512, kv 128, f 1024
    assert layer.ffn_size == (2 * 512**2 + 2 * 512 * 128 + 3 * 512 * 1024 - 4 * 512**2) // (2 * 512) == 1152


def test_full_head_attention_keeps_every_head():
    gpt = ModelProfile.gpt(get_config("gpt2"))
    assert all(layer.kv_heads == layer.num_heads == 12 for layer in gpt.layers)
    shape = ring_shape(gpt.layers[0], microbatch_size=1, tp=1, cp=2, bytes_per_element=2)
    assert shape.kv_heads == shape.num_heads == 12
