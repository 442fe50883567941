"""The context-parallel graph rewrite (autopar.runtime.cp_rewrite) in one process: what it replaces in
a hand-written attention model and the zoo GPT, that the capture itself is left alone, and what it
refuses (with the node and the fix). Running the rewritten graphs on 2 and 4 gloo ranks against one
process is tests/distributed/test_context_parallel_runtime.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.capture.annotate import flat_inputs
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.plans.pinned import plan_from_fix
from autopar.runtime.cp_rewrite import (
    RECORD_KEY,
    GlobalPositions,
    context_parallel_graph,
    rewrite_for_plan,
    ring_attention_modules,
)
from autopar.runtime.sequence_shard import SequenceShard, check_passes, local_example
from tests.helpers.distributed.cp_workers import HandWrittenLM

LOCAL = 8  # the models are captured at this local length (seq 16 over cp 2)


def _rewrite(model, ids=None, *, cp=2, rank=0):
    ids = torch.randint(0, 64, (2, LOCAL), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    program = autopar.lower(model, ids)
    gm = program.graph_module
    example = flat_inputs(gm, program.captured.example_args, program.captured.example_kwargs)
    return gm, context_parallel_graph(gm, local_seq_len=LOCAL, cp=cp, rank=rank, group=None,
                                      example_inputs=example)


def _targets(gm):
    return [getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in gm.graph.nodes]


def test_hand_written_attention_becomes_ring_attention_and_the_mask_goes():
    torch.manual_seed(0)
    gm, new = _rewrite(HandWrittenLM(layers=2), rank=1)
    record = new.meta[RECORD_KEY]
    assert [causal for _, causal in record.attention] == [True, True] and record.local_seq_len == LOCAL
    assert len(ring_attention_modules(new)) == 2 and len(record.positions) == 1
    names = _targets(new)
    assert not {"softmax", "tril", "ones", "masked_fill", "masked_fill_"} & set(names), names
    assert {"softmax", "tril"} <= set(_targets(gm)) and RECORD_KEY not in gm.meta  # the capture is unchanged
    positions = GlobalPositions(cp=2, rank=1)(torch.arange(LOCAL))
    assert positions.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # chunks 1 and 2 of 4


def test_sdpa_attention_of_the_zoo_gpt():
    _, new = _rewrite(autopar.models.build("gpt", num_layers=2))
    assert [causal for _, causal in new.meta[RECORD_KEY].attention] == [True, True]
    assert "scaled_dot_product_attention" not in _targets(new)


class _Attention(nn.Module):
    """One attention layer whose score path is chosen by ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.qkv = kind, nn.Linear(16, 48)
        pattern = torch.rand(LOCAL, LOCAL, generator=torch.Generator().manual_seed(0)) > 0.5
        self.register_buffer("pattern", pattern | torch.eye(LOCAL, dtype=torch.bool))

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (b, 1, s, 16)
        t = x.shape[1]
        if self.kind == "arbitrary":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.pattern[:t, :t])
        if self.kind == "dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
        if self.kind == "padding":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool())
        scores = q @ k.transpose(-2, -1) / math.sqrt(16)
        if self.kind == "alibi":
            causal = torch.triu(torch.full((t, t), float("-inf")), 1)
            scores = scores + -torch.arange(t).float()[None, :] + causal
        elif self.kind == "unrecognised":
            scores = torch.tanh(scores)
        return torch.softmax(scores, dim=-1) @ v


class _Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.layers = nn.ModuleList([_Attention(kind)])

    def forward(self, ids, mask=None):
        return self.layers[0](self.emb(ids), mask)


@pytest.mark.parametrize(("kind", "message"), [
    ("arbitrary", r"neither causal nor empty.*causal mask built from the sequence length, or cp = 1"),
    ("dropout", r"dropout \(p = 0.1\).*set the attention dropout to 0 or use cp = 1"),
    ("alibi", r"adds a bias to the scores.*use cp = 1"),
    ("unrecognised", r"\(softmax\): its pattern is not recognised.*softmax\(Q·Kᵀ·scale \+ causal mask\)·V"),
])
def test_what_cannot_run_under_cp_is_refused_by_node_with_the_fix(kind, message):
    with pytest.raises(ValueError, match=r"context parallelism cannot run attention \w+ .*" + message):
        _rewrite(_Model(kind))


def test_a_mask_read_from_an_input_is_refused():
    ids = torch.randint(0, 64, (2, LOCAL))
    program = autopar.lower(_Model("padding"), (ids, torch.ones(2, LOCAL)))
    gm = program.graph_module
    example = flat_inputs(gm, program.captured.example_args, program.captured.example_kwargs)
    with pytest.raises(ValueError, match=r"mask depends on the values of input mask.*pass no attention mask"):
        context_parallel_graph(gm, local_seq_len=LOCAL, cp=2, rank=0, group=None, example_inputs=example)


def test_sequences_that_do_not_split_into_2cp_chunks_and_random_ltd_are_refused():
    with pytest.raises(ValueError, match=r"sequence length 10 does not split into 2·cp = 4"):
        local_example((torch.zeros(2, 10),), seq_len=10, cp=2)
    fix = r"random-LTD .*context parallelism \(cp = 2\).*drop the RandomLTD pass or use cp = 1"
    with pytest.raises(ValueError, match=fix):
        check_passes(["fused_attention", "random_ltd"], cp=2)
    check_passes(["random_ltd"], cp=1)


def test_sequence_shard_cuts_only_sequence_tensors_after_the_rows():
    shard = SequenceShard(seq_len=8, cp=2, rank=1)
    ids = torch.arange(16).view(2, 8)
    assert shard.shard(ids).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert shard.shard(torch.zeros(2, 3)).shape == (2, 3) and shard.global_shape((4, 4, 5)) == (4, 8, 5)
    cut = local_example(((ids,), {"flag": torch.zeros(2)}), seq_len=8, cp=2)
    assert cut[0][0].shape == (2, 4) and cut[1]["flag"].shape == (2,)


def test_an_engine_given_the_full_length_capture_is_told_how_to_build_it():
    model = autopar.models.build("gpt", num_layers=2)
    ids = torch.randint(0, 64, (2, 2 * LOCAL))
    program = autopar.lower(model, ids)
    plan = plan_from_fix("gpt", graph_fingerprint=program.fingerprint, num_layers=2,
                         cluster=ClusterSpec.parse("local:2"), fix=Fix.from_dict({"cp": 2}),
                         global_batch_size=2, seq_len=2 * LOCAL)
    with pytest.raises(ValueError, match=r"seq/cp = 8 tokens, but this capture has 16.*start_engine"):
        rewrite_for_plan(program.captured, plan, layout=None)
