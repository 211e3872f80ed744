"""cvxpy as an inner solver (``"cvxpy"``): the user writes ``G`` as a convex program.

The module is named ``cvxpy_solver`` so that it does not shadow the ``cvxpy``
package inside ``bilevel.solvers``. cvxpy itself is imported only when a solve
runs (it is a heavy, optional dependency: ``pip install bilevel[cvxpy]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch

from .. import tree as _tree
from .._checks import check_positive_int
from .base import Solver, register_solver
from .objective import Objective
from .result import SolveResult, SolverStatus

__all__ = ["CvxpySolver", "CvxpyStatusError"]

#: cvxpy solver name -> the name of its iteration limit among its solve options.
MAX_ITER_OPTION = {"CLARABEL": "max_iter", "SCS": "max_iters", "ECOS": "max_iters", "OSQP": "max_iter"}

_ADVICE = {
    "infeasible": "the constraints that build() returned admit no point at this theta: check them (and the data) "
                  "for contradictions, or relax them",
    "unbounded": "the objective is unbounded below at this theta: check the builder (the sign of the objective, "
                 "that the regularisation is positive, that every direction is penalised or constrained)",
    "solver_error": "the conic solver failed: try another solver (solver='CLARABEL', 'SCS', ...; see "
                    "cvxpy.installed_solvers()), rescale the data, or pass solver_options={'verbose': True} to see "
                    "its log",
    "user_limit": "the conic solver hit an iteration or time limit before producing a point: raise its limit "
                  "(max_iter=..., or its own option in solver_options)",
}


class CvxpyStatusError(RuntimeError):
    """cvxpy returned no usable solution: the problem is infeasible or unbounded, or its solver failed.

    Attributes
    ----------
    status:
        cvxpy's status string (``"infeasible"``, ``"unbounded"``,
        ``"infeasible_inaccurate"``, ``"solver_error"``, ...).
    """

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _import_cvxpy():
    try:
        import cvxpy
    except ImportError as exc:  # cvxpy missing, or blocked in sys.modules
        raise ImportError(
            "the 'cvxpy' inner solver needs the cvxpy package, which is not installed; install it with "
            "`pip install bilevel[cvxpy]` (or `pip install cvxpy`), or pick another solver from "
            "bilevel.solvers.available()."
        ) from exc
    return cvxpy


def _status_error(status: str, solver_name: str | None, detail: str = "") -> CvxpyStatusError:
    key = status
    for prefix in ("infeasible", "unbounded"):
        if status.startswith(prefix):
            key = prefix
    advice = _ADVICE.get(key, _ADVICE["solver_error"])
    solver = f" with solver {solver_name!r}" if solver_name else ""
    return CvxpyStatusError(status, f"cvxpy{solver} returned status {status!r}{detail}; no solution for phi: "
                                    f"{advice}.")


def _values(variable: Any, cp: Any, path: str = "variable") -> Any:
    """The values of a cvxpy variable, or a dict / list / tuple of them, as float64 tensors."""
    if isinstance(variable, dict):
        return {k: _values(v, cp, f"{path}[{k!r}]") for k, v in variable.items()}
    if isinstance(variable, (list, tuple)):
        out = [_values(v, cp, f"{path}[{i}]") for i, v in enumerate(variable)]
        return out if isinstance(variable, list) else tuple(out)
    if isinstance(variable, cp.Expression):
        if variable.value is None:
            raise ValueError(f"the cvxpy {path} returned by build() has no value after the solve; return the "
                             f"cp.Variable that the problem's objective uses.")
        return torch.as_tensor(np.asarray(variable.value, dtype=np.float64))
    raise TypeError(f"build() must return (cvxpy.Problem, cvxpy.Variable); its {path} is a "
                    f"{type(variable).__name__}.")


@register_solver("cvxpy")
class CvxpySolver(Solver):
    """Solve the inner problem with cvxpy, from a convex program that the user writes.

    Parameters
    ----------
    build:
        ``build(theta_np, data) -> (problem, variable)``: returns a
        ``cvxpy.Problem`` whose minimiser is ``phi*(theta)`` and the
        ``cvxpy.Variable`` that holds ``phi``. ``theta_np`` has ``theta``'s
        structure with float64 NumPy arrays for leaves; ``data`` is passed
        untouched. ``variable`` has ``phi``'s shape (a tensor ``phi``), or is
        a dict / list / tuple of variables in ``phi``'s structure, or a 1-D
        variable of ``phi``'s total size in flattening order. Required: there
        is no default problem (``None`` raises ``TypeError``).
    solver:
        A cvxpy solver name (``"CLARABEL"``, ``"SCS"``, ``"OSQP"``, ...;
        ``None``, the default, lets cvxpy choose).
    solver_options:
        Keyword arguments for ``problem.solve``: the conic solver's own
        tolerances (e.g. ``{"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12,
        "tol_feas": 1e-12}`` for CLARABEL, ``{"eps_abs": ..., "eps_rel": ...}``
        for SCS), ``verbose``, ...
    max_iter:
        Iteration limit of the conic solver, forwarded under its own name
        for CLARABEL, SCS, ECOS and OSQP (``solver`` must then be one of
        them). ``None`` (default): the solver's own default.
    tol:
        Tolerance on ``||grad_phi G||`` at the returned point, measured with
        the torch objective of the inner problem. Default 1e-6.

    Raises
    ------
    CvxpyStatusError
        The problem is infeasible or unbounded (also their ``_inaccurate``
        variants), or the solver failed, at this ``theta``. The message names
        cvxpy's status and what to check.
    ImportError
        cvxpy is not installed (``pip install bilevel[cvxpy]``).

    Notes
    -----
    The cvxpy program must have the same minimiser as the torch objective
    ``G`` of the inner problem: cvxpy finds ``phi``, the hypergradient comes
    from ``G`` through the implicit function theorem at that ``phi``, and
    ``converged`` means ``||grad_phi G|| <= tol`` there, the test every
    solver answers to. Hence ``G`` must be smooth and strongly convex near
    the solution; constraints of the cvxpy program must not be active there. For constraints that
    bind, write the problem as a :class:`bilevel.CompositeProblem` whose regulariser is the
    constraint set (``bl.prox.Box``, ``bl.prox.Simplex``, ...) and solve it with the root solver
    ``"cvxpy"`` (:class:`bilevel.roots.CvxpyRootSolver`): :func:`bilevel.root` then differentiates the
    projected fixed point, which is exact with active constraints.

    A conic solver's answer is only as accurate as its own tolerances
    (about ``1e-8`` by default, relative to the problem's scale), so either
    tighten them through ``solver_options`` or choose ``tol`` accordingly.
    An ``"optimal_inaccurate"`` status is accepted and judged by the same
    stationarity test; if that fails, the message says so.

    ``build`` runs at every solve, so its cost (and cvxpy's compilation) is
    paid per outer step. For repeated solves build the problem once with
    ``cvxpy.Parameter`` objects and only set their ``.value`` in ``build``
    (cvxpy then caches the compilation: DPP).

    Not supported under :func:`torch.func.vmap`: the solve runs outside
    torch, in cvxpy. ``phi`` comes back in ``phi0``'s dtype and device.

    Examples
    --------
    Ridge regression with per-feature strengths ``exp(theta)``:

    >>> import cvxpy as cp, numpy as np, torch, bilevel as bl
    >>> from bilevel.solvers.cvxpy_solver import CvxpySolver
    >>> ref = bl.testing.ridge_regression(seed=0)
    >>> def build(theta, data):
    ...     X, y = data["X"].numpy(), data["y"].numpy()
    ...     w = cp.Variable(X.shape[1])
    ...     G = cp.sum_squares(X @ w - y) / (2 * len(y)) + 0.5 * cp.sum(cp.multiply(np.exp(theta), cp.square(w)))
    ...     return cp.Problem(cp.Minimize(G)), w
    >>> solver = CvxpySolver(build=build, solver="CLARABEL", tol=1e-8,
    ...                      solver_options={"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12})
    >>> theta = ref.theta.clone().requires_grad_(True)
    >>> phi, res = bl.argmin(ref.problem, theta, ref.data, solver=solver, phi0=ref.phi0, full_output=True)
    >>> res.converged
    True
    >>> ref.outer(phi, theta).backward()
    >>> bool(torch.allclose(theta.grad, ref.hypergradient(), rtol=1e-5, atol=1e-8))
    True
    """

    def __init__(self, *, build: Callable[[Any, Any], tuple[Any, Any]] | None = None, solver: str | None = None,
                 solver_options: dict[str, Any] | None = None, max_iter: int | None = None, tol: float = 1e-6):
        if build is None:
            raise TypeError(
                "the 'cvxpy' inner solver needs build=..., a function build(theta_np, data) -> "
                "(cvxpy.Problem, cvxpy.Variable) that writes the inner problem as a convex program; e.g. "
                "bl.solvers.get('cvxpy', build=my_build)."
            )
        if not callable(build):
            raise TypeError(f"build must be callable as build(theta_np, data) -> (cvxpy.Problem, cvxpy.Variable), "
                            f"got {type(build).__name__}.")
        super().__init__(max_iter=0, tol=tol)
        if solver is not None and not isinstance(solver, str):
            raise TypeError(f"solver must be a cvxpy solver name such as 'CLARABEL' or None, got {solver!r}.")
        if solver_options is None:
            solver_options = {}
        if not isinstance(solver_options, Mapping) or not all(isinstance(k, str) for k in solver_options):
            raise TypeError(f"solver_options must be a dict of keyword arguments for cvxpy's Problem.solve, "
                            f"got {solver_options!r}.")
        if "solver" in solver_options:
            raise TypeError("pass the cvxpy solver as solver=..., not inside solver_options.")
        if max_iter is not None:
            max_iter = check_positive_int(max_iter, "max_iter")
            if solver is None or solver.upper() not in MAX_ITER_OPTION:
                raise ValueError(
                    f"max_iter can be forwarded only to a named solver among {', '.join(MAX_ITER_OPTION)} (got "
                    f"solver={solver!r}); name one, or put the limit in solver_options under your solver's own "
                    f"option name."
                )
        self.build = build
        self.solver = solver
        self.solver_options = dict(solver_options)
        self.max_iter = max_iter  # type: ignore[assignment]  # None: the conic solver's default

    def _options(self):
        return {"build": getattr(self.build, "__name__", self.build), "solver": self.solver,
                "solver_options": self.solver_options, "max_iter": self.max_iter, "tol": self.tol}

    def run(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        x, status, iterations, detail = self.solve_point(fun, x0)
        result = self.finish(fun, x, iterations, {}, SolverStatus.MAX_ITER if status == "user_limit"
                             else SolverStatus.NOT_STATIONARY)
        if not result.converged:
            result.detail = detail
        return result

    def solve_point(self, fun: Any, x0: torch.Tensor) -> tuple[torch.Tensor, str, int, str]:
        """Run cvxpy: ``(flat phi, cvxpy's status, iterations, what to say if the point is not accepted)``.

        ``fun`` needs ``theta``, ``data`` and ``spec`` (an inner objective or a root objective).
        """
        cp = _import_cvxpy()
        theta_spec = _tree.tree_spec(fun.theta, "theta")
        theta_np = _tree.from_leaves(theta_spec, [t.detach().to(device="cpu", dtype=torch.float64).numpy()
                                                  for t in _tree.leaves(fun.theta)])
        built = self.build(theta_np, fun.data)
        if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], cp.Problem)):
            raise TypeError(f"build() must return a pair (cvxpy.Problem, cvxpy.Variable), got "
                            f"{type(built).__name__}{'' if not isinstance(built, tuple) else f' of {len(built)}'}.")
        problem, variable = built
        options = dict(self.solver_options)
        if self.max_iter is not None:
            options.setdefault(MAX_ITER_OPTION[self.solver.upper()], self.max_iter)
        try:
            problem.solve(solver=self.solver, **options)
        except cp.error.SolverError as exc:
            raise _status_error(cp.SOLVER_ERROR, self.solver, f" ({exc})") from exc
        status = problem.status
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE, cp.USER_LIMIT):
            raise _status_error(status, self.solver)
        try:
            values = _values(variable, cp)
        except ValueError:
            if status == cp.USER_LIMIT:
                raise _status_error(status, self.solver) from None
            raise
        x = self._to_flat(values, fun, x0)
        stats = problem.solver_stats
        iterations = int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0
        solver = stats.solver_name if stats is not None else self.solver
        detail = (f"cvxpy ({solver}) returned status {status!r}; its answer is only as accurate as the conic "
                  f"solver's tolerances: tighten them in solver_options or loosen tol.")
        return x, status, iterations, detail

    @staticmethod
    def _to_flat(values: Any, fun: Any, x0: torch.Tensor) -> torch.Tensor:
        spec = _tree.tree_spec(values, "the cvxpy variable")
        if _tree.same_structure(spec, fun.spec):
            flat, _ = _tree.flatten(values, "the cvxpy variable")
        elif spec.structure is None and len(spec.shapes[0]) == 1 and spec.size == fun.spec.size \
                and fun.spec.structure is not None:
            flat = values  # a flat variable for a tree phi, in flattening order
        else:
            got = spec.describe().replace("a tensor", "a variable")
            fix = (f"create cp.Variable({tuple(fun.spec.shapes[0])})" if fun.spec.structure is None else
                   f"return variables in phi's structure, or one cp.Variable({fun.spec.size}) in flattening order")
            raise ValueError(f"build() returned {got}, but phi0 is {fun.spec.describe()}; {fix}.")
        return flat.reshape(-1).to(dtype=x0.dtype, device=x0.device)
