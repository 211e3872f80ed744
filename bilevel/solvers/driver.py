"""The iteration driver of inner solvers: :class:`IterativeSolver` (``init`` / ``step``) and its loops.

The driver owns ``max_iter``, the stopping test ``||grad_phi G|| <= tol``, the non-finite check,
divergence detection, the history, and how the steps are driven: step by step with a read-back
each step, without read-backs (``tol = 0`` with a fixed step: one read-back at the end), or inside
a ``torch.func`` transform (a fixed count, nothing read back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

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
        if fun.functional:
            return self._run_fixed(fun, x0)
        if self.tol == 0.0 and self.vmappable:
            return self._run_unsynced(fun, x0)
        state = self.init(fun, x0.detach().clone())
        history: dict[str, list] = {"grad_norm": [], "value": []}
        last_good = state
        k = 0
        while True:
            gn = torch.linalg.vector_norm(state.grad).item()
            val = state.value.item()
            if not (math.isfinite(gn) and math.isfinite(val)):
                status = SolverStatus.NONFINITE
                state = last_good
                break
            history["grad_norm"].append(gn)
            history["value"].append(val)
            last_good = state
            if gn <= self.tol:
                status = SolverStatus.CONVERGED
                break
            if state.status is not None:
                status = state.status
                break
            if k >= self.max_iter:
                status = SolverStatus.MAX_ITER
                break
            state = self.step(fun, state, k)
            for key, item in state.record.items():
                history.setdefault(key, []).append(item)
            k += 1
        if status is SolverStatus.MAX_ITER and _diverged(history["grad_norm"], history["value"]):
            status = SolverStatus.DIVERGED
        gn = history["grad_norm"][-1] if history["grad_norm"] else float("nan")
        val = history["value"][-1] if history["value"] else float("nan")
        iterations = len(history["grad_norm"]) - 1 if status is not SolverStatus.NONFINITE else k
        return SolveResult(state.x, status.success, max(iterations, 0), gn, status, status.value,
                           history, val, self.name, fun.stats())


    def _run_unsynced(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        """The shared loop without reading values back at every step (``tol == 0``, a fixed step size).

        With ``tol == 0`` the loop runs ``max_iter`` steps unless an iterate is exactly stationary or
        non-finite; those tests move to the device (the iterate to return is selected with
        ``torch.where``) and the values are read back once, at the end. On a GPU this removes a host
        synchronisation per inner step. The result is the one of the step-by-step loop: the same
        point, status, iteration count and history. A solver's step runs unchanged: it never asks how
        it is being driven (a step that must read values back, such as a line search, makes the
        solver not :attr:`~bilevel.solvers.Solver.vmappable`, and this loop is not used for it).
        """
        state = self.init(fun, x0.detach().clone())
        grad_norms, values, records = [], [], []
        keep = state.x
        alive = torch.ones((), dtype=torch.bool, device=state.x.device)
        for k in range(self.max_iter + 1):
            gn = torch.linalg.vector_norm(state.grad)
            grad_norms.append(gn)
            values.append(state.value.detach())
            finite = torch.isfinite(gn) & torch.isfinite(state.value)
            keep = torch.where(alive & finite, state.x, keep)
            alive = alive & finite & (gn > self.tol)  # the loop's stopping tests, on the device
            if k < self.max_iter:
                state = self.step(fun, state, k)
                records.append(state.record)
        gns = torch.stack(grad_norms).tolist()  # the one read-back
        vals = torch.stack(values).tolist()
        status, last = SolverStatus.MAX_ITER, self.max_iter
        for k, (gn, val) in enumerate(zip(gns, vals)):
            if not (math.isfinite(gn) and math.isfinite(val)):
                status, last = SolverStatus.NONFINITE, k
                break
            if gn <= self.tol:
                status, last = SolverStatus.CONVERGED, k
                break
        kept = last if status is SolverStatus.NONFINITE else last + 1  # history holds finite iterates only
        history: dict[str, list] = {"grad_norm": gns[:kept], "value": vals[:kept]}
        if status is SolverStatus.MAX_ITER and _diverged(history["grad_norm"], history["value"]):
            status = SolverStatus.DIVERGED
        for record in records[:last]:  # the steps the step-by-step loop would have taken
            for key, item in record.items():
                history.setdefault(key, []).append(item)
        gn = history["grad_norm"][-1] if kept else float("nan")
        val = history["value"][-1] if kept else float("nan")
        return SolveResult(keep, status.success, last, gn, status, status.value, history, val, self.name,
                           fun.stats())

    def _run_fixed(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        """Inside a torch.func transform: exactly ``max_iter`` steps, no convergence test, no read-back."""
        _require_vmappable(self)
        state = self.init(fun, x0)
        for k in range(self.max_iter):
            state = self.step(fun, state, k)
        status = SolverStatus.UNCHECKED
        return SolveResult(state.x, False, self.max_iter, float("nan"), status, status.value, {}, float("nan"),
                           self.name, fun.stats())
