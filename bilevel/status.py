"""The status vocabulary shared by every solver: why a solve stopped, and the warning it raises.

Every family of solves (inner solvers, linear solvers) reports a member of an enum derived from
:class:`Status`. The members every family has, with the same meaning, are

* ``CONVERGED``: the tolerance was met (the only :attr:`~Status.success`);
* ``MAX_ITER``: the budget ran out first (a :class:`BudgetWarning`, unless the budget was asked
  for with ``tol=0``);
* ``NONFINITE``: a NaN or infinity appeared (a :class:`NonFiniteWarning`);
* ``DIVERGED``: the iteration grew instead of converging (a :class:`DivergenceWarning`);
* ``UNCHECKED``: the solve ran inside a ``torch.func`` transform, where nothing can be checked.

Each family adds its own breakdowns (``NEGATIVE_CURVATURE`` and ``BREAKDOWN`` for linear solves,
``LINE_SEARCH_FAILED`` and ``NOT_STATIONARY`` for inner solves). A member's value is the advice for the user; its
:attr:`~Status.warning` is the warning class a solve that ends with it emits.

Warnings carry what was measured: ``warning.status`` (the member) and ``warning.info`` (the
:class:`bilevel.SolveResult` or :class:`bilevel.linalg.LinearSolveInfo`), so code can react to a
breakdown by its type rather than by its text::

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        phi = bl.argmin(...)
        loss(phi).backward()
    hit = any(isinstance(w.message, bl.NegativeCurvatureWarning) for w in caught)
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["Status", "SHARED_STATUSES", "ConvergenceWarning", "BudgetWarning", "BreakdownWarning",
           "NegativeCurvatureWarning", "NonFiniteWarning", "DivergenceWarning", "LineSearchWarning",
           "ConvergenceError"]

#: The members every status family defines, with the same meaning.
SHARED_STATUSES = ("CONVERGED", "MAX_ITER", "NONFINITE", "DIVERGED", "UNCHECKED")


class ConvergenceWarning(UserWarning):
    """An inner solver or a linear solver stopped before meeting its tolerance.

    The result still comes back (``converged=False`` with a ``status`` that
    says what to change); call ``result.raise_if_failed()`` to turn the
    failure into an error, or filter this warning to silence it.

    Attributes
    ----------
    status:
        The :class:`Status` member the solve ended with (``None`` when not from a solve).
    info:
        What the solve measured: a :class:`bilevel.SolveResult` or a
        :class:`bilevel.linalg.LinearSolveInfo` (``None`` when not from a solve).
    """

    def __init__(self, message: str = "", *, status: "Status | None" = None, info: Any = None):
        super().__init__(message)
        self.status = status
        self.info = info


class BudgetWarning(ConvergenceWarning):
    """A solver used its whole budget (``max_iter``) before meeting its tolerance.

    Often intended (a fixed number of inner steps, 5 CG steps): silence these
    alone with ``warnings.simplefilter("ignore", bilevel.BudgetWarning)`` and
    still see the :class:`BreakdownWarning` s.
    """


class BreakdownWarning(ConvergenceWarning):
    """A solver stopped because something is wrong: negative curvature, divergence, NaN, a failed line search."""


class CompileWarning(UserWarning):
    """``compile=True`` could not compile a function with :func:`torch.compile`; the solve went on without it.

    The message names the function and torch's reason. Nothing is lost but speed: the eager
    evaluation that replaces the compiled one computes the same values.
    """


def compile_failure(what: str, error: BaseException, then: str) -> CompileWarning:
    """The :class:`CompileWarning` for ``error`` raised while compiling ``what``; ``then`` says what happens next."""
    reason = " ".join(str(error).split())[:300]
    return CompileWarning(f"{what}: torch.compile failed ({type(error).__name__}: {reason}); {then}. "
                          f"Pass compile=False to skip the attempt.")


class NegativeCurvatureWarning(BreakdownWarning):
    """A linear solve met a direction ``p`` with ``p^T A p <= 0``: the system is not positive definite.

    For the engine: the inner Hessian is indefinite at ``phi``, so the implicit function theorem
    does not apply as posed. ``info.extra["min_curvature"]`` holds the smallest curvature seen.
    """


class NonFiniteWarning(BreakdownWarning):
    """A NaN or infinity appeared in a solve (the last finite iterate is returned)."""


class DivergenceWarning(BreakdownWarning):
    """A solve grew instead of converging (a step size too large for the problem's curvature)."""


class LineSearchWarning(BreakdownWarning):
    """A line search found no step that decreases the objective enough."""


class ConvergenceError(RuntimeError):
    """Raised by ``raise_if_failed()`` on a result that did not converge."""


_WARNINGS: dict[str, type[ConvergenceWarning]] = {
    "MAX_ITER": BudgetWarning,
    "NOT_STATIONARY": BudgetWarning,
    "NOT_A_ROOT": BudgetWarning,
    "NONFINITE": NonFiniteWarning,
    "DIVERGED": DivergenceWarning,
    "NEGATIVE_CURVATURE": NegativeCurvatureWarning,
    "LINE_SEARCH_FAILED": LineSearchWarning,
    "BREAKDOWN": BreakdownWarning,  # a Krylov method's division by zero (BiCGStab, normal-equations CG)
}


class Status(enum.Enum):
    """Base of the status families (:class:`bilevel.SolverStatus`, :class:`bilevel.linalg.LinearSolveStatus`).

    A family is an enum deriving from this one that defines at least :data:`SHARED_STATUSES`;
    a member's value is the advice for the user.
    """

    @property
    def success(self) -> bool:
        """True only for ``CONVERGED``."""
        return self.name == "CONVERGED"

    @property
    def advice(self) -> str:
        """What to do about it (the member's value)."""
        return self.value

    @property
    def warning(self) -> type[ConvergenceWarning] | None:
        """The warning class a solve ending with this status emits (``None``: no warning)."""
        return _WARNINGS.get(self.name)

    @property
    def breakdown(self) -> bool:
        """True when something is wrong (warns even when a fixed budget was asked for)."""
        cls = self.warning
        return cls is not None and issubclass(cls, BreakdownWarning)


def follows_status(cls: type) -> type:
    """Class decorator for a result dataclass: ``converged`` and ``message`` become properties of ``status``.

    ``converged`` is ``status.success`` and ``message`` is ``status.value`` (the advice), followed by
    the result's ``detail`` where it has one (what a backend said). Both stay
    dataclass fields, so results are still built positionally as before; a ``converged`` passed at
    construction must agree with the status (a contradiction is a ``ValueError``), and a ``message``
    passed is ignored: the advice always comes from the status. Neither can be assigned afterwards:
    assign ``status``, and both follow. The dataclass calls :func:`check_given` from ``__post_init__``.
    """
    names = {f for f in getattr(cls, "__dataclass_fields__", {})}
    if "converged" in names:
        def get_converged(self) -> bool:
            return self.status.success

        def set_converged(self, value: bool) -> None:
            if self.__dict__.get("_built"):
                raise AttributeError(f"{type(self).__name__}.converged follows from status "
                                     f"(status.success); assign status instead.")
            self.__dict__["_converged_given"] = value

        cls.converged = property(get_converged, set_converged,
                                 doc="Whether the solve met its tolerance: ``status.success``.")
    if "message" in names:
        def get_message(self) -> str:
            detail = getattr(self, "detail", "")
            return f"{self.status.value} {detail}" if detail else self.status.value

        def set_message(self, value: str) -> None:
            if self.__dict__.get("_built"):
                raise AttributeError(f"{type(self).__name__}.message is the advice of status "
                                     f"(status.value); assign status instead, or detail to add facts.")

        cls.message = property(get_message, set_message,
                               doc="The advice attached to :attr:`status` (then ``detail``, if any).")
    return cls


def check_given(result: Any) -> None:
    """In ``__post_init__`` of a :func:`follows_status` result: a ``converged`` given must agree with ``status``."""
    given = result.__dict__.pop("_converged_given", None)
    if not isinstance(result.status, Status):
        raise TypeError(f"status must be a bilevel status member (e.g. bl.SolverStatus.CONVERGED), got "
                        f"{result.status!r}.")
    if given is not None and bool(given) != result.status.success:
        raise ValueError(f"converged={given!r} contradicts status {result.status.name} (converged means "
                         f"status.success); pass the status that says what happened and converged follows.")
    result.__dict__["_built"] = True
