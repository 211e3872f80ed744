"""What a root solve returns: :class:`RootStatus` (why it stopped) and :class:`RootResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..status import ConvergenceError, Status, check_given, follows_status

__all__ = ["RootStatus", "RootResult"]


class RootStatus(Status):
    """Why a root solve stopped. Each value is advice for the user (see :class:`bilevel.Status`)."""

    CONVERGED = "The residual ||F(phi, theta)|| reached tol."
    MAX_ITER = (
        "The maximum number of iterations was reached before ||F|| <= tol; increase max_iter, loosen tol, "
        "or use a faster solver ('anderson', 'newton_krylov'; see bilevel.roots.available())."
    )
    NONFINITE = (
        "A non-finite value (NaN or inf) appeared in F; lower the damping or step size, or start closer. "
        "The last finite iterate is returned."
    )
    DIVERGED = (
        "The residual grew instead of shrinking (at the end ||F|| was more than DIVERGENCE_FACTOR times its "
        "start): the map is not a contraction at this damping; lower damping or step_size, or use "
        "'newton_krylov'."
    )
    LINE_SEARCH_FAILED = (
        "The line search found no step that decreases ||F||: the Jacobian may be singular near phi, or tol is "
        "below what the floating-point precision can reach."
    )
    UNCHECKED = (
        "The solver ran inside a torch.func transform: it took exactly max_iter steps and could not test "
        "convergence there."
    )
    NOT_A_ROOT = (
        "The point returned by the solver is not a root (||F|| > tol); solve more accurately or loosen tol: the "
        "implicit hypergradient assumes F(phi, theta) = 0."
    )


@follows_status
@dataclass
class RootResult:
    """The outcome of a root solve.

    Attributes
    ----------
    phi:
        The solution, in the structure of ``phi0`` (detached; :func:`bilevel.root` gives one that
        carries gradients).
    converged:
        ``status.success`` (``residual_norm <= tol``); a property.
    iterations:
        Iterations performed.
    residual_norm:
        ``||F(phi, theta)||`` at the returned ``phi``.
    status:
        A :class:`RootStatus`.
    message:
        The advice of :attr:`status` (then :attr:`detail`); a property.
    history:
        ``{"residual_norm": [...]}`` per iterate.
    solver:
        The solver's name.
    stats:
        ``{"nfev": residual (or map) evaluations}``.
    detail:
        What a backend said beyond the status.
    """

    phi: Any
    converged: bool
    iterations: int
    residual_norm: float
    status: RootStatus
    message: str
    history: dict[str, list] = field(default_factory=dict)
    solver: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    def __post_init__(self) -> None:
        check_given(self)

    def raise_if_failed(self) -> "RootResult":
        """Raise :class:`bilevel.ConvergenceError` unless the solve converged; return ``self``."""
        if not self.converged:
            raise ConvergenceError(f"root solver {self.solver!r} stopped after {self.iterations} iterations with "
                                   f"||F|| = {self.residual_norm:.3g}: {self.message}")
        return self
