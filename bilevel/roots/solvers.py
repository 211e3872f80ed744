"""Root solvers (a registry like the inner solvers'), run by the shared driver :mod:`bilevel._loop`.

``"fixed_point"`` (damped fixed-point iteration), ``"anderson"`` (Anderson acceleration),
``"newton_krylov"`` (Newton's method with GMRES on Jacobian-vector products and a line search on
``||F||``), ``"ista"`` and ``"fista"`` (proximal gradient, for a :class:`bilevel.CompositeProblem`),
and any callable ``fn(problem, theta, data, phi0) -> phi``. A solver only finds ``phi``; the
gradient comes from the optimality condition (:func:`bilevel.root`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import tree as _tree
from .._checks import check_nonneg_float, check_positive_int
from .._loop import Iteration, Outcome, drive
from .._registry import Registry, check_options
from .problems import CompositeProblem, RootProblem
from .result import RootResult, RootStatus

__all__ = ["RootSolver", "FixedPointIteration", "Anderson", "NewtonKrylov", "ProximalGradient", "ISTA", "FISTA",
           "CallableRootSolver", "CvxpyRootSolver", "register", "get", "available", "solve_root", "DIVERGENCE_FACTOR"]

#: an unconverged run whose final ||F|| exceeds this multiple of the first is DIVERGED
DIVERGENCE_FACTOR = 1e3


class RootObjective:
    """``F`` and the fixed-point map on flat vectors, with an evaluation counter."""

    def __init__(self, problem: RootProblem, theta: Any, data: Any, spec: _tree.TreeSpec):
        self.problem, self.theta, self.data, self.spec = problem, theta, data, spec
        self.nfev = 0

    def unflatten(self, x: torch.Tensor) -> Any:
        return _tree.unflatten(x, self.spec)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        self.nfev += 1
        with torch.no_grad():
            out, _ = _tree.flatten(self.problem.residual(self.unflatten(x), self.theta, self.data), "the residual")
        return out

    def mapping(self, x: torch.Tensor) -> torch.Tensor:
        self.nfev += 1
        with torch.no_grad():
            out, _ = _tree.flatten(self.problem.mapping(self.unflatten(x), self.theta, self.data), "the mapping")
        return out

    def jvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(dF/dphi) v`` by forward mode."""
        self.nfev += 1

        def f(z):
            return _tree.flatten(self.problem.residual(self.unflatten(z), self.theta, self.data), "the residual")[0]
        return torch.func.jvp(f, (x,), (v,))[1]


@dataclass
class RootState:
    """An iterate ``x`` with its residual ``F(x)``; ``aux`` holds method tensors, ``status`` may stop the loop."""

    x: torch.Tensor
    F: torch.Tensor
    aux: dict[str, Any] = field(default_factory=dict)
    status: RootStatus | None = None


class RootSolver:
    """Base class of root solvers: ``init(fun, x0)`` and ``step(fun, state, k)``, driven by :mod:`bilevel._loop`.

    Parameters
    ----------
    max_iter:
        Maximum number of iterations.
    tol:
        Tolerance on ``||F(phi, theta)||``.
    rtol:
        Tolerance relative to the start's residual: stop when ``||F|| <= max(tol, rtol ||F(phi0)||)``
        (units-free; default 0: the absolute ``tol`` only).
    """

    name = "root_solver"

    def __init__(self, *, max_iter: int = 500, tol: float = 1e-8, rtol: float = 0.0):
        self.max_iter = check_positive_int(max_iter, "max_iter", allow_zero=True)
        self.tol = check_nonneg_float(tol, "tol")
        self.rtol = check_nonneg_float(rtol, "rtol")

    #: whether a step reads values back (a line search): then the loop runs step by step
    reads_back = False

    def init(self, fun: RootObjective, x0: torch.Tensor) -> RootState:
        return RootState(x0, fun.residual(x0))

    def step(self, fun: RootObjective, state: RootState, k: int) -> RootState:
        raise NotImplementedError

    def residual_norm(self, fun: RootObjective, state: RootState) -> torch.Tensor:
        """The measure of convergence (``||F||``; proximal gradient: its gradient mapping)."""
        return torch.linalg.vector_norm(state.F)

    def run(self, fun: RootObjective, x0: torch.Tensor) -> RootResult:
        state = self.init(fun, x0)
        threshold = self.tol
        if self.rtol > 0:
            threshold = max(self.tol, self.rtol * float(self.residual_norm(fun, state)))
        mode = "deferred" if threshold == 0.0 and not self.reads_back else "synced"
        run = drive(_RootIteration(self, fun), state, max_iter=self.max_iter, threshold=threshold, mode=mode)
        status = run.halt if run.outcome is Outcome.HALTED else _STATUS[run.outcome]
        rn = run.residuals[-1] if run.residuals else float("nan")
        return RootResult(run.state.x, status.success, run.steps, rn, status, status.value,
                          {"residual_norm": run.residuals}, self.name, {"nfev": fun.nfev})

    def _options(self) -> dict[str, Any]:
        return {"max_iter": self.max_iter, "tol": self.tol, "rtol": self.rtol}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._options().items())})"


_STATUS = {Outcome.CONVERGED: RootStatus.CONVERGED, Outcome.MAX_ITER: RootStatus.MAX_ITER,
           Outcome.NONFINITE: RootStatus.NONFINITE, Outcome.DIVERGED: RootStatus.DIVERGED,
           Outcome.BREAKDOWN: RootStatus.NONFINITE}


class _RootIteration(Iteration):
    def __init__(self, solver: RootSolver, fun: RootObjective):
        self.solver, self.fun = solver, fun

    def step(self, state: RootState, k: int) -> tuple[RootState, None]:
        return self.solver.step(self.fun, state, k), None

    def measure(self, state: RootState) -> tuple[torch.Tensor, None]:
        return self.solver.residual_norm(self.fun, state), None

    def halt(self, state: RootState) -> RootStatus | None:
        return state.status

    def diverged(self, residuals: list[float], values: list[float]) -> bool:
        return len(residuals) > 1 and residuals[-1] > DIVERGENCE_FACTOR * max(residuals[0], 1e-300)


_REGISTRY = Registry("root solver", RootSolver)


def register(name: str):
    """Class decorator: register a :class:`RootSolver` subclass under ``name``."""
    return _REGISTRY.register(name)


def available() -> list[str]:
    """Names of the registered root solvers.

    Examples
    --------
    >>> import bilevel as bl
    >>> "anderson" in bl.roots.available()
    True
    """
    return _REGISTRY.available()


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
        Tikhonov regularisation of the small least-squares system, relative to its scale. Default 1e-10.
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
        scale = torch.clamp(torch.diagonal(H).max(), min=torch.finfo(H.dtype).tiny)
        H = H + (self.ridge * scale) * torch.eye(m, dtype=H.dtype, device=H.device) + torch.diag((~used).to(H.dtype))
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
                     "step": torch.full((), step, dtype=x0.dtype, device=x0.device)}
        return state

    def step(self, fun: RootObjective, state: RootState, k: int) -> RootState:
        y, t, step = state.aux["y"], state.aux["t"], state.aux["step"]
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
        return RootState(x, F, {"y": y_next, "t": t_next, "step": step})

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


@register("cvxpy")
class CvxpyRootSolver(RootSolver):
    """Solve a root problem's underlying convex program with cvxpy; judged by ``||F|| <= tol``.

    Meant for a :class:`bilevel.CompositeProblem` whose regulariser is a constraint set (or a norm):
    cvxpy handles the constraints, and :func:`bilevel.root` differentiates the projected fixed point
    at the answer, so binding constraints get the exact hypergradient.

    Parameters
    ----------
    build, solver, solver_options, max_iter:
        As for the inner solver :class:`bilevel.solvers.cvxpy_solver.CvxpySolver`:
        ``build(theta_np, data) -> (cvxpy.Problem, cvxpy.Variable)``, the program whose solution is ``phi``
        (constraints included).
    tol:
        Tolerance on the residual ``||F||`` (for a composite problem: its gradient mapping). Default 1e-6.

    Examples
    --------
    >>> import cvxpy as cp, torch, bilevel as bl
    >>> def build(theta, data):
    ...     z = cp.Variable(2)
    ...     return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - theta)), [z >= 0]), z
    >>> problem = bl.CompositeProblem(lambda z, theta, d: 0.5 * ((z - theta) ** 2).sum(), bl.prox.NonNegative())
    >>> theta = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> bl.solve_root(problem, theta, solver=bl.roots.get("cvxpy", build=build)).phi.round(decimals=6)
    tensor([1., 0.], dtype=torch.float64)
    """

    def __init__(self, *, build: Callable | None = None, solver: str | None = None,
                 solver_options: dict | None = None, max_iter: int | None = None, tol: float = 1e-6):
        from ..solvers.cvxpy_solver import CvxpySolver

        super().__init__(max_iter=0, tol=tol)
        self.program = CvxpySolver(build=build, solver=solver, solver_options=solver_options, max_iter=max_iter,
                                   tol=tol)

    def run(self, fun: RootObjective, x0: torch.Tensor) -> RootResult:
        x, cp_status, iterations, detail = self.program.solve_point(fun, x0)
        rn = float(torch.linalg.vector_norm(fun.residual(x)))
        status = (RootStatus.NONFINITE if not math.isfinite(rn) else RootStatus.CONVERGED if rn <= self.tol
                  else RootStatus.MAX_ITER if cp_status == "user_limit" else RootStatus.NOT_A_ROOT)
        return RootResult(x, status.success, iterations, rn, status, status.value, {}, self.name,
                          {"nfev": fun.nfev}, detail="" if status.success else detail)

    def _options(self):
        return {**self.program._options(), "tol": self.tol}


class CallableRootSolver(RootSolver):
    """A user's ``fn(problem, theta, data, phi0) -> phi``, judged by ``||F(phi)|| <= tol``."""

    name = "callable"

    def __init__(self, fn: Callable, *, tol: float = 1e-8):
        super().__init__(max_iter=0, tol=tol)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = f"callable:{getattr(fn, '__name__', type(fn).__name__)}"

    def run(self, fun: RootObjective, x0: torch.Tensor) -> RootResult:
        out = self.fn(fun.problem, fun.theta, fun.data, fun.unflatten(x0.clone()))
        spec = _tree.tree_spec(out, "the solver's result")
        if not _tree.same_structure(spec, fun.spec):
            raise ValueError(f"solver {self.name} returned {spec.describe()}, but phi0 is {fun.spec.describe()}; "
                             f"return phi in the structure of phi0.")
        x = _tree.flatten(out, "the solver's result")[0].detach().to(dtype=x0.dtype, device=x0.device)
        rn = float(torch.linalg.vector_norm(fun.residual(x)))
        status = (RootStatus.NONFINITE if not math.isfinite(rn) else
                  RootStatus.CONVERGED if rn <= self.tol else RootStatus.NOT_A_ROOT)
        return RootResult(x, status.success, 0, rn, status, status.value, {}, self.name, {"nfev": fun.nfev})

    def _options(self):
        return {"fn": getattr(self.fn, "__name__", self.fn), "tol": self.tol}


def get(solver: str | RootSolver | Callable = "anderson", /, **options: Any) -> RootSolver:
    """Build a root solver by name (see :func:`available`); pass an instance through; wrap a callable.

    Examples
    --------
    >>> import bilevel as bl
    >>> bl.roots.get("anderson", memory=3)
    Anderson(max_iter=500, tol=1e-08, rtol=0.0, memory=3, damping=1.0)
    """
    if isinstance(solver, RootSolver):
        if options:
            raise TypeError(f"options {sorted(options)} cannot be applied to an existing {solver!r}; construct it "
                            f"with them instead.")
        return solver
    if isinstance(solver, str):
        return _REGISTRY.build(solver, options)
    if callable(solver):
        check_options(CallableRootSolver, {"fn": None, **options}, "a callable root solver")
        return CallableRootSolver(solver, **options)
    raise TypeError(f"solver must be a name ({', '.join(available())}), a RootSolver or a callable "
                    f"(problem, theta, data, phi0) -> phi, got {type(solver).__name__}.")


def prepare(problem: RootProblem, theta: Any, data: Any, phi0: Any) -> tuple[RootObjective, torch.Tensor]:
    """Validate a root solve's inputs; the flat objective and start."""
    if not isinstance(problem, RootProblem):
        raise TypeError(f"problem must be a bl.RootProblem, bl.FixedPointProblem or bl.CompositeProblem, got "
                        f"{type(problem).__name__}; for a smooth bl.InnerProblem use bl.solve / bl.argmin "
                        f"(bl.root accepts it too).")
    if theta is not None:
        _tree.tree_spec(theta, "theta")
        problem.validate(theta, data)
    if phi0 is None:
        if theta is None:
            raise ValueError("phi0 is needed when theta is None (the default start is theta); pass phi0=...")
        phi0 = problem.default_phi0(theta)
    if theta is not None:
        problem.check_phi(phi0, theta, "phi0")
    from .._checks import check_finite_tree

    check_finite_tree(phi0, "phi0", "start the root solver from finite values")
    x0, spec = _tree.flatten(phi0, "phi0")
    return RootObjective(problem, theta, data, spec), x0.detach().clone()


def solve_root(problem: RootProblem, theta: Any = None, data: Any = None, *,
               solver: str | RootSolver | Callable | None = None, phi0: Any = None) -> RootResult:
    """Find ``phi`` with ``F(phi, theta, data) = 0``; no gradients flow (see :func:`bilevel.root`).

    Parameters
    ----------
    problem:
        A :class:`bilevel.RootProblem`, :class:`bilevel.FixedPointProblem` or :class:`bilevel.CompositeProblem`.
    theta, data:
        Outer variables (a tensor or tree, or None) and the problem's data.
    solver:
        A name (:func:`available`), a :class:`RootSolver` or a callable; default ``"fista"`` for a
        :class:`bilevel.CompositeProblem`, ``"anderson"`` otherwise.
    phi0:
        The start (default: ``theta``). Never modified.

    Returns
    -------
    RootResult
        ``phi`` in the structure of ``phi0``; a failed solve warns with :class:`bilevel.ConvergenceWarning`
        (a fixed budget, ``tol=0``, reaching ``max_iter`` does not).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.FixedPointProblem(lambda z, theta, data: 0.5 * z + theta)
    >>> bl.solve_root(problem, torch.tensor([1.0]), phi0=torch.zeros(1)).phi
    tensor([2.])
    """
    if solver is None:
        solver = "fista" if isinstance(problem, CompositeProblem) else "anderson"
    solver_obj = get(solver)
    fun, x0 = prepare(problem, theta, data, phi0)
    result = solver_obj.run(fun, x0)
    result.phi = fun.unflatten(result.phi.detach())
    if not result.converged and result.status.warning is not None and not (
            result.status is RootStatus.MAX_ITER and solver_obj.tol == 0):
        warnings.warn(result.status.warning(
            f"root solver {result.solver!r} did not converge after {result.iterations} iterations "
            f"(||F|| = {result.residual_norm:.3g}, tol {solver_obj.tol:g}): {result.message}",
            status=result.status, info=result), stacklevel=2)
    return result
