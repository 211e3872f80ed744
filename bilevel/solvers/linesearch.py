"""The backtracking line search shared by the inner solvers (gradient descent, Newton-CG)."""

from __future__ import annotations

import torch

from .objective import Objective

__all__ = ["backtracking"]


def backtracking(fun: Objective, x: torch.Tensor, value: torch.Tensor, direction: torch.Tensor, slope: float,
                 t: float, *, armijo: float, shrink: float,
                 max_backtracks: int) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Armijo backtracking from ``x`` along a descent ``direction`` (``slope = <grad G(x), direction> < 0``).

    Tries ``t, shrink t, shrink^2 t, ...`` (at most ``max_backtracks`` trials) and accepts the first
    step with ``G(x) - G(x + t d) >= -armijo t slope``. Where the decrease is at the level of
    round-off, that test is noise; the approximate Armijo condition of Hager and Zhang (2005),
    ``<grad G(x + t d), d> <= -(1 - 2 armijo) slope``, decides instead.

    Returns ``(t, x + t d, G(x + t d), grad G(x + t d))``, or ``None`` when no trial was accepted.
    """
    noise = 100.0 * torch.finfo(value.dtype).eps * (abs(float(value)) + 1.0)
    for _ in range(max_backtracks):
        xt = x + t * direction
        decrease = float(value - fun.value(xt))
        if decrease >= -armijo * t * slope:
            new_value, grad = fun.value_and_grad(xt)
            return t, xt, new_value, grad
        if abs(decrease) <= noise:
            new_value, grad = fun.value_and_grad(xt)
            if float(torch.dot(grad, direction)) <= -(1.0 - 2.0 * armijo) * slope:
                return t, xt, new_value, grad
        t *= shrink
    return None
