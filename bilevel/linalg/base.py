"""Linear-solver protocol and results (the registry is in :mod:`bilevel.linalg.registry`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._checks import check_nonneg_float, check_positive_int
from .._functorch import in_transform
from .._registry import Registry
from ..status import ConvergenceError, Status, check_given, follows_status

__all__ = ["LinearSolveStatus", "LinearSolveInfo", "LinearSolver", "Matvec"]

#: A matrix-vector product ``v -> A v`` on 1-D tensors.
Matvec = Callable[[torch.Tensor], torch.Tensor]


class LinearSolveStatus(Status):
    """Why a linear solve stopped. Each value is advice for the user (see :class:`bilevel.Status`)."""

    CONVERGED = "The relative residual ||b - A x|| / ||b|| reached tol."
    MAX_ITER = (
        "The maximum number of iterations was reached before the relative residual reached tol; "
        "increase max_iter, loosen tol, or accept the truncated solution (iMAML uses 5 CG steps)."
    )
    NEGATIVE_CURVATURE = (
        "A direction p with p^T A p <= 0 was met: the inner Hessian is not positive definite at phi, "
        "so the implicit function theorem does not apply as posed. Solve the inner problem more "
        "accurately, raise lam (or add a proximal / L2 term), or add damping; the returned x is "
        "the last iterate before the curvature turned."
    )
    DIVERGED = (
        "The iteration diverged (the residual grew): for Neumann the step size exceeds 2/lambda_max(A) "
        "or A is not positive definite. Lower step_size, or use 'cg'."
    )
    UNCHECKED = (
        "The solve ran inside a torch.func transform (e.g. vmap over tasks): it took max_iter iterations "
        "(frozen where the residual reached tol or the curvature turned non-positive) and reported nothing "
        "back; check a task outside the transform if the accuracy matters."
    )
    NONFINITE = (
        "A non-finite value (NaN or inf) appeared in the matrix-vector products; check the inner "
        "problem at phi (a diverged inner solve or an overflow)."
    )


@follows_status
@dataclass
class LinearSolveInfo:
    """Diagnostics of one linear solve ``A x = b``.

    Attributes
    ----------
    iterations:
        Iterations performed.
    residual_norm:
        ``||b - A x||`` of the returned ``x`` (from the solver's recurrence).
    relative_residual:
        ``residual_norm / ||b||`` (0 when ``b = 0``).
    converged:
        ``status.success`` (``relative_residual <= tol``); a property of :attr:`status`.
    status:
        A :class:`LinearSolveStatus`; its value says what to do.
    matvecs:
        Matrix-vector products spent (a Hessian-vector product each, in the engine).
    solver:
        The name of the linear solver.
    extra:
        Solver-specific facts (e.g. the step size Neumann used).
    """

    iterations: int
    residual_norm: float
    relative_residual: float
    converged: bool
    status: LinearSolveStatus
    matvecs: int
    solver: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_given(self)

    @property
    def message(self) -> str:
        """The advice attached to :attr:`status`."""
        return self.status.value

    def raise_if_failed(self) -> "LinearSolveInfo":
        """Raise :class:`bilevel.ConvergenceError` unless the solve converged."""
        if not self.converged:
            raise ConvergenceError(f"{self.solver} stopped after {self.iterations} iterations "
                                   f"(relative residual {self.relative_residual:.3g}): {self.message}")
        return self


class LinearSolver:
    """Base class: solves ``A x = b`` for symmetric positive definite ``A`` given as a matvec.

    Subclasses implement :meth:`_solve`; :meth:`__call__` validates ``b``,
    runs it and emits a :class:`bilevel.ConvergenceWarning` on failure.

    Parameters
    ----------
    max_iter:
        Maximum number of iterations (matrix-vector products, roughly).
    tol:
        Tolerance on the relative residual ``||b - A x|| / ||b||``.
    warn:
        Emit a :class:`bilevel.ConvergenceWarning` when the solve does not
        converge. Set ``False`` (or ``tol=0``) when a fixed, truncated budget
        is intended (breakdowns such as negative curvature warn regardless).
    damping:
        ``>= 0``: solve ``(A + damping I) x = b`` instead (Tikhonov damping).
        A remedy when ``A`` (the inner Hessian) is indefinite or nearly
        singular, at the price of a bias of order ``damping / lambda_min``.
        Residuals and ``converged`` refer to the damped system. Default 0.
    """

    name = "linear_solver"

    def __init__(self, *, max_iter: int = 100, tol: float = 1e-10, warn: bool = True, damping: float = 0.0):
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.tol = check_nonneg_float(tol, "tol")
        self.warn = bool(warn)
        self.damping = check_nonneg_float(damping, "damping")

    def _solve(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None) -> tuple[torch.Tensor, LinearSolveInfo]:
        raise NotImplementedError

    @property
    def vmappable(self) -> bool:
        """Whether the solver, as configured, can run inside :func:`torch.func.vmap` (see :meth:`solve_fixed`)."""
        return False

    def solve_fixed(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None,
                    flags: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``max_iter`` iterations with no value read back to Python: vmap-safe, no GPU synchronisation.

        Used automatically inside ``torch.func`` transforms; only solvers whose
        :attr:`vmappable` is true implement it. A solver may record tensor flags
        in ``flags`` (CG: ``"negative_curvature"``, a boolean tensor); inside a
        transform they arrive in ``info.extra``, where per-task code can use
        them with :func:`torch.where`.
        """
        raise RuntimeError(
            f"{self!r} cannot run inside torch.func.vmap (or another torch.func transform); use "
            f"bl.linalg.get('cg', max_iter=...) or a Neumann series with a fixed step_size."
        )

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> tuple[torch.Tensor, LinearSolveInfo]:
        """Solve ``matvec(x) = b``; returns ``(x, info)``."""
        if not isinstance(b, torch.Tensor) or b.dim() != 1:
            raise ValueError(f"b must be a 1-D tensor, got {getattr(b, 'shape', type(b).__name__)}; "
                             f"flatten it with bilevel.tree.flatten.")
        if x0 is not None and x0.shape != b.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)} but b has {tuple(b.shape)}; pass x0 like b.")
        if self.damping:
            undamped = matvec

            def matvec(v, _m=undamped, _d=self.damping):
                return _m(v) + _d * v

        if in_transform():
            flags: dict[str, torch.Tensor] = {}
            x = self.solve_fixed(matvec, b, x0, flags)
            nan = float("nan")
            status = LinearSolveStatus.UNCHECKED
            return x, LinearSolveInfo(self.max_iter, nan, nan, False, status, self.max_iter, self.name, flags)
        x, info = self._solve(matvec, b, x0)
        info.solver = self.name
        if not info.converged and info.status.warning is not None:
            forced = info.status.breakdown
            if forced or (self.warn and self.tol > 0):  # tol=0 asks for exactly max_iter iterations
                warnings.warn(info.status.warning(
                    f"{self.name} did not converge after {info.iterations} iterations "
                    f"(relative residual {info.relative_residual:.3g}, tol {self.tol:g}): {info.message}",
                    status=info.status, info=info), stacklevel=3)
        return x, info

    def _options(self) -> dict[str, Any]:
        opts = {"max_iter": self.max_iter, "tol": self.tol, "warn": self.warn}
        if self.damping:
            opts["damping"] = self.damping
        return opts

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"


#: The registry of linear solvers by name (used through :mod:`bilevel.linalg.registry`).
_REGISTRY = Registry("linear solver", LinearSolver)
