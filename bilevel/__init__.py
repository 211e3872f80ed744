"""bilevel: bilevel optimisation in PyTorch with implicit differentiation.

::

    import bilevel as bl
    problem = bl.ProximalProblem(loss, lam=2.0)        # or bl.InnerProblem(G)
    phi = bl.argmin(problem, theta, data, solver="gd", linear_solver="cg")
    outer_loss(phi).backward()                         # theta.grad via the implicit function theorem
"""

from . import bounds, distributed, linalg, prox, solvers, status, testing, tree, unrolled
from .status import (BreakdownWarning, BudgetWarning, CompileWarning, ConvergenceError, ConvergenceWarning, DivergenceWarning,
                     LineSearchWarning, NegativeCurvatureWarning, NonFiniteWarning, Status)
from .certify import hypergradient
from .compiled import CompiledBatchInfo, CompiledHypergradient, CompiledInfo, compiled_hypergradient
from ._argmin import argmin
from .implicit import ImplicitInfo, implicit_vjp
from .linalg import LinearSolveInfo, LinearSolveStatus
from .problem import InnerProblem, PredictionLoss, ProximalProblem
from .solvers import SolveResult, SolverStatus, register_solver, solve
from . import roots
from .roots import CompositeProblem, FixedPointProblem, RootProblem, RootResult, RootStatus, root, solve_root

__version__ = "0.1.0"

__all__ = [
    "InnerProblem",
    "ProximalProblem",
    "PredictionLoss",
    "solve",
    "argmin",
    "RootProblem",
    "FixedPointProblem",
    "CompositeProblem",
    "root",
    "solve_root",
    "RootResult",
    "RootStatus",
    "roots",
    "implicit_vjp",
    "hypergradient",
    "compiled_hypergradient",
    "CompiledHypergradient",
    "CompiledInfo",
    "CompiledBatchInfo",
    "register_solver",
    "SolveResult",
    "SolverStatus",
    "ImplicitInfo",
    "LinearSolveInfo",
    "LinearSolveStatus",
    "ConvergenceWarning",
    "BudgetWarning",
    "CompileWarning",
    "BreakdownWarning",
    "NegativeCurvatureWarning",
    "NonFiniteWarning",
    "DivergenceWarning",
    "LineSearchWarning",
    "ConvergenceError",
    "Status",
    "status",
    "bounds",
    "distributed",
    "linalg",
    "prox",
    "solvers",
    "testing",
    "tree",
    "unrolled",
    "__version__",
]
