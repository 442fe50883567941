"""Stage split (autopar.runtime.split): a captured model cut at a Plan's layer boundaries gives one
graph per stage holding its layers, placeholders and outputs wired stage to stage, model inputs that
later layers need relayed through the stages between, and tied parameters found by identity."""

import pytest
import torch

import autopar
from autopar.capture import META_KEY
from autopar.runtime.split import StageGraph, shared_parameters, split_stages


def _gpt(**overrides):
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=4, **overrides)
    inputs, _ = autopar.models.example_batch(model, batch_size=2, seq_len=8, seed=1)
    return autopar.capture(model, inputs).graph_module, inputs


@pytest.fixture(scope="module")
def gpt():
    return _gpt()


def _layers(stage: StageGraph) -> set[int | None]:
    """Layers of the nodes a stage computes (not those it receives)."""
    computed = ("call_module", "call_function", "call_method")
    return {n.meta[META_KEY].layer for n in stage.module.graph.nodes if n.op in computed}


def _placeholders(stage: StageGraph) -> list[str]:
    return [n.name for n in stage.module.graph.nodes if n.op == "placeholder"]


def _run(stages: list[StageGraph], *inputs: torch.Tensor) -> torch.Tensor:
    values = inputs
    for stage in stages:
        values = stage.module(*values)
    return values


def test_two_stages_hold_their_layers_and_pass_one_activation(gpt):
    gm, inputs = gpt
    first, last = split_stages(gm, [(0, 2), (2, 4)])
    assert (first.index, first.is_last, last.index, last.is_last) == (0, False, 1, True)
    assert _layers(first) == {None, 0, 1} and _layers(last) == {2, 3, None}
    modules = [{n.target for n in s.module.graph.nodes if n.op == "call_module"} for s in (first, last)]
    assert {"wte", "wpe"} <= modules[0] and not {"ln_f", "lm_head"} & modules[0]  # embeddings first
    assert {"ln_f", "lm_head"} <= modules[1] and not {"wte", "wpe"} & modules[1]  # head last
    assert first.inputs == () and _placeholders(first) == ["input_ids"]
    assert len(first.outputs) == 1 and last.inputs == first.outputs
    assert _placeholders(last) == list(last.inputs)
    (crossing,) = first.outputs  # the residual stream after layer 1
    assert next(n for n in gm.graph.nodes if n.name == crossing).meta[META_KEY].layer == 1
    assert torch.equal(_run([first, last], inputs), gm(inputs))


def test_tied_embedding_is_shared_between_first_and_last_stage(gpt):
    gm, _ = gpt
    stages = split_stages(gm, [(0, 1), (1, 3), (3, 4)])
    assert shared_parameters(stages) == [((0, "wte.weight"), (2, "lm_head.weight"))]
    table = stages[0].module.get_parameter("wte.weight")
    assert table is stages[2].module.get_parameter("lm_head.weight") is gm.get_parameter("wte.weight")
    assert list(stages[1].module.parameters())  # the middle stage has only its blocks' parameters
    assert all(p is not table for p in stages[1].module.parameters())
    untied, _ = _gpt(tie_embeddings=False)
    assert shared_parameters(split_stages(untied, [(0, 2), (2, 4)])) == []


def test_mask_is_relayed_through_the_middle_stage():
    torch.manual_seed(0)
    bert = autopar.models.build("bert", num_layers=3)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padding, so that a lost mask would show
    gm = autopar.capture(bert, (ids, mask)).graph_module
    stages = split_stages(gm, [(0, 1), (1, 2), (2, 3)])
    assert [_layers(s) for s in stages] == [{None, 0}, {1}, {2, None}]
    relayed = set(stages[0].outputs) & set(stages[1].inputs) & set(stages[1].outputs) & set(stages[2].inputs)
    assert len(relayed) == 1 and all(len(s.outputs) == 2 for s in stages[:2])
    (name,) = relayed
    assert next(n for n in gm.graph.nodes if n.name == name).meta[META_KEY].dtypes == ("bool",)
    assert torch.equal(_run(stages, ids, mask), gm(ids, mask))
    assert not torch.equal(gm(ids, mask), gm(ids, torch.ones_like(mask)))


def test_constant_inputs_are_baked_into_the_first_stage():
    torch.manual_seed(0)
    bert = autopar.models.build("bert", num_layers=2)
    ids = torch.randint(0, 100, (2, 8))
    gm = autopar.capture(bert, ids).graph_module
    unpassed = {n.name: None for n in gm.graph.nodes if n.op == "placeholder" and n.name != "input_ids"}
    assert len(unpassed) == 2  # attention_mask and token_type_ids, left at None
    stages = split_stages(gm, [(0, 1), (1, 2)], constants=unpassed)
    assert _placeholders(stages[0]) == ["input_ids"] and len(stages[1].inputs) == 1
    assert torch.equal(_run(stages, ids), gm(ids))


def test_a_layer_in_no_stage_is_named(gpt):
    gm, _ = gpt
    with pytest.raises(ValueError, match=r"layer 3 \(node \w+\) is in no stage of \[\(0, 2\), \(2, 3\)\]"):
        split_stages(gm, [(0, 2), (2, 3)])


def test_an_unused_name_of_a_tied_weight_goes_with_the_stage_that_uses_it():
    """HF BERT's decoder bias is also ``cls.predictions.bias``; the capture reads it under one name
    only (the LM head, last stage). The other name must not pin a copy on stage 0, where no graph
    uses it and a data-parallel wrapper drops it: only the embedding is tied across stages."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM(config)
    ids = torch.randint(0, 64, (2, 8))
    captured = autopar.capture(model, ids)
    stages = split_stages(captured.graph_module, [(0, 1), (1, 2)])
    held = [dict(s.module.named_parameters(remove_duplicate=False)) for s in stages]
    bias = model.cls.predictions.decoder.bias
    assert all(p is not bias for p in held[0].values()), sorted(held[0])
    assert any(p is bias for p in held[1].values()), sorted(held[1])
    groups = shared_parameters(stages)
    assert len(groups) == 1 and [stage for stage, _ in groups[0]] == [0, 1], groups
    assert held[0][groups[0][0][1]] is model.bert.embeddings.word_embeddings.weight
    out = _run(stages, ids)
    torch.testing.assert_close(out if isinstance(out, torch.Tensor) else out[0], model(ids).logits)
