"""Intra-op parallelism (Alpa's ILP): a sharding strategy for every node on one tensor-parallel axis.

Data flow: captured graph + tp + cluster → ``graph.build_problem`` (``layouts``: how shardings follow
through shape ops; ``strategies``: each node's options and their prices) → ``problem.ShardingProblem``
(plain arrays, no torch) → ``ilp.solve_sharding_ilp`` (OR-Tools HiGHS, ``backends``; ``heuristic``
bounds and warm starts) → ``solve.IntraOpPlan``: a strategy per node and the ``Sharding`` records
the runtime applies.
"""

from autopar.planner.intra_op.solve import IntraOpOptions, IntraOpPlan, intra_op_problem, solve_intra_op

__all__ = ["IntraOpOptions", "IntraOpPlan", "intra_op_problem", "solve_intra_op"]
