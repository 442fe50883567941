"""MoE variants on the zoo GPT: the DTS gate (temperature schedule, dense routing above the
threshold, top-1 after the switch, seeded noise, its step counter as a PassRuntime), Residual-MoE
and Pyramid-MoE (shapes, parameter counts, dense function at upcycling, annotations), and the
config's errors."""

import math

import pytest
import torch
from torch import nn

import autopar
from autopar.capture import META_KEY
from autopar.passes import MoE, PassError
from autopar.passes.moe import RECORD_KEY, moe_layers, moe_runtime
from autopar.passes.moe.gates import DTSGate, MoERuntime, dts_route, dts_temperature, gumbel_noise
from autopar.passes.moe.layer import MoELayer
from autopar.runtime.pass_state import PassRuntime

B, S, H, V = 2, 16, 32, 64
DENSE_TOL = {"atol": 1e-5, "rtol": 0}  # fp32: experts are copies of the MLP, weights sum to 1


def _gpt(num_layers=4):
    torch.manual_seed(0)
    return autopar.models.build("gpt", num_layers=num_layers, hidden_size=H, num_heads=2, vocab_size=V,
                                seq_len=S)


def _ids():
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))


def _dense_and_moe(config, *, num_layers=4, mode="eval"):
    model, ids = _gpt(num_layers), _ids()
    getattr(model, mode)()
    with torch.no_grad():
        dense = model(ids)
    gm = autopar.transform(model, (ids,), passes=[config])
    getattr(gm, mode)()
    return model, ids, dense, gm


def test_dts_temperature_is_linear_then_constant():
    schedule = {"start": 2.0, "end": 0.3, "anneal_steps": 100}
    assert dts_temperature(0, **schedule) == 2.0
    assert dts_temperature(50, **schedule) == pytest.approx(1.15)
    assert dts_temperature(99, **schedule) == pytest.approx(2.0 - 1.7 * 0.99)
    assert dts_temperature(100, **schedule) == dts_temperature(10_000, **schedule) == 0.3


def test_dts_route_keeps_weights_above_threshold_summing_to_one():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    noise = gumbel_noise(logits.shape, seed=3, device=logits.device)
    routing = dts_route(logits, temperature=2.0, threshold=0.05, noise=noise)
    assert routing.experts.shape == routing.weights.shape == routing.kept.shape == (64, 8)
    assert routing.capacity == 64 and torch.equal(routing.kept, routing.routed)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(64))
    assert (routing.weights[routing.kept] >= 0.05).all() and (routing.weights[~routing.kept] == 0).all()
    assert (routing.kept.sum(-1) > 1).float().mean() > 0.9  # dense: most tokens use several experts
    assert torch.equal(noise, gumbel_noise(logits.shape, seed=3, device=logits.device))
    assert not torch.equal(noise, gumbel_noise(logits.shape, seed=4, device=logits.device))
    cold = dts_route(logits * 100, temperature=0.3, threshold=0.05)  # sharp: only the best survives
    assert cold.kept.sum(-1).eq(1).all() and cold.weights[:, 0].eq(1).all()


def test_dts_gate_goes_from_dense_to_top1_and_keeps_the_dense_function():
    config = MoE(gate="dts", num_experts=4, layers=(1,), dts_anneal_steps=10, dts_threshold=0.02)
    model, ids, dense, gm = _dense_and_moe(config, mode="train")  # the zoo GPT has dropout 0
    layer, runtime = moe_layers(gm)[1], moe_runtime(gm)
    assert isinstance(layer.gate, DTSGate) and layer.gate.runtime is runtime and layer.top_k == 1
    with torch.no_grad():
        early = gm(ids)
    stats = layer.stats
    assert sum(stats.routed_per_expert) > 2 * B * S and stats.dropped_assignments == 0
    torch.testing.assert_close(early, dense, **DENSE_TOL)
    runtime.set_step(10)
    with torch.no_grad():
        late = gm(ids)
    assert sum(layer.stats.tokens_per_expert) <= B * S == sum(layer.stats.routed_per_expert)
    assert layer.stats.capacity == math.ceil(1.25 * B * S / 4)
    logits = layer.router(torch.randn(5, H))
    assert layer.route(logits).experts.shape == (5, 1)
    assert late.shape == dense.shape
    record = gm.graph.find_nodes(op="call_module", target="blocks.1.mlp.moe")[0].meta[RECORD_KEY]
    assert (record.gate, record.top_k) == ("dts", 1)


def test_dts_noise_depends_on_step_layer_and_call():
    runtime = MoERuntime(step=3)
    first = runtime.noise_seed(0, layer=1)
    assert runtime.noise_seed(0, layer=1) != first  # second call in the step
    assert runtime.noise_seed(0, layer=2) != first
    runtime.set_step(3)
    assert runtime.noise_seed(0, layer=1) == first
    runtime.set_step(3, first_sample=8)
    assert runtime.noise_seed(0, layer=1) != first
    runtime.set_step(4)
    assert runtime.noise_seed(0, layer=1) != first


def test_moe_runtime_is_a_pass_runtime_with_int_state():
    gm = autopar.transform(_gpt(2), (_ids(),), passes=[MoE(gate="dts", num_experts=2)], step=5)
    runtime = moe_runtime(gm)
    assert isinstance(runtime, PassRuntime) and runtime is gm.moe
    assert runtime.state_dict() == {"step": 5}
    runtime.advance(B)
    assert runtime.state_dict() == {"step": 6}
    runtime.load_state_dict({"step": torch.tensor(2)})
    assert runtime.step == 2
    assert not [k for k in gm.state_dict() if k.startswith("moe.")]  # the graph's state stays the model's
    with pytest.raises(ValueError, match="no 'step'"):
        runtime.load_state_dict({})
    assert moe_runtime(autopar.transform(_gpt(2), (_ids(),), passes=[MoE(num_experts=2)])) is None


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_residual_moe_keeps_the_dense_function_and_adds_one_mlp(mode):
    config = MoE(num_experts=4, residual=True, layers=(1, 3), dropless=True)
    model, ids, dense, gm = _dense_and_moe(config, mode=mode)
    with torch.no_grad():
        out = gm(ids)
    torch.testing.assert_close(out, dense, **DENSE_TOL)
    layer = moe_layers(gm)[1]
    assert layer.top_k == 1 and layer.dense is not None and layer.coefficient.weight.shape == (2, H)
    mlp = sum(p.numel() for p in model.blocks[1].mlp.parameters())
    assert sum(p.numel() for p in layer.parameters()) == (4 + 1) * mlp + 4 * H + (2 * H + 2)
    node = gm.graph.find_nodes(op="call_module", target="blocks.1.mlp.moe")[0]
    assert node.meta[RECORD_KEY].residual and node.meta[RECORD_KEY].top_k == 1
    assert node.meta[META_KEY].param_bytes == 4 * sum(p.numel() for p in layer.parameters())
    block_flops = 2 * (2 * B * S * H * 4 * H)  # fc and proj of the dense MLP
    assert node.meta[META_KEY].flops_fwd >= 2 * block_flops  # top-1 expert + dense branch


def test_residual_gradients_reach_dense_branch_and_mixer():
    gm = autopar.transform(_gpt(2), (_ids(),), passes=[MoE(num_experts=2, residual=True, layers=(1,))])
    gm.train()
    gm(_ids()).square().mean().backward()
    layer = moe_layers(gm)[1]
    for module in (layer.dense, layer.coefficient, layer.router):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_pyramid_moe_has_one_expert_count_per_layer():
    config = MoE(layers=(3, 1), num_experts=(8, 4), top_k=2, dropless=True)
    assert config.layers == (1, 3) and config.num_experts == (4, 8)  # paired, then sorted
    model, ids, dense, gm = _dense_and_moe(config)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), dense, **DENSE_TOL)
    layers = moe_layers(gm)
    assert {i: m.num_experts for i, m in layers.items()} == {1: 4, 3: 8}
    records = gm.meta[RECORD_KEY].nodes
    assert [(r.layer, r.num_experts, r.capacity) for r in records] == [(1, 4, B * S), (3, 8, B * S)]
    assert [r.expected_tokens_per_expert for r in records] == [B * S * 2 / 4, B * S * 2 / 8]
    mlp = sum(p.numel() for p in model.blocks[1].mlp.parameters())
    assert [sum(p.numel() for p in m.experts.parameters()) for m in layers.values()] == [4 * mlp, 8 * mlp]


def test_pyramid_counts_must_match_the_chosen_layers():
    with pytest.raises(PassError, match=r"gives 2 counts, but MoE.layers = 'every_other' chose 3 layers"):
        autopar.transform(_gpt(6), (_ids(),), passes=[MoE(num_experts=(4, 8))])


def test_moe_layer_gate_hook_and_dropless_capacity():
    calls = []

    def gate(layer, logits):
        calls.append(layer)
        return dts_route(logits, temperature=1.0, threshold=0.0)

    layer = MoELayer([nn.Identity() for _ in range(3)], 3, top_k=1, capacity_factor=0.1,
                     eval_capacity_factor=0.1, aux_loss_weight=0.0, z_loss_weight=0.0, gate=gate,
                     dropless=True)
    x = torch.randn(6, 3)
    torch.testing.assert_close(layer(x), x)  # identity experts, weights summing to 1
    assert calls == [layer] and layer.capacity(6) == 6 and layer.stats.tokens_per_expert == (6, 6, 6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_experts": (4, 1)}, r"MoE.num_experts = \(4, 1\) .*Pyramid"),
    ({"num_experts": (4, 8), "layers": (1, 3, 5)}, r"gives 2 counts, but MoE.layers = \(1, 3, 5\) names 3"),
    ({"num_experts": "8"}, "MoE.num_experts = '8'"),
    ({"num_experts": (4, 8), "layers": (1, 3), "top_k": 5}, r"MoE.top_k = 5 .*min\(num_experts\) = 4"),
    ({"top_k": 9}, r"MoE.top_k = 9 .*\[1, num_experts = 8\]"),
    ({"top_k": 0, "layers": "existing"}, "MoE.top_k = 0 .*an int >= 1"),
    ({"gate": "switch"}, "MoE.gate = 'switch' .*'topk'.*'dts'"),
    ({"dts_start_temperature": 0.0}, "MoE.dts_start_temperature = 0.0 .*> 0"),
    ({"dts_end_temperature": float("inf")}, "MoE.dts_end_temperature = inf"),
    ({"dts_anneal_steps": 0}, "MoE.dts_anneal_steps = 0 .*int >= 1"),
    ({"dts_threshold": 1.0}, r"MoE.dts_threshold = 1.0 .*\[0, 1\)"),
    ({"residual": "yes"}, "MoE.residual = 'yes'"),
    ({"dropless": 1}, "MoE.dropless = 1 .*None"),
    ({"layers": "existing", "residual": True}, "MoE.residual = True is invalid with layers='existing'"),
    ({"layers": "existing", "upcycle": False}, "MoE.upcycle = False is invalid with layers='existing'"),
    ({"layers": "all"}, "MoE.layers = 'all' .*'existing'"),
])
def test_bad_variant_configs_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(**kwargs)


def test_defaults_are_filled_in_when_upcycling():
    assert MoE() == MoE(num_experts=8, top_k=2) and MoE(gate="dts").top_k == 1
    assert MoE(residual=True).top_k == 1 and MoE(num_experts=(2, 4), layers=(1, 3)).top_k == 2
    assert (MoE(layers="existing").num_experts, MoE(layers="existing").top_k) == (None, None)
    assert MoE().experts_for((1, 3)) == {1: 8, 3: 8}
    assert MoE(layers="existing").experts_for((0,)) == {0: None}
    assert MoE(layers="existing").is_dropless() and not MoE().is_dropless()
    assert MoE(dropless=True).is_dropless()


def test_existing_needs_a_model_with_sparse_moe_blocks():
    with pytest.raises(PassError, match="found no sparse-MoE block .*layers='every_other'"):
        autopar.transform(_gpt(2), (_ids(),), passes=[MoE(layers="existing")])
