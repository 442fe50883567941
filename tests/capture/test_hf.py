"""Capture of Hugging Face transformers models built from configs (random weights,
nothing downloaded): outputs equal eager, layers found, FLOPs equal FlopCounterMode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import autopar

tf = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)


def _configs():
    return {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
            bos_token_id=0, eos_token_id=0)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(
            num_hidden_layers=2, max_position_embeddings=64, **SMALL)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64, **SMALL)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
            num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64,
            num_local_experts=4, num_experts_per_tok=2, **SMALL)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=128,
            vocab_size=128)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(
            num_hidden_layers=2, image_size=32, patch_size=8, **{
                k: v for k, v in SMALL.items() if k != "vocab_size"})),
    }


def _inputs(name, device="cpu"):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return (torch.randn(2, 3, 32, 32, generator=g).to(device),), {}
    ids = torch.randint(0, 128, (2, 16), generator=g).to(device)
    if name == "t5":
        return (), {"input_ids": ids, "decoder_input_ids": ids[:, :8]}
    return (ids,), {}


EXPECTED_LAYERS = {"gpt2": 2, "bert": 2, "llama": 2, "mixtral": 2, "t5": 4, "vit": 2}


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_hf_capture_matches_eager(name):
    torch.manual_seed(0)
    model = _configs()[name]().eval()
    args, kwargs = _inputs(name)
    cap = autopar.capture(model, args, example_kwargs=kwargs)
    assert cap.frontend == "export"  # fx cannot trace transformers' **kwargs forwards
    assert any("fx failed" in w for w in cap.warnings)
    assert not [w for w in cap.warnings if "not counted" in w]
    with torch.no_grad():
        ref, out = model(*args, **kwargs), cap.graph_module(*args, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert len(cap.layers) == EXPECTED_LAYERS[name]
    assert len({layer.flops_fwd for layer in cap.layers if "decoder" not in layer.name}) == 1
    assert cap.param_count == sum(p.numel() for p in model.parameters())

    # FLOPs equal what PyTorch executes. The reference runs eager attention: CPU's fused
    # SDPA kernel is invisible to FlopCounterMode, eager attention's matmuls are not.
    model.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter:
        model.train()
        model(*args, **kwargs).logits.sum().backward()
    assert cap.flops_per_step == counter.get_total_flops()


@pytest.mark.hf
def test_hf_gpt2_layer_flops_follow_megatron_formula():
    model = _configs()["gpt2"]()
    b, s, h, V = 2, 16, 64, 128
    cap = autopar.capture(model, torch.randint(0, V, (b, s)))
    assert [layer.flops_fwd for layer in cap.layers] == [24 * b * s * h * h + 4 * b * s * s * h] * 2
    assert cap.flops_fwd == sum(layer.flops_fwd for layer in cap.layers) + 2 * b * s * h * V


@pytest.mark.hf
def test_hf_capture_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=4, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
            intermediate_size=4096, vocab_size=32000, use_cache=False))
    cap = autopar.capture(model, torch.randint(0, 32000, (1, 256)).to("meta"))
    assert len(cap.layers) == 4 and cap.flops_fwd > 0
    assert all(p.device.type == "meta" for p in model.parameters())
