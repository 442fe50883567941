"""MoE pass on Hugging Face captures (torch.export ATen graphs, random weights from small configs):
GPT-2 (Conv1D addmm) and Llama (gated SwiGLU MLP) upcycled compute the dense function; Mixtral's own
sparse-MoE blocks adopted with layers="existing" compute HF's logits and train."""

import pytest
import torch

import autopar
from autopar.capture import META_KEY
from autopar.passes import MoE, PassContext, run_passes
from autopar.passes.moe import RECORD_KEY, moe_layers, moe_stats
from autopar.passes.moe.hf import GatedExpert

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)
DENSE_TOL = {"atol": 1e-5, "rtol": 0}  # fp32: the same ops on the same weights, summed in another order


def _build(name):
    torch.manual_seed(0)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64, **SMALL))
    return tf.MixtralForCausalLM(tf.MixtralConfig(
        num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4,
        num_experts_per_tok=2, **SMALL))


def _ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize(("name", "mlp"), [("gpt2", "transformer.h.1.mlp"), ("llama", "model.layers.1.mlp")])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_upcycled_hf_model_computes_the_dense_function(name, mlp, mode):
    model, ids = getattr(_build(name), mode)(), _ids()
    with torch.no_grad():
        dense = model(ids).logits
    dense_params = sum(p.numel() for p in model.parameters())
    captured = autopar.capture(model, (ids,))
    mlp_flops = sum(r.flops_fwd for _, r in captured.records() if r.module_path.startswith(mlp))
    gm = run_passes(captured.graph_module, [MoE(num_experts=4, top_k=2, dropless=True)],
                    PassContext(captured=captured))
    with torch.no_grad():
        sparse = _logits(gm(ids))
    torch.testing.assert_close(sparse, dense, **DENSE_TOL)
    nodes = gm.graph.find_nodes(op="call_module", target=f"{mlp}.moe")
    assert len(nodes) == 1 and sorted(moe_layers(gm)) == [1]
    left = [n for n in gm.graph.nodes
            if n.op != "call_module" and n.meta[META_KEY].module_path.startswith(mlp)]
    assert not left  # the block's nodes and parameters are gone
    layer = moe_layers(gm)[1]
    mlp_params = sum(p.numel() for p in layer.experts[0].parameters())
    assert mlp_params == sum(p.numel() for p in model.get_submodule(mlp).parameters())
    assert sum(p.numel() for p in gm.parameters()) == dense_params + 3 * mlp_params + 4 * 64
    assert moe_stats(gm)[1].dropped_assignments == 0
    record = nodes[0].meta[RECORD_KEY]
    assert (record.num_experts, record.top_k, record.tokens, record.capacity) == (4, 2, 32, 32)
    assert nodes[0].meta[META_KEY].flops_fwd == 2 * mlp_flops + 2 * 32 * 64 * 4  # k × block + router


def test_hf_gpt2_dropout_inside_the_block_keeps_working_in_training():
    model = _build("gpt2")
    model.config.resid_pdrop = 0.5
    for block in model.transformer.h:
        block.mlp.dropout.p = 0.5
    ids = _ids()
    gm = autopar.transform(model.train(), (ids,), passes=[MoE(num_experts=2, top_k=1, dropless=True)])
    with torch.no_grad():
        first, second = _logits(gm(ids)), _logits(gm(ids))
    assert not torch.equal(first, second)  # the experts' dropout draws new masks


def test_mixtral_blocks_are_adopted_with_the_same_function_and_train():
    model, ids = _build("mixtral").train(), _ids()  # Mixtral has no dropout: train = eval
    with torch.no_grad():
        reference = model(ids).logits
    gm = autopar.transform(model, (ids,), passes=[MoE(layers="existing")])
    torch.testing.assert_close(_logits(gm(ids)), reference, **DENSE_TOL)
    layers = moe_layers(gm)
    assert sorted(layers) == [0, 1]
    hf_block = model.model.layers[0].mlp
    layer = layers[0]
    assert (layer.num_experts, layer.top_k, layer.dropless) == (4, 2, True)
    assert torch.equal(layer.router.weight, hf_block.gate.weight)
    for e, expert in enumerate(layer.experts):
        assert type(expert) is GatedExpert
        assert torch.equal(expert.gate_up_proj.weight, hf_block.experts.gate_up_proj[e])
        assert torch.equal(expert.down_proj.weight, hf_block.experts.down_proj[e])
        assert expert.gate_up_proj.weight.data_ptr() != hf_block.experts.gate_up_proj.data_ptr()
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    records = gm.meta[RECORD_KEY].nodes
    assert all(r.adopted and r.dropless and r.capacity == r.tokens == 32 for r in records)

    _logits(gm(ids)).square().mean().backward()
    for layer in layers.values():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        used = [e for e, n in enumerate(layer.stats.tokens_per_expert) if n > 0]
        assert used and all(p.grad is not None and p.grad.abs().sum() > 0
                            for e in used for p in layer.experts[e].parameters())
    with torch.no_grad():  # the experts are what computes: scaling one changes the output
        layers[0].experts[used[0]].down_proj.weight.mul_(2)
        assert not torch.allclose(_logits(gm(ids)), reference)


def test_mixtral_misuse_is_explained():
    captured = autopar.capture(_build("mixtral").eval(), (_ids(),))
    gm, ctx = captured.graph_module, PassContext(captured=captured)
    for config, match in [
        (MoE(layers="existing", num_experts=8), "num_experts = 8, but .* has 4 experts"),
        (MoE(layers="existing", top_k=1), "top_k = 1, but .* routes each token to 2"),
        (MoE(num_experts=4), r"already hold sparse-MoE blocks; pass MoE\(layers='existing'\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            config.apply(gm, ctx)
    assert not moe_layers(gm)  # refused before changing the graph
