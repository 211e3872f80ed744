"""The inner-solver registry.

Build a solver with :func:`get` (``bl.solvers.get("gd", step_size=0.1)``), list
them with :func:`available`, add one with :func:`register_solver`. Any
callable ``(problem, theta, data, phi0) -> phi`` also works as a solver.
"""

from .base import CallableSolver, Solver, available, get, register_solver, solve
from .driver import IterativeSolver, SolverState
from .objective import Objective
from .result import SolveResult, SolverStatus
from .agd import AcceleratedGradientDescent
from .cvxpy_solver import CvxpySolver, CvxpyStatusError
from .gd import GradientDescent
from .newton_cg import NewtonCG
from .scipy_lbfgs import ScipyLBFGS
from .scipy_minimize import ScipyMinimize

__all__ = [
    "AcceleratedGradientDescent",
    "NewtonCG",
    "CvxpySolver",
    "CvxpyStatusError",
    "ScipyLBFGS",
    "ScipyMinimize",
    "CallableSolver",
    "GradientDescent",
    "IterativeSolver",
    "Objective",
    "SolveResult",
    "Solver",
    "SolverState",
    "SolverStatus",
    "available",
    "get",
    "register_solver",
    "solve",
]
