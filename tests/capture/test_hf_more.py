"""More Hugging Face architectures a user would try: capture works, the graph computes
what eager does, and the repeated layers are found (random weights, nothing downloaded)."""

import pytest
import torch

import autopar

tf = pytest.importorskip("transformers")

S = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128,
         num_hidden_layers=2)

CASES = {
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **S)), 2),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **S)), 2),
    "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=16, **S)), 2),
    "phi3": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **S)), 2),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**S)), 2),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(
        hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=128, num_hidden_layers=2,
        word_embed_proj_dim=64, pad_token_id=0)), 2),
    "roberta": (lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(pad_token_id=1, **S)), 2),
    "distilbert": (lambda: tf.DistilBertForMaskedLM(tf.DistilBertConfig(
        dim=64, n_heads=4, hidden_dim=128, vocab_size=128, n_layers=2)), 2),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(
        hidden_size=64, n_head=4, vocab_size=128, n_layer=2)), 2),
    "falcon": (lambda: tf.FalconForCausalLM(tf.FalconConfig(
        hidden_size=64, num_attention_heads=4, vocab_size=128, num_hidden_layers=2)), 2),
    "gptj": (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(
        n_embd=64, n_head=4, vocab_size=128, n_layer=2, rotary_dim=8, bos_token_id=0,
        eos_token_id=0)), 2),
    "qwen2_moe": (lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=4, num_experts_per_tok=2, **S)), 2),
    "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2, vocab_size=128)), 4),
}


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(CASES))
def test_architecture_captures(name):
    factory, num_layers = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cap = autopar.capture(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(cap.layers) == num_layers
    assert cap.flops_fwd > 0 and not [w for w in cap.warnings if "not counted" in w]
