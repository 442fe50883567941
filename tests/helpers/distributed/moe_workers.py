"""Per-rank bodies of the expert-parallel runtime tests (importable, so spawned ranks can run them).

Each case trains a zoo GPT whose layers 1 and 3 are MoE layers (4 freshly drawn, different
experts, top-2, capacity factor 1: tokens are dropped) for 3 steps through
``autopar.compile(..., plan=...)`` with expert parallelism, and the same training in one
process. Routing is local to a rank's microbatch (capacity and auxiliary losses included), so
the single-process reference routes each (data-parallel shard, microbatch) group separately:

    loss = Σ_groups CE_sum(group) / counted tokens + Σ_layers mean_groups(aux(group)).

Every step's loss, and every parameter this rank holds after the last step, must agree.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

import autopar
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.losses import IGNORE_INDEX, logits_of
from autopar.lower import with_fingerprint
from autopar.passes import MoE
from autopar.passes.moe import moe_aux_loss, moe_layers
from autopar.plans.megatron import megatron_shardings
from autopar.plans.pinned import plan_from_fix
from autopar.runtime.expert_parallel import AllToAllExperts

RTOL, ATOL = 1e-5, 1e-6  # fp32 on CPU: the same terms summed in another order
STEPS, LR, SEQ_LEN, BATCH = 3, 0.05, 16, 8
CONFIG = MoE(num_experts=4, top_k=2, layers=(1, 3), capacity_factor=1.0, upcycle=False, seed=5)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


@dataclasses.dataclass(frozen=True)
class Case:
    """A model with MoE layers: how to build it with its batch, the pass, which layers are MoE."""

    name: str
    build: Callable[[], tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]
    config: MoE
    num_layers: int
    moe: frozenset[int]
    num_experts: int
    drops: bool  # capacity below the load: some assignments are dropped


def _gpt():
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=4)
    inputs, targets = autopar.models.example_batch(model, batch_size=BATCH, seq_len=SEQ_LEN, seed=1)
    return model, inputs, targets


def _mixtral():
    """Hugging Face Mixtral from a config (random weights, nothing downloaded)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (BATCH, SEQ_LEN + 1), generator=g)
    return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


GPT = Case(name="gpt", build=_gpt, config=CONFIG, num_layers=4, moe=frozenset({1, 3}), num_experts=4,
           drops=True)
MIXTRAL = Case(name="mixtral", build=_mixtral, config=MoE(layers="existing"), num_layers=2,
               moe=frozenset({0, 1}), num_experts=4, drops=False)  # Mixtral's own blocks: dropless


def _model():
    return _gpt()


def _plan(model, inputs, world: int, fix: dict, case: Case = GPT):
    pins = Fix.from_dict(fix)
    plan = plan_from_fix(case.name, graph_fingerprint="unset", num_layers=case.num_layers,
                         cluster=ClusterSpec.parse(f"local:{world}"), fix=pins, global_batch_size=BATCH,
                         seq_len=SEQ_LEN)
    if plan.parallelism.tp > 1:  # Megatron's column/row layout for the dense layers
        gm = autopar.transform(model, inputs[:plan.schedule.microbatch_size], passes=[case.config])
        plan = dataclasses.replace(plan, shardings=megatron_shardings(gm, plan.parallelism.tp))
    return with_fingerprint(plan, model, inputs, passes=[case.config])


def reference_run(model, inputs, targets, micro: int, case: Case = GPT) -> tuple[list[float], dict]:
    """One process, each (dp shard, microbatch) group routed separately; SGD on the sum."""
    groups = [(s, s + micro) for s in range(0, BATCH, micro)]
    gm = autopar.transform(model, inputs[:micro], passes=[case.config])
    optimizer = _sgd(gm.parameters())
    count = int((targets != IGNORE_INDEX).sum())
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for lo, hi in groups:
            logits = logits_of(gm(inputs[lo:hi]))
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets[lo:hi].flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum") / count
            loss = ce + moe_aux_loss(gm) / len(groups)
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
    return losses, dict(gm.named_parameters())


def run_case(world: int, fix: dict, case: Case = GPT) -> None:
    model, inputs, targets = case.build()
    reference = copy.deepcopy(model)
    plan = _plan(model, inputs, world, fix, case)
    par = plan.parallelism
    compiled = autopar.compile(model, f"local:{world}", plan=plan, optimizer=_sgd, passes=[case.config])
    losses = [compiled.step(inputs, targets) for _ in range(STEPS)]
    expected, params = reference_run(reference, inputs, targets, plan.schedule.microbatch_size, case)
    for step, (got, want) in enumerate(zip(losses, expected, strict=True)):
        assert abs(got - want) <= RTOL * abs(want) + ATOL, (case.name, fix, step, got, want)
    engine = compiled.engine
    layers = engine.moe_layers()
    mine = {layer for i in engine.stage_indices for layer in range(*plan.stages[i].layers)} & case.moe
    assert sorted(m.layer for m in layers) == sorted(mine), (fix, mine)
    dispatch = AllToAllExperts if par.ep > 1 else type(None)
    assert all(isinstance(m.expert_parallel, dispatch) for m in layers), fix
    assert all(len(m.experts) == case.num_experts // par.ep for m in layers), fix  # experts sharded
    dropped = sum(m.stats.dropped_assignments for m in layers)
    assert not layers or (dropped > 0) == case.drops, (fix, dropped)  # capacity bites (or is off)
    captured_layers = moe_layers(engine.captured.graph_module)
    assert all(len(m.experts) == case.num_experts for m in captured_layers.values())  # untouched
    names = [name for name, _ in engine.named_parameters()]
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == len(set(experts)) and bool(experts) == bool(layers), (fix, experts)
    for name, param in engine.named_parameters():
        torch.testing.assert_close(_full(param.detach()), params[name].detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name: f"{case.name} {fix} param {n}: {m}")


def resume_case(world: int, folder: str, fix_a: dict, fix_b: dict) -> None:
    """Saved under plan A (experts split over ep ranks) after 2 steps and loaded under plan B
    (another ep): the next step's loss is A's next step's."""
    model, inputs, targets = _model()
    first = autopar.compile(model, f"local:{world}", plan=_plan(model, inputs, world, fix_a), optimizer=_sgd,
                            passes=[CONFIG])
    for _ in range(2):
        first.step(inputs, targets)
    path = os.path.join(folder, "moe-checkpoint")
    autopar.save(first, path)
    want = first.step(inputs, targets)
    other = _model()[0]
    plan_b = _plan(other, inputs, world, fix_b)
    resumed = autopar.compile(other, f"local:{world}", plan=plan_b, optimizer=_sgd,
                              passes=[CONFIG])
    autopar.load(resumed, path, example_inputs=inputs)
    got = resumed.step(inputs, targets)
    assert abs(got - want) <= RTOL * abs(want) + ATOL, (fix_a, fix_b, got, want)


def two_rank_ep(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    run_case(world, {"dp": 2, "ep": 2, "num_microbatches": 2})
    run_case(world, {"dp": 2, "ep": 2, "num_microbatches": 1, "zero": 3})
    run_case(world, {"tp": 2, "num_microbatches": 1})  # Megatron TP around replicated MoE layers
    resume_case(world, folder, {"dp": 2, "ep": 2, "num_microbatches": 2}, {"dp": 2, "num_microbatches": 2})


def two_rank_mixtral(rank: int, world: int) -> None:
    """Hugging Face Mixtral (captured by torch.export) with its own sparse-MoE blocks adopted."""
    torch.set_num_threads(1)
    run_case(world, {"dp": 2, "ep": 2, "num_microbatches": 2}, MIXTRAL)
    run_case(world, {"dp": 2, "ep": 2, "pp": 1, "num_microbatches": 1, "recompute": "full"}, MIXTRAL)


def two_rank_ep_then_mixtral(rank: int, world: int, folder: str) -> None:
    """Both two-rank bodies in one spawn (process start-up costs more than a case)."""
    two_rank_ep(rank, world, folder)
    two_rank_mixtral(rank, world)


def four_rank_ep(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    run_case(world, {"dp": 4, "ep": 2, "num_microbatches": 2})
    run_case(world, {"dp": 2, "ep": 2, "pp": 2, "num_microbatches": 2, "recompute": "full"})
    run_case(world, {"dp": 2, "ep": 2, "pp": 2, "num_microbatches": 2, "schedule": "zero_bubble"})
    run_case(world, {"dp": 2, "ep": 2, "tp": 2, "num_microbatches": 2})
