"""SciPy's L-BFGS-B as an inner solver (``"scipy_lbfgs"``), with optional bounds on ``phi``."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from .. import tree as _tree
from .._checks import check_positive_int, check_structure
from ._scipy_bridge import run_minimize
from .base import Solver, register_solver
from .objective import Objective
from .result import SolveResult, SolverStatus
from .scipy_minimize import stopping_options

__all__ = ["ScipyLBFGS"]


def _check_bound(value: Any, what: str) -> Any:
    """A bound is ``None``, a real number, or a tensor / tree of tensors like ``phi``."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if v != v:
            raise ValueError(f"Invalid {what}: {value}; use -inf / inf (or None) for no bound, not NaN.")
        return v
    if isinstance(value, (torch.Tensor, dict, list, tuple)):
        leaves = _tree.leaves(value, what)
        if any(bool(torch.isnan(t).any()) for t in leaves):
            raise ValueError(f"{what} contains NaN; use -inf / inf for unbounded entries.")
        return value
    raise TypeError(f"{what} must be None, a number, or a tensor / tree of tensors like phi, "
                    f"got {type(value).__name__}.")


@register_solver("scipy_lbfgs")
class ScipyLBFGS(Solver):
    """Limited-memory BFGS with optional bounds: ``scipy.optimize.minimize(method="L-BFGS-B")``.

    Parameters
    ----------
    max_iter:
        Maximum number of L-BFGS-B iterations (SciPy's ``maxiter``; the
        number of evaluations is capped at ``20 * max_iter + 20``). Default 500.
    tol:
        Stop when ``||grad_phi G|| <= tol``. Default 1e-6.
    memory:
        Number of correction pairs kept (SciPy's ``maxcor``). Default 10.
    bounds:
        ``None`` (default), or ``(lower, upper)`` where each is ``None``, a
        number, or a tensor / tree of tensors with ``phi``'s structure
        (``-inf`` / ``inf`` entries for no bound).

    Notes
    -----
    ``G`` and its gradient come from the inner problem (one autograd call per
    evaluation). L-BFGS-B's own tests are set so that stationarity stops it:
    its projected-gradient test uses the max-norm, so it receives
    ``gtol = tol / sqrt(n)`` (which implies ``||grad G||_2 <= tol``), and its
    relative-reduction test on ``G`` gets a tolerance far below float64
    round-off. Its line search needs ``G`` to decrease measurably, so in
    float64 it stalls near ``||grad G|| ~ sqrt(2 eps |G| L)`` (``eps`` the
    machine epsilon, ``L`` the curvature): about ``1e-8`` to ``1e-7`` for
    ``|G| ~ 1``; a larger ``memory`` helps a little, and a ``tol`` below that
    is reported as not reached (use ``"newton_cg"`` or ``"scipy"`` with
    ``method="trust-ncg"`` for tighter solves). SciPy works on a float64
    NumPy copy of the flattened ``phi``:
    each evaluation converts to ``phi``'s dtype and device (CUDA included)
    and back, and the answer keeps ``phi0``'s dtype and device. In float32
    the gradient is only accurate to about ``1e-7 * |G|``; loosen ``tol``
    accordingly.

    The start point is clipped into the bounds. The implicit hypergradient
    assumes an unconstrained stationary point: where a bound is active at
    the solution ``grad_phi G`` is not zero there, and the result honestly
    says ``converged=False`` (``NOT_STATIONARY``). Use bounds to keep the
    iterates in the domain of ``G``, not to impose constraints that bind.

    When the solve does not reach ``tol``, ``message`` ends with SciPy's
    message. ``history`` holds ``value`` and ``grad_norm`` at the start
    point and after each iteration.

    Not supported under :func:`torch.func.vmap`: the solve runs outside
    torch, in SciPy.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> ref = bl.testing.ridge_regression(seed=0)
    >>> solver = bl.solvers.get("scipy_lbfgs", tol=1e-7)
    >>> res = bl.solve(ref.problem, ref.theta, ref.data, solver=solver, phi0=ref.phi0)
    >>> res.converged, bool(torch.allclose(res.phi, ref.solution(), atol=1e-6))
    (True, True)
    >>> theta = ref.theta.clone().requires_grad_(True)
    >>> ref.outer(bl.argmin(ref.problem, theta, ref.data, solver=solver, phi0=ref.phi0), theta).backward()
    >>> bool(torch.allclose(theta.grad, ref.hypergradient(), rtol=1e-5, atol=1e-8))
    True

    With bounds (here inactive at the solution ``phi = 0.5``), in float32:

    >>> problem = bl.ProximalProblem(lambda phi, d: ((phi - d) ** 2).sum(), lam=2.0)
    >>> solver = bl.solvers.get("scipy_lbfgs", tol=1e-5, bounds=(0.0, 1.0))
    >>> bl.solve(problem, torch.zeros(2), torch.ones(2), solver=solver).phi
    tensor([0.5000, 0.5000])
    """

    def __init__(self, *, max_iter: int = 500, tol: float = 1e-6, memory: int = 10,
                 bounds: tuple[Any, Any] | None = None):
        super().__init__(max_iter=max_iter, tol=tol)
        self.memory = check_positive_int(memory, "memory")
        if bounds is not None:
            if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
                raise TypeError(f"bounds must be None or a pair (lower, upper), got {bounds!r}; "
                                f"use None in a slot for no bound on that side.")
            lower, upper = _check_bound(bounds[0], "bounds[0] (lower)"), _check_bound(bounds[1], "bounds[1] (upper)")
            if isinstance(lower, float) and isinstance(upper, float) and lower > upper:
                raise ValueError(f"Invalid bounds: lower {lower} > upper {upper}.")
            bounds = (lower, upper)
        self.bounds = bounds

    def _options(self):
        return {**super()._options(), "memory": self.memory, "bounds": self.bounds}

    def _scipy_bounds(self, fun: Objective, x0: torch.Tensor):
        from scipy.optimize import Bounds

        n = x0.numel()
        arrays = []
        for value, side, default in ((self.bounds[0], "lower", -np.inf), (self.bounds[1], "upper", np.inf)):
            what = f"the {side} bound"
            if value is None:
                arrays.append(np.full(n, default))
            elif isinstance(value, float):
                arrays.append(np.full(n, value))
            else:
                check_structure(_tree.tree_spec(value, what), fun.spec, what, "phi")
                flat, _ = _tree.flatten(value, what)
                arrays.append(flat.detach().to(device="cpu", dtype=torch.float64).numpy().copy())
        lb, ub = arrays
        bad = lb > ub
        if bad.any():
            raise ValueError(f"Invalid bounds: lower > upper in {int(bad.sum())} entries (first at flat index "
                             f"{int(np.argmax(bad))}); pass lower <= upper everywhere.")
        return Bounds(lb, ub)

    def run(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        bounds = None if self.bounds is None else self._scipy_bounds(fun, x0)
        if self.max_iter == 0:
            x = x0.detach().clone()
            if bounds is not None:
                x = x.clamp(torch.as_tensor(bounds.lb).to(x), torch.as_tensor(bounds.ub).to(x))
            return self.finish(fun, x, 0, {}, SolverStatus.MAX_ITER)
        options = {"maxiter": self.max_iter, "maxfun": 20 * self.max_iter + 20, "maxcor": self.memory,
                   **stopping_options("l-bfgs-b", self.tol, x0.numel())}
        return run_minimize(self, fun, x0, method="l-bfgs-b", options=options, tol=None, use_jac=True,
                            bounds=bounds)
