"""Per-rank body of the error-path test: hand-edited plans and user mistakes under a pipeline give one
clear line on every rank, before any collective could hang (issue 16 items 3 and 10)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopar
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.lower import with_fingerprint
from autopar.plans import Sharding
from autopar.plans.pinned import plan_from_fix


def _pp2_plan(model, inputs, layers):
    plan = plan_from_fix("gpt", graph_fingerprint="unset", num_layers=2, cluster=ClusterSpec.parse("local:2"),
                         fix=Fix.from_dict({"pp": 2, "num_microbatches": 2}), global_batch_size=4,
                         seq_len=8)
    stages = tuple(dataclasses.replace(s, layers=r) for s, r in zip(plan.stages, layers, strict=True))
    return with_fingerprint(dataclasses.replace(plan, stages=stages), model, inputs)


def pipeline_mistakes(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=2, hidden_size=32, num_heads=2, vocab_size=64,
                                 seq_len=8)
    inputs, targets = autopar.models.example_batch(model, batch_size=4, seq_len=8)
    cases = [(((0, 1), (1, 40)), "stage layers .* do not split this model's 2 layers"),
             (((0, 2), (2, 2)), "do not split")]
    for layers, match in cases:
        with pytest.raises(ValueError, match=match):
            autopar.compile(model, "local:2", plan=_pp2_plan(model, inputs, layers)).step(inputs, targets)
    foreign = dataclasses.replace(_pp2_plan(model, inputs, ((0, 1), (1, 2))),
                                  shardings=(Sharding(node="no_such_node", strategy="colwise"),))
    with pytest.raises(ValueError, match=r"shards node\(s\) \['no_such_node'\]"):
        autopar.compile(model, "local:2", plan=foreign).step(inputs, targets)
    compiled = autopar.compile(model, "local:2", fix={"pp": 2, "num_microbatches": 2},
                               loss_fn=lambda out, t: torch.nn.functional.cross_entropy(
                                   out.flatten(0, 1), t.flatten(), reduction="none"))
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):  # on every rank
        compiled.step(inputs, targets)


def shape_changes(rank: int, world: int) -> None:
    """Issue 16 item 7: a new sequence length under pp is refused on every rank before any collective
    (it used to abort a worker in gloo), and the engine keeps working with the planned shape."""
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=2, hidden_size=32, num_heads=2, vocab_size=64,
                                 seq_len=16)
    inputs, targets = autopar.models.example_batch(model, batch_size=4, seq_len=16)
    compiled = autopar.compile(model, "local:2", fix={"pp": 2, "num_microbatches": 2})
    first = compiled.step(inputs, targets)
    with pytest.raises(ValueError, match=r"shape \(4, 8\).*\(4, 16\)"):
        compiled.step(inputs[:, :8], targets[:, :8])
    with pytest.raises(ValueError, match=r"shape \(2, 16\).*\(4, 16\)"):
        compiled.step(inputs[:2], targets[:2])
    assert compiled.step(inputs, targets) < first
