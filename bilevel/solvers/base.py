"""Inner-solver protocol, the shared iteration loop, results and the registry.

Solvers only find ``phi``: none contains differentiation code. Gradients of
the solution with respect to ``theta`` come from the optimality condition
(:mod:`bilevel.implicit`), so any solver, including a user's black box, gets
exact hypergradients once it returns a stationary point.
"""

from __future__ import annotations

import enum
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import tree as _tree
from .._checks import BreakdownWarning, BudgetWarning, ConvergenceError, check_nonneg_float, check_positive_int
from .._functorch import in_transform
from .._registry import Registry
from ..problem import InnerProblem

__all__ = [
    "SolverStatus",
    "SolveResult",
    "Objective",
    "Solver",
    "IterativeSolver",
    "SolverState",
    "CallableSolver",
    "register_solver",
    "get",
    "available",
    "solve",
]

logger = logging.getLogger(__name__)


class SolverStatus(enum.Enum):
    """Why an inner solve stopped. Each value is advice for the user."""

    CONVERGED = "The stationarity residual ||grad_phi G|| reached tol."
    MAX_ITER = (
        "The maximum number of iterations was reached before ||grad_phi G|| <= tol; increase max_iter, "
        "loosen tol, or use a faster solver (see bilevel.solvers.available())."
    )
    NONFINITE = (
        "A non-finite value (NaN or inf) appeared in G or its gradient; lower step_size (or pass "
        "step_size=None for a line search), or check the objective near phi0. The last finite iterate "
        "is returned."
    )
    LINE_SEARCH_FAILED = (
        "The line search found no step that decreases G enough: tol may be below what the floating-point "
        "precision can reach (loosen tol or use float64), or G is non-smooth or its gradient is wrong."
    )
    UNCHECKED = (
        "The solver ran inside a torch.func transform (e.g. vmap over tasks): it took exactly max_iter steps "
        "and could not test convergence there; check ||grad_phi G|| outside the transform if it matters."
    )
    NOT_STATIONARY = (
        "The point returned by the solver is not stationary (||grad_phi G|| > tol); solve more accurately "
        "or loosen tol: the implicit hypergradient assumes phi minimises G."
    )

    @property
    def success(self) -> bool:
        """True only for :attr:`CONVERGED`."""
        return self is SolverStatus.CONVERGED


@dataclass
class SolveResult:
    """The outcome of an inner solve; every solver returns one.

    Attributes
    ----------
    phi:
        The solution, in the structure of ``phi0`` (detached; use
        :func:`bilevel.argmin` for a ``phi`` that carries gradients).
    converged:
        ``grad_norm <= tol``.
    iterations:
        Iterations performed.
    grad_norm:
        ``||grad_phi G(phi, theta)||`` at the returned ``phi``.
    status:
        A :class:`SolverStatus`; :attr:`message` says what to do about it.
    message:
        Human-readable advice for :attr:`status`.
    history:
        ``{"grad_norm": [...], "value": [...]}`` per iterate (as available), plus
        solver-specific per-step lists (e.g. ``step_size``).
    value:
        ``G(phi, theta)`` at the returned ``phi`` (``nan`` if not computed).
    solver:
        Name of the solver that produced the result.
    stats:
        Work counters: ``nfev`` (objective values), ``ngev`` (gradients),
        ``nhvp`` (Hessian-vector products).
    backward:
        For a result from ``bl.argmin(..., full_output=True)``: the
        :class:`bilevel.ImplicitInfo` of the implicit backward pass once it
        has run (HVPs spent, linear-solve status), else ``None``.
    """

    phi: Any
    converged: bool
    iterations: int
    grad_norm: float
    status: SolverStatus
    message: str
    history: dict[str, list] = field(default_factory=dict)
    value: float = float("nan")
    solver: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    backward: Any = None

    def raise_if_failed(self) -> "SolveResult":
        """Raise :class:`bilevel.ConvergenceError` unless the solve converged; return ``self``."""
        if not self.converged:
            raise ConvergenceError(
                f"inner solver {self.solver!r} stopped after {self.iterations} iterations with "
                f"||grad_phi G|| = {self.grad_norm:.3g}: {self.message}"
            )
        return self


class Objective:
    """The inner objective seen as a function of a flat vector ``x`` (no autograd graph kept).

    Solvers receive one. ``theta`` is detached, so nothing a solver does
    builds a graph back to the outer variables, and memory does not grow
    with the number of iterations.

    Attributes
    ----------
    problem, theta, data:
        What the solve is about (``theta`` detached, in the user's structure).
    spec:
        The :class:`bilevel.tree.TreeSpec` of ``phi``.
    nfev, ngev, nhvp:
        Counters of values, gradients and Hessian-vector products computed.
    functional:
        True inside a ``torch.func`` transform (e.g. ``vmap`` over tasks):
        derivatives then come from ``torch.func`` and no value is read back.
    read_back:
        False while the shared loop runs without per-step read-backs (``tol=0``
        with a fixed step): a step must then test values on the device
        (``torch.where``) instead of with ``float()`` / ``bool()``.
    """

    def __init__(self, problem: InnerProblem, theta: Any, data: Any, spec: _tree.TreeSpec):
        self.problem = problem
        self.theta = _tree.map(lambda t: t.detach(), theta)
        self.data = data
        self.spec = spec
        self.nfev = 0
        self.ngev = 0
        self.nhvp = 0
        #: inside a torch.func transform (vmap over tasks): derivatives by torch.func, no read-backs
        self.functional = in_transform()
        self.read_back = True

    def unflatten(self, x: torch.Tensor) -> Any:
        """``x`` as a tree in ``phi``'s structure (views)."""
        return _tree.unflatten(x, self.spec)

    def _g(self, x: torch.Tensor) -> torch.Tensor:
        return self.problem.value(self.unflatten(x), self.theta, self.data)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """``G(x)`` as a 0-d tensor, without building a graph."""
        self.nfev += 1
        if self.functional:
            return self._g(x)
        with torch.no_grad():
            return self._g(x).detach()

    def value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G(x), grad G(x))``, both detached; the graph is freed before returning."""
        self.nfev += 1
        self.ngev += 1
        if self.functional:
            g, v = torch.func.grad_and_value(self._g)(x)
            return v, g
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            val = self.problem.value(self.unflatten(xx), self.theta, self.data)
            if not val.requires_grad:  # G does not depend on phi
                return val.detach(), torch.zeros_like(x)
            (g,) = torch.autograd.grad(val, xx, allow_unused=True)
        return val.detach(), (torch.zeros_like(x) if g is None else g)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """``grad G(x)`` (detached)."""
        return self.value_and_grad(x)[1]

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``d2G/dphi2 (x) @ v`` (detached), for second-order solvers."""
        self.nhvp += 1
        if self.functional:
            return torch.func.jvp(torch.func.grad(self._g), (x,), (v,))[1]
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            val = self.problem.value(self.unflatten(xx), self.theta, self.data)
            (g,) = torch.autograd.grad(val, xx, create_graph=True)
            if not g.requires_grad:
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(g, xx, v, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    def stats(self) -> dict[str, int]:
        return {"nfev": self.nfev, "ngev": self.ngev, "nhvp": self.nhvp}


class Solver:
    """Base class of inner solvers.

    A solver implements :meth:`run` on an :class:`Objective` and a flat start
    ``x0``, returning a :class:`SolveResult` whose ``phi`` is flat (the
    caller restores the structure). Iterative methods should subclass
    :class:`IterativeSolver` instead and implement ``init`` and ``step``.

    Parameters
    ----------
    max_iter:
        Maximum number of iterations.
    tol:
        Tolerance on the stationarity residual ``||grad_phi G||``.
    """

    name = "solver"

    def __init__(self, *, max_iter: int = 500, tol: float = 1e-6):
        self.max_iter = check_positive_int(max_iter, "max_iter", allow_zero=True)
        self.tol = check_nonneg_float(tol, "tol")

    @property
    def vmappable(self) -> bool:
        """Whether this solver, as configured, can run inside :func:`torch.func.vmap` (fixed iteration count)."""
        return False

    def run(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        raise NotImplementedError

    def finish(self, fun: Objective, x: torch.Tensor, iterations: int, history: dict | None = None,
               status: SolverStatus | None = None) -> SolveResult:
        """Build the result for a final point: measures ``||grad G||`` and decides ``converged``.

        For solvers that do not run the shared loop (black boxes, SciPy, cvxpy).
        """
        value, g = fun.value_and_grad(x)
        gn = torch.linalg.vector_norm(g).item()
        v = value.item()
        if not (math.isfinite(gn) and math.isfinite(v)):
            st = SolverStatus.NONFINITE
        elif gn <= self.tol:
            st = SolverStatus.CONVERGED
        else:
            st = status or SolverStatus.NOT_STATIONARY
        return SolveResult(x, st.success, iterations, gn, st, st.value, history or {}, v, self.name, fun.stats())

    def _options(self) -> dict[str, Any]:
        return {"max_iter": self.max_iter, "tol": self.tol}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._options().items())})"


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
        point, status, iteration count and history.
        """
        fun.read_back = False
        try:
            return self._unsynced_loop(fun, x0)
        finally:
            fun.read_back = True

    def _unsynced_loop(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
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


def _require_vmappable(solver: Solver) -> None:
    if not solver.vmappable:
        raise RuntimeError(
            f"{solver!r} cannot run inside torch.func.vmap (or another torch.func transform): it decides "
            f"when to stop from values that cannot be read there, or runs outside torch. Use a fixed iteration "
            f"count instead, e.g. bl.solvers.get('gd', step_size=...) or bl.solvers.get('agd', step_size=..., "
            f"mu=...), or loop over the tasks."
        )


class CallableSolver(Solver):
    """Wrap a user's function ``fn(problem, theta, data, phi0) -> phi`` (or a :class:`SolveResult`).

    The function receives ``theta`` detached and a copy of ``phi0``, in the
    user's structures, and may do anything (NumPy, an external program, a
    Python line search, its own autograd). Its answer is judged like every
    solver's: ``converged`` iff ``||grad_phi G|| <= tol`` at the returned point.

    Parameters
    ----------
    fn:
        The solver function.
    tol:
        Stationarity tolerance used to judge the returned point. Default 1e-6.
    """

    name = "callable"

    def __init__(self, fn: Callable, *, tol: float = 1e-6):
        super().__init__(max_iter=0, tol=tol)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = f"callable:{getattr(fn, '__name__', type(fn).__name__)}"

    def run(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        phi0 = fun.unflatten(x0.detach().clone())
        with torch.enable_grad():  # the user's code may use autograd, also inside bl.argmin's forward
            out = self.fn(fun.problem, fun.theta, fun.data, phi0)
        iterations, history = 0, {}
        if isinstance(out, SolveResult):
            iterations, history, out = out.iterations, out.history, out.phi
        if isinstance(out, torch.Tensor) or isinstance(out, (dict, list, tuple)):
            spec = _tree.tree_spec(out, "the solver's result")
            if not _tree.same_structure(spec, fun.spec):
                raise ValueError(
                    f"solver {self.name} returned {spec.describe()}, but phi0 is {fun.spec.describe()}; "
                    f"return phi in the structure of phi0."
                )
            x, _ = _tree.flatten(out, "the solver's result")
        else:
            raise TypeError(f"solver {self.name} must return phi (a tensor or tree like phi0) or a SolveResult, "
                            f"got {type(out).__name__}.")
        x = x.detach().to(dtype=x0.dtype, device=x0.device)
        return self.finish(fun, x, iterations, history)

    def _options(self):
        return {"fn": getattr(self.fn, "__name__", self.fn), "tol": self.tol}


_REGISTRY = Registry("inner solver", Solver)


def register_solver(name: str):
    """Class decorator: register a :class:`Solver` subclass under ``name``.

    Examples
    --------
    >>> import bilevel as bl
    >>> @bl.register_solver("half_gd")
    ... class HalfGD(bl.solvers.GradientDescent):
    ...     def __init__(self, *, max_iter: int = 500, tol: float = 1e-6):
    ...         super().__init__(step_size=0.5, max_iter=max_iter, tol=tol)
    >>> "half_gd" in bl.solvers.available()
    True
    """
    return _REGISTRY.register(name)


def available() -> list[str]:
    """Names of the registered inner solvers.

    Examples
    --------
    >>> import bilevel as bl
    >>> "gd" in bl.solvers.available()
    True
    """
    return _REGISTRY.available()


def get(solver: str | Solver | Callable = "gd", /, **options: Any) -> Solver:
    """Build an inner solver by name; pass an instance through; wrap a callable.

    Parameters
    ----------
    solver:
        A registered name (see :func:`available`), a :class:`Solver`, or a
        callable ``(problem, theta, data, phi0) -> phi``.
    **options:
        Constructor options (``max_iter``, ``tol``, ``step_size``, ...).

    Raises
    ------
    ValueError
        Unknown name; the message lists the available ones.
    TypeError
        Unknown option; the message lists the valid ones.

    Examples
    --------
    >>> import bilevel as bl
    >>> bl.solvers.get("gd", step_size=0.1, max_iter=500, tol=1e-8)
    GradientDescent(max_iter=500, tol=1e-08, step_size=0.1)
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(f"options {sorted(options)} cannot be applied to an existing {solver!r}; "
                            f"construct it with them instead.")
        return solver
    if isinstance(solver, str):
        return _REGISTRY.build(solver, options)
    if callable(solver):
        from .._registry import check_options

        check_options(CallableSolver, {"fn": None, **options}, "a callable solver")
        return CallableSolver(solver, **options)
    raise TypeError(f"solver must be a name ({', '.join(available())}), a Solver instance or a callable "
                    f"(problem, theta, data, phi0) -> phi, got {type(solver).__name__}.")


def prepare(problem: InnerProblem, theta: Any, data: Any, phi0: Any) -> tuple[Objective, torch.Tensor]:
    """Validate the inputs of a solve and build the flat :class:`Objective` and start point."""
    if not isinstance(problem, InnerProblem):
        raise TypeError(f"problem must be a bilevel.InnerProblem or ProximalProblem, got {type(problem).__name__}; "
                        f"wrap your objective as bl.InnerProblem(objective).")
    _tree.tree_spec(theta, "theta")
    problem.validate(theta, data)
    if phi0 is None:
        phi0 = problem.default_phi0(theta)
    else:
        problem.check_phi(phi0, theta, "phi0")
        from .._checks import check_finite_tree

        check_finite_tree(phi0, "phi0", "start the inner solver from finite values")
    x0, spec = _tree.flatten(phi0, "phi0")
    x0 = x0.detach().clone()  # never mutate the caller's phi0 (a plain copy inside torch.func transforms)
    return Objective(problem, theta, data, spec), x0


def solve(problem: InnerProblem, theta: Any, data: Any = None, *, solver: str | Solver | Callable = "gd",
          phi0: Any = None) -> SolveResult:
    """Minimise ``G(phi, theta, data)`` over ``phi``; no gradients flow (see :func:`bilevel.argmin`).

    Parameters
    ----------
    problem:
        An :class:`bilevel.InnerProblem` or :class:`bilevel.ProximalProblem`.
    theta:
        Outer variables: a tensor or a dict / list / tuple of tensors.
    data:
        Passed to the objective untouched.
    solver:
        A name, a :class:`Solver` or a callable; default ``"gd"`` with its
        defaults (Armijo line search, ``max_iter=500``, ``tol=1e-6``).
    phi0:
        Starting point; defaults to ``theta`` (which needs ``phi`` and
        ``theta`` to share a structure, as in iMAML). Never modified.

    Returns
    -------
    SolveResult
        ``phi`` in the structure of ``phi0``. A failed solve sets
        ``converged=False`` and warns with :class:`bilevel.ConvergenceWarning`;
        a solver built with ``tol=0`` runs exactly ``max_iter`` iterations
        (iMAML's fixed inner budget) and reaching them is not a warning.

    Notes
    -----
    ``solve`` runs inside :func:`torch.func.vmap` (a batch of tasks) with the
    solvers whose ``vmappable`` property is true (``"gd"`` with a fixed
    ``step_size``; ``"agd"`` with a fixed step and no adaptive restart). There
    they take exactly ``max_iter`` steps with ``torch.func`` derivatives,
    value checks are skipped, and the status is ``UNCHECKED``; others raise a
    ``RuntimeError`` saying what to use instead.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.ProximalProblem(lambda phi, d: ((phi - d) ** 2).sum(), lam=2.0)
    >>> res = bl.solve(problem, torch.zeros(2), torch.ones(2), solver=bl.solvers.get("gd", step_size=0.25, tol=1e-10))
    >>> res.converged, res.phi
    (True, tensor([0.5000, 0.5000]))
    """
    solver_obj = get(solver)
    fun, x0 = prepare(problem, theta, data, phi0)
    if fun.functional:
        _require_vmappable(solver_obj)
    result = solver_obj.run(fun, x0)
    result.phi = fun.unflatten(result.phi.detach())
    logger.debug("inner solve %s: %s after %d iterations, ||grad G|| = %.3g", result.solver,
                 result.status.name, result.iterations, result.grad_norm)
    if not result.converged and result.status is not SolverStatus.UNCHECKED and not (
            result.status is SolverStatus.MAX_ITER and solver_obj.tol == 0):  # tol=0: a fixed budget, as asked
        warnings.warn(
            f"inner solver {result.solver!r} did not converge after {result.iterations} iterations "
            f"(||grad_phi G|| = {result.grad_norm:.3g}, tol {solver_obj.tol:g}): {result.message}",
            BudgetWarning if result.status in (SolverStatus.MAX_ITER, SolverStatus.NOT_STATIONARY)
            else BreakdownWarning,
            stacklevel=2,
        )
    return result
