"""The inner-solver protocol (:class:`Solver`), a user's callable as a solver, the registry and :func:`solve`.

The result types are in :mod:`bilevel.solvers.result`, the flat objective in
:mod:`bilevel.solvers.objective` and the iteration driver in :mod:`bilevel.solvers.driver`.

Solvers only find ``phi``: none contains differentiation code. Gradients of
the solution with respect to ``theta`` come from the optimality condition
(:mod:`bilevel.implicit`), so any solver, including a user's black box, gets
exact hypergradients once it returns a stationary point.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable

import torch

from .. import tree as _tree
from .._checks import check_nonneg_float, check_positive_int
from .._functorch import explain_transform_errors
from .._registry import Registry
from ..problem import InnerProblem
from .objective import Objective
from .result import SolveResult, SolverStatus

__all__ = [
    "Solver",
    "CallableSolver",
    "register_solver",
    "get",
    "available",
    "solve",
]

logger = logging.getLogger(__name__)


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
    rtol:
        Tolerance relative to the start (iterative solvers): stop when ``||grad_phi G|| <= max(tol,
        rtol ||grad_phi G(phi0)||)``, a test that does not depend on the units of ``G``. Default 0
        (the absolute ``tol`` alone).
    """

    name = "solver"

    def __init__(self, *, max_iter: int = 500, tol: float = 1e-6, rtol: float = 0.0):
        self.max_iter = check_positive_int(max_iter, "max_iter", allow_zero=True)
        self.tol = check_nonneg_float(tol, "tol")
        self.rtol = check_nonneg_float(rtol, "rtol")

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
        opts = {"max_iter": self.max_iter, "tol": self.tol}
        if getattr(self, "rtol", 0.0):
            opts["rtol"] = self.rtol
        return opts

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._options().items())})"


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
    with explain_transform_errors(f"the inner solve ({solver_obj.name})"):
        result = solver_obj.run(fun, x0)
    result.phi = fun.unflatten(result.phi.detach())
    logger.debug("inner solve %s: %s after %d iterations, ||grad G|| = %.3g", result.solver,
                 result.status.name, result.iterations, result.grad_norm)
    if not result.converged and result.status.warning is not None and not (
            result.status is SolverStatus.MAX_ITER and solver_obj.tol == 0):  # tol=0: a fixed budget, as asked
        warnings.warn(result.status.warning(
            f"inner solver {result.solver!r} did not converge after {result.iterations} iterations "
            f"(||grad_phi G|| = {result.grad_norm:.3g}, tol {solver_obj.tol:g}"
            f"{f', rtol {solver_obj.rtol:g}' if solver_obj.rtol else ''}): {result.message}",
            status=result.status, info=result), stacklevel=2)
    return result
