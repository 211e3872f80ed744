"""Any :func:`scipy.optimize.minimize` method as an inner solver (``"scipy"``).

The module is named ``scipy_minimize`` so that it does not shadow the
``scipy`` package inside ``bilevel.solvers``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ._scipy_bridge import run_minimize
from .base import Solver, register_solver
from .objective import Objective
from .result import SolveResult, SolverStatus

__all__ = ["ScipyMinimize", "SCIPY_METHODS"]

#: method (lower case) -> (uses the gradient, second-order information: None, "hessp" or "hess").
SCIPY_METHODS: dict[str, tuple[bool, str | None]] = {
    "nelder-mead": (False, None),
    "powell": (False, None),
    "cobyla": (False, None),
    "cobyqa": (False, None),
    "cg": (True, None),
    "bfgs": (True, None),
    "l-bfgs-b": (True, None),
    "tnc": (True, None),
    "slsqp": (True, None),
    "newton-cg": (True, "hessp"),
    "trust-ncg": (True, "hessp"),
    "trust-krylov": (True, "hessp"),
    "trust-constr": (True, "hessp"),
    "dogleg": (True, "hess"),
    "trust-exact": (True, "hess"),
}

#: A relative-reduction tolerance on G small enough that it does not stop L-BFGS-B before ||grad G|| <= tol.
TINY_FTOL = 1e-3 * float(torch.finfo(torch.float64).eps)


def stopping_options(method: str, tol: float, n: int) -> dict[str, Any]:
    """Translate ``tol`` on ``||grad G||_2`` into ``method``'s own stopping options, where it has such a test.

    Methods without a gradient-norm test get SciPy's generic ``tol`` instead
    (see :class:`ScipyMinimize`).
    """
    if method in ("bfgs", "cg"):
        return {"gtol": tol, "norm": 2}
    if method == "l-bfgs-b":  # L-BFGS-B tests the max-norm: ||g||_2 <= sqrt(n) ||g||_inf
        return {"gtol": tol / math.sqrt(max(n, 1)), "ftol": TINY_FTOL}
    if method == "tnc":  # the same max-norm test; its tests on f and x steps only when they stall
        return {"gtol": tol / math.sqrt(max(n, 1)), "ftol": 0.0, "xtol": 0.0}
    if method == "slsqp":  # only a test on G's change; near phi*, G - G* ~ ||grad G||^2 / (2 L)
        return {"ftol": tol ** 2}
    if method in ("trust-ncg", "trust-krylov", "trust-exact", "dogleg"):  # these test ||g||_2 already
        return {"gtol": tol}
    return {}


@register_solver("scipy")
class ScipyMinimize(Solver):
    """Any method of :func:`scipy.optimize.minimize` as an inner solver.

    Parameters
    ----------
    method:
        A ``scipy.optimize.minimize`` method name (case-insensitive):
        derivative-free ``"Nelder-Mead"`` (default), ``"Powell"``,
        ``"COBYLA"``, ``"COBYQA"``; gradient-based ``"CG"``, ``"BFGS"``,
        ``"L-BFGS-B"``, ``"TNC"``, ``"SLSQP"``; second-order
        ``"Newton-CG"``, ``"trust-ncg"``, ``"trust-krylov"``,
        ``"trust-constr"`` (given Hessian-vector products) and ``"dogleg"``,
        ``"trust-exact"`` (given the dense Hessian, built from ``n``
        Hessian-vector products: small problems only).
    max_iter:
        Maximum number of iterations (SciPy's ``maxiter``; ``maxfun`` for
        TNC). Default 500.
    tol:
        Tolerance on the stationarity residual ``||grad_phi G||``, the test
        that decides ``converged`` for every solver. Default 1e-6.
    options:
        Extra SciPy options for the method, passed through (they override the
        ones this class derives from ``max_iter`` and ``tol``), e.g.
        ``{"xatol": 1e-10, "fatol": 1e-14}`` for Nelder-Mead.

    Raises
    ------
    ValueError
        Unknown ``method``; the message lists SciPy's methods.

    Notes
    -----
    The objective, its gradient (``jac``) and, for second-order methods, its
    Hessian-vector products (``hessp``) come from the inner problem through
    autograd; derivative-free methods only evaluate ``G``. SciPy works on a
    float64 NumPy copy of the flattened ``phi``; values are converted to
    ``phi``'s dtype and device (CUDA included) for every evaluation and the
    answer comes back in them, so each evaluation pays a host-device copy.

    ``tol`` is translated into the method's own stopping test where it has a
    gradient-norm test (``gtol`` with the 2-norm for CG, BFGS and the trust
    region methods; ``gtol = tol / sqrt(n)`` on the max-norm, with the tests
    on ``G``'s change switched off, for L-BFGS-B and TNC; ``ftol = tol**2``
    for SLSQP, whose only test is on ``G``'s change); other methods get
    SciPy's generic ``tol`` argument, which they interpret as a tolerance on
    ``x`` or ``G`` (see :func:`scipy.optimize.minimize`). Either
    way the returned point is judged like every solver's: ``converged`` iff
    ``||grad_phi G|| <= tol`` there. A derivative-free method stops on the
    simplex (or step) size, so with its default tolerances it often reports
    ``converged=False`` honestly; tighten its own options (``xatol`` /
    ``fatol`` for Nelder-Mead, ``xtol`` / ``ftol`` for Powell) or loosen
    ``tol``. Derivative-free methods suit small black-box problems (tens of
    variables); the gradient of ``G`` is still needed for the hypergradient,
    so prefer ``"BFGS"``, ``"trust-ncg"`` or the ``"scipy_lbfgs"`` solver
    whenever ``G`` is differentiable.

    When the solve does not reach ``tol``, the result's ``message`` ends with
    SciPy's own message. ``history`` holds ``value`` (and ``grad_norm`` for
    gradient methods) at the start point and after every SciPy iteration.
    Bounds and constraints are not passed (see ``"scipy_lbfgs"`` for
    bounds).

    Not supported under :func:`torch.func.vmap`: the solve runs outside
    torch, in SciPy.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.ProximalProblem(lambda phi, d: ((phi - d) ** 2).sum(), lam=2.0)
    >>> theta, d = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    >>> solver = bl.solvers.get("scipy", method="BFGS", tol=1e-9)
    >>> res = bl.solve(problem, theta, d, solver=solver)
    >>> res.converged, res.phi.tolist()
    (True, [0.5, 0.5])

    A derivative-free method on a tiny problem, with its own tolerances
    tightened so that the simplex shrinks until ``||grad G|| <= tol``:

    >>> solver = bl.solvers.get("scipy", method="Nelder-Mead", tol=1e-4,
    ...                         options={"xatol": 1e-8, "fatol": 1e-12})
    >>> bl.solve(problem, theta, d, solver=solver).converged
    True
    """

    def __init__(self, *, method: str = "Nelder-Mead", max_iter: int = 500, tol: float = 1e-6,
                 options: dict[str, Any] | None = None):
        super().__init__(max_iter=max_iter, tol=tol)
        if not isinstance(method, str):
            raise TypeError(f"method must be a scipy.optimize.minimize method name, got {type(method).__name__}; "
                            f"for a custom solver pass a callable (problem, theta, data, phi0) -> phi as the solver.")
        key = method.strip().lower()
        if key not in SCIPY_METHODS:
            raise ValueError(f"unknown scipy.optimize.minimize method {method!r}; available: "
                             f"{', '.join(SCIPY_METHODS)}.")
        self.method = method
        self._key = key
        if options is None:
            options = {}
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise TypeError(f"options must be a dict of SciPy options for method {method!r} (str keys), "
                            f"got {options!r}.")
        self.options = dict(options)

    def _options(self):
        return {"method": self.method, **super()._options(), "options": self.options}

    def run(self, fun: Objective, x0: torch.Tensor) -> SolveResult:
        uses_grad, second_order = SCIPY_METHODS[self._key]
        iter_key = "maxfun" if self._key == "tnc" else "maxiter"
        options = {iter_key: self.max_iter, **stopping_options(self._key, self.tol, x0.numel()), **self.options}
        if options[iter_key] == 0:  # nothing to do; SciPy treats 0 as "its default" for some methods
            return self.finish(fun, x0.detach().clone(), 0, {}, SolverStatus.MAX_ITER)
        return run_minimize(self, fun, x0, method=self._key, options=options, tol=self.tol, use_jac=uses_grad,
                            use_hessp=second_order == "hessp", use_hess=second_order == "hess")
