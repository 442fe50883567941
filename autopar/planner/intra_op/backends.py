"""Solver adapters for the intra-op sharding ILP (``sharding_ilp``): one small interface
(binary and fractional variables, named two-sided rows, a minimized sum) over OR-Tools'
``pywraplp`` (HiGHS, SCIP) and CP-SAT, each single-threaded with a fixed seed and a time
limit. ``sharding_ilp`` says which backend is the default and why (measured).
"""

from __future__ import annotations

import math

SCALE_TARGET = 1e3
"""The largest objective coefficient after rescaling (HiGHS' tolerances are absolute, ~10⁻⁶)."""
CP_SAT_RESOLUTION = 1e6
"""CP-SAT needs integers: costs are rounded to 1/this of the largest coefficient."""

Term = tuple[float, object]


class MipModel:
    """pywraplp (HiGHS or SCIP): binary strategy variables, continuous edge variables."""

    def __init__(self, backend: str, time_limit_s: float, seed: int) -> None:
        from ortools.linear_solver import pywraplp

        self.lp = pywraplp
        self.solver = pywraplp.Solver.CreateSolver("HIGHS" if backend == "highs" else "SCIP")
        assert self.solver is not None, f"OR-Tools was built without {backend}"
        self.solver.SuppressOutput()
        self.solver.SetTimeLimit(max(1, int(time_limit_s * 1000)))
        if backend == "highs":  # pywraplp returns False here even when HiGHS accepts them
            self.solver.SetSolverSpecificParametersAsString(
                f"random_seed = {seed}\nthreads = 1\noutput_flag = false\n")
        else:
            self.solver.SetNumThreads(1)
            self.solver.SetSolverSpecificParametersAsString(f"randomization/randomseedshift = {seed}\n")

    def binary(self, name: str) -> object:
        return self.solver.BoolVar(name)

    def fraction(self, name: str) -> object:
        return self.solver.NumVar(0.0, 1.0, name)

    def add(self, terms: list[Term], low: float, high: float, name: str) -> None:
        infinity = self.solver.infinity()
        row = self.solver.Constraint(max(low, -infinity), min(high, infinity), name)
        for coefficient, var in terms:
            row.SetCoefficient(var, row.GetCoefficient(var) + coefficient)

    def minimize(self, terms: list[Term]) -> None:
        objective = self.solver.Objective()
        for coefficient, var in terms:
            objective.SetCoefficient(var, objective.GetCoefficient(var) + coefficient)
        objective.SetMinimization()

    def solve(self) -> tuple[str, float, float]:
        params = self.lp.MPSolverParameters()
        params.SetDoubleParam(params.RELATIVE_MIP_GAP, 1e-7)
        code = self.solver.Solve(params)
        status = {self.lp.Solver.OPTIMAL: "OPTIMAL", self.lp.Solver.FEASIBLE: "FEASIBLE",
                  self.lp.Solver.INFEASIBLE: "INFEASIBLE"}.get(code, "UNKNOWN")
        if status not in ("OPTIMAL", "FEASIBLE"):
            return status, math.nan, math.nan
        objective = self.solver.Objective()
        return status, objective.Value(), objective.BestBound()

    def value(self, var: object) -> float:
        return var.solution_value()  # type: ignore[attr-defined]


class CpSatModel:
    """CP-SAT with one worker and linearization level 2 (ARCHITECTURE decision 3); integer
    coefficients: costs are rounded to 10⁻⁶ of the largest, memory to whole bytes (up)."""

    def __init__(self, time_limit_s: float, seed: int) -> None:
        from ortools.sat.python import cp_model

        self.cp = cp_model
        self.model = cp_model.CpModel()
        self.solver = cp_model.CpSolver()
        params = self.solver.parameters
        params.num_workers, params.linearization_level = 1, 2
        params.max_time_in_seconds, params.random_seed = time_limit_s, seed

    def binary(self, name: str) -> object:
        return self.model.new_bool_var(name)

    fraction = binary

    def add(self, terms: list[Term], low: float, high: float, name: str) -> None:
        expr = sum(math.ceil(c) * v if c > 0 else math.floor(c) * v for c, v in terms)  # type: ignore[operator]
        low_i = -(2**62) if math.isinf(low) else math.ceil(low - 1e-9)
        self.model.add_linear_constraint(expr, low_i, math.floor(high + 1e-9)).with_name(name)

    def minimize(self, terms: list[Term]) -> None:
        factor = CP_SAT_RESOLUTION / SCALE_TARGET
        self.model.minimize(sum(round(c * factor) * v for c, v in terms))  # type: ignore[operator]
        self._factor = factor

    def solve(self) -> tuple[str, float, float]:
        code = self.solver.solve(self.model)
        status = {self.cp.OPTIMAL: "OPTIMAL", self.cp.FEASIBLE: "FEASIBLE",
                  self.cp.INFEASIBLE: "INFEASIBLE"}.get(code, "UNKNOWN")
        if status not in ("OPTIMAL", "FEASIBLE"):
            return status, math.nan, math.nan
        solver = self.solver
        return status, solver.objective_value / self._factor, solver.best_objective_bound / self._factor

    def value(self, var: object) -> float:
        return float(self.solver.value(var))
