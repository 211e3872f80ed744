"""Nesterov's accelerated gradient descent, with a fixed step or a backtracking estimate of ``1/L``."""

from __future__ import annotations

import math

import torch

from .._checks import check_bool, check_nonneg_float, check_positive_int
from .base import register_solver
from .driver import IterativeSolver, SolverState
from .objective import Objective
from .result import SolverStatus

__all__ = ["AcceleratedGradientDescent"]


@register_solver("agd")
class AcceleratedGradientDescent(IterativeSolver):
    r"""Nesterov's accelerated gradient descent for a smooth, (strongly) convex ``G``.

    Each iteration extrapolates ``y = phi_k + beta_k (phi_k - phi_{k-1})`` and
    takes a gradient step from there, ``phi_{k+1} = y - s grad_phi G(y)``.

    Parameters
    ----------
    step_size:
        A fixed step ``s`` (at most ``1/L`` for the guarantees below), or
        ``None`` (default): ``1/smoothness`` if ``smoothness`` is given, else
        ``1/L`` is estimated by backtracking on the smoothness inequality
        ``G(y - s g) <= G(y) - s/2 ||g||^2`` (``g = grad G(y)``). The first
        trial step is 1, later ones ``growth`` times the last accepted step,
        so the estimate can follow a curvature that falls along the path; a rejected trial
        jumps to ``min(shrink * s, 1/L_local)`` with ``L_local`` the curvature
        measured along the step. Where the two values of ``G`` are equal to
        round-off (near convergence), ``L_local`` comes from the gradients,
        ``|<dx, grad G(y + dx) - g>| / ||dx||^2``, as in TFOCS.
    mu:
        The strong-convexity modulus of ``G`` in ``phi`` (smallest Hessian
        eigenvalue), if known. With ``mu`` the momentum is the constant
        ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)``, ``kappa = L / mu`` (``L`` from
        ``smoothness``, else ``1/s`` with ``s`` the fixed or estimated step).
        Without it, the schedule ``beta_k = (t_k - 1) / t_{k+1}`` of Nesterov /
        FISTA is used, with adaptive restart (see ``restart``).
    smoothness:
        The Lipschitz constant ``L`` of ``grad_phi G`` (largest Hessian
        eigenvalue), if known. Must be ``>= mu``.
    max_iter:
        Maximum number of iterations. Default 500.
    tol:
        Stop when ``||grad_phi G|| <= tol`` at the iterate ``phi_k``. Default 1e-6.
    rtol:
        Also stop when ``||grad_phi G|| <= rtol ||grad_phi G(phi0)||`` (units-free). Default 0.
    restart:
        With the ``t_k`` schedule, reset the momentum (``t = 1``) whenever
        ``<grad G(y_k), phi_{k+1} - phi_k> > 0``, i.e. when the momentum points
        uphill: the adaptive gradient restart of O'Donoghue and Candes (2015),
        which recovers a linear rate without knowing ``mu``. Default ``True``.
        Ignored with the constant momentum of a known ``mu``.
    growth:
        Factor ``>= 1`` by which each backtracking starts above the last
        accepted step. Default 1.1 (TFOCS's 0.9 on ``L``).
    shrink:
        Backtracking factor in ``(0, 1)``. Default 0.5.
    max_backtracks:
        Trials per iteration before giving up. Default 40.
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
    On an ``L``-smooth, ``mu``-strongly convex ``G`` with ``s = 1/L`` and the
    constant momentum, ``G(phi_k) - G*`` contracts by ``1 - 1/sqrt(kappa)`` per
    iteration, against ``1 - 1/kappa`` for gradient descent; with the ``t_k``
    schedule the error is ``O(L ||phi_0 - phi*||^2 / k^2)`` on a convex ``G``
    and, with the adaptive restart, linear again on a strongly convex one.
    With backtracking the momentum sequence follows the variable steps,
    ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2 s_k / s_{k+1})) / 2`` (Scheinberg,
    Goldfarb and Bai, 2014), which keeps the ``O(1/k^2)`` guarantee while the
    step grows; ``y`` is therefore recomputed when a trial step is rejected.

    Cost per iteration: the shared loop tests ``||grad G||`` at ``phi_k``,
    while the step needs the gradient at the extrapolated point ``y``, so an
    iteration costs **two** gradient evaluations (each with its value): one
    at ``y`` (skipped when ``beta = 0``: the first iteration and after a
    restart) and one at ``phi_{k+1}``. Each rejected backtracking trial adds
    one more at the trial point, plus one at the new ``y`` when the momentum
    depends on the step. ``result.stats["ngev"]`` counts them all. Memory is
    flat in ``max_iter``: no autograd graph survives an evaluation.

    ``result.history`` holds, besides ``grad_norm`` and ``value``, per
    iteration: ``step_size`` (the accepted step, 0 for a failed line search),
    ``momentum`` (``beta``) and ``restart`` (whether the momentum was reset).

    With a fixed step (``step_size`` or ``smoothness``) and no adaptive restart
    (``mu`` given, or ``restart=False``) the solver runs inside
    :func:`torch.func.vmap` (e.g. over the tasks of a meta-batch): there it
    takes exactly ``max_iter`` steps (status ``UNCHECKED``), since convergence
    cannot be tested without reading values back. The backtracking and the
    restart test read values, so those configurations cannot.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> A = bl.testing.random_spd(20, 100.0)
    >>> problem = bl.InnerProblem(lambda phi, theta, d: 0.5 * phi @ (A @ phi) - theta @ phi)
    >>> theta = torch.ones(20, dtype=torch.float64)
    >>> res = bl.solve(problem, theta, solver=bl.solvers.get("agd", mu=1.0, smoothness=100.0, tol=1e-10))
    >>> res.converged, bool(torch.allclose(res.phi, torch.linalg.solve(A, theta)))
    (True, True)
    >>> res = bl.solve(problem, theta, solver=bl.solvers.get("agd", tol=1e-10))  # step found by backtracking
    >>> res.converged, len(res.history["step_size"]) == res.iterations
    (True, True)
    """

    def __init__(self, *, step_size: float | None = None, mu: float | None = None,
                 smoothness: float | None = None, max_iter: int = 500, tol: float = 1e-6, restart: bool = True,
                 growth: float = 1.1, shrink: float = 0.5, max_backtracks: int = 40, rtol: float = 0.0,
                 compile: bool = False):
        super().__init__(max_iter=max_iter, tol=tol, rtol=rtol)
        self.compile = check_bool(compile, "compile")
        self.step_size = None if step_size is None else check_nonneg_float(step_size, "step_size", positive=True)
        self.mu = None if mu is None else check_nonneg_float(mu, "mu", positive=True)
        self.smoothness = None if smoothness is None else check_nonneg_float(smoothness, "smoothness",
                                                                             positive=True)
        if self.mu is not None and self.smoothness is not None and self.mu > self.smoothness:
            raise ValueError(f"Invalid mu={mu} > smoothness={smoothness}: the strong-convexity modulus cannot "
                             f"exceed the smoothness constant L; check both (mu <= L).")
        if (self.mu is not None and self.smoothness is None and self.step_size is not None
                and self.mu * self.step_size > 1.0):
            raise ValueError(f"Invalid mu={mu} with step_size={step_size}: mu * step_size = "
                             f"{self.mu * self.step_size:g} > 1, but a step of at most 1/L <= 1/mu is expected; "
                             f"lower step_size or mu, or pass smoothness=L.")
        if not isinstance(restart, bool):
            raise TypeError(f"restart must be a bool, got {restart!r}.")
        self.restart = restart
        self.growth = check_nonneg_float(growth, "growth", positive=True)
        if self.growth < 1:
            raise ValueError(f"Invalid growth: {growth}; it must be >= 1 (the factor the trial step grows by).")
        self.shrink = check_nonneg_float(shrink, "shrink", positive=True)
        if not self.shrink < 1:
            raise ValueError(f"Invalid shrink: {shrink}; it must lie in (0, 1).")
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")

    def _options(self):
        return {**super()._options(), "step_size": self.step_size, "mu": self.mu, "smoothness": self.smoothness,
                "restart": self.restart, **({"compile": True} if self.compile else {})}

    @property
    def vmappable(self) -> bool:
        """True with a fixed step (``step_size`` or ``smoothness``) and no adaptive restart (``mu`` given or ``restart=False``)."""
        return self._fixed_step is not None and (self.mu is not None or not self.restart)

    @property
    def _fixed_step(self) -> float | None:
        if self.step_size is not None:
            return self.step_size
        return None if self.smoothness is None else 1.0 / self.smoothness

    def _momentum(self, t: float, s_prev: float, s: float) -> tuple[float, float]:
        """``(beta, t_next)`` for a step ``s`` following an accepted ``s_prev``."""
        if self.mu is not None:
            kappa = self.smoothness / self.mu if self.smoothness is not None else 1.0 / (self.mu * s)
            q = math.sqrt(max(kappa, 1.0))
            return (q - 1.0) / (q + 1.0), t
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t * (s_prev / s)))
        return (t - 1.0) / t_next, t_next

    def init(self, fun: Objective, x0: torch.Tensor) -> SolverState:
        state = super().init(fun, x0)
        fixed = self._fixed_step
        state.aux = {"x_prev": x0, "t": 1.0, "s": fixed if fixed is not None else 1.0}
        return state

    def step(self, fun: Objective, state: SolverState, k: int) -> SolverState:
        aux = state.aux
        x, x_prev, t, s_prev = state.x, aux["x_prev"], aux["t"], aux["s"]
        fixed = self._fixed_step
        s = fixed if fixed is not None else (s_prev * self.growth if k > 0 else s_prev)
        if k == 0:
            s_prev = s  # no step before the first: ratio s_prev / s = 1 in the t_k update
        beta_y = None  # the momentum y was last built with
        for _ in range(1 if fixed is not None else self.max_backtracks):
            beta, t_next = self._momentum(t, s_prev, s)
            if beta != beta_y:
                beta_y = beta
                if beta == 0.0:
                    y, fy, gy = x, state.value, state.grad
                else:
                    y = x + beta * (x - x_prev)
                    fy, gy = fun.value_and_grad(y)
                    # with a line search (always driven step by step), a non-finite y would only exhaust the
                    # backtracking: hand it to the driver, which returns the last finite iterate. With a fixed
                    # step the next point is non-finite too, and the driver sees that in whichever way it runs.
                    if fixed is None and not (math.isfinite(float(fy)) and bool(torch.isfinite(gy).all())):
                        return SolverState(y, fy, gy, aux=aux, record=self._record(s, beta, False))
                gg = float(torch.dot(gy, gy)) if fixed is None else None
            x_new = y - s * gy
            f_new, g_new = fun.value_and_grad(x_new)
            if fixed is not None:
                break
            accepted, s_local = self._accept(fy, gy, gg, f_new, g_new, s)
            if accepted:
                break
            s = min(self.shrink * s, s_local)
            if k == 0:
                s_prev = s
        else:
            return SolverState(x, state.value, state.grad, status=SolverStatus.LINE_SEARCH_FAILED, aux=aux,
                               record=self._record(0.0, 0.0, False))
        restarted = False
        if self.mu is None and self.restart and t > 1.0 and float(torch.dot(gy, x_new - x)) > 0.0:
            t_next, restarted = 1.0, True
        return SolverState(x_new, f_new, g_new, aux={"x_prev": x, "t": t_next, "s": s},
                           record=self._record(s, beta, restarted))

    @staticmethod
    def _record(s: float, beta: float, restarted: bool) -> dict:
        return {"step_size": s, "momentum": beta, "restart": restarted}

    def _accept(self, fy: torch.Tensor, gy: torch.Tensor, gg: float, f_new: torch.Tensor, g_new: torch.Tensor,
                s: float) -> tuple[bool, float]:
        """Test ``G(y - s g) <= G(y) - s/2 ||g||^2``; return ``(accepted, 1 / L_local)``."""
        f0, f1 = float(fy), float(f_new)
        if not math.isfinite(f1):
            return False, math.inf
        if gg == 0.0:
            return True, math.inf
        dxx = s * s * gg
        noise = 100.0 * torch.finfo(fy.dtype).eps * (abs(f0) + 1.0)
        if abs(f0 - f1) > noise:
            local_l = 2.0 * (f1 - f0 + s * gg) / dxx
        else:
            # the values agree to round-off: measure the curvature along dx = -s g with gradients
            local_l = abs(-s * float(torch.dot(gy, g_new - gy))) / dxx
        if local_l * s <= 1.0:
            return True, math.inf
        return False, (1.0 / local_l if local_l > 0 else math.inf)
