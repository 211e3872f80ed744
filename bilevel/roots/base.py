"""The root-solver protocol, its registry and :func:`bilevel.solve_root`.

A root solver implements ``init`` / ``step`` on a :class:`RootObjective` (``F`` and the fixed-point
map on flat vectors) and is run by the shared driver :mod:`bilevel._loop`; a user's callable
``fn(problem, theta, data, phi0) -> phi`` works too. The methods are in
:mod:`bilevel.roots.methods` (fixed-point iteration, Anderson, Newton-Krylov),
:mod:`bilevel.roots.proxgrad` (ISTA, FISTA) and :mod:`bilevel.roots.cvxpy_root` (cvxpy). A solver
only finds ``phi``; the gradient comes from the optimality condition (:func:`bilevel.root`).
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

__all__ = ["RootObjective", "RootState", "RootSolver", "CallableRootSolver", "register", "get", "available",
           "prepare", "solve_root", "DIVERGENCE_FACTOR"]

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
