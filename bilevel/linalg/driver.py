"""The iteration driver of linear solvers: a method is ``init`` and ``step``; the driver does the rest.

A method written as an :class:`IterativeLinearSolver` gives the state after one more iteration
(``step``) and, where an iteration can break down, a flag saying that its result must be
discarded (CG: a direction of non-positive curvature). The driver owns ``max_iter``, the
tolerance test on the residual, the non-finite check, the breakdown rule (keep the last good
iterate) and how the steps are driven:

* :meth:`IterativeLinearSolver._solve`: step by step, reading the residual back after each
  step, so that it stops as soon as it can and reports what happened;
* :meth:`IterativeLinearSolver.solve_fixed`: exactly ``max_iter`` steps with nothing read back,
  a finished or broken-down solve frozen by a mask (``torch.where``), which runs under
  :func:`torch.func.vmap` and without a host synchronisation on a GPU. Both run the same step,
  so both give the same ``x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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


def _where(mask: torch.Tensor, keep: LinearState, new: LinearState) -> LinearState:
    return LinearState(torch.where(mask, keep.x, new.x), torch.where(mask, keep.r, new.r),
                       {k: torch.where(mask, keep.aux[k], v) for k, v in new.aux.items()})


class IterativeLinearSolver(LinearSolver):
    """A linear solver written as ``init`` / ``step``, driven by this module (see its docstring).

    Subclasses implement :meth:`init` and :meth:`step`, and may override :meth:`prepare` (work
    before the first step that may end the solve, e.g. a step-size estimate), :meth:`breakdown`
    (the status of a discarded step), :meth:`diverged` and :meth:`extra` (facts for ``info.extra``).
    """

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

    @property
    def vmappable(self) -> bool:
        """True: :meth:`solve_fixed` reads nothing back (subclasses whose :meth:`prepare` reads values say no)."""
        return True

    def _solve(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None) -> tuple[torch.Tensor, LinearSolveInfo]:
        early, matvecs, extra = self.prepare(matvec, b)
        bnorm = torch.linalg.vector_norm(b).item()
        if early is not None:
            return torch.zeros_like(b), LinearSolveInfo(0, bnorm, 1.0 if bnorm > 0 else 0.0, False, early, matvecs,
                                                        extra=extra)
        state = self.init(matvec, b, x0, extra)
        matvecs += 0 if x0 is None else 1
        rnorm = r0 = torch.linalg.vector_norm(state.r).item()
        scale = bnorm if bnorm > 0 else 1.0
        status = LinearSolveStatus.CONVERGED if rnorm <= self.tol * scale else LinearSolveStatus.MAX_ITER
        k = 0
        last = state
        while status is LinearSolveStatus.MAX_ITER and k < self.max_iter:
            new, broke = self.step(matvec, state)
            matvecs += 1
            last = new
            if broke is not None and bool(broke):
                status = self.breakdown(new)
                break
            k += 1
            state = new
            rnorm = torch.linalg.vector_norm(state.r).item()
            if not math.isfinite(rnorm):
                status = LinearSolveStatus.NONFINITE
            elif rnorm <= self.tol * scale:
                status = LinearSolveStatus.CONVERGED
            elif self.diverged(rnorm, r0):
                status = LinearSolveStatus.DIVERGED
        rel = rnorm / bnorm if bnorm > 0 else rnorm
        return state.x, LinearSolveInfo(k, rnorm, rel, status.success, status, matvecs,
                                        extra={**extra, **self.extra(last)})

    def solve_fixed(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None,
                    flags: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Exactly ``max_iter`` steps with nothing read back; a finished or broken-down solve stays frozen.

        The result equals :meth:`_solve`'s ``x`` (the same steps, stopped by a mask instead of a
        ``break``). ``flags`` receives ``"breakdown"`` (a bool tensor: a step was discarded) and the
        method's own name for it (CG: ``"negative_curvature"``).
        """
        if not self.vmappable:
            return super().solve_fixed(matvec, b, x0, flags)
        _, _, prepared = self.prepare(matvec, b)  # a vmappable solver's prepare reads nothing back
        state = self.init(matvec, b, x0, prepared)
        threshold = self.tol * torch.linalg.vector_norm(b)
        done = torch.linalg.vector_norm(state.r) <= threshold
        broke_any = torch.zeros_like(done)
        for _ in range(self.max_iter):
            new, broke = self.step(matvec, state)
            if broke is not None:
                broke_any = broke_any | (~done & broke)
                done = done | broke
            state = _where(done, state, new)
            done = done | (torch.linalg.vector_norm(state.r) <= threshold)
        if flags is not None:
            flags["breakdown"] = broke_any
            if self.breakdown_flag:
                flags[self.breakdown_flag] = broke_any
        return state.x

    #: The name under which :meth:`solve_fixed` also reports a breakdown in ``flags`` (CG: "negative_curvature").
    breakdown_flag: str = ""

