"""Conjugate gradient on the normal equations ``A^T A x = A^T b`` (CGNR / CGLS), for non-symmetric ``A``."""

from __future__ import annotations

import math

import torch

from .base import LinearSolveStatus, Matvec
from .driver import IterativeLinearSolver, LinearState
from .registry import register

__all__ = ["NormalCG"]


@register("normal_cg")
class NormalCG(IterativeLinearSolver):
    r"""Conjugate gradient on the normal equations ``A^T A x = A^T b``, for any non-singular ``A``.

    Called with the transposed product: ``solver(matvec, b, rmatvec=lambda v: A^T v)``.

    Parameters
    ----------
    max_iter:
        Maximum number of iterations (two products each: ``A p`` and ``A^T r``). Default 100.
    tol:
        Tolerance on the relative residual ``||b - A x|| / ||b||`` of the original system (not of
        the normal equations). Default 1e-10.
    warn:
        Warn when ``max_iter`` is reached first (breakdowns and non-finite values always warn).
    damping:
        Solve ``(A + damping I) x = b`` (see :class:`LinearSolver`); ``rmatvec`` is damped too.

    Notes
    -----
    ``A^T A`` is symmetric positive definite whenever ``A`` is non-singular, so CG applies to it
    and ``x_k`` minimises ``||b - A x||`` over ``x0 + span{A^T r0, (A^T A) A^T r0, ...}``
    (the CGLS arrangement, which never forms ``A^T A``). Its residual never grows and it cannot
    break down on a non-singular ``A``, but it converges like CG on a system of condition
    number ``kappa(A)^2``: use it when ``A`` is well conditioned, or when ``"gmres"`` stalls
    (an ``A`` whose field of values contains 0). It needs ``rmatvec`` (``v -> A^T v``; with
    torch, a vector-Jacobian product); without one it raises ``ValueError``. For a symmetric
    ``A``, ``rmatvec`` is ``matvec``: the implicit engine passes it so for a Hessian, but
    ``"cg"`` or ``"minres"`` are then the better choice (they do not square ``kappa``).

    The state carries the residual ``r = b - A x`` itself (updated with ``A p``) and ``A^T r``,
    so ``tol`` is tested on the original system's relative residual, as for every solver.
    Per iteration: one ``A p``, one ``A^T r`` (two entries of ``info.matvecs``) and ``O(n)``
    work; one more ``A^T r`` at the start (and ``A x0`` with a start). It keeps 3 vectors. When ``A p = 0``
    for a search direction (a singular ``A``, or an inconsistent system whose least-squares
    solution is reached), the step is discarded and the solve stops with
    :attr:`LinearSolveStatus.BREAKDOWN`.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> A = torch.tensor([[1.0, 2.0], [-3.0, 1.0]], dtype=torch.float64)  # not symmetric
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> x, info = bl.linalg.get("normal_cg")(lambda v: A @ v, b, rmatvec=lambda v: A.T @ v)
    >>> info.converged, info.iterations, info.matvecs
    (True, 2, 5)
    >>> torch.allclose(A @ x, b)
    True
    """

    symmetric = False
    needs_rmatvec = True
    matvecs_per_step = 2

    def init_matvecs(self, warm: bool) -> int:
        """``A^T r0``, and ``A x0`` with a start."""
        return 2 if warm else 1

    def init(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None, prepared: dict) -> LinearState:
        rmatvec = getattr(matvec, "rmatvec", None)
        if rmatvec is None:
            raise ValueError(f"{self.name} needs the transposed product: call it as solver(matvec, b, "
                             f"rmatvec=lambda v: A^T v) (for a symmetric A, rmatvec=matvec).")
        state = super().init(matvec, b, x0, prepared)
        z = rmatvec(state.r)
        state.aux = {"p": z, "zz": torch.dot(z, z), "ApAp": torch.ones((), dtype=b.dtype, device=b.device)}
        return state

    def step(self, matvec: Matvec, state: LinearState) -> tuple[LinearState, torch.Tensor]:
        p, zz = state.aux["p"], state.aux["zz"]
        Ap = matvec(p)
        ApAp = torch.dot(Ap, Ap)  # p^T (A^T A) p: the curvature of the normal equations, >= 0
        alpha = zz / torch.where(ApAp > 0, ApAp, torch.ones_like(ApAp))
        x = state.x + alpha * p
        r = state.r - alpha * Ap
        z = matvec.rmatvec(r)
        zz_new = torch.dot(z, z)
        p_new = z + (zz_new / torch.where(zz > 0, zz, torch.ones_like(zz))) * p
        return LinearState(x, r, {"p": p_new, "zz": zz_new, "ApAp": ApAp}), ~(ApAp > 0)

    def breakdown(self, new: LinearState) -> LinearSolveStatus:
        """``A p = 0`` (:attr:`LinearSolveStatus.BREAKDOWN`), or a non-finite product (``NONFINITE``)."""
        return LinearSolveStatus.BREAKDOWN if math.isfinite(float(new.aux["ApAp"])) else LinearSolveStatus.NONFINITE
