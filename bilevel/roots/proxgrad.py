"""Proximal gradient (ISTA, FISTA) for a :class:`bilevel.CompositeProblem`."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_nonneg_float, check_positive_int
from .base import RootObjective, RootSolver, RootState, register
from .problems import CompositeProblem
from .result import RootStatus

__all__ = ["ProximalGradient", "ISTA", "FISTA"]


class ProximalGradient(RootSolver):
    """Proximal gradient for a :class:`bilevel.CompositeProblem` (the base of ISTA and FISTA).

    Parameters
    ----------
    step_size:
        A fixed step (at most ``1 / L`` for ``L``-smooth ``f``), or ``None`` (default) for a
        backtracking search of the local Lipschitz constant of ``grad f`` (each iteration tries
        twice the last step first).
    max_iter, tol, rtol:
        See :class:`RootSolver`; the residual is the gradient mapping ``(phi - T(phi)) / step``.
    """

    accelerated = False

    def __init__(self, *, step_size: float | None = None, max_iter: int = 1000, tol: float = 1e-8,
                 rtol: float = 0.0, shrink: float = 0.5, max_backtracks: int = 40):
        super().__init__(max_iter=max_iter, tol=tol, rtol=rtol)
        self.step_size = None if step_size is None else check_nonneg_float(step_size, "step_size", positive=True)
        self.shrink = check_nonneg_float(shrink, "shrink", positive=True)
        if not self.shrink < 1:
            raise ValueError(f"Invalid shrink: {shrink}; it must lie in (0, 1).")
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")

    @property
    def reads_back(self) -> bool:  # the backtracking search compares values
        return self.step_size is None

    def _problem(self, fun: RootObjective) -> CompositeProblem:
        if not isinstance(fun.problem, CompositeProblem):
            raise TypeError(f"{self.name!r} solves a bl.CompositeProblem(smooth, regulariser), got "
                            f"{fun.problem!r}; use 'anderson' or 'newton_krylov' for other root problems.")
        return fun.problem

    def _f_and_grad(self, fun: RootObjective, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        problem = self._problem(fun)
        fun.nfev += 1
        with torch.no_grad():
            g, f = torch.func.grad_and_value(lambda p: problem.smooth_value(p, fun.theta, fun.data))(x)
        return f, g

    def _prox(self, fun: RootObjective, x: torch.Tensor, step: Any) -> torch.Tensor:
        with torch.no_grad():
            return self._problem(fun).regulariser.prox(x, step, fun.theta)

    def init(self, fun: RootObjective, x0: torch.Tensor) -> RootState:
        self._problem(fun)
        step = self.step_size if self.step_size is not None else 1.0
        f, g = self._f_and_grad(fun, x0)
        state = RootState(x0, (x0 - self._prox(fun, x0 - step * g, step)) / step)
        state.aux = {"y": x0, "t": torch.ones((), dtype=x0.dtype, device=x0.device),
                     "step": torch.full((), step, dtype=x0.dtype, device=x0.device), "g_y": g}
        return state

    def step(self, fun: RootObjective, state: RootState, k: int) -> RootState:
        y, t, step = state.aux["y"], state.aux["t"], state.aux["step"]
        gy = state.aux.get("g_y")  # ISTA: y is the last x, whose gradient the residual already computed
        if gy is None:
            _, gy = self._f_and_grad(fun, y)
        gx = None
        if self.step_size is None:
            # backtracking on the local Lipschitz constant along d = x - y: <grad f(x) - grad f(y), d> <= ||d||^2 / s
            # (measured with gradients, it does not drown in round-off near the solution as a test on values does)
            s = float(step) / self.shrink if k > 0 else float(step)
            for _ in range(self.max_backtracks):
                x = self._prox(fun, y - s * gy, s)
                _, gx = self._f_and_grad(fun, x)
                d = (x - y).reshape(-1)
                if float((gx - gy).reshape(-1) @ d) <= float(d @ d) / s:
                    break
                s *= self.shrink
            else:
                return RootState(state.x, state.F, state.aux, status=RootStatus.LINE_SEARCH_FAILED)
            step = torch.full_like(step, s)
        else:
            x = self._prox(fun, y - step * gy, step)
        if self.accelerated:
            t_next = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
            y_next = x + ((t - 1) / t_next) * (x - state.x)
        else:
            t_next, y_next = t, x
        # the residual at x: its gradient mapping at the current step
        if gx is None:
            _, gx = self._f_and_grad(fun, x)
        F = (x - self._prox(fun, x - step * gx, step)) / step
        aux = {"y": y_next, "t": t_next, "step": step}
        if not self.accelerated:
            aux["g_y"] = gx
        return RootState(x, F, aux)

    def _options(self):
        return {**super()._options(), "step_size": self.step_size}


@register("ista")
class ISTA(ProximalGradient):
    """Proximal gradient descent (ISTA) for a :class:`bilevel.CompositeProblem`; see :class:`ProximalGradient`.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.CompositeProblem(lambda phi, theta, d: 0.5 * ((phi - d) ** 2).sum(), bl.prox.NonNegative())
    >>> bl.solve_root(problem, None, torch.tensor([1.0, -1.0]), solver="ista", phi0=torch.zeros(2)).phi
    tensor([1., 0.])
    """


@register("fista")
class FISTA(ProximalGradient):
    """Accelerated proximal gradient (FISTA) for a :class:`bilevel.CompositeProblem`; see :class:`ProximalGradient`.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.CompositeProblem(lambda phi, theta, d: 0.5 * ((phi - d) ** 2).sum(), bl.prox.L1(0.5))
    >>> bl.solve_root(problem, None, torch.tensor([2.0, 0.2]), solver="fista", phi0=torch.zeros(2)).phi
    tensor([1.5000, 0.0000])
    """

    accelerated = True
