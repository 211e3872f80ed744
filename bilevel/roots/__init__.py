"""Inner solutions defined by an optimality condition: roots, fixed points, composite (non-smooth) problems.

:class:`bilevel.RootProblem`, :class:`bilevel.FixedPointProblem` and :class:`bilevel.CompositeProblem`
describe the condition; the root solvers here (a registry: :func:`available`, :func:`get`,
:func:`register`) find ``phi``; :func:`bilevel.root` differentiates it (:mod:`bilevel.roots.adjoint`).
"""

from .adjoint import root
from .problems import CompositeProblem, FixedPointProblem, RootProblem
from .result import RootResult, RootStatus
from .base import CallableRootSolver, RootObjective, RootSolver, available, get, register, solve_root
from .cvxpy_root import CvxpyRootSolver
from .methods import Anderson, FixedPointIteration, NewtonKrylov
from .proxgrad import FISTA, ISTA, ProximalGradient

__all__ = ["RootProblem", "FixedPointProblem", "CompositeProblem", "RootResult", "RootStatus", "RootSolver",
           "RootObjective", "FixedPointIteration", "Anderson", "NewtonKrylov", "ProximalGradient", "ISTA", "FISTA",
           "CallableRootSolver", "CvxpyRootSolver", "available", "get", "register", "solve_root", "root"]
