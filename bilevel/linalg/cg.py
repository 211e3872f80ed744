"""Conjugate gradient on a matvec closure, with a negative-curvature guard."""

from __future__ import annotations

import torch

from .base import LinearSolveInfo, LinearSolver, LinearSolveStatus, Matvec
from .registry import register

__all__ = ["CG", "cg"]


@register("cg")
class CG(LinearSolver):
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
    rather than stepping along a direction of negative curvature.
    In exact arithmetic CG solves an ``n x n`` system with ``m`` distinct
    eigenvalues in ``m`` iterations; its error contracts at least like
    ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> x, info = bl.linalg.get("cg")(lambda v: A @ v, torch.tensor([1.0, 2.0]))
    >>> info.converged, info.iterations
    (True, 2)
    """

    def _solve(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None):
        bnorm = torch.linalg.vector_norm(b).item()
        if x0 is None:
            x = torch.zeros_like(b)
            r = b.clone()
            matvecs = 0
        else:
            x = x0.clone()
            r = b - matvec(x)
            matvecs = 1
        rs = torch.dot(r, r)
        rnorm = rs.sqrt().item()
        scale = bnorm if bnorm > 0 else 1.0
        p = r.clone()
        status = LinearSolveStatus.MAX_ITER
        k = 0
        min_curvature = float("inf")
        if rnorm <= self.tol * scale:
            status = LinearSolveStatus.CONVERGED
        else:
            for k in range(1, self.max_iter + 1):
                Ap = matvec(p)
                matvecs += 1
                pAp = torch.dot(p, Ap)
                pAp_f = pAp.item()
                if pAp_f != pAp_f or abs(pAp_f) == float("inf"):
                    status = LinearSolveStatus.NONFINITE
                    k -= 1
                    break
                pp = torch.dot(p, p).item()
                min_curvature = min(min_curvature, pAp_f / pp if pp > 0 else float("inf"))
                if pAp_f <= 0:
                    status = LinearSolveStatus.NEGATIVE_CURVATURE
                    k -= 1
                    break
                alpha = rs / pAp
                x = x + alpha * p
                r = r - alpha * Ap
                rs_new = torch.dot(r, r)
                rnorm = rs_new.sqrt().item()
                if rnorm <= self.tol * scale:
                    status = LinearSolveStatus.CONVERGED
                    break
                p = r + (rs_new / rs) * p
                rs = rs_new
        rel = rnorm / bnorm if bnorm > 0 else rnorm
        info = LinearSolveInfo(
            iterations=k, residual_norm=rnorm, relative_residual=rel, converged=status.success,
            status=status, matvecs=matvecs, extra={"min_curvature": min_curvature},
        )
        return x, info


    @property
    def vmappable(self) -> bool:
        """Always true: :meth:`solve_fixed` runs CG without reading values back."""
        return True

    def solve_fixed(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None,
                    flags: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Exactly ``max_iter`` CG iterations without data-dependent Python control flow.

        An iteration whose residual already met ``tol``, or whose direction has
        non-positive curvature, leaves ``x`` unchanged from then on (a mask, not
        a ``break``), so the result equals :meth:`__call__`'s. Runs under
        :func:`torch.func.vmap` and on a GPU without synchronisation.

        Examples
        --------
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> CG(max_iter=2).solve_fixed(lambda v: A @ v, torch.tensor([1.0, 2.0]))
        tensor([0.0909, 0.6364])
        """
        x = torch.zeros_like(b) if x0 is None else x0
        r = b if x0 is None else b - matvec(x0)
        p = r
        rs = torch.dot(r, r)
        threshold = (self.tol * torch.linalg.vector_norm(b)) ** 2
        done = rs <= threshold
        negative = torch.zeros_like(done)
        for _ in range(self.max_iter):
            Ap = matvec(p)
            pAp = torch.dot(p, Ap)
            negative = negative | (~done & ~(pAp > 0))
            done = done | ~(pAp > 0)  # non-positive (or NaN) curvature: freeze at the last iterate
            alpha = torch.where(done, torch.zeros_like(rs), rs / torch.where(done, torch.ones_like(pAp), pAp))
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = torch.dot(r, r)
            beta = torch.where(done, torch.zeros_like(rs), rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)))
            done = done | (rs_new <= threshold)
            p = r + beta * p
            rs = rs_new
        if flags is not None:
            flags["negative_curvature"] = negative
        return x


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
