"""Conjugate gradient on a matvec closure, with a negative-curvature guard."""

from __future__ import annotations

import math

import torch

from .base import LinearSolveInfo, LinearSolveStatus, Matvec
from .driver import IterativeLinearSolver, LinearState
from .registry import register

__all__ = ["CG", "cg"]


@register("cg")
class CG(IterativeLinearSolver):
    """Conjugate gradient for symmetric positive definite ``A``.

    Parameters
    ----------
    max_iter:
        Maximum number of CG iterations (one matvec each). Default 100.
    tol:
        Tolerance on the relative residual ``||b - A x|| / ||b||``. Default 1e-10.
    warn:
        Warn when ``max_iter`` is reached first (negative curvature and
        non-finite values always warn).
    damping:
        Solve ``(A + damping I) x = b`` (see :class:`LinearSolver`). Default 0.

    Notes
    -----
    Every iteration checks the curvature ``p^T A p`` of the search direction.
    When it is not positive, ``A`` is not positive definite (for the engine:
    the inner problem is not strongly convex at ``phi``); CG stops with
    :attr:`LinearSolveStatus.NEGATIVE_CURVATURE` and returns the last iterate,
    rather than stepping along a direction of negative curvature. The smallest
    curvature ``p^T A p / p^T p`` it met (an upper bound on ``lambda_min(A)``) is
    ``info.extra["min_curvature"]``.
    In exact arithmetic CG solves an ``n x n`` system with ``m`` distinct
    eigenvalues in ``m`` iterations; its error contracts at least like
    ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k``.

    One step serves both drivers of :mod:`bilevel.linalg.driver`: step by step, and
    :meth:`solve_fixed`, exactly ``max_iter`` iterations without reading values back (vmap-safe):

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> x, info = bl.linalg.get("cg")(lambda v: A @ v, torch.tensor([1.0, 2.0]))
    >>> info.converged, info.iterations
    (True, 2)
    >>> CG(max_iter=2).solve_fixed(lambda v: A @ v, torch.tensor([1.0, 2.0]))
    tensor([0.0909, 0.6364])
    """

    breakdown_flag = "negative_curvature"

    def init(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None, prepared: dict) -> LinearState:
        state = super().init(matvec, b, x0, prepared)
        inf = torch.full((), math.inf, dtype=b.dtype, device=b.device)
        state.aux = {"p": state.r, "rs": torch.dot(state.r, state.r), "curvature": inf, "pAp": inf}
        return state

    def step(self, matvec: Matvec, state: LinearState) -> tuple[LinearState, torch.Tensor]:
        p, rs = state.aux["p"], state.aux["rs"]
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        # the smallest Rayleigh quotient seen; fmin skips the NaN of p = 0 (a finished solve stepped on when masked)
        curvature = torch.fmin(state.aux["curvature"], pAp / torch.dot(p, p))
        alpha = rs / pAp
        x = state.x + alpha * p
        r = state.r - alpha * Ap
        rs_new = torch.dot(r, r)
        p_new = r + (rs_new / torch.where(rs > 0, rs, torch.ones_like(rs))) * p
        return LinearState(x, r, {"p": p_new, "rs": rs_new, "curvature": curvature, "pAp": pAp}), ~(pAp > 0)

    def breakdown(self, new: LinearState) -> LinearSolveStatus:
        """Non-positive curvature (or a non-finite product) along the direction: the step is discarded."""
        pAp = float(new.aux["pAp"])
        return LinearSolveStatus.NEGATIVE_CURVATURE if math.isfinite(pAp) else LinearSolveStatus.NONFINITE

    def extra(self, last: LinearState) -> dict:
        return {"min_curvature": float(last.aux["curvature"])}

    def recurrence_norm(self, state: LinearState) -> torch.Tensor:
        """``sqrt(r^T r)``: the step computes ``r^T r`` anyway."""
        return torch.sqrt(state.aux["rs"])


def cg(matvec: Matvec, b: torch.Tensor, *, x0: torch.Tensor | None = None, max_iter: int = 100,
       tol: float = 1e-10, warn: bool = True) -> tuple[torch.Tensor, LinearSolveInfo]:
    """Functional form of :class:`CG`: solve ``matvec(x) = b``.

    Examples
    --------
    >>> import torch
    >>> x, info = cg(lambda v: 2.0 * v, torch.ones(3))
    >>> x
    tensor([0.5000, 0.5000, 0.5000])
    """
    return CG(max_iter=max_iter, tol=tol, warn=warn)(matvec, b, x0)
