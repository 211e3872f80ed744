"""Truncated Neumann series ``x = alpha sum_k (I - alpha A)^k b``."""

from __future__ import annotations

import torch

from .._checks import check_nonneg_float, check_positive_int
from .base import LinearSolveStatus, Matvec
from .driver import IterativeLinearSolver, LinearState
from .eig import power_iteration
from .registry import register

__all__ = ["Neumann", "neumann"]


@register("neumann")
class Neumann(IterativeLinearSolver):
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

    def prepare(self, matvec: Matvec, b: torch.Tensor) -> tuple[LinearSolveStatus | None, int, dict]:
        """The step size: given, or ``1 / lambda_max`` by power iteration (which may end the solve)."""
        if self.step_size is not None:
            return None, 0, {"step_size": self.step_size}
        lam_max, used = power_iteration(matvec, b, max_iter=self.power_iters)
        extra = {"lambda_max_estimate": lam_max}
        if not lam_max > 0 or lam_max != lam_max:
            return (LinearSolveStatus.NEGATIVE_CURVATURE if lam_max <= 0 else LinearSolveStatus.NONFINITE), used, extra
        extra["step_size"] = 1.0 / lam_max
        return None, used, extra

    def init(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None, prepared: dict) -> LinearState:
        state = super().init(matvec, b, x0, prepared)
        state.aux = {"alpha": torch.full((), prepared["step_size"], dtype=b.dtype, device=b.device)}
        return state

    def step(self, matvec: Matvec, state: LinearState) -> tuple[LinearState, None]:
        alpha = state.aux["alpha"]
        Ar = matvec(state.r)
        return LinearState(state.x + alpha * state.r, state.r - alpha * Ar, state.aux), None

    def diverged(self, rnorm: float, r0: float) -> bool:
        return rnorm > self.divergence_factor * max(r0, 1e-300)


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
