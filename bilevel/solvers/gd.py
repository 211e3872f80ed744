"""Gradient descent with a fixed step or an Armijo backtracking line search."""

from __future__ import annotations

import torch

from .._checks import check_bool, check_nonneg_float, check_positive_int
from .base import register_solver
from .driver import IterativeSolver, SolverState
from .linesearch import backtracking
from .objective import Objective
from .result import SolverStatus

__all__ = ["GradientDescent"]


@register_solver("gd")
class GradientDescent(IterativeSolver):
    """Gradient descent ``phi <- phi - step * grad_phi G``.

    Parameters
    ----------
    step_size:
        A fixed step (iMAML's inner loop), or ``None`` (default) for an
        Armijo backtracking line search: the trial step starts at ``growth``
        times the last accepted one and shrinks by ``shrink`` until
        ``G(phi - t g) <= G(phi) - armijo * t ||g||^2`` (near convergence, where
        that test drowns in round-off, the approximate Armijo condition of
        Hager and Zhang on the directional derivative is used instead).
    max_iter:
        Maximum number of iterations. Default 500.
    tol:
        Stop when ``||grad_phi G|| <= tol``. Default 1e-6.
    rtol:
        Also stop when ``||grad_phi G|| <= rtol ||grad_phi G(phi0)||`` (units-free). Default 0.
    armijo:
        Sufficient-decrease constant ``c`` in ``(0, 1)``. Default 1e-4.
    shrink:
        Backtracking factor in ``(0, 1)``. Default 0.5.
    growth:
        Each line search starts from ``growth`` times the last accepted step
        (``>= 1``). Default 1.25.
    max_backtracks:
        Trials per line search before giving up. Default 40.
    compile:
        Evaluate ``G`` and its gradient with :func:`torch.compile` (``torch.func.grad_and_value``,
        static shapes) from the second evaluation of each solve on; the first runs eagerly and checks
        the objective. Pays where steps are many and cheap (small models, long inner loops: Python and
        dispatch overhead dominate; ``docs/inner_solvers.rst``, "Compiled steps"; to compile the whole
        hypergradient, see :func:`bilevel.compiled_hypergradient`). The first solve of a shape pays
        for compiling (seconds); later solves reuse it. If compiling fails, a
        :class:`bilevel.CompileWarning` says why and the solver runs eagerly from then on. Ignored
        inside ``torch.func`` transforms. Default False.

    Notes
    -----
    On an ``L``-smooth, ``mu``-strongly convex ``G`` a fixed step ``1/L``
    contracts the error by ``1 - 1/kappa`` per iteration. Each iteration
    costs one gradient (plus one value per trial step with the line
    search); no autograd graph survives an iteration, so memory is flat in
    ``max_iter``.

    With a fixed ``step_size`` the solver runs inside :func:`torch.func.vmap`
    (a batch of tasks): there it takes exactly ``max_iter`` steps and reports
    the status ``UNCHECKED``, since convergence cannot be tested without
    reading values back. The line search (``step_size=None``) cannot.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.ProximalProblem(lambda phi, d: ((phi - d) ** 2).sum(), lam=2.0)
    >>> res = bl.solve(problem, torch.zeros(2), torch.ones(2), solver=bl.solvers.get("gd", tol=1e-9))
    >>> res.converged
    True
    """

    def __init__(self, *, step_size: float | None = None, max_iter: int = 500, tol: float = 1e-6,
                 armijo: float = 1e-4, shrink: float = 0.5, growth: float = 1.25, max_backtracks: int = 40,
                 rtol: float = 0.0, compile: bool = False):
        super().__init__(max_iter=max_iter, tol=tol, rtol=rtol)
        self.compile = check_bool(compile, "compile")
        self.step_size = None if step_size is None else check_nonneg_float(step_size, "step_size", positive=True)
        self.armijo = check_nonneg_float(armijo, "armijo", positive=True)
        self.shrink = check_nonneg_float(shrink, "shrink", positive=True)
        if not self.armijo < 1 or not self.shrink < 1:
            raise ValueError(f"Invalid armijo={armijo} / shrink={shrink}: both must lie in (0, 1).")
        self.growth = check_nonneg_float(growth, "growth", positive=True)
        if self.growth < 1:
            raise ValueError(f"Invalid growth: {growth}; it must be >= 1 (the factor the trial step grows by).")
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")

    @property
    def vmappable(self) -> bool:
        """True with a fixed ``step_size``: the line search reads values back and cannot run under vmap."""
        return self.step_size is not None

    def _options(self):
        opts = {**super()._options(), "step_size": self.step_size, **({"compile": True} if self.compile else {})}
        return opts

    def init(self, fun: Objective, x0: torch.Tensor) -> SolverState:
        state = super().init(fun, x0)
        state.aux["t"] = 1.0
        return state

    def step(self, fun: Objective, state: SolverState, k: int) -> SolverState:
        g = state.grad
        if self.step_size is not None:
            x = torch.add(state.x, g, alpha=-self.step_size)  # one kernel, as torch.optim.SGD steps
            value, grad = fun.value_and_grad(x)
            return SolverState(x, value, grad, aux=state.aux)
        found = backtracking(fun, state.x, state.value, -g, -float(torch.dot(g, g)), state.aux["t"] * self.growth,
                             armijo=self.armijo, shrink=self.shrink, max_backtracks=self.max_backtracks)
        if found is not None:
            t, x, value, grad = found
            return SolverState(x, value, grad, aux={"t": t})
        return SolverState(state.x, state.value, state.grad, status=SolverStatus.LINE_SEARCH_FAILED, aux=state.aux)
