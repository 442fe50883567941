"""The fused-attention pass: every attention of the Hugging Face GPT-2, BERT, Llama, Mixtral, T5
and ViT graphs (eager and SDPA attention, random weights from configs, nothing downloaded) and
of the zoo GPT/BERT becomes one FlashAttention-2 node, run by Triton's CPU interpreter, and a
training step's outputs and gradients are unchanged; hand-written patterns (masked_fill, where,
pre-scaled queries, 3-D bmm, nn.Dropout, grouped-query SDPA) are folded into SDPA's arguments;
attention that cannot be fused is reported with its reason."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import autopar
from autopar.capture import META_KEY
from autopar.cost_models import ModelProfile
from autopar.kernels import triton_available
from autopar.passes import FusedAttention, PassContext, RandomLTD, run_passes
from autopar.passes.fused_attention import fused_attention_nodes, fused_attention_record
from autopar.passes.fused_attention.patterns import find_attention
from tests.helpers.nanogpt import NanoGPT

# The interpreter evaluates exp2((s − m)·log₂e) in numpy; finfo.min masks overflow to −inf there
# (the intended zero probability) and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

# fp32 models: the kernel sums in a different order than eager softmax/matmul.
TOLERANCE = dict(atol=2e-5, rtol=2e-5)
SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Fused nodes run the Triton kernels on CPU (SDPA when Triton is absent); set per test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _hf_models():
    tf = pytest.importorskip("transformers")
    return {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(
            num_hidden_layers=2, max_position_embeddings=32, attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0, **SMALL)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=32, **SMALL)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
            num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=32, num_local_experts=2,
            num_experts_per_tok=1, **SMALL)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            num_layers=1, num_decoder_layers=1, d_model=32, d_kv=16, num_heads=2, d_ff=64, vocab_size=64,
            dropout_rate=0.0)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(
            num_hidden_layers=2, image_size=16, patch_size=8, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **{k: v for k, v in SMALL.items() if k != "vocab_size"})),
    }


EXPECTED_FUSED = {"gpt2": 2, "bert": 2, "llama": 2, "mixtral": 2, "t5": 3, "vit": 2}  # T5: self, self, cross
EXPECTED_GROUPS = {"llama": 2, "mixtral": 2}


def _hf(name, implementation):
    torch.manual_seed(0)
    model = _hf_models()[name]()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation
    return model.train()


def _hf_inputs(name):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return (torch.randn(2, 3, 16, 16, generator=g),), {}
    ids = torch.randint(0, 64, (2, 11), generator=g)
    if name == "t5":
        return (), {"input_ids": ids, "decoder_input_ids": ids[:, :7]}
    return (ids,), {}


def _step(module, args, kwargs, params):
    """Logits and gradients of a training step; counts the fused op's FLOPs (proof that it ran)."""
    with FlopCounterMode(display=False) as counter:
        out = module(*args, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        grads = torch.autograd.grad(logits.float().pow(2).mean(), params, allow_unused=True)
    ops = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    return logits, grads, ops


def _assert_same_step(reference, fused):
    torch.testing.assert_close(fused[0], reference[0], **TOLERANCE)
    for got, want in zip(fused[1], reference[1], strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, **TOLERANCE)
    if triton_available():
        assert {"autopar.flash_attention", "autopar.flash_attention_backward"} <= fused[2]


@pytest.mark.hf
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(EXPECTED_FUSED))
def test_hf_attention_fused_and_training_step_unchanged(name, implementation):
    model = _hf(name, implementation)
    args, kwargs = _hf_inputs(name)
    params = list(model.parameters())
    reference = _step(model, args, kwargs, params)
    gm = autopar.transform(model, args, example_kwargs=kwargs, passes=[FusedAttention()])
    record = fused_attention_record(gm)
    assert len(fused_attention_nodes(gm)) == len(record.replaced) == EXPECTED_FUSED[name]
    assert not record.skipped and not find_attention(gm)
    assert all(e.kernel_note == "" and e.kv_groups == EXPECTED_GROUPS.get(name, 1) for e in record.replaced)
    _assert_same_step(reference, _step(gm, args, kwargs, params))


def _zoo(name):
    torch.manual_seed(0)
    if name == "nanogpt":
        return NanoGPT(layers=2, h=32, n=2, block=16, vocab=64)
    return autopar.models.build(name, num_layers=2, hidden_size=32, num_heads=2, vocab_size=64, seq_len=16)


@pytest.mark.parametrize("name", ["gpt", "bert", "nanogpt"])
def test_zoo_and_nanogpt_fx_graphs_fused(name):
    model = _zoo(name).train()
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    padding = (torch.arange(13) < torch.tensor([[13], [9]])).long()  # the second sequence is padded
    kwargs = {"attention_mask": padding} if name == "bert" else {}
    params = list(model.parameters())
    reference = _step(model, (ids,), kwargs, params)
    cap = autopar.capture(model, ids, example_kwargs=kwargs)
    gm = run_passes(cap.graph_module, [FusedAttention()], PassContext(captured=cap))
    assert cap.frontend == "fx" and len(fused_attention_nodes(gm)) == 2
    assert [e.mask for e in fused_attention_record(gm).replaced] == [
        {"gpt": "none", "bert": "bool", "nanogpt": "bool"}[name]] * 2
    _assert_same_step(reference, _step(gm, (ids,), kwargs, params))


class Written(nn.Module):
    """Attention written out in one of several styles (``style``), q/k/v from one projection."""

    def __init__(self, style: str, heads: int = 2, kv_heads: int = 2) -> None:
        super().__init__()
        self.style, self.heads, self.kv_heads = style, heads, kv_heads
        self.qkv = nn.Linear(32, 16 * (heads + 2 * kv_heads))
        self.drop = nn.Dropout(0.5)
        self.router = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([16 * self.heads, 16 * self.kv_heads, 16 * self.kv_heads], dim=-1)
        q = q.view(b, s, self.heads, 16).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, 16).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, 16).transpose(1, 2)
        gate = torch.softmax(self.router(x), dim=-1)  # a router: softmax, but not attention
        if self.style == "sdpa_gqa_causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return y.transpose(1, 2).reshape(b, s, -1) * gate.sum(-1, keepdim=True)
        if self.style == "bmm_3d":
            q3, k3, v3 = (t.reshape(b * self.heads, s, 16) for t in (q, k, v))
            p = torch.softmax(torch.bmm(q3, k3.permute(0, 2, 1)) * 0.25, dim=-1)
            return torch.bmm(p, v3).view(b, self.heads, s, 16).transpose(1, 2).reshape(b, s, -1)
        if self.style == "prescaled_where":
            scores = torch.where(keep, (q * 0.25) @ k.transpose(-2, -1), float("-inf"))
        elif self.style == "div_additive":
            bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
            scores = q @ k.transpose(-2, -1) / math.sqrt(16) + bias
        else:  # "masked_fill_finite"
            scores = (q @ k.transpose(2, 3) * 0.25).masked_fill(~keep, -1e9)
        p = self.drop(F.softmax(scores, dim=-1))
        if self.style == "returns_probs":
            return p @ v, p
        if self.style == "head_mask":
            return (p * 0.5) @ v
        return (p @ v).transpose(1, 2).reshape(b, s, -1)


WRITTEN = {"prescaled_where": "bool", "div_additive": "additive", "masked_fill_finite": "additive",
           "bmm_3d": "none", "sdpa_gqa_causal": "none"}


def _keep(s=9):
    keep = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[..., 0] = True  # no fully masked row: a finite masked_fill equals an additive mask only then
    return keep


@pytest.mark.parametrize("style", sorted(WRITTEN))
def test_written_out_attention_folded_into_sdpa_arguments(style):
    torch.manual_seed(0)
    model = Written(style, kv_heads=1 if style == "sdpa_gqa_causal" else 2).eval()
    x, keep = torch.randn(2, 9, 32), _keep()
    params = list(model.parameters())
    reference = _step(model, (x, keep), {}, params)
    gm = autopar.transform(model, (x, keep), passes=[FusedAttention()])
    (entry,) = fused_attention_record(gm).entries  # the router softmax is not attention
    assert entry.replaced and entry.mask == WRITTEN[style]
    _assert_same_step(reference, _step(gm, (x, keep), {}, params))
    if style not in ("sdpa_gqa_causal", "bmm_3d"):  # nn.Dropout's rate is read at run time
        assert entry.dropout == "drop"
        gm.train()
        torch.manual_seed(0)
        assert not torch.allclose(gm(x, keep), reference[0], **TOLERANCE)


@pytest.mark.parametrize("style, reason", [("returns_probs", "2 users"),
                                           ("head_mask", "before the value matmul")])
def test_attention_that_cannot_be_fused_is_left_alone_with_a_reason(style, reason):
    model = Written(style).eval()
    x, keep = torch.randn(2, 9, 32), _keep()
    gm = autopar.transform(model, (x, keep), passes=[FusedAttention()])
    (entry,) = fused_attention_record(gm).entries
    assert not entry.replaced and reason in entry.reason and not fused_attention_nodes(gm)
    torch.testing.assert_close(gm(x, keep), model(x, keep))


def test_composes_with_random_ltd_and_runs_once():
    """Fused nodes carry records and shapes that random-LTD's rewrite and fake-tensor probe accept,
    in either order; a second FusedAttention finds nothing left to fuse."""
    model, ids = _zoo("gpt").eval(), torch.randint(0, 64, (2, 16))
    want = model(ids)
    for passes in ([FusedAttention(), RandomLTD(min_tokens=8, num_steps=4, layers=(1,))],
                   [RandomLTD(min_tokens=8, num_steps=4, layers=(1,)), FusedAttention()]):
        gm = autopar.transform(model, ids, passes=passes, step=4)  # step 4: every token kept
        assert len(fused_attention_nodes(gm)) == 2
        torch.testing.assert_close(gm(ids), want, **TOLERANCE)
    gm = FusedAttention().apply(gm, PassContext())
    assert fused_attention_record(gm).entries == () and len(fused_attention_nodes(gm)) == 2


def test_config_validates_and_can_spare_sdpa_calls():
    with pytest.raises(ValueError, match="FusedAttention.sdpa"):
        FusedAttention(sdpa="yes")
    gm = autopar.transform(_zoo("gpt"), torch.randint(0, 64, (2, 8)), passes=[FusedAttention(sdpa=False)])
    assert not fused_attention_nodes(gm)
    assert [e.reason for e in fused_attention_record(gm).entries] == ["FusedAttention(sdpa=False)"] * 2


@pytest.mark.hf
def test_records_drop_score_tensors_and_cost_model_sees_fused_attention():
    """The (b, h, s, s) scores and probabilities leave the graph; the fused node keeps the FLOPs
    of what it replaced and reads/writes O(s·h) bytes; ModelProfile detects fused attention."""
    model = _hf("gpt2", "eager")
    args, _ = _hf_inputs("gpt2")
    cap = autopar.capture(model, args)
    flops_before = sum(n.meta[META_KEY].flops_fwd for n in cap.graph_module.graph.nodes)
    assert not ModelProfile.from_captured(cap, batch_size=2).fused_attention
    gm = run_passes(cap.graph_module, [FusedAttention()], PassContext(captured=cap))
    records = [n.meta[META_KEY] for n in gm.graph.nodes]
    assert sum(r.flops_fwd for r in records) == flops_before
    assert not [r for r in records if (2, 2, 11, 11) in r.shapes]
    for node in fused_attention_nodes(gm):
        record = node.meta[META_KEY]
        assert record.shapes == ((2, 2, 11, 16),) and record.bytes_written == 2 * 2 * 11 * 16 * 4
    assert ModelProfile.from_captured(cap, batch_size=2).fused_attention


@pytest.mark.hf
def test_hf_attention_dropout_kept_in_training_graphs():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                             attn_pdrop=0.25, bos_token_id=0, eos_token_id=0)).train()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    gm = autopar.transform(model, ids, passes=[FusedAttention()])
    (node,) = fused_attention_nodes(gm)
    assert node.kwargs["dropout_p"] == 0.25 and fused_attention_record(gm).replaced[0].dropout == "0.25"
    torch.manual_seed(5)
    first = gm(ids).logits
    torch.manual_seed(5)
    torch.testing.assert_close(gm(ids).logits, first)  # the kernel's seed comes from torch's generator
