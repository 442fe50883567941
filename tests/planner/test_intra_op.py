"""Known answers of the intra-op sharding ILP (autopar/planner/intra_op/solve.py).

Megatron-LM's column/row alternation for an MLP and for the zoo GPT, everything replicated
at tp = 1, agreement with brute force, variables shared across repeated layers, an
infeasible memory budget explained by name, and determinism.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from autopar import models
from autopar.capture import capture
from autopar.cluster import ClusterSpec
from autopar.cost_models import Group, all_reduce_time_s
from autopar.planner.intra_op import IntraOpOptions, intra_op_problem, solve_intra_op
from autopar.planner.intra_op.backends import MipModel
from autopar.planner.intra_op.graph import GraphMapping
from autopar.planner.intra_op.ilp import solve_sharding_ilp
from autopar.planner.intra_op.layouts import REPLICATED, index_layout, reshape_layout
from autopar.planner.intra_op.problem import EdgeCost, ShardingProblem, evaluate, exhaustive_reference
from autopar.plans.megatron import megatron_shardings

A100 = ClusterSpec.parse("1x8xA100-80GB")
RUNTIME_VOCABULARY = {"colwise", "rowwise", "vocab"}


def _gpt(num_layers: int = 2, frontend: str = "fx", **shape: int):
    """The zoo GPT captured; with ``shape`` overrides it is built and captured on ``meta``."""
    if not shape:
        model = models.build("gpt-tiny", num_layers=num_layers)
        ids, _ = models.example_batch(model, batch_size=2)
        return capture(model, (ids,)).graph_module
    model = models.build("gpt-tiny", num_layers=num_layers, device="meta", **shape)
    ids = torch.empty(4, shape["seq_len"], dtype=torch.long, device="meta")
    return capture(model, (ids,), frontend=frontend).graph_module  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_gpt():
    return _gpt()


def _choice(problem: ShardingProblem, mapping: GraphMapping, wanted: dict[str, str]) -> tuple[int, ...]:
    """Group strategy indices that give each group's first node ``wanted`` (default: replicate,
    attention heads)."""
    choice = []
    for members in mapping.members:
        name, kind, names = members[0]
        target = wanted.get(name, "heads" if kind == "attention" else "replicate")
        choice.append(names.index(target))
    return tuple(choice)


def test_mlp_block_gets_column_then_row_with_one_all_reduce_each_way():
    mlp = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).to("meta")
    x = torch.empty(8, 1024, 1024, device="meta")
    plan = solve_intra_op(capture(mlp, (x,)).graph_module, tp=2, cluster=A100)
    assert [s for _, s in plan.strategies] == ["colwise", "rowwise"]
    assert [s.strategy for s in plan.shardings] == ["colwise", "rowwise"]
    activation_bytes = 8 * 1024 * 1024 * 2  # bf16
    one = all_reduce_time_s(activation_bytes, group=Group(size=2), cluster=A100)
    assert plan.communication_s == pytest.approx(2 * one)  # forward after row, backward before column
    assert plan.resharding_s == 0.0
    assert [anchor for _, anchor in plan.followers] == [plan.strategies[0][0]]  # GELU follows fc


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_gpt_at_gpt2_width_rediscovers_megatron(frontend):
    gm = _gpt(frontend=frontend, hidden_size=768, num_heads=12, vocab_size=50304, seq_len=1024)
    plan = solve_intra_op(gm, tp=2, cluster=A100)
    assert set(plan.shardings) == set(megatron_shardings(gm, 2))
    assert {s.strategy for s in plan.shardings} <= RUNTIME_VOCABULARY
    attention = [s for n, s in plan.strategies if n.startswith("scaled_dot_product_attention")]
    assert attention == ["heads", "heads"]
    embeddings = [s for n, s in plan.strategies if n in ("wpe", "embedding_1")]
    assert embeddings == ["replicate"]  # a vocabulary split of positions only adds an all-reduce
    assert plan.status == "OPTIMAL" and plan.gap <= 1e-6


def test_tiny_gpt_rediscovers_megatron_when_weights_must_be_split(tiny_gpt):
    """At h = 64 replication is cheaper on A100s (tensor parallelism does not pay), so give the
    ILP only the parameter memory Megatron's layout needs: it must then split every weight and
    picks Megatron's alternation, the split with the least communication."""
    megatron = megatron_shardings(tiny_gpt, 2)
    problem, mapping = intra_op_problem(tiny_gpt, tp=2, cluster=A100)
    budget = evaluate(problem, _choice(problem, mapping, {s.node: s.strategy for s in megatron})).memory_bytes
    free = solve_intra_op(tiny_gpt, tp=2, cluster=A100)
    assert free.shardings == () and free.parameter_bytes_per_device > budget
    plan = solve_intra_op(tiny_gpt, tp=2, cluster=A100, memory_budget_bytes=budget)
    assert set(plan.shardings) == set(megatron)
    assert plan.strategy_of("wte") == "vocab" and plan.strategy_of("lm_head") == "colwise"  # tied
    assert [s for n, s in plan.strategies if "attention" in n] == ["heads", "heads"]
    assert "memory[parameters per device]" in plan.constraint_names


def test_tp1_replicates_everything_without_communication(tiny_gpt):
    plan = solve_intra_op(tiny_gpt, tp=1, cluster=A100)
    assert {s for _, s in plan.strategies} == {"replicate"} and plan.shardings == ()
    assert plan.communication_s == 0.0 and plan.resharding_s == 0.0
    assert plan.num_variables == 0 and plan.objective_s == plan.compute_s > 0


@pytest.mark.parametrize("backend", ["highs", "scip", "cp_sat"])
@pytest.mark.parametrize("budget_fraction", [None, 0.7])
def test_ilp_agrees_with_exhaustive_search_on_the_tiny_gpt(tiny_gpt, backend, budget_fraction):
    problem, _ = intra_op_problem(tiny_gpt, tp=2, cluster=A100, microbatch_scale=512)
    if budget_fraction is not None:
        problem, _ = intra_op_problem(tiny_gpt, tp=2, cluster=A100, microbatch_scale=512,
                                      memory_budget_bytes=budget_fraction * evaluate(
                                          problem, (0,) * len(problem.names)).memory_bytes)
    _, best = exhaustive_reference(problem)
    solution = solve_sharding_ilp(problem, backend=backend)
    assert solution.breakdown.objective_s == pytest.approx(best.objective_s, rel=1e-6)


def _random_problem(seed: int, num_groups: int = 8) -> ShardingProblem:
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3]) for _ in range(num_groups)]

    def rows(scale: float) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(rng.uniform(0, scale) for _ in range(n)) for n in sizes)

    def matrix(u: int, v: int) -> tuple[tuple[float, ...], ...]:  # sparse: many free reshardings
        return tuple(tuple(rng.choice([0.0, rng.uniform(0, 2e-4)]) for _ in range(sizes[v]))
                     for _ in range(sizes[u]))

    edges = [EdgeCost(u=u, v=v, cost_s=matrix(u, v))
             for v in range(1, num_groups) for u in sorted({rng.randrange(v), v - 1})]
    memory = rows(1e6)
    budget = sum(max(r) + min(r) for r in memory) / 2
    return ShardingProblem(names=tuple(f"g{i}" for i in range(num_groups)),
                           strategies=tuple(tuple(f"s{j}" for j in range(n)) for n in sizes),
                           compute_s=rows(1e-4), communication_s=rows(1e-4), resharding_s=rows(1e-5),
                           memory_bytes=memory, edges=tuple(edges), constant_memory_bytes=1e5,
                           memory_budget_bytes=budget)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_agrees_with_exhaustive_search_on_random_problems(seed):
    problem = _random_problem(seed)
    _, best = exhaustive_reference(problem)
    solution = solve_sharding_ilp(problem)
    assert solution.breakdown.objective_s == pytest.approx(best.objective_s, rel=1e-7)
    assert solution.breakdown.memory_bytes <= problem.memory_budget_bytes


@pytest.mark.parametrize("seed", range(3))
def test_time_limit_without_incumbent_falls_back_to_local_search(seed, monkeypatch):
    problem = _random_problem(seed)
    _, best = exhaustive_reference(problem)
    monkeypatch.setattr(MipModel, "solve", lambda self: ("UNKNOWN", math.nan, math.nan))
    solution = solve_sharding_ilp(problem)
    assert solution.status == "FEASIBLE" and 0.0 <= solution.gap < 1.0
    assert solution.breakdown == evaluate(problem, solution.choice)
    assert solution.breakdown.objective_s >= best.objective_s * (1 - 1e-12)
    assert solution.breakdown.memory_bytes <= problem.memory_budget_bytes


def test_repeated_layers_share_variables():
    shallow, deep = _gpt(2), _gpt(8)
    plans = [solve_intra_op(gm, tp=2, cluster=A100, microbatch_scale=512) for gm in (shallow, deep)]
    counts = [(p.num_groups, p.num_variables, p.num_constraints) for p in plans]
    assert counts[0] == counts[1]
    assert ("blocks_7_mlp_fc", "blocks_0_mlp_fc") in plans[1].tied
    untied = solve_intra_op(deep, tp=2, cluster=A100, microbatch_scale=512,
                            options=IntraOpOptions(tie_layers=False))
    assert untied.num_variables > 3 * plans[1].num_variables
    assert untied.objective_s == pytest.approx(plans[1].objective_s)  # identical layers: a uniform optimum


def test_too_small_memory_budget_names_the_binding_constraint(tiny_gpt):
    problem, _ = intra_op_problem(tiny_gpt, tp=2, cluster=A100)
    floor = problem.constant_memory_bytes + sum(min(row) for row in problem.memory_bytes)
    with pytest.raises(ValueError, match=r"memory\[parameters per device\].*ZeRO"):
        solve_intra_op(tiny_gpt, tp=2, cluster=A100, memory_budget_bytes=floor * 0.99)
    assert solve_intra_op(tiny_gpt, tp=2, cluster=A100, memory_budget_bytes=floor).status == "OPTIMAL"


def test_same_input_gives_the_same_plan(tiny_gpt):
    first = solve_intra_op(tiny_gpt, tp=2, cluster=A100, microbatch_scale=512)
    second = solve_intra_op(tiny_gpt, tp=2, cluster=A100, microbatch_scale=512)
    assert first == second
    assert intra_op_problem(tiny_gpt, tp=2, cluster=A100) == intra_op_problem(tiny_gpt, tp=2, cluster=A100)


def test_invalid_arguments_say_what_is_allowed(tiny_gpt):
    with pytest.raises(ValueError, match="tp = 0"):
        solve_intra_op(tiny_gpt, tp=0, cluster=A100)
    with pytest.raises(ValueError, match="backend"):
        IntraOpOptions(backend="gurobi")  # type: ignore[arg-type]
    bare = torch.fx.symbolic_trace(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="autopar.capture"):
        solve_intra_op(bare, tp=2, cluster=A100)


def test_layout_rules_for_heads():
    assert reshape_layout((2, 32, 64), (2, 32, 4, 16), 2, tp=2) == 2  # split hidden → split heads
    assert reshape_layout((2, 32, 4, 16), (2, 32, 64), 2, tp=2) == 2  # merge heads back
    assert reshape_layout((2, 32, 64), (64, 64), 2, tp=2) == 1
    assert reshape_layout((2, 32, 64), (2, 2048), 1, tp=2) == 1  # the split dim is the merge's outer factor
    assert reshape_layout((2, 32, 64), (2, 2048), 2, tp=2) is None  # ... but not its inner one
    assert index_layout(4, (Ellipsis, slice(None, 8)), 1) == 1  # RoPE's half-slice keeps heads split
    assert index_layout(4, (Ellipsis, slice(None, 8)), 3) is None
    assert index_layout(3, (0, None), 1) == 1
    assert REPLICATED == -1
