"""Run :func:`scipy.optimize.minimize` on an :class:`~bilevel.solvers.Objective`.

Shared by the ``"scipy"`` and ``"scipy_lbfgs"`` solvers. SciPy works on
float64 NumPy vectors on the CPU; the objective works on torch tensors of
``phi``'s dtype and device. This module converts at the boundary (and
nothing else): values, gradients and Hessian-vector products all come from
the :class:`Objective`, so no differentiation code lives here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import Solver
from .objective import Objective
from .result import SolveResult, SolverStatus

__all__ = ["NumpyObjective", "run_minimize", "scipy_status"]


class NumpyObjective:
    """An :class:`Objective` seen from SciPy: float64 NumPy in, float64 NumPy out.

    Keeps the best finite point it has evaluated (returned if SciPy ends on a
    non-finite one) and the last evaluation (so that a per-iteration callback
    can record ``||grad G||`` without paying for another gradient).
    """

    def __init__(self, fun: Objective, x0: torch.Tensor):
        self.fun = fun
        self.dtype = x0.dtype
        self.device = x0.device
        self.best_x: np.ndarray | None = None
        self.best_value = math.inf
        self.last: tuple[np.ndarray, float, float] | None = None  # (x, value, grad_norm)
        self.first: tuple[np.ndarray, float, float] | None = None  # the start point, evaluated first

    def to_torch(self, x: np.ndarray) -> torch.Tensor:
        """A copy of ``x`` on ``phi``'s device, in ``phi``'s dtype (SciPy may reuse its buffers)."""
        return torch.tensor(np.asarray(x, dtype=np.float64), dtype=self.dtype, device=self.device)

    @staticmethod
    def to_numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=torch.float64).numpy()

    def _remember(self, x: np.ndarray, value: float, grad_norm: float | None = None) -> None:
        self.last = (np.array(x, dtype=np.float64), value, math.nan if grad_norm is None else grad_norm)
        if self.first is None:
            self.first = self.last
        finite = math.isfinite(value) and (grad_norm is None or math.isfinite(grad_norm))
        if finite and value < self.best_value:
            self.best_value = value
            self.best_x = self.last[0]

    def value(self, x: np.ndarray) -> float:
        v = float(self.fun.value(self.to_torch(x)))
        self._remember(x, v)
        return v

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = self.fun.value_and_grad(self.to_torch(x))
        value = float(v)
        self._remember(x, value, torch.linalg.vector_norm(g).item())
        return value, self.to_numpy(g)

    def hessp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        return self.to_numpy(self.fun.hvp(self.to_torch(x), self.to_torch(p)))

    def hess(self, x: np.ndarray) -> np.ndarray:
        """The dense Hessian from ``n`` Hessian-vector products (for methods that need a matrix)."""
        xt = self.to_torch(x)
        eye = torch.eye(xt.numel(), dtype=self.dtype, device=self.device)
        H = self.to_numpy(torch.stack([self.fun.hvp(xt, e) for e in eye]))
        return 0.5 * (H + H.T)

    def cached_grad_norm(self, x: np.ndarray) -> float:
        """``||grad G(x)||`` if ``x`` was the last point evaluated with its gradient, else ``nan``."""
        if self.last is not None and np.array_equal(self.last[0], x):
            return self.last[2]
        return math.nan


def scipy_status(res: Any, iterations: int, max_iter: int) -> SolverStatus:
    """Map a SciPy ``OptimizeResult`` that did not meet ``tol`` to the closest :class:`SolverStatus`."""
    msg = str(res.get("message", "")).lower()
    if iterations >= max_iter or "exceed" in msg or "limit" in msg or "maximum number" in msg:
        return SolverStatus.MAX_ITER
    if "nan" in msg or "infinit" in msg:
        return SolverStatus.NONFINITE
    if "line search" in msg or "abnormal" in msg or "precision loss" in msg:
        return SolverStatus.LINE_SEARCH_FAILED
    return SolverStatus.NOT_STATIONARY


def run_minimize(solver: Solver, fun: Objective, x0: torch.Tensor, *, method: str, options: dict[str, Any],
                 tol: float | None, use_jac: bool, use_hessp: bool = False, use_hess: bool = False,
                 bounds: Any = None) -> SolveResult:
    """``scipy.optimize.minimize(method=method)`` from ``x0``; the result is judged by ``solver.finish``.

    ``tol`` is SciPy's generic ``tol`` argument (its per-method defaults; the
    explicit ``options`` take precedence). When the solve does not reach
    ``solver.tol``, SciPy's own message is appended to the result's message.
    """
    from scipy.optimize import OptimizeResult, minimize  # heavy import, kept out of `import bilevel`

    np_fun = NumpyObjective(fun, x0)
    x_start = np_fun.to_numpy(x0).copy()
    if bounds is not None:
        x_start = np.clip(x_start, bounds.lb, bounds.ub)
    history: dict[str, list[float]] = {"value": []}
    if use_jac:
        history["grad_norm"] = []

    def record(x: np.ndarray, value: float) -> None:
        history["value"].append(float(value))
        if use_jac:
            history["grad_norm"].append(np_fun.cached_grad_norm(x))

    def callback(intermediate_result):
        # SciPy >= 1.11 passes an OptimizeResult; older versions pass x alone.
        if isinstance(intermediate_result, OptimizeResult):
            x, value = intermediate_result.x, float(intermediate_result.fun)
        else:
            x = np.asarray(intermediate_result)
            value = np_fun.last[1] if np_fun.last is not None and np.array_equal(np_fun.last[0], x) else math.nan
        record(x, value)

    f = np_fun.value_and_grad if use_jac else np_fun.value
    kwargs: dict[str, Any] = {"method": method, "jac": True if use_jac else None, "tol": tol,
                              "callback": callback, "options": options}
    if use_hessp:
        kwargs["hessp"] = np_fun.hessp
    if use_hess:
        kwargs["hess"] = np_fun.hess
    if bounds is not None:
        kwargs["bounds"] = bounds

    res = minimize(f, x_start, **kwargs)
    iterations = int(res.get("nit", len(history["value"])))
    if np_fun.first is not None:  # SciPy evaluates the start point first: make it history[0]
        history["value"].insert(0, np_fun.first[1])
        if use_jac:
            history["grad_norm"].insert(0, np_fun.first[2])
    x_final = np.asarray(res.x, dtype=np.float64)
    nonfinite = not (np.all(np.isfinite(x_final)) and math.isfinite(float(res.get("fun", 0.0))))
    if nonfinite and np_fun.best_x is not None:
        x_final = np_fun.best_x
    result = solver.finish(fun, np_fun.to_torch(x_final), iterations, history,
                           SolverStatus.NONFINITE if nonfinite else scipy_status(res, iterations, solver.max_iter))
    if not result.converged:
        result.detail = f"SciPy {method} stopped with: {str(res.message).strip()!r}."
    return result
