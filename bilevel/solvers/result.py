"""What an inner solve returns: :class:`SolverStatus` (why it stopped) and :class:`SolveResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..status import ConvergenceError, Status, check_given, follows_status

__all__ = ["SolverStatus", "SolveResult", "DIVERGENCE_FACTOR"]


class SolverStatus(Status):
    """Why an inner solve stopped. Each value is advice for the user (see :class:`bilevel.Status`)."""

    CONVERGED = "The stationarity residual ||grad_phi G|| reached tol."
    MAX_ITER = (
        "The maximum number of iterations was reached before ||grad_phi G|| <= tol; increase max_iter, "
        "loosen tol, or use a faster solver (see bilevel.solvers.available())."
    )
    NONFINITE = (
        "A non-finite value (NaN or inf) appeared in G or its gradient; lower step_size (or pass "
        "step_size=None for a line search), or check the objective near phi0. The last finite iterate "
        "is returned."
    )
    DIVERGED = (
        "The iterates grew instead of converging: at the end both G and ||grad_phi G|| were larger than at "
        "phi0 (the gradient norm by more than DIVERGENCE_FACTOR times). The step size is too large for the "
        "curvature of G: lower step_size, or pass step_size=None for a line search."
    )
    LINE_SEARCH_FAILED = (
        "The line search found no step that decreases G enough: tol may be below what the floating-point "
        "precision can reach (loosen tol or use float64), or G is non-smooth or its gradient is wrong."
    )
    UNCHECKED = (
        "The solver ran inside a torch.func transform (e.g. vmap over tasks): it took exactly max_iter steps "
        "and could not test convergence there; check ||grad_phi G|| outside the transform if it matters."
    )
    NOT_STATIONARY = (
        "The point returned by the solver is not stationary (||grad_phi G|| > tol); solve more accurately "
        "or loosen tol: the implicit hypergradient assumes phi minimises G."
    )


#: A solve that ends without converging is DIVERGED when G grew and ||grad_phi G|| grew by more than
#: this factor from phi0 (tested once, at the end: no read-back per step).
DIVERGENCE_FACTOR = 10.0


@follows_status
@dataclass
class SolveResult:
    """The outcome of an inner solve; every solver returns one.

    Attributes
    ----------
    phi:
        The solution, in the structure of ``phi0`` (detached; use
        :func:`bilevel.argmin` for a ``phi`` that carries gradients).
    converged:
        ``status.success`` (``grad_norm <= tol``); a property of :attr:`status`.
    iterations:
        Iterations performed.
    grad_norm:
        ``||grad_phi G(phi, theta)||`` at the returned ``phi``.
    status:
        A :class:`SolverStatus`; :attr:`message` says what to do about it.
    message:
        Human-readable advice for :attr:`status` (``status.value``, then
        :attr:`detail`; a property).
    history:
        ``{"grad_norm": [...], "value": [...]}`` per iterate (as available), plus
        solver-specific per-step lists (e.g. ``step_size``).
    value:
        ``G(phi, theta)`` at the returned ``phi`` (``nan`` if not computed).
    solver:
        Name of the solver that produced the result.
    stats:
        Work counters: ``nfev`` (objective values), ``ngev`` (gradients),
        ``nhvp`` (Hessian-vector products).
    backward:
        For a result from ``bl.argmin(..., full_output=True)``: the
        :class:`bilevel.ImplicitInfo` of the implicit backward pass once it
        has run (HVPs spent, linear-solve status), else ``None``.
    detail:
        What the solver's backend said, where it said more than the status
        (SciPy's or cvxpy's own message); appended to :attr:`message`.
    """

    phi: Any
    converged: bool
    iterations: int
    grad_norm: float
    status: SolverStatus
    message: str
    history: dict[str, list] = field(default_factory=dict)
    value: float = float("nan")
    solver: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    backward: Any = None
    detail: str = ""

    def __post_init__(self) -> None:
        check_given(self)

    def raise_if_failed(self) -> "SolveResult":
        """Raise :class:`bilevel.ConvergenceError` unless the solve converged; return ``self``."""
        if not self.converged:
            raise ConvergenceError(
                f"inner solver {self.solver!r} stopped after {self.iterations} iterations with "
                f"||grad_phi G|| = {self.grad_norm:.3g}: {self.message}"
            )
        return self
