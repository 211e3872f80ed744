"""Hessian-vector products and linear solvers on matvec closures.

Every linear solver is called as ``solver(matvec, b, x0=None) -> (x, info)``
with ``info`` a :class:`LinearSolveInfo`. Build one with :func:`get`.
"""

from .base import LinearSolveInfo, LinearSolver, LinearSolveStatus, Matvec
from .registry import available, get, register
from .cg import CG, cg
from .driver import IterativeLinearSolver, LinearState
from .eig import CurvatureEstimate, lanczos, power_iteration
from .hvp import DEFAULT_HVP_MODE, EXACT_HVP_MODES, GAUSS_NEWTON_MODES, HVP_MODES, Linearization, hvp
from .neumann import Neumann, neumann

__all__ = [
    "LinearSolveInfo",
    "LinearSolveStatus",
    "LinearSolver",
    "Matvec",
    "available",
    "get",
    "register",
    "IterativeLinearSolver",
    "LinearState",
    "CG",
    "cg",
    "Neumann",
    "neumann",
    "power_iteration",
    "lanczos",
    "CurvatureEstimate",
    "hvp",
    "Linearization",
    "HVP_MODES",
    "EXACT_HVP_MODES",
    "GAUSS_NEWTON_MODES",
    "DEFAULT_HVP_MODE",
]
