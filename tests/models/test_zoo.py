"""The model zoo: every config builds on meta, tiny models run and train, parameter
and FLOP counts follow the published formulas, inputs are deterministic."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from autopar import models
from autopar.models import BertConfig, GPTConfig, build, example_batch, param_count


@pytest.mark.parametrize("name", [name for name, _ in models.list_models()])
def test_every_config_builds_on_meta(name):
    model = build(name, device="meta")  # build time is measured in benchmarks/, not here
    assert all(p.device.type == "meta" for p in model.parameters())
    stack = model.blocks if isinstance(model.config, GPTConfig) else model.layers
    assert isinstance(stack, nn.ModuleList) and len(stack) == model.config.num_layers
    assert sum(p.numel() for p in model.parameters()) == param_count(model.config)


@pytest.mark.parametrize("name, billions", [
    ("gpt3-175b", 175.0), ("megatron-1.7b", 1.7), ("megatron-145b", 145.6),
    ("megatron-530b", 529.6), ("megatron-1t", 1008.0), ("gpt2-xl", 1.5), ("bert-large", 0.34),
])
def test_published_sizes(name, billions):
    count = param_count(models.get_config(name))
    assert count / 1e9 == pytest.approx(billions, rel=0.04)


def test_registry_names_and_sources():
    names = dict(models.list_models())
    gpt3 = ["gpt3-125m", "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b"]
    megatron = ["megatron-1.7b", "megatron-3.6b", "megatron-7.5b", "megatron-18b", "megatron-39b",
                "megatron-76b", "megatron-145b", "megatron-310b", "megatron-530b", "megatron-1t"]
    expected = ["gpt", "bert", "gpt-tiny", "bert-tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
                "bert-base", "bert-large", *gpt3, "gpt3-175b", *megatron]
    assert set(expected) <= set(names)
    assert all(text and "\n" not in text for text in names.values())
    assert all("Table 2.1" in names[n] for n in gpt3) and all("SC'21" in names[n] for n in megatron)
    assert param_count(models.get_config("gpt3-175b")) == pytest.approx(175e9, rel=0.01)
    c = models.get_config("megatron-145b")
    assert (c.num_heads, c.hidden_size, c.num_layers, c.vocab_size, c.seq_len) == (96, 12288, 80, 51200, 2048)
    assert models.get_config("gpt") == models.get_config("gpt-tiny")


def test_gpt_params_follow_megatron_formula():
    for name in ("gpt3-175b", "megatron-39b", "megatron-1t", "gpt2"):
        c = models.get_config(name)
        L, h, V, s = c.num_layers, c.hidden_size, c.vocab_size, c.seq_len
        megatron = 12 * L * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * L * h))
        assert param_count(c) - 2 * h == pytest.approx(megatron, rel=1e-12)  # + final LayerNorm


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_flops_follow_megatron_formula(family, device):
    """Per layer 24bsh² + 4bs²h, logits 2bshV, backward twice the forward (Narayanan et al.).

    FlopCounterMode has no formula for the CPU flash kernel of SDPA (it would count 0),
    so CPU runs use the math backend, whose two bmms are counted; meta needs nothing.
    """
    b, s, h, V, L = 2, 16, 64, 96, 3
    model = build(family, num_layers=L, hidden_size=h, num_heads=4, vocab_size=V, seq_len=s, device=device)
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    stack, head = ("GPT.blocks", "GPT.lm_head") if family == "gpt" else ("Bert.layers", "Bert.decoder")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        logits = model(ids)
    per_module = {name: sum(ops.values()) for name, ops in forward.get_flop_counts().items()}
    for i in range(L):
        assert per_module[f"{stack}.{i}"] == 24 * b * s * h * h + 4 * b * s * s * h
    assert per_module[head] == 2 * b * s * h * V
    mlm_dense = 0 if family == "gpt" else 2 * b * s * h * h
    layers = L * (24 * b * s * h * h + 4 * b * s * s * h)
    assert forward.get_total_flops() == layers + 2 * b * s * h * V + mlm_dense
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as backward:
        logits.sum().backward()
    assert backward.get_total_flops() == 2 * forward.get_total_flops()


@pytest.mark.parametrize("name", ["gpt-tiny", "bert-tiny"])
def test_tiny_models_run_and_learn(name):
    torch.manual_seed(0)
    model = build(name)
    inputs, targets = example_batch(model, batch_size=4)
    logits = model(inputs)
    assert logits.shape == (4, model.config.seq_len, model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tied_embeddings_and_init():
    torch.manual_seed(0)
    gpt = build("gpt-tiny")
    assert gpt.lm_head.weight is gpt.wte.weight
    assert gpt.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert gpt.wte.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert gpt.wpe.weight.abs().max().item() < 0.2 and gpt.wpe.weight.requires_grad
    assert torch.count_nonzero(gpt.blocks[0].attn.qkv.bias) == 0
    untied = build("gpt-tiny", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


def _tiny_calls():
    torch.manual_seed(0)
    gpt = build("gpt-tiny").eval()
    gpt_ids, _ = example_batch(gpt, batch_size=2, seq_len=12)
    bert = build("bert-tiny").eval()
    bert_ids, _ = example_batch(bert, batch_size=2, seq_len=12)
    mask = torch.ones_like(bert_ids)
    mask[0, 8:] = 0
    types = torch.zeros_like(bert_ids)
    types[:, 6:] = 1
    return [(gpt, (gpt_ids,), {}), (bert, (bert_ids,), {}),
            (bert, (bert_ids,), {"attention_mask": mask, "token_type_ids": types})]


def test_fx_symbolic_trace_matches_eager():
    for model, args, kwargs in _tiny_calls():
        absent = {name: None for name in ("attention_mask", "token_type_ids")
                  if isinstance(model, models.Bert) and name not in kwargs}
        gm = torch.fx.symbolic_trace(model, concrete_args=absent)
        assert any(node.op == "call_function" and node.target is F.scaled_dot_product_attention
                   for node in gm.graph.nodes)
        torch.testing.assert_close(gm(*args, **kwargs), model(*args, **kwargs), rtol=0, atol=0)


def test_torch_export_matches_eager():
    for model, args, kwargs in _tiny_calls():
        program = torch.export.export(model, args, kwargs, strict=False)
        torch.testing.assert_close(program.module()(*args, **kwargs), model(*args, **kwargs))


def test_bert_padding_mask_hides_padded_keys():
    torch.manual_seed(0)
    model = build("bert-tiny").eval()
    ids = torch.randint(0, 100, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 100
    first = model(ids, attention_mask=mask)[0, :5]
    second = model(changed, attention_mask=mask)[0, :5]
    torch.testing.assert_close(first, second)  # padded positions do not reach real tokens
    assert not torch.allclose(model(ids)[0, :5], model(changed)[0, :5])


def test_example_batch():
    gpt = build("gpt-tiny")
    inputs, targets = example_batch(gpt, batch_size=3, seq_len=10, seed=7)
    again, _ = example_batch(gpt, batch_size=3, seq_len=10, seed=7)
    other, _ = example_batch(gpt, batch_size=3, seq_len=10, seed=8)
    assert inputs.shape == targets.shape == (3, 10) and inputs.dtype == torch.long
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # next-token targets
    bert = build("bert-tiny")
    masked_inputs, masked_targets = example_batch(bert, batch_size=4)
    mask_id = bert.config.vocab_size - 1
    is_masked = masked_targets != -100
    assert is_masked.any(dim=1).all()
    assert (masked_inputs[is_masked] == mask_id).all() and (masked_inputs[~is_masked] != mask_id).all()
    again_inputs, again_targets = example_batch(bert, batch_size=4)
    assert torch.equal(masked_inputs, again_inputs) and torch.equal(masked_targets, again_targets)
    assert masked_inputs.shape == (4, bert.config.seq_len)
    meta_inputs, meta_targets = example_batch(build("gpt3-175b", device="meta"), batch_size=2)
    assert meta_inputs.device.type == "meta" and meta_inputs.shape == (2, 2048)
    assert meta_targets.dtype == meta_inputs.dtype == torch.long


def test_build_dtype_and_dropout():
    model = build("gpt-tiny", dtype=torch.bfloat16, device="meta")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.manual_seed(0)
    model = build("gpt-tiny", dropout=0.5)
    ids, _ = example_batch(model, batch_size=2)
    assert not torch.equal(model.train()(ids), model(ids))  # dropout active in training
    assert torch.equal(model.eval()(ids), model(ids))


@pytest.mark.parametrize("call, error, message", [
    (lambda: build("gpt-5"), ValueError, "unknown model 'gpt-5'; known models: gpt, bert"),
    (lambda: build("gpt2", hidden=3), TypeError, "no field(s) ['hidden']"),
    (lambda: build("gpt", hidden_size=65, num_heads=4), ValueError, "not divisible by num_heads"),
    (lambda: build("gpt", num_layers=0), ValueError, "num_layers = 0 is invalid"),
    (lambda: build("bert", dropout=1.5), ValueError, "dropout = 1.5 is invalid"),
    (lambda: build("gpt", ffn_size=-1), ValueError, "or 0 for 4 × hidden_size"),
    (lambda: build("gpt", tie_embeddings="yes"), ValueError, "expected True or False"),
    (lambda: build("gpt", dtype=torch.long), ValueError, "floating-point torch.dtype"),
    (lambda: build("gpt", device="cdua"), ValueError, "device = 'cdua' is invalid"),
    (lambda: build("bert-tiny", tie_embeddings=False), TypeError, "valid fields: ['num_layers'"),
    (lambda: example_batch(build("gpt-tiny"), 0), ValueError, "batch_size = 0 is invalid"),
    (lambda: example_batch(build("gpt-tiny"), 1, 33), ValueError, "seq_len <= 32"),
    (lambda: example_batch(torch.nn.Linear(2, 2), 1), TypeError, "needs a zoo model"),
])
def test_errors(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_configs_are_frozen_and_keyword_only():
    config = GPTConfig(num_layers=3)
    assert config.ffn_size == 4 * config.hidden_size
    with pytest.raises(AttributeError):
        config.num_layers = 4
    with pytest.raises(TypeError):
        BertConfig(2)
