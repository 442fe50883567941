"""The model zoo: every config builds on meta, tiny models run and train, parameter
and FLOP counts follow the published formulas, inputs are deterministic."""

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from autopar import models
from autopar.models import BertConfig, GPTConfig, build, example_batch, param_count


@pytest.mark.parametrize("name", [name for name, _ in models.list_models()])
def test_every_config_builds_on_meta(name):
    start = time.perf_counter()
    model = build(name, device="meta")
    assert time.perf_counter() - start < 5.0
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == param_count(model.config)


@pytest.mark.parametrize("name, billions", [
    ("gpt3-175b", 175.0), ("megatron-1.7b", 1.7), ("megatron-145b", 145.6),
    ("megatron-530b", 529.6), ("megatron-1t", 1008.0), ("gpt2-xl", 1.5), ("bert-large", 0.34),
])
def test_published_sizes(name, billions):
    count = param_count(models.get_config(name))
    assert count / 1e9 == pytest.approx(billions, rel=0.04)


def test_gpt_params_follow_megatron_formula():
    for name in ("gpt3-175b", "megatron-39b", "megatron-1t", "gpt2"):
        c = models.get_config(name)
        L, h, V, s = c.num_layers, c.hidden_size, c.vocab_size, c.seq_len
        megatron = 12 * L * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * L * h))
        assert param_count(c) - 2 * h == pytest.approx(megatron, rel=1e-12)  # + final LayerNorm


def test_gpt_flops_follow_megatron_formula():
    """Per layer 24bsh² + 4bs²h, logits 2bshV, backward twice the forward (Narayanan et al.)."""
    b, s, h, V, L = 2, 16, 64, 96, 3
    model = build("gpt", num_layers=L, hidden_size=h, num_heads=4, vocab_size=V, seq_len=s,
                  device="meta")
    ids = torch.zeros(b, s, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as forward:
        logits = model(ids)
    assert forward.get_total_flops() == L * (24 * b * s * h * h + 4 * b * s * s * h) + 2 * b * s * h * V
    with FlopCounterMode(display=False) as backward:
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
    assert torch.count_nonzero(gpt.blocks[0].attn.qkv.bias) == 0
    untied = build("gpt-tiny", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


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
    meta_inputs, _ = example_batch(build("gpt3-175b", device="meta"), batch_size=2)
    assert meta_inputs.device.type == "meta" and meta_inputs.shape == (2, 2048)


@pytest.mark.parametrize("call, error, message", [
    (lambda: build("gpt-5"), ValueError, "unknown model 'gpt-5'; known models: gpt, bert"),
    (lambda: build("gpt2", hidden=3), TypeError, "no field(s) ['hidden']"),
    (lambda: build("gpt", hidden_size=65, num_heads=4), ValueError, "not divisible by num_heads"),
    (lambda: build("gpt", num_layers=0), ValueError, "num_layers = 0 is invalid"),
    (lambda: build("bert", dropout=1.5), ValueError, "dropout = 1.5 is invalid"),
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
