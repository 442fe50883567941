"""Per-rank bodies of the graph-pass runtime tests (importable, so spawned ranks can run them).

Each case trains the zoo GPT for 3 steps through ``autopar.compile(..., passes=[RandomLTD])``
under a pinned plan, and the same training in one process on ``autopar.transform``'s graph
with the same pass and seed; every step's loss, and the parameters after the last step, must
agree. The token choices depend on each sample's index in the global batch only, so they
agree across microbatches, pipeline stages and data-parallel shards.
"""

from __future__ import annotations

import copy
import os

import torch
from torch.distributed.tensor import DTensor

import autopar
from autopar.losses import cross_entropy
from autopar.passes import RandomLTD
from autopar.passes.random_ltd import random_ltd_runtime
from tests.helpers.models import gpt_and_batch
from tests.helpers.random_ltd import random_ltd_reference

# fp32 on CPU: the pipelined program sums the same terms in another order (as workers.RTOL).
RTOL, ATOL = 1e-5, 1e-6
STEPS = 3
LR = 0.05
SEQ_LEN = 16
# k(t) = 4, 6, 10 of 16 tokens on layers 1 and 2 over the 3 steps
CONFIG = RandomLTD(min_tokens=4, num_steps=4, granularity=2, seed=3)


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _model():
    return gpt_and_batch({"num_layers": 4}, batch_size=8, seq_len=SEQ_LEN)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def reference_run(model, inputs, targets) -> list[float]:
    """Single-process training on the transformed graph for ``STEPS`` steps."""
    return random_ltd_reference(model, inputs, targets, config=CONFIG, optimizer=_sgd, num_steps=STEPS)


def run_case(world: int, fix: dict) -> None:
    model, inputs, targets = _model()
    plain = cross_entropy(model(inputs), targets).item()
    reference = copy.deepcopy(model)
    compiled = autopar.compile(model, f"local:{world}", fix=fix, optimizer=_sgd, passes=[CONFIG])
    losses = [compiled.step(inputs, targets) for _ in range(STEPS)]
    expected = reference_run(reference, inputs, targets)
    for step, (got, want) in enumerate(zip(losses, expected, strict=True)):
        assert abs(got - want) <= RTOL * abs(want) + ATOL, (fix, step, got, want)
    assert abs(losses[0] - plain) > 1e-3, (fix, losses[0], plain)  # tokens were dropped
    _check_pass_ran(compiled, fix)
    ref = dict(reference.named_parameters())
    for fqn, param in compiled.engine.named_parameters():
        torch.testing.assert_close(_full(param.detach()), ref[fqn].detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, f=fqn: f"{fix} param {f}: {m}")


def _check_pass_ran(compiled, fix: dict) -> None:
    """The stages run the transformed graph, sharing the captured graph's pass module, which
    followed the compiled step counter and counted the global batch's layer-tokens."""
    engine = compiled.engine
    assert compiled.passes_applied == ("random_ltd",)
    runtime = random_ltd_runtime(engine.captured.graph_module)
    calls = [n for m in engine.modules for sub in m.modules() if isinstance(sub, torch.fx.GraphModule)
             for n in sub.graph.nodes if n.op == "call_module" and n.target == "random_ltd"]
    mine = {layer for i in engine.stage_indices for layer in range(*engine.plan.stages[i].layers)} & {1, 2}
    assert len(calls) == len(mine) > 0, (fix, len(calls), mine)
    shared = {id(sub) for m in engine.modules for sub in m.modules() if type(sub) is type(runtime)}
    assert shared == {id(runtime)}, fix
    assert runtime.last_kept == dict.fromkeys(mine, 10), (fix, runtime.last_kept)  # k(2) = 10
    assert runtime.state.step == compiled.num_steps == STEPS
    assert compiled.consumed_layer_tokens == 8 * sum(2 * k + 2 * SEQ_LEN for k in (4, 6, 10))


def resume_case(world: int, folder: str, fix_a: dict, fix_b: dict) -> None:
    """Saved under plan A after 2 steps, loaded under plan B: step 3 keeps the same tokens."""
    model, inputs, targets = _model()
    reference = copy.deepcopy(model)
    first = autopar.compile(model, f"local:{world}", fix=fix_a, optimizer=_sgd, passes=[CONFIG])
    for _ in range(2):
        first.step(inputs, targets)
    path = os.path.join(folder, "ltd-checkpoint")
    autopar.save(first, path)
    resumed = autopar.compile(_model()[0], f"local:{world}", fix=fix_b, optimizer=_sgd, passes=[CONFIG])
    autopar.load(resumed, path, example_inputs=inputs)
    assert resumed.num_steps == 2 and resumed.pass_state == first.pass_state, resumed.pass_state
    loss = resumed.step(inputs, targets)
    want = reference_run(reference, inputs, targets)[-1]
    assert abs(loss - want) <= RTOL * abs(want) + ATOL, (fix_a, fix_b, loss, want)
    assert resumed.consumed_layer_tokens == 8 * sum(2 * k + 2 * SEQ_LEN for k in (4, 6, 10))


def two_rank_random_ltd(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    run_case(world, {"pp": 2, "num_microbatches": 4})
    run_case(world, {"pp": 2, "num_microbatches": 2, "recompute": "full"})
    run_case(world, {"pp": 2, "schedule": "interleaved", "num_microbatches": 2})
    run_case(world, {"dp": 2, "num_microbatches": 2})
    run_case(world, {"tp": 2, "num_microbatches": 2})
    resume_case(world, folder, {"pp": 2, "num_microbatches": 2}, {"dp": 2, "num_microbatches": 2})
