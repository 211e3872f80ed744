"""Inner solvers written as ``init`` / ``step`` (:class:`IterativeSolver`), run by the shared driver.

The driver (:mod:`bilevel._loop`, which the linear solvers use too) owns ``max_iter``, the
stopping test ``||grad_phi G|| <= tol``, the non-finite check, divergence, the history, and how
the steps are executed: step by step with a read-back each step, without read-backs (``tol = 0``
with a step that reads nothing: one read-back at the end), or inside a ``torch.func`` transform
(a fixed count, nothing read back). This module binds a solver to its objective for the driver
and names the driver's outcome as a :class:`SolverStatus`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._loop import Iteration, Outcome, drive
from .base import Solver, _require_vmappable
from .objective import Objective
from .result import DIVERGENCE_FACTOR, SolveResult, SolverStatus

__all__ = ["SolverState", "IterativeSolver"]


def _diverged(grad_norms: list[float], values: list[float]) -> bool:
    """Whether a finished, unconverged run grew: the last G above the first and ``||grad G||`` well above."""
    if len(grad_norms) < 2:
        return False
    return values[-1] > values[0] and grad_norms[-1] > DIVERGENCE_FACTOR * max(grad_norms[0], 1e-30)


@dataclass
class SolverState:
    """The iterate of an :class:`IterativeSolver`: ``x`` with ``G(x)`` and ``grad G(x)``.

    ``status`` may be set by ``step`` to stop the loop (e.g. a failed line
    search); ``aux`` holds method-specific state (momentum, step sizes);
    ``record`` holds per-step facts (``{"step_size": 0.5}``) that the loop
    appends to ``result.history`` under the same keys.
    """

    x: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor
    status: SolverStatus | None = None
    aux: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


class IterativeSolver(Solver):
    """An iterative solver driven by the shared loop.

    Subclasses implement ``init(fun, x0) -> SolverState`` and
    ``step(fun, state, k) -> SolverState``. The loop owns ``max_iter``, the
    test ``||grad_phi G|| <= tol``, the non-finite check (the last finite
    iterate is returned) and the history (``grad_norm`` and ``value`` per
    iterate, plus whatever each step puts in ``SolverState.record``).
    """

    def init(self, fun: Objective, x0: torch.Tensor) -> SolverState:
        value, grad = fun.value_and_grad(x0)
        return SolverState(x0, value, grad)

    def step(self, fun: Objective, state: SolverState, k: int) -> SolverState:
        raise NotImplementedError

    def run(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        it = _InnerIteration(self, fun)
        if fun.functional:  # inside a torch.func transform: exactly max_iter steps, nothing read back
            _require_vmappable(self)
            run = drive(it, self.init(fun, x0), max_iter=self.max_iter, threshold=None, mode="masked")
            status = SolverStatus.UNCHECKED
            return SolveResult(run.state.x, False, self.max_iter, float("nan"), status, status.value, {},
                               float("nan"), self.name, fun.stats())
        if getattr(self, "compile", False) and not getattr(self, "_compile_failed", False):
            fun.enable_compile()
        # tol == 0 with a step that reads nothing back: run the budget and read back once, at the end
        state = self.init(fun, x0.detach().clone())
        threshold = self.tol
        if self.rtol > 0:  # relative to the start: units-free
            threshold = max(self.tol, self.rtol * torch.linalg.vector_norm(state.grad).item())
        mode = "deferred" if threshold == 0.0 and self.vmappable else "synced"
        run = drive(it, state, max_iter=self.max_iter, threshold=threshold, mode=mode)
        status = run.halt if run.outcome is Outcome.HALTED else _STATUS[run.outcome]
        history: dict[str, list] = {"grad_norm": run.residuals, "value": run.values}
        for record in run.records:
            for key, item in record.items():
                history.setdefault(key, []).append(item)
        if fun.compile_failed:
            self._compile_failed = True  # said once (a CompileWarning); later solves run eagerly from the start
        gn = run.residuals[-1] if run.residuals else float("nan")
        val = run.values[-1] if run.values else float("nan")
        return SolveResult(run.state.x, status.success, run.steps, gn, status, status.value, history, val,
                           self.name, fun.stats())


#: The gradients a deferred inner run keeps at most to measure their norms in one operation.
_MEASURE_BYTES = 8 * 2 ** 20

_STATUS = {Outcome.CONVERGED: SolverStatus.CONVERGED, Outcome.MAX_ITER: SolverStatus.MAX_ITER,
           Outcome.NONFINITE: SolverStatus.NONFINITE, Outcome.DIVERGED: SolverStatus.DIVERGED,
           Outcome.BREAKDOWN: SolverStatus.NONFINITE}


class _InnerIteration(Iteration):
    """An :class:`IterativeSolver` bound to its objective, for :func:`bilevel._loop.drive`."""

    def __init__(self, solver: IterativeSolver, fun: Objective):
        self.solver, self.fun = solver, fun

    def step(self, state: SolverState, k: int) -> tuple[SolverState, None]:
        return self.solver.step(self.fun, state, k), None

    def measure(self, state: SolverState) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.vector_norm(state.grad), state.value  # value_and_grad's values are detached

    def measure_many(self, states: list[SolverState]) -> tuple[torch.Tensor, torch.Tensor]:
        # one fused norm over the batch (the same numbers as vector_norm one by one)
        return torch.stack(torch._foreach_norm([s.grad for s in states])), torch.stack([s.value for s in states])

    def batch(self, state: SolverState) -> int:
        # up to 32 states wait to be measured, holding at most ~8 MiB of gradients
        return max(1, min(32, _MEASURE_BYTES // max(1, state.grad.numel() * state.grad.element_size())))

    def halt(self, state: SolverState) -> SolverStatus | None:
        return state.status

    def record(self, state: SolverState) -> dict:
        return state.record

    def diverged(self, residuals: list[float], values: list[float]) -> bool:
        return _diverged(residuals, values)
