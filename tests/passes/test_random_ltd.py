"""Random-LTD: schedule formula, exact identity at the end of the schedule, kept-token counts,
gradients against a hand-written gather-run-scatter reference, encoder masks, resumable token
choices, Hugging Face captures (rotary tables gathered for Llama, a Mixture-of-Experts router's
token counts for Mixtral), and cost-model FLOPs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import autopar
from autopar.capture import META_KEY
from autopar.cost_models import ModelProfile, estimate
from autopar.cost_models.token_dropping import ltd_profile
from autopar.passes import PassContext, RandomLTD, run_passes
from autopar.passes.random_ltd import kept_fractions, random_ltd_runtime
from autopar.passes.random_ltd.schedule import (
    kept_tokens,
    layer_token_lr_scheduler,
    layer_tokens_per_step,
    ltd_gather,
    ltd_scatter,
    mean_kept_fraction,
)
from autopar.plans import Plan

B, S, H, V = 2, 32, 32, 128


def _gpt(num_layers=4, seq_len=S):
    torch.manual_seed(0)
    return autopar.models.build("gpt", num_layers=num_layers, hidden_size=H, num_heads=2, vocab_size=V,
                                seq_len=seq_len)


def _ids(seed=1, seq_len=S):
    return torch.randint(0, V, (B, seq_len), generator=torch.Generator().manual_seed(seed))


def _record_kept(gm):
    seen = {}
    random_ltd_runtime(gm).register_forward_hook(lambda mod, args, out: seen.__setitem__(args[1], out))
    return seen


def _loss(logits, ids):
    return F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())


def test_schedule_matches_formula():
    s, low, steps, g = 512, 128, 100, 16
    expect = {0: 128, 33: 240, 50: 320, 99: 496, 100: 512, 10**6: 512}
    for step, k in expect.items():
        assert kept_tokens(step, seq_len=s, min_tokens=low, num_steps=steps, granularity=g) == k
        formula = low + (step * (s - low)) // steps
        if step < steps:
            assert k == max(low, formula - formula % g)
    # never below min_tokens when it is not a multiple of the granularity
    assert kept_tokens(0, seq_len=512, min_tokens=100, num_steps=10, granularity=64) == 100
    assert kept_tokens(3, seq_len=512, min_tokens=100, num_steps=10, granularity=64) == 192
    values = [kept_tokens(t, seq_len=s, min_tokens=low, num_steps=steps, granularity=g) for t in range(120)]
    assert values == sorted(values)
    assert mean_kept_fraction(seq_len=s, min_tokens=low, num_steps=steps, granularity=g) == pytest.approx(
        sum(values[:steps]) / (steps * s))
    assert layer_tokens_per_step(kept=256, seq_len=512, batch_size=4, num_layers=24, num_ltd_layers=22) == \
        4 * (22 * 256 + 2 * 512)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"min_tokens": 0, "num_steps": 10}, "min_tokens"),
    ({"min_tokens": 8, "num_steps": 1.5}, "num_steps"),
    ({"min_tokens": 8, "num_steps": 10, "granularity": -1}, "granularity"),
    ({"min_tokens": 8, "num_steps": 10, "layers": (1, 1)}, "layers"),
    ({"min_tokens": 8, "num_steps": 10, "seed": -3}, "seed"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RandomLTD.{field}"):
        RandomLTD(**kwargs)
    with pytest.raises(TypeError):
        RandomLTD(8, 10)  # keyword-only


def test_pass_errors_say_what_to_do():
    model, ids = _gpt(), _ids()
    with pytest.raises(autopar.passes.PassError, match=r"layers = \(7,\).*expected indices in \[0, 4\)"):
        autopar.transform(model, ids, passes=[RandomLTD(min_tokens=8, num_steps=10, layers=[7])])
    with pytest.raises(autopar.passes.PassError, match="exceeds the sequence length 32"):
        autopar.transform(model, ids, passes=[RandomLTD(min_tokens=40, num_steps=10)])
    with pytest.raises(autopar.passes.PassError, match="needs >= 3, or pass layers"):
        autopar.transform(_gpt(num_layers=2), ids, passes=[RandomLTD(min_tokens=8, num_steps=10)])
    cap = autopar.capture(model, ids)
    gm = run_passes(cap.graph_module, [RandomLTD(min_tokens=8, num_steps=10)], PassContext(captured=cap))
    with pytest.raises(autopar.passes.PassError, match="already applied"):
        run_passes(gm, [RandomLTD(min_tokens=8, num_steps=10)], PassContext(captured=cap))


class _PositionsInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(S, H)
        self.fc = nn.Linear(H, H)

    def forward(self, x):
        return x + self.fc(x + self.pos(torch.arange(x.size(1))))


def test_layers_computing_positions_inside_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(*[_PositionsInside() for _ in range(3)])
    with pytest.raises(autopar.passes.PassError, match="computes positions inside"):
        autopar.transform(model, torch.randn(B, S, H), passes=[RandomLTD(min_tokens=8, num_steps=10)])


def test_end_of_schedule_is_bitwise_the_original():
    model, ids = _gpt(), _ids()
    gm = autopar.transform(model, ids, passes=[RandomLTD(min_tokens=8, num_steps=5)], step=5)
    model.train()
    gm.train()
    ref = model(ids)
    _loss(ref, ids).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = gm(ids)
    _loss(out, ids).backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref_grads, strict=True))
    runtime = random_ltd_runtime(gm)
    runtime.set_step(0)
    assert not torch.equal(gm(ids), ref)  # dropping while the schedule runs
    gm.eval()
    model.eval()
    assert torch.equal(gm(ids), model(ids))  # evaluation keeps every token


def test_layer_sees_round_r_s_tokens_in_causal_order():
    model, ids = _gpt(), _ids()
    r = 0.3
    gm = autopar.transform(model, ids, passes=[RandomLTD(min_tokens=round(r * S), num_steps=100)])
    seen_tokens = {}
    for i, block in enumerate(model.blocks):
        block.attn.qkv.register_forward_pre_hook(
            lambda mod, args, i=i: seen_tokens.__setitem__(i, args[0].shape))
    kept = _record_kept(gm)
    gm.train()
    gm(ids)
    assert seen_tokens == {0: (B, S, H), 1: (B, round(r * S), H), 2: (B, round(r * S), H), 3: (B, S, H)}
    assert random_ltd_runtime(gm).last_kept == {1: round(r * S), 2: round(r * S)}
    for index in kept.values():
        assert index.shape == (B, round(r * S))
        assert torch.equal(index, index.sort(dim=1).values)  # causal order
        assert all(len(set(row.tolist())) == index.shape[1] for row in index)  # without replacement
    assert not torch.equal(kept[1][0], kept[1][1])  # each sample draws its own tokens


def _gpt_reference(model, ids, kept):
    x = model.drop(model.wte(ids) + model.wpe(torch.arange(ids.shape[1])))
    for i, block in enumerate(model.blocks):
        if i in kept:
            index = kept[i][..., None].expand(-1, -1, x.shape[-1])
            x = x.scatter(1, index, block(x.gather(1, index)))
        else:
            x = block(x)
    return model.lm_head(model.ln_f(x))


def test_gradients_match_gather_run_scatter_reference():
    model, ids = _gpt(), _ids()
    gm = autopar.transform(model, ids, passes=[RandomLTD(min_tokens=11, num_steps=100)], step=3)
    kept = _record_kept(gm)
    gm.train()
    _loss(gm(ids), ids).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _loss(_gpt_reference(model, ids, kept), ids).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_dropped_tokens_pass_through_and_get_no_layer_gradient():
    block = _gpt().blocks[1]
    x = torch.randn(B, S, H, requires_grad=True)
    kept = torch.tensor([[1, 4, 5, 20], [0, 2, 30, 31]])
    weight = torch.randn(B, S, H)

    def run(inputs):
        block.zero_grad()
        out = ltd_scatter(inputs, block(ltd_gather(inputs, kept, (1,))), kept)
        (out * weight).sum().backward()
        return out, [p.grad.clone() for p in block.parameters()]

    out, grads = run(x)
    dropped = torch.ones(B, S, dtype=torch.bool)
    dropped[torch.arange(B)[:, None], kept] = False
    assert torch.equal(out[dropped], x[dropped])
    assert torch.equal(x.grad[dropped], weight[dropped])  # identity at dropped positions
    changed = (x.detach() + 5.0 * dropped[..., None]).requires_grad_()
    _, grads_changed = run(changed)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_changed, strict=True))


def test_token_choices_are_reproducible_and_resume_from_a_checkpoint():
    model, ids = _gpt(), _ids()
    config = RandomLTD(min_tokens=8, num_steps=100, seed=7)

    def run(gm, steps):
        kept, runtime = _record_kept(gm), random_ltd_runtime(gm)
        choices = []
        for _ in range(steps):
            gm(ids)
            choices.append({layer: index.clone() for layer, index in kept.items()})
            runtime.advance(B)
        return choices

    first = autopar.transform(model, ids, passes=[config])
    full = run(first, 4)
    assert not torch.equal(full[0][1], full[1][1]) and not torch.equal(full[0][1], full[0][2])
    resumed = autopar.transform(model, ids, passes=[config])
    run(resumed, 2)
    checkpoint = random_ltd_runtime(resumed).state_dict()
    assert checkpoint == {"step": 2, "microbatch": 0, "consumed_layer_tokens": B * (
        2 * 8 + 2 * S) + B * (2 * kept_tokens(1, seq_len=S, min_tokens=8, num_steps=100) + 2 * S)}
    fresh = autopar.transform(model, ids, passes=[config])
    random_ltd_runtime(fresh).load_state_dict(checkpoint)
    later = run(fresh, 2)
    for a, b in zip(full[2:], later, strict=True):
        assert all(torch.equal(a[layer], b[layer]) for layer in a)
    with pytest.raises(ValueError, match="missing"):
        random_ltd_runtime(fresh).load_state_dict({"step": 1})


def test_microbatches_shards_and_recomputation_keep_the_whole_batch_tokens():
    """Choices follow each sample's index in the step's batch: microbatches run in order, a
    shard that starts at ``first_sample``, and a recomputed forward all keep the same tokens."""
    model = _gpt()
    ids = torch.cat([_ids(1), _ids(2)])  # 2·B samples
    gm = autopar.transform(model, ids, passes=[RandomLTD(min_tokens=8, num_steps=100)], step=1)
    runtime, seen = random_ltd_runtime(gm), []
    runtime.register_forward_hook(lambda mod, args, out: seen.append((args[1], out)))

    def kept_by_layer(calls):
        return {layer: torch.cat([out for lay, out in calls if lay == layer]) for layer in (1, 2)}

    gm(ids)
    whole = kept_by_layer(seen)
    seen.clear()
    runtime.set_step(1)
    gm(ids[:B])
    gm(ids[B:])
    assert all(torch.equal(kept_by_layer(seen)[layer], whole[layer]) for layer in whole)
    seen.clear()
    runtime.set_step(1, first_sample=B)
    gm(ids[B:])
    assert all(torch.equal(kept_by_layer(seen)[layer], whole[layer][B:]) for layer in whole)
    seen.clear()
    runtime.set_step(1)
    checkpoint(gm, ids, use_reentrant=False).sum().backward()
    forward, recomputed = seen[:2], seen[2:]
    assert len(recomputed) == 2
    assert all(torch.equal(a[1], b[1]) for a, b in zip(forward, recomputed, strict=True))
    assert all(torch.equal(out, whole[layer]) for layer, out in forward)


def test_lr_follows_consumed_layer_tokens():
    model, ids = _gpt(), _ids()
    gm = autopar.transform(model, ids, passes=[RandomLTD(min_tokens=8, num_steps=4)])
    runtime = random_ltd_runtime(gm)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    per_full_step = runtime.layer_tokens_per_step(B, step=10)
    scheduler = layer_token_lr_scheduler(optimizer, runtime, warmup_layer_tokens=0,
                                         total_layer_tokens=6 * per_full_step, decay="linear")
    for _ in range(3):
        runtime.advance(B)
        optimizer.step()
        scheduler.step()
    consumed = sum(runtime.layer_tokens_per_step(B, step=t) for t in range(3))
    assert runtime.state.consumed_layer_tokens == consumed < 3 * per_full_step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - consumed / (6 * per_full_step))


def _bert_reference(model, ids, mask, kept):
    x = model.word_embeddings(ids) + model.position_embeddings(torch.arange(ids.shape[1]))
    x = model.drop(model.ln_emb(x + model.token_type_embeddings(torch.zeros_like(ids))))
    full = mask[:, None, None, :].bool()
    for i, layer in enumerate(model.layers):
        if i in kept:
            index = kept[i][..., None].expand(-1, -1, x.shape[-1])
            x = x.scatter(1, index, layer(x.gather(1, index), full.gather(3, kept[i][:, None, None, :])))
        else:
            x = layer(x, full)
    return model.decoder(model.head_ln(F.gelu(model.head_dense(x))))


def test_encoder_attention_mask_is_gathered():
    torch.manual_seed(0)
    model = autopar.models.build("bert", num_layers=3, hidden_size=H, num_heads=2, vocab_size=V, seq_len=S)
    ids = _ids()
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 20:] = 0
    gm = autopar.transform(model, ids, example_kwargs={"attention_mask": mask},
                           passes=[RandomLTD(min_tokens=12, num_steps=50)])
    kept = _record_kept(gm)
    gm.train()
    out = gm(ids, attention_mask=mask)
    assert kept[1].shape == (B, 12)
    torch.testing.assert_close(out, _bert_reference(model, ids, mask, kept), rtol=1e-5, atol=1e-5)


def test_cost_model_flops_match_hand_count():
    model, ids = _gpt(), _ids()
    r = 0.5
    cap = autopar.capture(model, ids)
    before = ModelProfile.from_captured(cap, batch_size=B)
    gm = run_passes(cap.graph_module, [RandomLTD(min_tokens=round(r * S), num_steps=100)],
                    PassContext(captured=cap))
    assert kept_fractions(gm, step=0) == {1: r, 2: r}
    profile = ltd_profile(ModelProfile.from_captured(cap, batch_size=B), kept_fractions(gm, step=0))
    full, dropped = 24 * S * H * H + 4 * S * S * H, 24 * r * S * H * H + 4 * (r * S) ** 2 * H
    assert [layer.flops_fwd for layer in profile.layers] == [full, dropped, dropped, full]
    assert [layer.flops_bwd for layer in profile.layers] == [2 * full, 2 * dropped, 2 * dropped, 2 * full]
    assert [layer.seq_len for layer in profile.layers] == [S, r * S, r * S, S]
    # what the transformed graph executes in a training step, gather and scatter included; the math
    # SDPA backend, because FlopCounterMode does not see CPU's fused attention kernel
    gm.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _loss(gm(ids), ids).backward()
    assert counter.get_total_flops() == B * profile.model_flops_per_sequence
    saving = before.model_flops_per_sequence - profile.model_flops_per_sequence
    assert saving == 3 * 2 * (full - dropped)
    plan = Plan.single_device("gpt", graph_fingerprint="x", cluster=autopar.ClusterSpec.parse("local:1"),
                              global_batch_size=B, seq_len=S, num_layers=4)
    assert estimate(plan, profile).step_time_s < estimate(plan, before).step_time_s
    with pytest.raises(ValueError, match=r"kept\[1\] = 1.5"):
        ltd_profile(before, {1: 1.5})




def _hf(name):
    tf = pytest.importorskip("transformers")
    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=V)
    torch.manual_seed(0)
    if name == "gpt2":
        config = tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0,
                               eos_token_id=0)
        return tf.GPT2LMHeadModel(config).eval()
    if name == "bert":
        config = tf.BertConfig(num_hidden_layers=3, max_position_embeddings=64, **small)
        return tf.BertForMaskedLM(config).eval()
    if name == "mixtral":
        config = tf.MixtralConfig(num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=64,
                                  num_local_experts=4, num_experts_per_tok=2, **small)
        return tf.MixtralForCausalLM(config).eval()
    config = tf.LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=64, **small)
    return tf.LlamaForCausalLM(config).eval()


HF_S = 12  # differs from head_dim 16, hidden 64 and batch 2 (export graphs bake sizes)


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "mixtral"])
def test_hf_captures(name):
    model, ids = _hf(name), _ids(seq_len=HF_S)
    mask = torch.ones(B, HF_S, dtype=torch.long)
    mask[1, 9:] = 0
    cap = autopar.capture(model, (ids,), example_kwargs={"attention_mask": mask})
    original = cap.graph_module(ids, attention_mask=mask).logits
    gm = run_passes(cap.graph_module, [RandomLTD(min_tokens=5, num_steps=10)], PassContext(captured=cap))
    assert cap.frontend == "export"
    kept = _record_kept(gm)
    out = gm(ids, attention_mask=mask).logits
    assert out.shape == original.shape and torch.isfinite(out).all()
    assert {layer: index.shape for layer, index in kept.items()} == {1: (B, 5)}
    runtime = random_ltd_runtime(gm)
    if name != "bert":  # causal: keeping a prefix of 7 tokens leaves the logits of those 7 as they were
        with runtime.probing(7):
            prefix = gm(ids, attention_mask=mask).logits
        torch.testing.assert_close(prefix[:, :7], original[:, :7], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(prefix[:, 7:], original[:, 7:])
    runtime.set_step(10)
    assert torch.equal(gm(ids, attention_mask=mask).logits, original)


@pytest.mark.hf
def test_hf_llama_gathers_rotary_tables():
    model, ids = _hf("llama"), _ids(seq_len=HF_S)
    gm = autopar.transform(model, (ids,), passes=[RandomLTD(min_tokens=5, num_steps=10)])
    kept = _record_kept(gm)
    out = gm(ids).logits
    inner = model.model
    x = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(x, position_ids=torch.arange(HF_S)[None])
    causal = torch.ones(HF_S, HF_S, dtype=torch.bool).tril()
    for i, layer in enumerate(inner.layers):
        if i in kept:
            index = kept[i]
            rows = index[..., None].expand(-1, -1, x.shape[-1])
            tables = tuple(t.expand(B, -1, -1).gather(1, index[..., None].expand(-1, -1, t.shape[-1]))
                           for t in (cos, sin))
            mask = causal[index[:, :, None], index[:, None, :]][:, None]
            x = x.scatter(1, rows, layer(x.gather(1, rows), attention_mask=mask, position_embeddings=tables))
        else:
            x = layer(x, attention_mask=causal.expand(B, 1, -1, -1), position_embeddings=(cos, sin))
    torch.testing.assert_close(out, model.lm_head(inner.norm(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.hf
def test_hf_ambiguous_sequence_length_is_refused_and_the_graph_restored():
    model, ids = _hf("llama"), _ids(seq_len=16)  # 16 = head_dim: the export graph's reshapes are ambiguous
    cap = autopar.capture(model, (ids,))
    original = cap.graph_module(ids).logits
    with pytest.raises(autopar.passes.PassError, match="differs from the hidden, head and batch sizes"):
        run_passes(cap.graph_module, [RandomLTD(min_tokens=5, num_steps=10)], PassContext(captured=cap))
    assert random_ltd_runtime(cap.graph_module) is None and kept_fractions(cap.graph_module) == {}
    assert all(META_KEY in node.meta for node in cap.graph_module.graph.nodes)
    assert torch.equal(cap.graph_module(ids).logits, original)


@pytest.mark.hf
def test_hf_bert_padding_mask_is_gathered():
    model, ids = _hf("bert"), _ids(seq_len=HF_S)
    mask = torch.ones(B, HF_S, dtype=torch.long)
    mask[1, 7:] = 0
    gm = autopar.transform(model, (ids,), example_kwargs={"attention_mask": mask},
                           passes=[RandomLTD(min_tokens=5, num_steps=10)])
    kept = _record_kept(gm)
    out = gm(ids, attention_mask=mask).logits
    x = model.bert.embeddings(input_ids=ids)
    full = mask[:, None, None, :].bool().expand(B, 1, HF_S, HF_S)
    for i, layer in enumerate(model.bert.encoder.layer):
        if i in kept:
            index = kept[i]
            rows = index[..., None].expand(-1, -1, x.shape[-1])
            gathered = full.gather(2, index[:, None, :, None].expand(-1, 1, -1, HF_S))
            gathered = gathered.gather(3, index[:, None, None, :].expand(-1, 1, index.shape[1], -1))
            x = x.scatter(1, rows, layer(x.gather(1, rows), attention_mask=gathered))
        else:
            x = layer(x, attention_mask=full)
    torch.testing.assert_close(out, model.cls(x), rtol=1e-5, atol=1e-5)
