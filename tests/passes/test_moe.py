"""MoE pass: upcycled zoo GPT and BERT compute the dense function, capacity and dropping
arithmetic, balance and z losses on hand-made routings, layer selection, config errors, and
gradients to experts and routers through the transformed graph."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.capture import META_KEY
from autopar.passes import MoE, PassError
from autopar.passes.moe import RECORD_KEY, moe_aux_loss, moe_layers, moe_stats
from autopar.passes.moe.layer import MoELayer, balance_loss, expert_capacity, route, z_loss

B, S, H, V = 2, 16, 32, 64
NO_DROP = {"capacity_factor": 4.0, "eval_capacity_factor": 4.0}  # E / k = 4: capacity = tokens


def _model(name, num_layers=4):
    torch.manual_seed(0)
    return autopar.models.build(name, num_layers=num_layers, hidden_size=H, num_heads=2, vocab_size=V,
                                seq_len=S)


def _inputs(name):
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    if name == "bert":
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, S - 3:] = 0
        return (ids, mask)
    return (ids,)


def _moe_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MoELayer)]


@pytest.mark.parametrize("name", ["gpt", "bert"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_upcycled_model_computes_the_dense_function(name, mode):
    model, inputs = _model(name), _inputs(name)
    getattr(model, mode)()
    with torch.no_grad():
        dense = model(*inputs)
    gm = autopar.transform(model, inputs, passes=[MoE(num_experts=8, top_k=2, **NO_DROP)])
    getattr(gm, mode)()
    with torch.no_grad():
        sparse = gm(*inputs)
        again = model(*inputs)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    assert torch.equal(again, dense)  # the original model is untouched
    nodes = _moe_nodes(gm)
    assert sorted(moe_layers(gm)) == [1, 3] == [n.meta[META_KEY].layer for n in nodes]
    stats = moe_stats(gm)
    assert all(s.dropped_assignments == 0 and sum(s.tokens_per_expert) == B * S * 2 for s in stats.values())
    linears = [n.target for n in gm.graph.nodes if n.op == "call_module"
               and type(gm.get_submodule(n.target)) is nn.Linear]
    ffn = ("mlp.fc", "mlp.proj") if name == "gpt" else (".fc", ".out")
    stack = "blocks" if name == "gpt" else "layers"
    for layer in range(4):
        kept = [t for t in linears if t.startswith(f"{stack}.{layer}.") and t.endswith(ffn)]
        assert len(kept) == (0 if layer in (1, 3) else 2), (layer, kept)
    record = nodes[0].meta[RECORD_KEY]
    assert (record.num_experts, record.top_k, record.capacity_factor, record.tokens) == (8, 2, 4.0, B * S)
    assert record.capacity == B * S and record.expected_tokens_per_expert == B * S * 2 / 8
    path = "blocks.1.mlp.moe" if name == "gpt" else "layers.1.moe"
    assert nodes[0].meta[META_KEY].module_path == record.module_path == path
    assert gm.meta[RECORD_KEY].layers == (1, 3)


def test_capacity_and_dropping_on_a_hand_made_routing():
    assert expert_capacity(6, 3, 1, 1.0) == 2
    assert expert_capacity(10, 8, 2, 1.25) == math.ceil(1.25 * 10 * 2 / 8) == 4
    # top-1: tokens 0, 1, 3, 4 prefer expert 0, token 2 expert 1, token 5 expert 2; capacity 2
    winner = torch.tensor([0, 0, 1, 0, 0, 2])
    logits = F.one_hot(winner, 3).float() * 5
    routing = route(logits, 1, expert_capacity(6, 3, 1, 1.0))
    assert routing.kept[:, 0].tolist() == [True, True, True, False, False, True]
    # top-2, capacity 2: first choices of all tokens are placed before any second choice
    logits = torch.tensor([[3.0, 2, 0, 0], [3, 2, 0, 0], [2, 3, 0, 0], [0, 3, 2, 0]])
    routing = route(logits, 2, expert_capacity(4, 4, 2, 1.0))
    assert routing.capacity == 2
    assert routing.experts.tolist() == [[0, 1], [0, 1], [1, 0], [1, 2]]
    # expert 0: first choices of tokens 0, 1 fill it, token 2's second choice is dropped;
    # expert 1: first choices of tokens 2, 3 fill it, second choices of tokens 0, 1 are dropped
    assert routing.kept.tolist() == [[True, False], [True, False], [True, False], [True, True]]
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(4))

    # through the layer: identity experts, x one-hot, router = 5·I; tokens 3, 4 lose their only slot
    layer = MoELayer([nn.Identity() for _ in range(3)], 3, top_k=1, capacity_factor=1.0,
                     eval_capacity_factor=1.0, aux_loss_weight=0.0, z_loss_weight=0.0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3) * 5)
    x = F.one_hot(winner, 3).float()
    out = layer(x)
    assert layer.stats.capacity == 2
    assert layer.stats.dropped_assignments == layer.stats.dropped_tokens == 2
    assert layer.stats.routed_per_expert == (4, 1, 1) and layer.stats.tokens_per_expert == (2, 1, 1)
    assert out[3].abs().sum() == 0 and out[4].abs().sum() == 0
    torch.testing.assert_close(out[[0, 1, 2, 5]], x[[0, 1, 2, 5]])  # top-1 weight renormalized to 1


def test_balance_and_z_loss_values_on_a_hand_made_routing():
    logits = torch.tensor([[2.0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 3]])
    routing = route(logits, 1, capacity=4)
    rows = [[math.exp(v) for v in row] for row in logits.tolist()]
    probs = [[v / sum(row) for v in row] for row in rows]
    mean_p = [sum(p[i] for p in probs) / 4 for i in range(3)]
    f = [2 / 4, 1 / 4, 1 / 4]
    by_hand = 3 * sum(fi * pi for fi, pi in zip(f, mean_p, strict=True))
    assert balance_loss(routing).item() == pytest.approx(by_hand, rel=1e-6)
    assert z_loss(logits).item() == pytest.approx(sum(math.log(sum(row)) ** 2 for row in rows) / 4, rel=1e-6)
    # top-2: f counts all T·k assignments, so a uniform router scores exactly 1
    uniform = route(torch.zeros(8, 4), 2, capacity=8)
    counts = torch.bincount(uniform.experts.reshape(-1), minlength=4).float() / 16
    assert balance_loss(uniform).item() == pytest.approx(4 * (counts * 0.25).sum().item())
    assert balance_loss(uniform).item() == pytest.approx(1.0)

    layer = MoELayer([nn.Identity() for _ in range(3)], 3, top_k=1, capacity_factor=2.0,
                     eval_capacity_factor=2.0, aux_loss_weight=0.5, z_loss_weight=0.25)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))
    layer(logits)  # x = logits, router = I: the same routing
    expected = 0.5 * balance_loss(routing) + 0.25 * z_loss(logits)
    torch.testing.assert_close(layer.last_aux_loss, expected)


@pytest.mark.parametrize(("layers", "expected"), [
    ("every_other", [1, 3, 5]), ("second_half", [3, 4, 5]), ((0, 4), [0, 4]), ([5, 2], [2, 5]),
])
def test_layer_selection(layers, expected):
    model, inputs = _model("gpt", num_layers=6), _inputs("gpt")
    gm = autopar.transform(model, inputs, passes=[MoE(num_experts=2, top_k=1, layers=layers)])
    assert sorted(moe_layers(gm)) == expected
    assert [n.meta[META_KEY].layer for n in _moe_nodes(gm)] == expected


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_experts": 1}, "MoE.num_experts = 1"),
    ({"top_k": 3, "num_experts": 2}, r"MoE.top_k = 3 .*\[1, num_experts = 2\]"),
    ({"capacity_factor": 0}, "MoE.capacity_factor = 0 .*> 0"),
    ({"eval_capacity_factor": float("nan")}, "MoE.eval_capacity_factor = nan"),
    ({"aux_loss_weight": -1.0}, "MoE.aux_loss_weight = -1.0"),
    ({"z_loss_weight": True}, "MoE.z_loss_weight = True"),
    ({"upcycle": 1}, "MoE.upcycle = 1 .*True"),
    ({"seed": -1}, "MoE.seed = -1"),
    ({"layers": "odd"}, "MoE.layers = 'odd' .*'every_other', 'second_half'"),
    ({"layers": (1, 1)}, r"MoE.layers = \(1, 1\) .*distinct"),
    ({"layers": ()}, r"MoE.layers = \(\) .*e.g. \(1, 3\)"),
])
def test_bad_configs_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(**kwargs)


def test_out_of_range_layers_and_repeated_pass_are_rejected():
    model, inputs = _model("gpt", num_layers=2), _inputs("gpt")
    with pytest.raises(PassError, match=r"layer\(s\) \[4\].*\[0, 2\)"):
        autopar.transform(model, inputs, passes=[MoE(layers=(0, 4))])
    gm = autopar.transform(model, inputs, passes=[MoE(num_experts=2)])
    with pytest.raises(ValueError, match="already applied"):
        MoE(num_experts=2).apply(gm, autopar.passes.PassContext())


def test_gradients_reach_experts_and_router():
    model, inputs = _model("gpt"), _inputs("gpt")
    gm = autopar.transform(model, inputs, passes=[MoE(num_experts=4, top_k=2, capacity_factor=1.0)])
    gm.train()
    logits = gm(*inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), inputs[0].roll(-1, 1).flatten())
    aux = moe_aux_loss(gm)
    assert aux.item() > 0
    (loss + aux).backward()
    for layer in moe_layers(gm).values():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        used = [e for e, n in enumerate(layer.stats.tokens_per_expert) if n > 0]
        assert used
        for e in used:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts[e].parameters())
    assert model.blocks[0].mlp.fc.weight.grad is not None  # untouched layers still train


def test_from_scratch_experts_differ_and_are_seeded():
    model, inputs = _model("gpt", num_layers=2), _inputs("gpt")
    first = moe_layers(autopar.transform(model, inputs, passes=[MoE(num_experts=2, upcycle=False)]))[1]
    second = moe_layers(autopar.transform(model, inputs, passes=[MoE(num_experts=2, upcycle=False)]))[1]
    w = [e.fc.weight for e in first.experts]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[0], model.blocks[1].mlp.fc.weight)
    assert torch.equal(w[0], second.experts[0].fc.weight)
    assert torch.equal(first.router.weight, second.router.weight)
