"""``autopar.compile(..., passes=[...])`` on one device: the step runs the transformed graph, the
random-LTD schedule follows the compiled step counter, eval keeps every token, and the pass
state goes through ``state_dict`` and checkpoints so resumed training keeps the same tokens."""

import copy
import json

import pytest
import torch

import autopar
from autopar.losses import cross_entropy
from autopar.passes import RandomLTD
from autopar.passes.random_ltd import random_ltd_runtime
from autopar.passes.random_ltd.schedule import kept_tokens
from autopar.runtime.pass_state import PASSES_ENV, passes_from_json, passes_to_json
from tests.helpers.models import gpt_and_batch
from tests.helpers.random_ltd import random_ltd_reference

B, S, L = 4, 32, 4
CONFIG = RandomLTD(min_tokens=8, num_steps=6, granularity=4, seed=5)
MODEL = dict(num_layers=L, hidden_size=32, num_heads=2, vocab_size=128, seq_len=S)
SGD = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731


def _model():
    return gpt_and_batch(MODEL, batch_size=B, seq_len=S)


def _compiled(model, **options):
    return autopar.compile(model, "local:1", optimizer=SGD, passes=[CONFIG], **options)


def _kept_hook(compiled, inputs):
    """Record the kept positions of every dropping layer (captures first, if needed)."""
    seen = {}
    runtime = random_ltd_runtime(compiled.captured_for(inputs).graph_module)
    runtime.register_forward_hook(lambda mod, args, out: seen.__setitem__(args[1], out))
    return seen


def _k(step):
    return kept_tokens(step, seq_len=S, min_tokens=8, num_steps=6, granularity=4)


def test_step_equals_the_transformed_graph():
    model, inputs, targets = _model()
    reference = copy.deepcopy(model)
    compiled = _compiled(model)
    losses = [compiled.step(inputs, targets) for _ in range(4)]
    expected = random_ltd_reference(reference, inputs, targets, config=CONFIG, optimizer=SGD, num_steps=4)
    assert losses == expected  # the same graph, the same token choices: bitwise
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    plain = _model()[0]
    assert losses[0] != pytest.approx(cross_entropy(plain(inputs), targets).item(), abs=1e-3)
    assert compiled.passes_applied == ("random_ltd",)
    consumed = B * sum(2 * _k(t) + 2 * S for t in range(4))
    assert compiled.pass_state == {"random_ltd": {"step": 4, "microbatch": 0,
                                                  "consumed_layer_tokens": consumed}}
    assert compiled.consumed_layer_tokens == compiled.pass_state["random_ltd"]["consumed_layer_tokens"]
    counter = [n for n in compiled.captured.graph_module.graph.nodes if n.target == "random_ltd"]
    assert len(counter) == 2  # layers 1 and 2 (all but the first and last)


def test_schedule_follows_the_step_counter_and_eval_keeps_every_token():
    model, inputs, targets = _model()
    compiled = _compiled(model)
    kept = _kept_hook(compiled, inputs)
    compiled.step(inputs, targets)
    assert {layer: index.shape[1] for layer, index in kept.items()} == {1: _k(0), 2: _k(0)}
    compiled.set_step(3)
    compiled.step(inputs, targets)
    assert {layer: index.shape[1] for layer, index in kept.items()} == {1: _k(3), 2: _k(3)}
    assert compiled.num_steps == 4 and compiled.pass_state["random_ltd"]["step"] == 4
    compiled.set_step(6)
    compiled.step(inputs, targets)
    runtime = random_ltd_runtime(compiled.captured.graph_module)
    assert runtime.last_kept == {1: S, 2: S}  # the end of the schedule keeps every token
    compiled.eval()
    model.eval()
    assert not runtime.training
    torch.testing.assert_close(compiled(inputs), model(inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="step = -1"):
        compiled.set_step(-1)


def test_captures_share_the_schedule_state():
    model, inputs, targets = _model()
    compiled = _compiled(model)
    compiled.step(inputs, targets)
    shorter = inputs[:, : S // 2], targets[:, : S // 2]
    compiled.step(*shorter)  # a new signature: captured and transformed again
    assert compiled.num_lowered == 2
    assert compiled.captured_for(inputs) is not compiled.captured_for(shorter[0])
    assert compiled.pass_state["random_ltd"]["step"] == 2
    compiled.step(inputs, targets)
    first = random_ltd_runtime(compiled.captured_for(inputs).graph_module)
    assert first.state.step == 3 and first.state.consumed_layer_tokens == compiled.consumed_layer_tokens


def test_state_dict_round_trip_resumes_with_the_same_token_choices():
    model, inputs, targets = _model()
    uninterrupted = _compiled(model)
    kept = _kept_hook(uninterrupted, inputs)
    for _ in range(2):
        uninterrupted.step(inputs, targets)
    state = {k: v.clone() for k, v in uninterrupted.state_dict().items()}  # they alias the weights
    assert {k: int(v) for k, v in state.items() if k.startswith("passes.")} == {
        "passes.random_ltd.step": 2, "passes.random_ltd.microbatch": 0,
        "passes.random_ltd.consumed_layer_tokens": uninterrupted.consumed_layer_tokens}
    json.dumps(uninterrupted.pass_state)  # plain ints
    expected_loss = uninterrupted.step(inputs, targets)
    expected_kept = {layer: index.clone() for layer, index in kept.items()}

    resumed = _compiled(_model()[0])
    resumed.load_state_dict(state)  # before the first capture: the state waits for it
    assert resumed.num_steps == 2
    kept = _kept_hook(resumed, inputs)
    assert resumed.step(inputs, targets) == expected_loss
    assert all(torch.equal(kept[layer], expected_kept[layer]) for layer in expected_kept)
    assert resumed.pass_state == uninterrupted.pass_state


def test_checkpoint_saves_and_restores_the_pass_state(tmp_path):
    model, inputs, targets = _model()
    compiled = _compiled(model)
    for _ in range(2):
        compiled.step(inputs, targets)
    autopar.save(compiled, tmp_path / "ckpt")
    expected = compiled.step(inputs, targets)
    resumed = _compiled(_model()[0])
    autopar.load(resumed, tmp_path / "ckpt")
    assert resumed.num_steps == 2
    assert resumed.pass_state["random_ltd"]["step"] == 2
    assert resumed.step(inputs, targets) == pytest.approx(expected, rel=1e-6)
    assert resumed.pass_state == compiled.pass_state
    without = autopar.compile(_model()[0], "local:1", optimizer=SGD)  # a model without the pass loads it too
    autopar.load(without, tmp_path / "ckpt")
    assert without.num_steps == 2 and without.pass_state == {}


def test_without_passes_nothing_changes():
    model, inputs, targets = _model()
    compiled = autopar.compile(model, "local:1", optimizer=SGD)
    compiled.step(inputs, targets)
    assert compiled.passes_applied == () and compiled.consumed_layer_tokens is None
    assert not [k for k in compiled.state_dict() if k.startswith("passes.")]


def test_pass_options_are_checked(monkeypatch):
    model = _model()[0]
    with pytest.raises(TypeError, match="autopar.passes objects"):
        autopar.compile(model, "local:1", passes=["random_ltd"])
    with pytest.raises(TypeError, match=r"a list of passes, e.g. passes=\[RandomLTD"):
        autopar.compile(model, "local:1", passes=CONFIG)
    with pytest.raises(ValueError, match="once"):
        autopar.compile(model, "local:1", passes=[CONFIG, CONFIG])
    monkeypatch.setenv(PASSES_ENV, passes_to_json([CONFIG]))
    assert autopar.compile(model, "local:1").passes == (CONFIG,)  # handed over by `autopar run`
    with pytest.raises(ValueError, match="autopar run"):
        autopar.compile(model, "local:1", passes=[CONFIG])
    monkeypatch.setenv(PASSES_ENV, "not json")
    with pytest.raises(ValueError, match=PASSES_ENV):
        autopar.compile(model, "local:1")
    assert passes_from_json(passes_to_json([RandomLTD(min_tokens=2, num_steps=3, layers=(1, 2))])) == [
        RandomLTD(min_tokens=2, num_steps=3, layers=(1, 2))]
