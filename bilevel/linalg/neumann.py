"""Truncated Neumann series ``x = alpha sum_k (I - alpha A)^k b``."""

from __future__ import annotations

import torch

from .._checks import check_nonneg_float, check_positive_int
from .base import LinearSolveInfo, LinearSolver, LinearSolveStatus, Matvec
from .registry import register
from .eig import power_iteration

__all__ = ["Neumann", "neumann"]


@register("neumann")
class Neumann(LinearSolver):
    """Richardson iteration / truncated Neumann series for positive definite ``A``.

    Parameters
    ----------
    max_iter:
        Number of series terms (one matvec each). Default 100.
    tol:
        Tolerance on the relative residual. Default 1e-10.
    step_size:
        ``alpha``. The series converges iff ``0 < alpha < 2 / lambda_max(A)``
        and ``A`` is positive definite. ``None`` (default) estimates
        ``lambda_max`` by ``power_iters`` steps of power iteration and uses
        ``alpha = 1 / lambda_max`` (the matvecs are counted in ``info``).
    power_iters:
        Power-iteration steps for the automatic step size. Default 20.
    divergence_factor:
        Stop with :attr:`LinearSolveStatus.DIVERGED` once the residual exceeds
        this multiple of the initial one. Default 10.
    warn:
        Warn when ``max_iter`` is reached first.
    damping:
        Solve ``(A + damping I) x = b`` (see :class:`LinearSolver`).

    Notes
    -----
    The residual contracts by ``max |1 - alpha lambda_i|`` per step, that is
    ``1 - 1/kappa`` with ``alpha = 1/lambda_max``: slower than CG's
    ``1 - 2/sqrt(kappa)``, but every step is the same cheap update, which is
    why it is used for truncated implicit gradients.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> x, info = bl.linalg.get("neumann", step_size=0.4)(lambda v: 2.0 * v, torch.ones(2))
    >>> info.converged
    True
    """

    def __init__(self, *, max_iter: int = 100, tol: float = 1e-10, step_size: float | None = None,
                 power_iters: int = 20, divergence_factor: float = 10.0, warn: bool = True, damping: float = 0.0):
        super().__init__(max_iter=max_iter, tol=tol, warn=warn, damping=damping)
        self.step_size = None if step_size is None else check_nonneg_float(step_size, "step_size", positive=True)
        self.power_iters = check_positive_int(power_iters, "power_iters")
        self.divergence_factor = check_nonneg_float(divergence_factor, "divergence_factor", positive=True)

    def _options(self):
        return {**super()._options(), "step_size": self.step_size, "power_iters": self.power_iters}

    @property
    def vmappable(self) -> bool:
        """True with a fixed ``step_size`` (the power-iteration estimate reads values back)."""
        return self.step_size is not None

    def solve_fixed(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None,
                    flags: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Exactly ``max_iter`` terms of the series, with no value read back (vmap-safe)."""
        if self.step_size is None:
            return super().solve_fixed(matvec, b, x0, flags)
        x = torch.zeros_like(b) if x0 is None else x0
        r = b if x0 is None else b - matvec(x0)
        for _ in range(self.max_iter):
            x = x + self.step_size * r
            r = r - self.step_size * matvec(r)
        return x

    def _solve(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None):
        matvecs = 0
        alpha = self.step_size
        extra = {}
        if alpha is None:
            lam_max, used = power_iteration(matvec, b, max_iter=self.power_iters)
            matvecs += used
            extra["lambda_max_estimate"] = lam_max
            if not lam_max > 0 or lam_max != lam_max:
                bn = torch.linalg.vector_norm(b).item()
                info = LinearSolveInfo(0, bn, 1.0 if bn > 0 else 0.0, False,
                                       LinearSolveStatus.NEGATIVE_CURVATURE if lam_max <= 0
                                       else LinearSolveStatus.NONFINITE, matvecs, extra=extra)
                return torch.zeros_like(b), info
            alpha = 1.0 / lam_max
        extra["step_size"] = alpha
        bnorm = torch.linalg.vector_norm(b).item()
        if x0 is None:
            x, r = torch.zeros_like(b), b.clone()
        else:
            x, r = x0.clone(), b - matvec(x0)
            matvecs += 1
        r0 = torch.linalg.vector_norm(r).item()
        rnorm = r0
        scale = bnorm if bnorm > 0 else 1.0
        status = LinearSolveStatus.CONVERGED if rnorm <= self.tol * scale else LinearSolveStatus.MAX_ITER
        k = 0
        while status is LinearSolveStatus.MAX_ITER and k < self.max_iter:
            k += 1
            Ar = matvec(r)
            matvecs += 1
            x = x + alpha * r
            r = r - alpha * Ar
            rnorm = torch.linalg.vector_norm(r).item()
            if rnorm != rnorm or rnorm == float("inf"):
                status = LinearSolveStatus.NONFINITE
            elif rnorm <= self.tol * scale:
                status = LinearSolveStatus.CONVERGED
            elif rnorm > self.divergence_factor * max(r0, 1e-300):
                status = LinearSolveStatus.DIVERGED
        rel = rnorm / bnorm if bnorm > 0 else rnorm
        return x, LinearSolveInfo(k, rnorm, rel, status.success, status, matvecs, extra=extra)


def neumann(matvec: Matvec, b: torch.Tensor, *, x0: torch.Tensor | None = None, max_iter: int = 100,
            tol: float = 1e-10, step_size: float | None = None, warn: bool = True):
    """Functional form of :class:`Neumann`: solve ``matvec(x) = b``.

    Examples
    --------
    >>> import torch
    >>> x, info = neumann(lambda v: 2.0 * v, torch.ones(2), step_size=0.5)
    >>> x
    tensor([0.5000, 0.5000])
    """
    return Neumann(max_iter=max_iter, tol=tol, step_size=step_size, warn=warn)(matvec, b, x0)
