"""The constants and the adaptive loop behind :func:`bilevel.hypergradient`'s certificates.

Resolving the constants a certificate needs (the mixed term's, an estimated ``mu``, or all of them
estimated when none were given), and ``target_error``'s loop: re-solve ``phi`` and the linear
system, certify, and tighten whichever part fell short until the certificate meets the target.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import replace
from typing import Any, Callable

import torch

from . import bounds as _bounds
from . import tree as _tree
from ._checks import ConvergenceWarning, check_finite_tree, check_scalar
from .implicit import _PHI_HINT, ImplicitInfo, _core, _flat_detached, _measured_curvature, _outer_grads
from .linalg.base import LinearSolver, LinearSolveStatus
from .linalg.eig import lanczos
from .linalg.hvp import hvp as _hvp
from .linalg.registry import get as get_linear_solver
from .problem import InnerProblem, ProximalProblem
from .solvers.base import Solver
from .solvers.base import get as get_solver
from .solvers.base import solve

logger = logging.getLogger(__name__)


def _proximal_lam_max(problem: ProximalProblem) -> float:
    if isinstance(problem.lam, float):
        return problem.lam
    return max(float(t.detach().max()) for t in _tree.leaves(problem.lam))


def _resolve_cross(problem: InnerProblem, constants: _bounds.Constants, depends_on_theta: bool) -> dict[str, float]:
    """The constants of the mixed term ``d2G/dtheta dphi`` and of the direct term, for the certificate."""
    if isinstance(problem, ProximalProblem):
        lam_max = _proximal_lam_max(problem)
        if constants.lam is not None and constants.lam < lam_max * (1.0 - 1e-12):
            raise ValueError(f"constants.lam={constants.lam:g} is below the problem's lam (largest value {lam_max:g}), "
                             f"which would make the certificate invalid; leave constants.lam=None for a "
                             f"ProximalProblem (its lam is read from the problem).")
        cross = lam_max if constants.lam is None else constants.lam
        cross_lipschitz = 0.0  # d2G/dtheta dphi = -diag(lam), constant in phi
    else:
        missing = [n for n in ("cross", "cross_lipschitz") if getattr(constants, n) is None]
        if missing:
            raise ValueError(
                f"a certificate for a general InnerProblem needs constants.{' and constants.'.join(missing)}: "
                f"a bound on the operator norm of d2G/dtheta dphi at phi (cross) and its Lipschitz constant in "
                f"phi (cross_lipschitz; 0 when G is bilinear in (phi, theta) plus terms in one of them). For "
                f"iMAML's G use bl.ProximalProblem, where both are known (lam, 0).")
        cross, cross_lipschitz = constants.cross, constants.cross_lipschitz
    direct = 0.0
    if depends_on_theta:
        if constants.direct_lipschitz is None:
            raise ValueError("the outer objective depends on theta directly, so the certificate needs "
                             "constants.direct_lipschitz: the Lipschitz constant in phi of grad_theta f (0 when f is "
                             "a sum of a term in phi and a term in theta).")
        direct = constants.direct_lipschitz
    return {"cross": cross, "cross_lipschitz": cross_lipschitz, "direct_lipschitz": direct}


def _resolve_mu(problem: InnerProblem, theta: Any, phi: Any, data: Any, constants: _bounds.Constants,
                hvp: str) -> tuple[_bounds.Constants, _bounds.CurvatureEstimate | None, tuple[str, ...]]:
    """Fill in an estimated ``mu`` (Lanczos at ``phi``, times ``mu_safety``) when ``constants.mu`` is None."""
    if constants.mu is not None:
        return constants, None, ()
    est = _bounds.hessian_extremes(problem, theta, phi, data, hvp=hvp)
    mu = est.mu(constants.mu_safety)
    if not mu > 0:
        raise ValueError(f"constants.mu=None, and the inner Hessian at phi has lambda_min ~ {est.lambda_min:.3g} <= 0 "
                         f"(Lanczos, {est.hvps} HVPs): G is not strongly convex there, so no certificate exists. "
                         f"Raise lam, solve the inner problem more accurately, or pass mu if you know it.")
    logger.debug("estimated mu = %.3g (lambda_min %.3g, kappa %.3g, %d HVPs)", mu, est.lambda_min, est.kappa, est.hvps)
    return replace(constants, mu=mu), est, ("mu",)


def _estimated_constants(problem: InnerProblem, outer: Callable, theta: Any,
                         phi: Any) -> tuple[_bounds.Constants, tuple[str, ...]]:
    """Constants for ``target_error`` when none were given: what can be estimated at ``phi``, marked so.

    ``mu`` is left to :func:`_resolve_mu` (Lanczos on the inner Hessian), ``L`` is the largest
    curvature (in absolute value) of the outer objective at ``phi`` by Lanczos, and ``rho`` is
    assumed 0 (exact for a quadratic ``G``; nothing at one point measures it). The certificate is
    then not rigorous and says which constants were estimated.
    """
    if not isinstance(problem, ProximalProblem):
        raise ValueError("target_error without constants can estimate the constants only for a ProximalProblem "
                         "(whose mixed derivative is known); for a general InnerProblem pass "
                         "constants=bl.bounds.Constants(mu=..., L=..., rho=..., cross=..., cross_lipschitz=...).")
    phi_flat, spec = _flat_detached(phi, "phi")
    fixed = _tree.map(lambda t: t.detach(), theta)

    def f(x: torch.Tensor) -> torch.Tensor:
        return check_scalar(outer(_tree.unflatten(x, spec), fixed), "the outer objective")

    est = lanczos(lambda v: _hvp(f, phi_flat, v), phi_flat)
    L = max(abs(est.lambda_min), abs(est.lambda_max))
    logger.debug("target_error without constants: L ~ %.3g (Lanczos, %d HVPs), rho assumed 0", L, est.hvps)
    return _bounds.Constants(mu=None, L=L, rho=0.0), ("L", "rho")


def _check_linear_solver_arg(linear_solver: Any) -> None:
    if not (isinstance(linear_solver, (str, LinearSolver)) or callable(linear_solver)):
        raise TypeError(f"linear_solver must be a name, a LinearSolver or a callable, got {type(linear_solver).__name__}.")


def _with_tol_linear(linear_solver: str | LinearSolver | Callable, tol: float) -> LinearSolver:
    """A copy of the linear solver with relative tolerance ``tol`` (no warnings: the adaptive mode reports)."""
    if isinstance(linear_solver, str):
        try:
            return get_linear_solver(linear_solver, tol=tol, warn=False, max_iter=_ADAPTIVE_LINEAR_MAX_ITER)
        except TypeError:
            return get_linear_solver(linear_solver, tol=tol, warn=False)
    if isinstance(linear_solver, LinearSolver):
        out = copy.copy(linear_solver)
    else:
        out = get_linear_solver(linear_solver)
    out.tol = tol
    out.warn = False
    return out


def _with_tol_solver(solver: str | Solver | Callable | None, tol: float, constants: _bounds.Constants) -> Solver:
    """A copy of the inner solver that stops at ``||grad_phi G|| <= tol``."""
    if solver is None:
        opts: dict[str, Any] = {"tol": tol, "max_iter": _ADAPTIVE_INNER_MAX_ITER}
        if constants.beta is not None and constants.mu is not None:
            opts.update(mu=constants.mu, smoothness=constants.beta)
        return get_solver("agd", **opts)
    if isinstance(solver, str):
        try:
            return get_solver(solver, tol=tol, max_iter=_ADAPTIVE_INNER_MAX_ITER)
        except TypeError:
            return get_solver(solver, tol=tol)
    if isinstance(solver, Solver):
        out = copy.copy(solver)
        out.tol = tol
        return out
    return get_solver(solver, tol=tol)


#: The adaptive mode's limits: rounds of (re-solve, linear solve, certify), and the iteration caps of the
#: solvers it builds from a name (instances keep their own ``max_iter``).
_ADAPTIVE_MAX_ROUNDS = 6
_ADAPTIVE_INNER_MAX_ITER = 10_000
_ADAPTIVE_LINEAR_MAX_ITER = 1_000


def _adaptive(problem: InnerProblem, outer: Callable, theta: Any, phi: Any, data: Any,
              linear_solver: str | LinearSolver | Callable, hvp: str, constants: _bounds.Constants, eps: float,
              solver: str | Solver | Callable | None, assumed: tuple[str, ...] = ()) -> tuple[Any, ImplicitInfo]:
    """``hypergradient(..., target_error=eps)``: re-solve and solve until the certificate is ``<= eps``.

    ``assumed`` names constants that were estimated or assumed rather than given (the certificate is
    then not rigorous).
    """
    from .solvers.base import prepare

    check_finite_tree(phi, "phi", _PHI_HINT)
    theta_flat, theta_spec = _flat_detached(theta, "theta")
    phi_cur = _tree.map(lambda t: t.detach(), phi)
    cot, direct, depends_on_theta = _outer_grads(outer, theta, phi_cur)
    cross = _resolve_cross(problem, constants, depends_on_theta)
    constants, curvature, estimated = _resolve_mu(problem, theta, phi_cur, data, constants, hvp)
    estimated = tuple(dict.fromkeys(estimated + assumed))
    mu, L, rho = constants.mu, constants.L, constants.rho
    fun, x = prepare(problem, theta, data, phi_cur)
    inner_gn = torch.linalg.vector_norm(fun.grad(x)).item()
    share_phi = share_lin = 0.5 * eps
    phi_scale = lin_scale = 1.0
    hvps = curvature.hvps if curvature is not None else 0
    inner_its = cg_its = 0
    history: list[dict] = []
    failure: str | None = None
    met = False
    v_prev: torch.Tensor | None = None
    prev_bound = math.inf
    inner_tol = lin_tol = math.nan
    vjp = info = cert = None
    for rnd in range(1, _ADAPTIVE_MAX_ROUNDS + 1):
        # -- the inner solve: ||grad G|| <= mu * delta, with coefficient * delta <= its share -------------------
        gf = _tree.norm(cot).item()
        delta_now = inner_gn / mu
        b_est = gf + L * delta_now if constants.B is None else min(constants.B, gf + L * delta_now)
        coef = (cross["cross"] * (2.0 * rho * b_est / mu ** 2 + L / mu) + cross["cross_lipschitz"] * b_est / mu
                + cross["direct_lipschitz"])
        delta_req = share_phi * phi_scale / coef if coef > 0 else math.inf
        if rho > 0:
            delta_req = min(delta_req, 0.25 * mu / rho)  # half of Lemma 3's mu / (2 rho)
        inner_tol = mu * delta_req
        solved = 0
        if inner_gn > inner_tol:
            s = _with_tol_solver(solver, inner_tol, constants)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = solve(problem, theta, data, solver=s, phi0=phi_cur)
            solved = res.iterations
            inner_its += res.iterations
            phi_cur = res.phi
            if not res.converged:
                failure = (f"the inner solver {res.solver!r} stopped after {res.iterations} iterations at "
                           f"||grad_phi G|| = {res.grad_norm:.3g}, above the {inner_tol:.3g} the target needs "
                           f"({res.status.name}: {res.message})")
                eps_dtype = torch.finfo(theta_flat.dtype).eps
                if inner_tol < 1e3 * eps_dtype * (1.0 + gf):
                    failure += (f"; a tolerance this close to {theta_flat.dtype}'s precision ({eps_dtype:.1e} times "
                                f"the gradient scale) may be out of reach: loosen target_error or use float64")
            cot, direct, _ = _outer_grads(outer, theta, phi_cur)
            check_finite_tree(phi_cur, "the re-solved phi", "the inner solver diverged; pass a stabler solver=")
        # -- the linear solve: cross * ||r|| / mu <= its share --------------------------------------------------
        cot_flat, _ = _flat_detached(cot, "cotangent")
        gf = torch.linalg.vector_norm(cot_flat).item()
        r_req = share_lin * lin_scale * mu / cross["cross"] if cross["cross"] > 0 else math.inf
        # a relative tolerance >= 1 accepts v = 0 (no iteration); 2, not 1, so that rounding cannot refuse it
        lin_tol = min(2.0, r_req / gf) if gf > 0 else 2.0
        phi_flat, phi_spec = _flat_detached(phi_cur, "phi")
        keep: dict = {}
        vjp, _, info = _core(problem, theta_flat, theta_spec, phi_flat, phi_spec, data, cot_flat,
                             _with_tol_linear(linear_solver, lin_tol), hvp, [], check_residual=True, x0=v_prev,
                             keep=keep)
        v_prev = keep["v"]
        hvps += info.hvps
        cg_its += info.iterations
        inner_gn = info.inner_grad_norm
        cert = _bounds.certificate(constants, inner_grad_norm=inner_gn, residual_norm=info.true_residual_norm,
                                   outer_grad_norm=gf, estimated=estimated,
                                   measured_curvature=_measured_curvature(info), **cross)
        history.append({"round": rnd, "inner_tol": inner_tol, "inner_iterations": solved, "inner_grad_norm": inner_gn,
                        "linear_tol": lin_tol, "cg_iterations": info.iterations,
                        "residual_norm": info.true_residual_norm, "phi_term": cert.phi_term,
                        "delta_prime": cert.delta_prime, "bound": cert.bound})
        logger.debug("adaptive round %d: bound %.3g (phi term %.3g, linear %.3g), target %.3g", rnd, cert.bound,
                     cert.phi_term, cert.delta_prime, eps)
        if cert.valid and cert.bound <= eps:
            met = True
            break
        if cert.contradicted:
            failure = f"the certificate is {cert.message}"
            break
        if failure is not None:
            break
        if info.status in (LinearSolveStatus.NEGATIVE_CURVATURE, LinearSolveStatus.NONFINITE,
                           LinearSolveStatus.DIVERGED):
            failure = f"the linear solve stopped with {info.status.name}: {info.message}"
            break
        if info.status is LinearSolveStatus.MAX_ITER and cert.delta_prime > share_lin:
            failure = (f"the linear solver stopped at max_iter after {info.iterations} iterations with residual "
                       f"{info.true_residual_norm:.3g} (the target needs {r_req:.3g}); raise its max_iter")
            break
        if cert.valid and cert.bound >= 0.9 * prev_bound:
            failure = (f"the certificate stalled at {cert.bound:.3g} (phi term {cert.phi_term:.3g}, linear term "
                       f"{cert.delta_prime:.3g}): the target is below what this dtype's precision allows here "
                       f"(||grad_phi G|| = {inner_gn:.3g}, residual {info.true_residual_norm:.3g})")
            break
        prev_bound = cert.bound if cert.valid else prev_bound
        if not cert.valid or cert.phi_term > share_phi:
            phi_scale *= 0.1 if not cert.valid else 0.5 * share_phi / cert.phi_term
        if cert.delta_prime > share_lin:
            lin_scale *= 0.5 * share_lin / cert.delta_prime
    else:
        failure = f"the certificate did not fall below the target in {_ADAPTIVE_MAX_ROUNDS} rounds"
    if met:
        msg = (f"certified ||g - dF/dtheta|| <= {cert.bound:.3g} <= {eps:.3g} in {len(history)} round(s): "
               f"{inner_its} inner and {cg_its} linear-solver iterations")
    else:
        msg = (f"could not certify target_error={eps:.3g}: the certificate is {cert.bound:.3g}; {failure}.")
        warnings.warn(f"hypergradient: {msg}", ConvergenceWarning, stacklevel=3)
    info.certificate = cert
    info.curvature = curvature
    info.hvps = hvps
    info.adaptive = _bounds.AdaptiveReport(
        target=eps, met=met, bound=cert.bound, rounds=len(history), inner_iterations=inner_its, cg_iterations=cg_its,
        hvps=hvps, inner_tol=inner_tol, linear_tol=lin_tol, phi=phi_cur, message=msg, history=history)
    return _tree.map(torch.add, direct, _tree.unflatten(vjp, theta_spec)), info
