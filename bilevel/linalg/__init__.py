"""Hessian-vector products and linear solvers on matvec closures.

Every linear solver is called as ``solver(matvec, b, x0=None) -> (x, info)``
with ``info`` a :class:`LinearSolveInfo` (``"normal_cg"`` also needs
``rmatvec=``, the transposed product). Build one with :func:`get`; for a
symmetric positive definite ``A`` use ``"cg"``, for a symmetric indefinite one
``"minres"``, for a non-symmetric one ``"gmres"``, ``"bicgstab"`` or
``"normal_cg"`` (:func:`default_solver` names ``"cg"`` or ``"gmres"``).
"""

from .base import LinearSolveInfo, LinearSolver, LinearSolveStatus, Matvec
from .registry import available, default_solver, get, register
from .bicgstab import BiCGStab
from .cg import CG, cg
from .gmres import GMRES
from .minres import MINRES
from .normal_cg import NormalCG
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
    "default_solver",
    "IterativeLinearSolver",
    "LinearState",
    "CG",
    "cg",
    "Neumann",
    "neumann",
    "MINRES",
    "GMRES",
    "BiCGStab",
    "NormalCG",
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
