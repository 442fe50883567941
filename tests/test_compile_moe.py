"""``autopar.compile(..., passes=[MoE(...)])`` on one device: the loss adds the auxiliary losses,
routers and experts train, every capture runs the same MoE layers, the state dict holds them,
and the expert loads reach ``moe_stats()`` and ``report()``."""

import copy

import pytest
import torch

import autopar
from autopar.losses import cross_entropy
from autopar.passes import MoE
from autopar.passes.moe import moe_aux_loss
from autopar.passes.moe.layer import MoELayer, MoEStats
from autopar.runtime.pass_state import passes_from_json, passes_to_json
from tests.helpers.models import gpt_and_batch

B, S, L = 2, 16, 4
NO_DROP = MoE(num_experts=8, top_k=2, capacity_factor=4.0, eval_capacity_factor=4.0)  # E / k = 4
CONFIG = MoE(num_experts=8, top_k=2)
MODEL = dict(num_layers=L, hidden_size=32, num_heads=2, vocab_size=64, seq_len=S)
SGD = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)  # noqa: E731


def _model():
    return gpt_and_batch(MODEL, batch_size=B, seq_len=S)


def _compiled(model, config=CONFIG, **options):
    return autopar.compile(model, "local:1", optimizer=SGD, passes=[config], **options)


def _clone(state):
    return {k: v.clone() for k, v in state.items()}  # state dict tensors alias the weights


def test_first_step_loss_is_the_dense_loss_plus_the_aux_loss():
    model, inputs, targets = _model()
    dense = copy.deepcopy(model)
    compiled = _compiled(model, NO_DROP)
    loss = compiled.step(inputs, targets)
    gm = autopar.transform(copy.deepcopy(dense), inputs, passes=[NO_DROP])
    upcycled = cross_entropy(gm(inputs), targets).item()
    aux = moe_aux_loss(gm).item()
    assert aux > 0
    assert loss == pytest.approx(upcycled + aux, rel=1e-6)  # the same graph and router draws
    with torch.no_grad():
        dense_loss = cross_entropy(dense(inputs), targets).item()
    assert loss - dense_loss == pytest.approx(aux, abs=1e-5)  # upcycled = dense function at step 0
    assert compiled.passes_applied == ("moe",)
    assert sorted(compiled.moe) == ["1", "3"] and all(isinstance(m, MoELayer) for m in compiled.moe.values())


def test_routers_and_experts_train_and_the_dense_mlps_stay():
    model, inputs, targets = _model()
    compiled = _compiled(model)
    compiled.captured_for(inputs)  # the first capture creates the MoE layers
    layer = compiled.moe["1"]
    router = layer.router.weight.detach().clone()
    experts = [expert.fc.weight.detach().clone() for expert in layer.experts]
    dense_fc = model.blocks[1].mlp.fc.weight.detach().clone()
    assert all(torch.equal(w, dense_fc) for w in experts)  # upcycled: copies of the dense MLP
    compiled.step(inputs, targets)
    in_optimizer = {id(p) for group in compiled.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in compiled.moe.parameters()} <= in_optimizer
    used = [i for i, n in enumerate(compiled.moe_stats()[1].tokens_per_expert) if n > 0]
    assert not torch.equal(layer.router.weight, router)
    assert used and all(not torch.equal(layer.experts[i].fc.weight, experts[i]) for i in used)
    assert torch.equal(model.blocks[1].mlp.fc.weight, dense_fc)  # replaced: not in the graph any more
    names = dict(compiled.named_model_parameters())  # what checkpoints name
    assert names["blocks.1.mlp.moe.router.weight"] is layer.router.weight
    assert {id(p) for p in names.values()} == {id(p) for p in compiled.parameters()} == in_optimizer


def test_an_optimizer_built_before_the_first_capture_gets_the_moe_layers():
    model, inputs, targets = _model()
    compiled = _compiled(model)
    optimizer = compiled.optimizer
    compiled.step(inputs, targets)
    assert len(optimizer.param_groups) == 2
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in compiled.moe.parameters()}
    router = compiled.moe["3"].router.weight.detach().clone()
    compiled.step(inputs, targets)
    assert not torch.equal(compiled.moe["3"].router.weight, router)


def test_every_capture_runs_the_trained_layers():
    model, inputs, targets = _model()
    compiled = _compiled(model, NO_DROP)
    for _ in range(3):
        compiled.step(inputs, targets)
    train_gm = compiled.captured_for(inputs).graph_module
    compiled.eval()
    assert not any(m.training for m in compiled.moe.values())
    with torch.no_grad():
        out = compiled(inputs)  # a new capture (eval mode); the pass upcycled fresh copies in it
        expected = train_gm(inputs)  # the first capture, its (shared) layers now in eval mode
        fresh = autopar.transform(copy.deepcopy(model), inputs, passes=[NO_DROP]).eval()(inputs)
    assert compiled.num_lowered == 2
    eval_gm = compiled.captured.graph_module
    assert eval_gm.get_submodule("blocks.1.mlp.moe") is compiled.moe["1"]
    assert torch.equal(out, expected)
    assert not torch.allclose(out, fresh, atol=1e-4)  # what re-upcycling the dense MLPs would give
    compiled.train()
    router = compiled.moe["1"].router.weight.detach().clone()
    compiled.step(inputs[:, : S // 2], targets[:, : S // 2])  # another shape: a third capture
    assert compiled.captured.graph_module.get_submodule("blocks.3.mlp.moe") is compiled.moe["3"]
    assert not torch.equal(compiled.moe["1"].router.weight, router)


def test_state_dict_round_trip_before_and_after_the_first_capture():
    model, inputs, targets = _model()
    compiled = _compiled(model)
    for _ in range(2):
        compiled.step(inputs, targets)
    state = _clone(compiled.state_dict())
    assert "moe.1.router.weight" in state and "moe.3.experts.7.proj.bias" in state
    expected = compiled.step(inputs, targets)  # its loss is computed before the update

    waiting = _compiled(_model()[0])
    waiting.load_state_dict(state)  # before the first capture: the moe.* entries wait for it
    assert set(waiting.state_dict()) == set(state)
    assert waiting.step(inputs, targets) == expected

    captured = _compiled(_model()[0])
    captured.step(inputs, targets)
    captured.load_state_dict(state)
    assert captured.step(inputs, targets) == expected
    with pytest.raises(RuntimeError, match="moe.1.router.weight"):
        captured.load_state_dict({k: v for k, v in state.items() if not k.startswith("moe.")})


def test_a_dense_state_dict_is_upcycled_at_the_first_capture():
    model, inputs, targets = _model()
    dense = autopar.compile(model, "local:1", optimizer=SGD)
    for _ in range(2):
        dense.step(inputs, targets)
    state = _clone(dense.state_dict())
    with torch.no_grad():
        dense_loss = cross_entropy(model(inputs), targets).item()
    upcycled = _compiled(_model()[0], NO_DROP)
    upcycled.load_state_dict(state)
    loss = upcycled.step(inputs, targets)
    aux = moe_aux_loss(upcycled.captured.graph_module).item()
    assert loss == pytest.approx(dense_loss + aux, abs=1e-5)


def test_moe_stats_and_the_single_device_report():
    model, inputs, targets = _model()
    compiled = _compiled(model)
    assert compiled.moe_stats() == {}
    compiled.step(inputs, targets)
    stats = compiled.moe_stats()
    assert sorted(stats) == [1, 3] and all(isinstance(s, MoEStats) for s in stats.values())
    for s in stats.values():
        assert s.tokens == B * S and s.capacity == 10  # ceil(1.25 · 32 · 2 / 8)
        assert sum(s.tokens_per_expert) + s.dropped_assignments == sum(s.routed_per_expert) == B * S * 2
        assert max(s.tokens_per_expert) <= s.capacity
    compiled.eval()
    with torch.no_grad():
        compiled(inputs[:1])
    assert compiled.moe_stats() == stats  # the last training step's, not the eval forward's
    compiled.train()

    before = compiled.state_dict()
    result = compiled.report(inputs, targets)  # measures, then puts the model back as it was
    assert compiled.num_steps == 1 and len(result.ranks) == 1
    after = compiled.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    steps, phases, memory, moe = result.__rich__().renderables
    assert steps.row_count == 1 and memory.row_count == 5 and moe.row_count == 2
    assert "phase" in str(result) and phases.row_count > 0
    assert [str(c.header) for c in moe.columns][:3] == ["layer", "tokens", "capacity"]
    assert "memory by category" in str(result) and "expert load" in str(result)

    plain = autopar.compile(_model()[0], "local:1", optimizer=SGD)
    rep = plain.report(inputs, targets)  # no step yet: one unmeasured step first, then restored
    (rank,) = rep.ranks
    assert rank.measured.step_s > 0 and rank.predicted.step_s > 0 and plain.num_steps == 0
    assert set(rank.measured.memory_bytes) == set(rank.predicted.memory_bytes) == {
        "parameters", "gradients", "optimizer", "activations", "temporaries"}
    assert plain.moe_stats() == {} and not len(plain.moe)


def test_moe_passes_through_json():
    configs = [CONFIG, MoE(num_experts=4, top_k=1, layers=(0, 2), capacity_factor=1.0, upcycle=False, seed=3),
               MoE(layers="second_half", aux_loss_weight=0.0)]
    for config in configs:
        assert passes_from_json(passes_to_json([config])) == [config]


def test_checkpoint_save_and_load_on_one_device(tmp_path):
    """``autopar.save``/``load`` keep the routers and experts (they exist from the first capture
    on: loading before it needs ``example_inputs``); the resumed step equals the original's."""
    model, inputs, targets = _model()
    compiled = _compiled(model)
    for _ in range(2):
        compiled.step(inputs, targets)
    path = tmp_path / "moe-checkpoint"
    autopar.save(compiled, path)
    want = compiled.step(inputs, targets)
    resumed = _compiled(_model()[0])
    with pytest.raises(ValueError, match="example_inputs"):
        autopar.load(resumed, path)
    autopar.load(resumed, path, example_inputs=inputs)
    assert resumed.step(inputs, targets) == pytest.approx(want, rel=1e-6)
