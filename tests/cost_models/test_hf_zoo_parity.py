"""The same computation costs the same whatever graph captured it: a Hugging Face model and the zoo
GPT of the same shape, planned under one pinned plan, get the same predicted step (issue 17).

GPT-2 is the zoo's own shape (HF's Conv1D layers run as ``addmm``; its causal mask is built from
position comparisons, not ``is_causal``). A Llama layer is not a GPT layer (SwiGLU's three
matrices, grouped-query K/V, RMSNorm, rotary), so the zoo cannot build it; it is compared with
the zoo GPT whose matmuls have, by construction, the Llama layer's FLOPs: MLP width
``F = (2h² + 2h·kv + 3hf − 4h²) / 2h`` (computed here by hand from the shapes), and the same
tensor-parallel traffic (two all-reduces of ``b·s·h`` per layer forward). HF models are built from
configs with random weights on ``meta``: nothing is downloaded.
"""

from collections import Counter

import pytest
import torch

import autopar
from autopar.cluster import ClusterSpec
from autopar.planner.intra_op import solve_intra_op

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

TOLERANCE = 0.02  # the bar: a zoo GPT and an HF model of one shape priced within 2 %


def _plan(model, ids, cluster, fix):
    return autopar.plan(model, ids, cluster=cluster, global_batch_size=64, fix=fix)


def _strategies(plan):
    return dict(Counter(sharding.strategy for sharding in plan.shardings))


def _parts(predicted):
    parts = dict(predicted.breakdown)
    return {"step": predicted.step_time_s, "compute": parts["compute"], "tp_comm": parts["tp_comm"]}


def _assert_same_cost(hf, zoo):
    for name, value in _parts(zoo).items():
        assert _parts(hf)[name] == pytest.approx(value, rel=TOLERANCE), name
    assert hf.mfu == pytest.approx(zoo.mfu, rel=TOLERANCE)


def test_hf_gpt2_is_priced_as_the_zoo_gpt2():
    config = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                           use_cache=False)
    with torch.device("meta"):
        hf_model = tf.GPT2LMHeadModel(config)
    zoo_model = autopar.models.build("gpt2", device="meta")
    ids, _ = autopar.models.example_batch(zoo_model, batch_size=1)  # (1, 1024)
    fix = {"dp": 2, "tp": 4, "pp": 1, "microbatch_size": 1, "recompute": "none"}
    hf = _plan(hf_model, ids, "1x8xA100-80GB", fix)
    zoo = _plan(zoo_model, ids, "1x8xA100-80GB", fix)
    assert dict(zoo.predicted.breakdown)["tp_comm"] > 0
    assert _strategies(hf) == _strategies(zoo)  # HF's Conv1D (addmm) sharded as the zoo's nn.Linear
    assert _strategies(hf)["rowwise"] >= 12  # at least every MLP
    _assert_same_cost(hf.predicted, zoo.predicted)


def test_hf_llama_is_priced_as_the_gpt_with_its_flops():
    h, heads, kv_heads, f, layers, vocab, seq = 4096, 32, 8, 14336, 4, 128256, 2048  # Llama-3-8B, 4 layers
    config = tf.LlamaConfig(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            intermediate_size=f, num_hidden_layers=layers, vocab_size=vocab,
                            max_position_embeddings=seq, use_cache=False)
    with torch.device("meta"):
        hf_model = tf.LlamaForCausalLM(config)
    kv = kv_heads * h // heads  # width of K and of V
    attention, swiglu = 2 * h * h + 2 * h * kv, 3 * h * f
    width = (attention + swiglu - 4 * h * h) // (2 * h)
    assert width * 2 * h == attention + swiglu - 4 * h * h  # the shapes chosen make F an integer
    zoo_model = autopar.models.build("gpt", num_layers=layers, hidden_size=h, num_heads=heads,
                                     vocab_size=vocab, seq_len=seq, ffn_size=width, tie_embeddings=False,
                                     device="meta")
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    program = autopar.lower(hf_model, ids, cluster="8x8xH100-80GB")
    by_hand = 2 * seq * (attention + swiglu) + 4 * seq * seq * h  # matmuls, QKᵀ and attention·V
    assert [layer.flops_fwd for layer in program.profile.layers] == [by_hand] * layers
    assert program.profile.causal  # the mask compares positions; HF passes is_causal=False
    fix = {"dp": 8, "tp": 8, "pp": 1, "microbatch_size": 1, "recompute": "none"}
    hf = _plan(hf_model, ids, "8x8xH100-80GB", fix)
    zoo = _plan(zoo_model, ids, "8x8xH100-80GB", fix)
    assert dict(zoo.predicted.breakdown)["tp_comm"] > 0
    _assert_same_cost(hf.predicted, zoo.predicted)
    # every linear sharded as Megatron-LM does: q, k, v, gate, up colwise; o, down rowwise
    assert _strategies(hf) == {"colwise": 5 * layers + 1, "rowwise": 2 * layers, "vocab": 1}
    # the intra-op ILP charges the separate q/k/v (gate/up) one backward all-reduce, as for a fused QKV
    cluster = ClusterSpec.parse("8x8xH100-80GB")
    hf_ilp, zoo_ilp = (solve_intra_op(autopar.lower(m, ids, cluster=cluster).graph_module, tp=8,
                                      cluster=cluster) for m in (hf_model, zoo_model))
    assert hf_ilp.communication_s == pytest.approx(zoo_ilp.communication_s, rel=TOLERANCE)


def test_a_padding_mask_is_not_causal():
    config = tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                           intermediate_size=256, vocab_size=128, max_position_embeddings=64)
    with torch.device("meta"):
        model = tf.BertForMaskedLM(config)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    program = autopar.lower(model, ids, cluster="1x8xA100-80GB")
    assert program.profile.fused_attention and not program.profile.causal
    assert [layer.ffn_size for layer in program.profile.layers] == [256, 256]  # BERT is GPT-shaped


class _GatedBlock(torch.nn.Module):
    """A user's own layer: separate q/k/v, a causal mask from ``tril``, a SwiGLU MLP."""

    def __init__(self, h, heads, f):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(h, h, bias=False) for _ in range(4))
        self.gate, self.up = torch.nn.Linear(h, f, bias=False), torch.nn.Linear(h, f, bias=False)
        self.down = torch.nn.Linear(f, h, bias=False)
        self.norm = torch.nn.RMSNorm(h)

    def forward(self, x):
        b, s, h = x.shape
        y = self.norm(x)
        q, k, v = (p(y).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        y = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


def test_a_hand_written_gated_layer_is_priced_by_its_flops():
    h, heads, f, seq = 64, 4, 96, 16
    model = torch.nn.Sequential(_GatedBlock(h, heads, f), _GatedBlock(h, heads, f))
    program = autopar.lower(model, torch.randn(2, seq, h), cluster="1x8xA100-80GB")
    width = (4 * h * h + 3 * h * f - 4 * h * h) // (2 * h)  # the GPT MLP with the same matmuls
    assert [layer.ffn_size for layer in program.profile.layers] == [width] * 2
    assert program.profile.causal  # from the tril mask
