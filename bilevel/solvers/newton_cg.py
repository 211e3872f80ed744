"""Hessian-free (truncated) Newton: CG on Hessian-vector products, then an Armijo line search."""

from __future__ import annotations

import math

import torch

from .._checks import check_nonneg_float, check_positive_int
from ..linalg.base import LinearSolveStatus
from ..linalg.cg import CG
from .base import register_solver
from .driver import IterativeSolver, SolverState
from .linesearch import backtracking
from .objective import Objective
from .result import SolverStatus

__all__ = ["NewtonCG"]


@register_solver("newton_cg")
class NewtonCG(IterativeSolver):
    r"""Hessian-free Newton: ``phi <- phi + t d`` with ``(H + damping I) d ~= -grad_phi G`` by truncated CG.

    The paper's iMAML-HF inner solver. ``H = d2G/dphi2`` is never formed: CG
    uses Hessian-vector products only.

    Parameters
    ----------
    max_iter:
        Maximum number of Newton iterations. Default 50.
    tol:
        Stop when ``||grad_phi G|| <= tol``. Default 1e-6.
    rtol:
        Also stop when ``||grad_phi G|| <= rtol ||grad_phi G(phi0)||`` (units-free). Default 0.
    cg_max_iter:
        CG iterations (Hessian-vector products) per Newton step. Default 5,
        the paper's value for iMAML-HF; raise it for a more exact Newton step.
    cg_tol:
        Relative residual ``||H d + g|| / ||g||`` at which CG stops, in
        ``[0, 1)``; ``None`` (default) uses the forcing term
        ``eta = min(0.5, sqrt(||g||))`` (Eisenstat and Walker; Nocedal and
        Wright, Algorithm 7.1), which gives superlinear convergence.
    damping:
        ``>= 0`` added to the Hessian's diagonal (Levenberg-style), for a
        nearly singular or indefinite ``H``. Default 0.
    armijo:
        Sufficient-decrease constant ``c`` in ``(0, 1/2)``: accept ``t`` when
        ``G(phi + t d) <= G(phi) + c t <g, d>``. Default 1e-4.
    shrink:
        Backtracking factor in ``(0, 1)``; the line search starts at ``t = 1``.
        Default 0.5.
    max_backtracks:
        Trials per line search before giving up. Default 30.

    Notes
    -----
    CG starts from ``d = 0`` and stops at the relative tolerance, after
    ``cg_max_iter`` iterations, or when it meets a direction ``p`` with
    ``p^T (H + damping I) p <= 0`` (``G`` is not convex there): then the last
    CG iterate is used, or, if that happens at the first CG iteration, the
    steepest-descent direction ``-g``. Every CG iterate from ``0`` is a
    descent direction, so the line search always has one to work with (a
    direction that is not, because of round-off, is replaced by ``-g``).
    Near convergence, where the Armijo test drowns in round-off, the
    approximate Armijo condition of Hager and Zhang (2005),
    ``<grad G(phi + t d), d> <= (1 - 2c) |<g, d>|``, is used instead, as in
    :class:`~bilevel.solvers.GradientDescent`.

    On a strongly convex ``G`` with a Lipschitz Hessian, the unit step is
    eventually accepted and the convergence is superlinear with the forcing
    term (quadratic with ``cg_tol=0`` and enough CG iterations); a fixed
    ``cg_tol`` gives a linear rate about ``cg_tol``. With ``cg_max_iter``
    small against ``sqrt(kappa)`` the steps are inexact and the rate linear.

    Cost per Newton iteration: up to ``cg_max_iter`` Hessian-vector products
    (each about two to three gradients' work: :meth:`Objective.hvp` builds the
    gradient's graph and differentiates it again), one value of ``G`` per
    line-search trial and one gradient at the accepted point.
    ``result.stats`` counts them (``nhvp``, ``nfev``, ``ngev``); memory is
    that of one Hessian-vector product, flat in ``max_iter``.

    ``result.history`` holds, besides ``grad_norm`` and ``value``, per Newton
    iteration: ``step_size`` (the accepted ``t``; 0 for a failed line
    search), ``cg_iterations`` and ``negative_curvature`` (whether CG met
    ``p^T H p <= 0``). The running state keeps the last step's CG count in
    ``state.aux["cg_iterations"]``.

    This solver cannot run under :func:`torch.func.vmap` (e.g. over the tasks
    of a meta-batch): the shared loop, CG and the line search read norms and
    values back to Python (``.item()``) to decide when to stop.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> loss = lambda phi, d: torch.nn.functional.softplus(-d["y"] * (d["X"] @ phi)).sum()
    >>> g = torch.Generator().manual_seed(0)
    >>> data = {"X": torch.randn(40, 3, generator=g, dtype=torch.float64),
    ...         "y": torch.randn(40, generator=g, dtype=torch.float64).sign()}
    >>> problem = bl.ProximalProblem(loss, lam=1.0)
    >>> solver = bl.solvers.get("newton_cg", cg_max_iter=10, tol=1e-10)
    >>> res = bl.solve(problem, torch.zeros(3, dtype=torch.float64), data, solver=solver)
    >>> res.converged, res.iterations <= 6, res.history["cg_iterations"][0] <= 3
    (True, True, True)
    """

    def __init__(self, *, max_iter: int = 50, tol: float = 1e-6, cg_max_iter: int = 5, cg_tol: float | None = None,
                 damping: float = 0.0, armijo: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 30,
                 rtol: float = 0.0):
        super().__init__(max_iter=max_iter, tol=tol, rtol=rtol)
        self.cg_max_iter = check_positive_int(cg_max_iter, "cg_max_iter")
        self.cg_tol = None if cg_tol is None else check_nonneg_float(cg_tol, "cg_tol")
        if self.cg_tol is not None and not self.cg_tol < 1:
            raise ValueError(f"Invalid cg_tol: {cg_tol}; the relative CG tolerance must lie in [0, 1) (a value "
                             f">= 1 would stop CG before its first step), or be None for the forcing term.")
        self.damping = check_nonneg_float(damping, "damping")
        self.armijo = check_nonneg_float(armijo, "armijo", positive=True)
        if not self.armijo < 0.5:
            raise ValueError(f"Invalid armijo: {armijo}; it must lie in (0, 0.5) so that Newton's unit step "
                             f"can be accepted near the solution.")
        self.shrink = check_nonneg_float(shrink, "shrink", positive=True)
        if not self.shrink < 1:
            raise ValueError(f"Invalid shrink: {shrink}; it must lie in (0, 1).")
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")

    def _options(self):
        return {**super()._options(), "cg_max_iter": self.cg_max_iter, "cg_tol": self.cg_tol,
                "damping": self.damping}

    def init(self, fun: Objective, x0: torch.Tensor) -> SolverState:
        state = super().init(fun, x0)
        state.aux = {"cg_iterations": 0}
        return state

    def _direction(self, fun: Objective, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        """Truncated CG on ``(H + damping I) d = -g`` from ``d = 0``: ``(d, cg_iterations, negative_curvature)``.

        CG is :class:`bilevel.linalg.CG` with the forcing term as its tolerance; at non-positive (or
        non-finite) curvature it returns its last iterate, or ``-g`` when that is still ``d = 0``.
        """
        eta = self.cg_tol if self.cg_tol is not None else min(0.5, math.sqrt(float(torch.linalg.vector_norm(g))))

        def matvec(p: torch.Tensor) -> torch.Tensor:
            hp = fun.hvp(x, p)
            return hp + self.damping * p if self.damping else hp

        d, info = CG(max_iter=self.cg_max_iter, tol=eta, warn=False)._solve(matvec, -g, None)
        negative = info.status in (LinearSolveStatus.NEGATIVE_CURVATURE, LinearSolveStatus.NONFINITE)
        if negative and info.iterations == 0:
            d = -g
        return d, info.matvecs, negative

    def step(self, fun: Objective, state: SolverState, k: int) -> SolverState:
        x, g, f0 = state.x, state.grad, state.value
        d, n_cg, negative = self._direction(fun, x, g)
        slope = float(torch.dot(g, d))
        if not (slope < 0 and math.isfinite(slope)):  # round-off (or a NaN) spoiled the CG direction
            d = -g
            slope = -float(torch.dot(g, g))
        aux = {"cg_iterations": n_cg}

        def record(t: float) -> dict:
            return {"step_size": t, "cg_iterations": n_cg, "negative_curvature": negative}

        found = backtracking(fun, x, f0, d, slope, 1.0, armijo=self.armijo, shrink=self.shrink,
                             max_backtracks=self.max_backtracks)
        if found is not None:
            t, xt, value, grad = found
            return SolverState(xt, value, grad, aux=aux, record=record(t))
        return SolverState(x, f0, g, status=SolverStatus.LINE_SEARCH_FAILED, aux=aux, record=record(0.0))

