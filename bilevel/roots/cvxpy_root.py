"""cvxpy as a root solver: the program with its constraints; the gradient from the projected fixed point."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .base import RootObjective, RootSolver, register
from .result import RootResult, RootStatus

__all__ = ["CvxpyRootSolver"]


@register("cvxpy")
class CvxpyRootSolver(RootSolver):
    """Solve a root problem's underlying convex program with cvxpy; judged by ``||F|| <= tol``.

    Meant for a :class:`bilevel.CompositeProblem` whose regulariser is a constraint set (or a norm):
    cvxpy handles the constraints, and :func:`bilevel.root` differentiates the projected fixed point
    at the answer, so binding constraints get the exact hypergradient.

    Parameters
    ----------
    build, solver, solver_options, max_iter:
        As for the inner solver :class:`bilevel.solvers.cvxpy_solver.CvxpySolver`:
        ``build(theta_np, data) -> (cvxpy.Problem, cvxpy.Variable)``, the program whose solution is ``phi``
        (constraints included).
    tol:
        Tolerance on the residual ``||F||`` (for a composite problem: its gradient mapping). Default 1e-6.

    Examples
    --------
    >>> import cvxpy as cp, torch, bilevel as bl
    >>> def build(theta, data):
    ...     z = cp.Variable(2)
    ...     return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - theta)), [z >= 0]), z
    >>> problem = bl.CompositeProblem(lambda z, theta, d: 0.5 * ((z - theta) ** 2).sum(), bl.prox.NonNegative())
    >>> theta = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> bl.solve_root(problem, theta, solver=bl.roots.get("cvxpy", build=build)).phi.round(decimals=6)
    tensor([1., 0.], dtype=torch.float64)
    """

    def __init__(self, *, build: Callable | None = None, solver: str | None = None,
                 solver_options: dict | None = None, max_iter: int | None = None, tol: float = 1e-6):
        from ..solvers.cvxpy_solver import CvxpySolver

        super().__init__(max_iter=0, tol=tol)
        self.program = CvxpySolver(build=build, solver=solver, solver_options=solver_options, max_iter=max_iter,
                                   tol=tol)

    def run(self, fun: RootObjective, x0: torch.Tensor) -> RootResult:
        x, cp_status, iterations, detail = self.program.solve_point(fun, x0)
        rn = float(torch.linalg.vector_norm(fun.residual(x)))
        status = (RootStatus.NONFINITE if not math.isfinite(rn) else RootStatus.CONVERGED if rn <= self.tol
                  else RootStatus.MAX_ITER if cp_status == "user_limit" else RootStatus.NOT_A_ROOT)
        return RootResult(x, status.success, iterations, rn, status, status.value, {}, self.name,
                          {"nfev": fun.nfev}, detail="" if status.success else detail)

    def _options(self):
        return {**self.program._options(), "tol": self.tol}
