"""Root solvers for any root or fixed-point problem: fixed-point iteration, Anderson acceleration, Newton-Krylov."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .._checks import check_nonneg_float, check_positive_int
from .base import RootObjective, RootSolver, RootState, register
from .result import RootStatus

__all__ = ["FixedPointIteration", "Anderson", "NewtonKrylov"]


@register("fixed_point")
class FixedPointIteration(RootSolver):
    """Damped fixed-point iteration ``phi <- phi + damping (T(phi) - phi)`` (``T = phi - F`` for a root problem).

    Parameters
    ----------
    damping:
        In ``(0, 1]``; 1 is the plain iteration ``phi <- T(phi)``. Default 1.
    max_iter, tol, rtol:
        See :class:`RootSolver`.

    Notes
    -----
    Converges linearly, at the contraction factor of ``T``; one evaluation of ``T`` per iteration.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.FixedPointProblem(lambda z, theta, data: torch.cos(z))
    >>> res = bl.solve_root(problem, None, solver=bl.roots.get("fixed_point", tol=1e-10), phi0=torch.zeros(1))
    >>> res.converged, round(float(res.phi), 6)
    (True, 0.739085)
    """

    def __init__(self, *, damping: float = 1.0, max_iter: int = 500, tol: float = 1e-8, rtol: float = 0.0):
        super().__init__(max_iter=max_iter, tol=tol, rtol=rtol)
        self.damping = check_nonneg_float(damping, "damping", positive=True)
        if self.damping > 1:
            raise ValueError(f"Invalid damping: {damping}; it must lie in (0, 1].")

    def step(self, fun: RootObjective, state: RootState, k: int) -> RootState:
        x = state.x - self.damping * state.F
        return RootState(x, fun.residual(x))

    def _options(self):
        return {**super()._options(), "damping": self.damping}


@register("anderson")
class Anderson(RootSolver):
    """Anderson acceleration of the fixed-point map ``T`` (type II, with a ridge on its least squares).

    Parameters
    ----------
    memory:
        How many past iterates the extrapolation combines. Default 5.
    damping:
        Mixing ``beta`` in ``(0, 1]`` of the extrapolated map. Default 1.
    ridge:
        Tikhonov regularisation of the small least-squares system, relative to its scale (at least 10
        rounding units of the dtype). Default 1e-10.
    max_iter, tol, rtol:
        See :class:`RootSolver`.

    Notes
    -----
    Each iteration costs one evaluation of ``T`` and a ``memory x memory`` solve; nothing is read back,
    so a fixed budget (``tol=0``) runs without host synchronisation.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.FixedPointProblem(lambda z, theta, data: torch.cos(z))
    >>> res = bl.solve_root(problem, None, solver="anderson", phi0=torch.zeros(1, dtype=torch.float64))
    >>> res.converged, res.iterations < 15
    (True, True)
    """

    def __init__(self, *, memory: int = 5, damping: float = 1.0, ridge: float = 1e-10, max_iter: int = 500,
                 tol: float = 1e-8, rtol: float = 0.0):
        super().__init__(max_iter=max_iter, tol=tol, rtol=rtol)
        self.memory = check_positive_int(memory, "memory")
        self.damping = check_nonneg_float(damping, "damping", positive=True)
        if self.damping > 1:
            raise ValueError(f"Invalid damping: {damping}; it must lie in (0, 1].")
        self.ridge = check_nonneg_float(ridge, "ridge")

    def init(self, fun: RootObjective, x0: torch.Tensor) -> RootState:
        state = super().init(fun, x0)
        n, m = x0.numel(), self.memory
        state.aux = {"X": x0.new_zeros(m, n), "G": x0.new_zeros(m, n), "count": torch.zeros((), dtype=torch.long,
                                                                                             device=x0.device)}
        return state

    def step(self, fun: RootObjective, state: RootState, k: int) -> RootState:
        m = self.memory
        g = -state.F  # T(x) - x
        X = torch.cat([state.aux["X"][1:], state.x[None]])  # the last m iterates and their g, oldest first
        G = torch.cat([state.aux["G"][1:], g[None]])
        count = state.aux["count"] + 1
        used = torch.arange(m, device=g.device) >= m - torch.clamp(count, max=m)  # rows filled so far
        # minimise ||sum_i a_i g_i|| subject to sum_i a_i = 1, over the filled rows
        Gm = G * used[:, None]
        H = Gm @ Gm.T
        # the Gram matrix of m residuals in fewer than m dimensions (or of repeated ones) is singular: a ridge
        # of at least a few rounding units of its scale keeps the solve defined in every precision
        finfo = torch.finfo(H.dtype)
        scale = torch.clamp(torch.diagonal(H).max(), min=finfo.tiny)
        ridge = (max(self.ridge, 10 * finfo.eps) * scale).clamp(min=finfo.tiny)
        H = H + ridge * torch.eye(m, dtype=H.dtype, device=H.device) + torch.diag((~used).to(H.dtype))
        ones = used.to(H.dtype)
        w = torch.linalg.solve(H, ones)
        a = w / w.sum()
        x = a @ (X + self.damping * G)
        return RootState(x, fun.residual(x), {"X": X, "G": G, "count": count})

    def _options(self):
        return {**super()._options(), "memory": self.memory, "damping": self.damping}


@register("newton_krylov")
class NewtonKrylov(RootSolver):
    """Newton's method: ``(dF/dphi) d = -F`` solved by a Krylov method on Jacobian-vector products, then a line search.

    Parameters
    ----------
    linear_solver:
        The inexact Newton solve (a name or :class:`bilevel.linalg.LinearSolver`); default ``"gmres"``
        (the Jacobian of ``F`` is not symmetric in general).
    linear_max_iter:
        Krylov iterations per Newton step. Default 50.
    forcing:
        The relative tolerance of each Newton solve. Default 1e-4.
    max_iter, tol, rtol:
        See :class:`RootSolver`.

    Notes
    -----
    Quadratic convergence near a root with an invertible Jacobian. The backtracking line search on
    ``||F||`` (halving from the full step) reads values back, so the loop runs step by step.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.RootProblem(lambda phi, theta, data: phi ** 3 - theta)
    >>> res = bl.solve_root(problem, torch.tensor([8.0], dtype=torch.float64), solver="newton_krylov",
    ...                     phi0=torch.ones(1, dtype=torch.float64))
    >>> res.converged, round(float(res.phi), 8)
    (True, 2.0)
    """

    reads_back = True

    def __init__(self, *, linear_solver: Any = "gmres", linear_max_iter: int = 50, forcing: float = 1e-4,
                 max_iter: int = 100, tol: float = 1e-8, rtol: float = 0.0, max_backtracks: int = 30):
        super().__init__(max_iter=max_iter, tol=tol, rtol=rtol)
        self.linear_solver = linear_solver
        self.linear_max_iter = check_positive_int(linear_max_iter, "linear_max_iter")
        self.forcing = check_nonneg_float(forcing, "forcing", positive=True)
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")

    def step(self, fun: RootObjective, state: RootState, k: int) -> RootState:
        from ..linalg.registry import get as get_linear

        solver = self.linear_solver
        if isinstance(solver, str):
            solver = get_linear(solver, max_iter=self.linear_max_iter, tol=self.forcing, warn=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an inexact Newton direction is still a direction
            d, _ = solver(lambda v: fun.jvp(state.x, v), -state.F)
        norm0 = float(torch.linalg.vector_norm(state.F))
        t = 1.0
        for _ in range(self.max_backtracks):
            x = state.x + t * d
            F = fun.residual(x)
            norm = float(torch.linalg.vector_norm(F))
            if math.isfinite(norm) and norm <= (1.0 - 1e-4 * t) * norm0:
                return RootState(x, F)
            t *= 0.5
        return RootState(state.x, state.F, status=RootStatus.LINE_SEARCH_FAILED)

    def _options(self):
        return {**super()._options(), "linear_solver": self.linear_solver, "forcing": self.forcing}
