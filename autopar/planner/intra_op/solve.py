"""Intra-op parallelism: a sharding strategy for every node on one tensor-parallel axis.

Data flow::

    captured fx.GraphModule (node.meta["autopar"]) + tp + ClusterSpec
      │ graph.build_problem   layouts (followers), strategies (prices), ties
      ▼
    ShardingProblem (plain arrays)  ──► ilp.solve_sharding_ilp (OR-Tools HiGHS)
      ▼
    IntraOpPlan: strategy per node, ``Sharding`` records for the runtime, predicted seconds

The inter-op planner (stage split, degrees, schedule) calls :func:`solve_intra_op` per
candidate tp degree and stage; ``IntraOpPlan.shardings`` uses the vocabulary of
``plans.megatron.megatron_shardings`` (``colwise``/``rowwise`` linears, ``vocab``
embeddings), which ``runtime.tensor_parallel`` applies.

The formulation is Alpa's intra-op ILP (Zheng et al., "Alpa: Automating Inter- and
Intra-Operator Parallelism for Distributed Deep Learning", OSDI 2022, §4.2): one-hot strategy
per node, linearized edge variables carrying resharding cost, a memory row; simple ops merged
into their operands and repeated layers sharing variables. It is hand-written because no
maintained library solves this ILP for fx graphs. Known answers (tests/planner/test_intra_op.py):
Megatron-LM's column/row alternation for an MLP and a GPT, everything replicated at tp = 1,
agreement with exhaustive search, a variable count independent of depth.

Left out: the data-parallel (batch) axis and 2-D meshes (the inter-op planner owns dp and
its gradient sync), sequence parallelism, activation memory in the memory row (parameters
only), ZeRO. Approximations (``strategies``): a colwise QKV output is assumed head-aligned as
in Megatron-LM; the one backward all-reduce of an input that several colwise linears read
(Llama's q/k/v) is split evenly between them, an underestimate when only some of them are
colwise; ``microbatch_scale`` also scales the few
tensors without a batch dimension (position embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

from torch import fx

from autopar.capture.record import META_KEY
from autopar.cost_models.memory import model_state_bytes, training_states
from autopar.hardware import DTYPE_BYTES, canonical_dtype
from autopar.planner.intra_op.graph import GraphMapping, build_problem
from autopar.planner.intra_op.ilp import Backend, IlpSolution, solve_sharding_ilp
from autopar.planner.intra_op.problem import ShardingProblem
from autopar.planner.intra_op.strategies import CostContext
from autopar.plans.schema import Sharding

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec

RUNTIME_STRATEGIES = {"linear": ("colwise", "rowwise"), "embedding": ("vocab",)}
"""The strategies ``runtime.tensor_parallel`` applies; attention follows its inputs there."""


@dataclass(frozen=True, kw_only=True)
class IntraOpOptions:
    """Solver settings: ``backend`` (see ``sharding_ilp`` for the measurements behind the
    default), a wall-clock ``time_limit_s``, the solver's ``seed``, and ``tie_layers`` (share
    one set of variables across isomorphic repeated layers)."""

    backend: Backend = "highs"
    time_limit_s: float = 10.0
    seed: int = 0
    tie_layers: bool = True

    def __post_init__(self) -> None:
        if self.backend not in get_args(Backend):
            raise ValueError(f"IntraOpOptions.backend = {self.backend!r} is invalid: expected one of "
                             f"{list(get_args(Backend))}")
        if not (isinstance(self.time_limit_s, (int, float)) and 0 < self.time_limit_s < math.inf):
            raise ValueError(f"IntraOpOptions.time_limit_s = {self.time_limit_s!r} is invalid: "
                             "expected a finite number of seconds > 0")
        if type(self.seed) is not int or self.seed < 0:
            raise ValueError(f"IntraOpOptions.seed = {self.seed!r} is invalid: expected an int >= 0")


@dataclass(frozen=True, kw_only=True)
class IntraOpPlan:
    """The chosen strategies and their predicted cost per microbatch (forward + backward).

    ``strategies`` has every decision node (linear, embedding, attention) in graph order;
    ``shardings`` the subset the runtime applies (non-replicated linears and embeddings).
    ``followers`` pairs each merged elementwise/view op with the node whose layout it takes;
    ``tied`` pairs each node that shares variables (tied weight, repeated layer) with its
    group's representative. ``gap`` is the solver's relative optimality gap. Equality ignores
    ``solve_time_s``, so the same inputs give equal plans.
    """

    tp: int
    strategies: tuple[tuple[str, str], ...]
    shardings: tuple[Sharding, ...]
    objective_s: float
    compute_s: float
    communication_s: float
    resharding_s: float
    parameter_bytes_per_device: float
    status: str
    gap: float
    backend: str
    num_groups: int
    num_variables: int
    num_strategy_variables: int
    num_edge_variables: int
    num_constraints: int
    constraint_names: tuple[str, ...]
    followers: tuple[tuple[str, str], ...]
    tied: tuple[tuple[str, str], ...]
    solve_time_s: float = field(compare=False)

    def strategy_of(self, node: str) -> str:
        """The strategy of decision node ``node``."""
        found = dict(self.strategies).get(node)
        if found is None:
            raise KeyError(f"{node!r} is not a decision node (linear, embedding or attention) of this plan")
        return found


def intra_op_problem(gm: fx.GraphModule, *, tp: int, cluster: ClusterSpec, dtype: str = "bf16",
                     microbatch_scale: float = 1.0, memory_budget_bytes: float | None = None,
                     state_bytes_per_param: float | None = None,
                     tie_layers: bool = True) -> tuple[ShardingProblem, GraphMapping]:
    """The ILP :func:`solve_intra_op` solves, as plain arrays (for tests and explanations)."""
    _check(gm, tp, microbatch_scale, memory_budget_bytes)
    if state_bytes_per_param is None:  # the runtime's model states (mixed precision on GPUs)
        states = training_states(gpu=cluster.device.name != "CPU",
                                 element_bytes=DTYPE_BYTES[canonical_dtype(dtype)])
        state_bytes_per_param = model_state_bytes(1.0, states=states)
    state = float(state_bytes_per_param)
    ctx = CostContext(tp=tp, cluster=cluster, dtype=canonical_dtype(dtype),
                      microbatch_scale=float(microbatch_scale), state_bytes_per_param=state)
    return build_problem(gm, ctx, memory_budget_bytes=memory_budget_bytes, tie_layers=tie_layers)


def solve_intra_op(gm: fx.GraphModule, *, tp: int, cluster: ClusterSpec, dtype: str = "bf16",
                   microbatch_scale: float = 1.0, memory_budget_bytes: float | None = None,
                   state_bytes_per_param: float | None = None,
                   options: IntraOpOptions = IntraOpOptions()) -> IntraOpPlan:
    """Choose a strategy per node of ``gm`` (annotated by ``autopar.capture``) for a tp axis
    of ``tp`` devices on ``cluster``, minimizing compute + collective + resharding seconds.

    ``dtype`` is the training dtype; ``microbatch_scale`` the planned microbatch's tokens ÷
    the captured example's. With ``memory_budget_bytes``, model states per device
    (``state_bytes_per_param`` per parameter, default mixed-precision Adam's 16, split by
    the sharded weights) must fit; if nothing fits, ``ValueError`` names the constraint.
    """
    problem, mapping = intra_op_problem(gm, tp=tp, cluster=cluster, dtype=dtype,
                                        microbatch_scale=microbatch_scale,
                                        memory_budget_bytes=memory_budget_bytes,
                                        state_bytes_per_param=state_bytes_per_param,
                                        tie_layers=options.tie_layers)
    solution = solve_sharding_ilp(problem, backend=options.backend, time_limit_s=options.time_limit_s,
                                  seed=options.seed)
    return _plan(gm, tp, problem, mapping, solution)


def _check(gm: fx.GraphModule, tp: int, scale: float, budget: float | None) -> None:
    if type(tp) is not int or tp < 1:
        raise ValueError(f"tp = {tp!r} is invalid: expected an int >= 1 (the tensor-parallel axis size)")
    if not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
        raise ValueError(f"microbatch_scale = {scale!r} is invalid: expected a finite number > 0")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"memory_budget_bytes = {budget!r} is invalid: expected bytes > 0 or None")
    missing = [n.name for n in gm.graph.nodes if META_KEY not in n.meta]
    if missing:
        raise ValueError(f"{len(missing)} nodes have no node.meta[{META_KEY!r}] (first: {missing[0]}); "
                         "capture the model with autopar.capture(...) and pass its graph_module")


def _plan(gm: fx.GraphModule, tp: int, problem: ShardingProblem, mapping: GraphMapping,
          solution: IlpSolution) -> IntraOpPlan:
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    picked = zip(mapping.members, solution.choice, strict=True)
    chosen = sorted(((name, kind, names[c]) for members, c in picked for name, kind, names in members),
                    key=lambda item: order[item[0]])
    shardings = tuple(Sharding(node=name, strategy=strategy) for name, kind, strategy in chosen
                      if strategy in RUNTIME_STRATEGIES.get(kind, ()))
    cost = solution.breakdown
    return IntraOpPlan(
        tp=tp, strategies=tuple((name, strategy) for name, _, strategy in chosen), shardings=shardings,
        objective_s=cost.objective_s, compute_s=cost.compute_s, communication_s=cost.communication_s,
        resharding_s=cost.resharding_s, parameter_bytes_per_device=cost.memory_bytes,
        status=solution.status, gap=solution.gap, backend=solution.backend, num_groups=len(problem.names),
        num_variables=solution.num_variables, num_strategy_variables=solution.num_strategy_variables,
        num_edge_variables=solution.num_edge_variables, num_constraints=solution.num_constraints,
        constraint_names=solution.constraint_names, followers=mapping.followers, tied=mapping.tied,
        solve_time_s=solution.solve_time_s)
