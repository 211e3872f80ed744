"""Linear solvers written as ``init`` / ``step`` (:class:`IterativeLinearSolver`), run by the shared driver.

A method gives the state after one more iteration (``step``) and, where an iteration can break
down, a flag saying that its result must be discarded (CG: a direction of non-positive
curvature). The driver (:mod:`bilevel._loop`, which the inner solvers use too) owns ``max_iter``,
the tolerance test on the residual, the non-finite check, the breakdown rule (keep the last good
iterate), divergence and how the steps are executed:

* :meth:`IterativeLinearSolver._solve`: step by step, reading the residual back after each
  step, so that it stops as soon as it can and reports what happened; with ``tol = 0`` (a
  fixed budget) the steps run without read-backs and the residuals are read back once, at the
  end, with the same result;
* :meth:`IterativeLinearSolver.solve_fixed`: exactly ``max_iter`` steps with nothing read back,
  a finished or broken-down solve frozen by a mask (``torch.where``), which runs under
  :func:`torch.func.vmap` and without a host synchronisation on a GPU. All run the same step,
  so all give the same ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._loop import Iteration, Outcome, drive
from .base import LinearSolveInfo, LinearSolver, LinearSolveStatus, Matvec

__all__ = ["LinearState", "IterativeLinearSolver"]


@dataclass
class LinearState:
    """The iterate of an :class:`IterativeLinearSolver`: ``x``, its residual ``r = b - A x``, method tensors.

    ``aux`` holds the method's own tensors (CG: the direction ``p`` and ``r^T r``); every value in it is
    a tensor, so that the masked driver can freeze a finished solve with ``torch.where``.
    """

    x: torch.Tensor
    r: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def safe_divisor(t: torch.Tensor) -> torch.Tensor:
    """``t`` where it is non-zero, 1 elsewhere: a branch-free divisor that cannot turn an exact zero into a NaN
    (a NaN in ``t`` stays a NaN, for the driver's non-finite check)."""
    return torch.where(t != 0, t, torch.ones_like(t))


class _WithTranspose:
    """``v -> A v`` carrying ``rmatvec`` (``v -> A^T v``): the ``matvec`` a method whose
    :attr:`~bilevel.linalg.LinearSolver.needs_rmatvec` is true receives in :meth:`IterativeLinearSolver.init`
    and :meth:`IterativeLinearSolver.step`."""

    __slots__ = ("matvec", "rmatvec")

    def __init__(self, matvec: Matvec, rmatvec: Matvec):
        self.matvec, self.rmatvec = matvec, rmatvec

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)


class IterativeLinearSolver(LinearSolver):
    """A linear solver written as ``init`` / ``step``, driven by this module (see its docstring).

    Subclasses implement :meth:`init` and :meth:`step`, and may override :meth:`prepare` (work
    before the first step that may end the solve, e.g. a step-size estimate), :meth:`breakdown`
    (the status of a discarded step), :meth:`diverged` and :meth:`extra` (facts for ``info.extra``).
    A step that spends more than one product sets :attr:`matvecs_per_step` (BiCGStab: 2), and an
    ``init`` that spends other products than ``A x0`` overrides :meth:`init_matvecs`, so that
    ``info.matvecs`` counts them all. A method whose :attr:`needs_rmatvec` is true receives as
    ``matvec`` a callable that also has ``matvec.rmatvec(v) = A^T v``.
    """

    #: Matrix-vector products (``A v`` or ``A^T v``) one :meth:`step` spends.
    matvecs_per_step: int = 1

    def init_matvecs(self, warm: bool) -> int:
        """Products :meth:`init` spends: ``A x0`` when an ``x0`` is given (``warm``), none otherwise."""
        return 1 if warm else 0

    def _budget_matvecs(self, warm: bool) -> int:
        return self.init_matvecs(warm) + self.matvecs_per_step * self.max_iter

    def prepare(self, matvec: Matvec, b: torch.Tensor) -> tuple[LinearSolveStatus | None, int, dict]:
        """Work before the first step: ``(status that ends the solve at x = 0 or None, matvecs, extra)``."""
        return None, 0, {}

    def init(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None, prepared: dict) -> LinearState:
        """The state at ``x0`` (default 0); ``prepared`` is :meth:`prepare`'s ``extra``. One matvec with ``x0``."""
        if x0 is None:
            return LinearState(torch.zeros_like(b), b.clone())
        return LinearState(x0.clone(), b - matvec(x0))

    def step(self, matvec: Matvec, state: LinearState) -> tuple[LinearState, torch.Tensor | None]:
        """One iteration (one matvec): ``(next state, breakdown)``, ``breakdown`` a 0-d bool tensor or None.

        A step that breaks down is discarded: the driver keeps ``state``. The step must not read
        values back (no ``float()``, ``bool()``, ``.item()``): the masked driver runs it under vmap.
        """
        raise NotImplementedError

    def breakdown(self, new: LinearState) -> LinearSolveStatus:
        """The status of a discarded step (default: NONFINITE)."""
        return LinearSolveStatus.NONFINITE

    def diverged(self, rnorm: float, r0: float) -> bool:
        """Whether the residual grew so much that the solve should stop as DIVERGED (default: never)."""
        return False

    def extra(self, last: LinearState) -> dict:
        """Facts for ``info.extra`` from the last state computed (kept or discarded)."""
        return {}

    def recurrence_norm(self, state: LinearState) -> torch.Tensor | None:
        """``||r||`` from a quantity the method already holds (CG: ``sqrt(r^T r)``), or None.

        The masked driver (:meth:`solve_fixed`) tests convergence with it, one reduction fewer per
        step; the other drivers measure ``||r||`` itself, which may differ from it in the last bit.
        """
        return None

    @property
    def vmappable(self) -> bool:
        """True: :meth:`solve_fixed` reads nothing back (subclasses whose :meth:`prepare` reads values say no)."""
        return True

    def _solve(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None,
               rmatvec: Matvec | None = None) -> tuple[torch.Tensor, LinearSolveInfo]:
        if rmatvec is not None:
            matvec = _WithTranspose(matvec, rmatvec)
        early, matvecs, extra = self.prepare(matvec, b)
        bnorm = torch.linalg.vector_norm(b).item()
        if early is not None:
            return torch.zeros_like(b), LinearSolveInfo(0, bnorm, 1.0 if bnorm > 0 else 0.0, False, early, matvecs,
                                                        extra=extra)
        state = self.init(matvec, b, x0, extra)
        matvecs += self.init_matvecs(x0 is not None)
        scale = bnorm if bnorm > 0 else 1.0
        # tol == 0 asks for exactly max_iter steps: run them and read the residuals back once, at the end
        run = drive(_LinearIteration(self, matvec), state, max_iter=self.max_iter, threshold=self.tol * scale,
                    mode="deferred" if self.tol == 0.0 else "synced")
        status = self.breakdown(run.last) if run.outcome is Outcome.BREAKDOWN else _STATUS[run.outcome]
        matvecs += self.matvecs_per_step * (run.steps + (1 if run.outcome is Outcome.BREAKDOWN else 0))
        rnorm = run.residuals[-1] if run.residuals else float("nan")
        rel = rnorm / bnorm if bnorm > 0 else rnorm
        return run.state.x, LinearSolveInfo(run.steps, rnorm, rel, status.success, status, matvecs,
                                            extra={**extra, **self.extra(run.last)})

    def solve_fixed(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None,
                    flags: dict[str, torch.Tensor] | None = None, rmatvec: Matvec | None = None) -> torch.Tensor:
        """Exactly ``max_iter`` steps with nothing read back; a finished or broken-down solve stays frozen.

        The result equals :meth:`_solve`'s ``x`` (the same steps, stopped by a mask instead of a
        ``break``). ``flags`` receives ``"breakdown"`` (a bool tensor: a step was discarded) and the
        method's own name for it (CG: ``"negative_curvature"``).
        """
        if not self.vmappable:
            return super().solve_fixed(matvec, b, x0, flags)
        if rmatvec is not None:
            matvec = _WithTranspose(matvec, rmatvec)
        _, _, prepared = self.prepare(matvec, b)  # a vmappable solver's prepare reads nothing back
        state = self.init(matvec, b, x0, prepared)
        run = drive(_LinearIteration(self, matvec, masked=True), state, max_iter=self.max_iter,
                    threshold=self.tol * torch.linalg.vector_norm(b), mode="masked")
        if flags is not None:
            broke = run.flags.get("breakdown")
            if broke is None:
                broke = torch.zeros((), dtype=torch.bool, device=b.device)
            flags["breakdown"] = broke
            if self.breakdown_flag:
                flags[self.breakdown_flag] = broke
        return run.state.x

    #: The name under which :meth:`solve_fixed` also reports a breakdown in ``flags`` (CG: "negative_curvature").
    breakdown_flag: str = ""



_STATUS = {Outcome.CONVERGED: LinearSolveStatus.CONVERGED, Outcome.MAX_ITER: LinearSolveStatus.MAX_ITER,
           Outcome.NONFINITE: LinearSolveStatus.NONFINITE, Outcome.DIVERGED: LinearSolveStatus.DIVERGED}


class _LinearIteration(Iteration):
    """An :class:`IterativeLinearSolver` bound to its matvec, for :func:`bilevel._loop.drive`."""

    def __init__(self, solver: IterativeLinearSolver, matvec: Matvec, masked: bool = False):
        self.solver, self.matvec, self.masked = solver, matvec, masked

    def step(self, state: LinearState, k: int) -> tuple[LinearState, torch.Tensor | None]:
        return self.solver.step(self.matvec, state)

    def measure(self, state: LinearState) -> tuple[torch.Tensor, None]:
        if self.masked:
            norm = self.solver.recurrence_norm(state)
            if norm is not None:
                return norm, None
        return torch.linalg.vector_norm(state.r), None

    def diverging(self, residual: float, residual0: float) -> bool:
        return self.solver.diverged(residual, residual0)
