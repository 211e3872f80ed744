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

#: A matrix-vector product ``v -> A v`` on 1-D tensors (or ``v -> A^T v``, for ``rmatvec``).
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
    BREAKDOWN = (
        "The Krylov method could not continue: a quantity it divides by vanished (BiCGStab: r0^T r, "
        "r0^T A p or omega; normal_cg: A p = 0 for a search direction p, so A is singular). The returned x is "
        "the last iterate before it. Restart from it (x0=x), use 'gmres', which does not break down this way, "
        "or add damping if A is singular."
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
    """Base class: solves ``A x = b`` for ``A`` given as a matvec (symmetric positive definite, unless a
    solver says otherwise in :attr:`symmetric`).

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

    Attributes
    ----------
    symmetric:
        Whether the solver requires a symmetric ``A`` (a class attribute): true for
        ``"cg"``, ``"neumann"`` and ``"minres"`` (and, by default, for a subclass that does not
        say), false for ``"gmres"``, ``"bicgstab"``, ``"normal_cg"`` and a user's callable.
        An engine whose system is not symmetric (the Jacobian of a root or fixed-point problem)
        checks it; :func:`bilevel.linalg.default_solver` picks a name from it.
    needs_rmatvec:
        Whether the solver needs the transposed product ``v -> A^T v`` (``"normal_cg"``): it
        must then be called with ``rmatvec=``, which :meth:`__call__` passes on to :meth:`_solve`
        and :meth:`solve_fixed` as a keyword. Other solvers ignore ``rmatvec`` and are called
        without it, so a subclass written as ``_solve(matvec, b, x0)`` keeps working.
    """

    name = "linear_solver"
    symmetric: bool = True
    needs_rmatvec: bool = False

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

    def _budget_matvecs(self, warm: bool) -> int:
        """Matrix-vector products that a fixed budget (:meth:`solve_fixed`) spends; ``warm``: an ``x0`` was given."""
        return self.max_iter

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None, *,
                 rmatvec: Matvec | None = None) -> tuple[torch.Tensor, LinearSolveInfo]:
        """Solve ``matvec(x) = b``; returns ``(x, info)``.

        ``rmatvec`` (``v -> A^T v``) is needed by solvers whose :attr:`needs_rmatvec` is true
        (``"normal_cg"``) and ignored by the others. For a symmetric ``A`` it is ``matvec`` itself;
        only pass that when ``A`` is known to be symmetric (the engine does, for a Hessian).
        """
        if not isinstance(b, torch.Tensor) or b.dim() != 1:
            raise ValueError(f"b must be a 1-D tensor, got {getattr(b, 'shape', type(b).__name__)}; "
                             f"flatten it with bilevel.tree.flatten.")
        if x0 is not None and x0.shape != b.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)} but b has {tuple(b.shape)}; pass x0 like b.")
        if rmatvec is not None and not callable(rmatvec):
            raise TypeError(f"rmatvec must be a callable v -> A^T v on 1-D tensors, got {type(rmatvec).__name__}.")
        if self.needs_rmatvec and rmatvec is None:
            raise ValueError(
                f"{self.name} needs the transposed product: pass rmatvec=, a callable v -> A^T v (for a "
                f"symmetric A, rmatvec=matvec; with torch: the vector-Jacobian product of the map whose "
                f"Jacobian is A), or use 'gmres' or 'bicgstab', which need only matvec.")
        if self.damping:
            undamped = matvec

            def matvec(v, _m=undamped, _d=self.damping):
                return _m(v) + _d * v

            if rmatvec is not None:  # (A + d I)^T = A^T + d I
                undamped_t = rmatvec

                def rmatvec(v, _m=undamped_t, _d=self.damping):
                    return _m(v) + _d * v

        # only a solver that asks for the transposed product gets it: a subclass written as
        # _solve(matvec, b, x0) / solve_fixed(matvec, b, x0, flags) keeps working unchanged
        transposed = {"rmatvec": rmatvec} if self.needs_rmatvec else {}
        if in_transform():
            flags: dict[str, torch.Tensor] = {}
            x = self.solve_fixed(matvec, b, x0, flags, **transposed)
            nan = float("nan")
            status = LinearSolveStatus.UNCHECKED
            return x, LinearSolveInfo(self.max_iter, nan, nan, False, status, self._budget_matvecs(x0 is not None),
                                      self.name, flags)
        x, info = self._solve(matvec, b, x0, **transposed)
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
