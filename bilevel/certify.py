r"""The hypergradient of an outer objective, with certificates and the adaptive mode on request.

:func:`hypergradient` adds the outer objective's direct term to the adjoint of
:mod:`bilevel.implicit`; given :class:`bilevel.bounds.Constants` it certifies the result
(:func:`bilevel.bounds.certificate`, the paper's Lemma 3 from the two residuals), and given a
``target_error`` it re-solves the inner problem and the linear system until the certificate
meets it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch

from . import bounds as _bounds
from . import tree as _tree
from ._adaptive import _adaptive, _check_linear_solver_arg, _estimated_constants, _resolve_cross, _resolve_mu
from ._checks import ConvergenceWarning, check_finite_tree
from ._functorch import in_transform
from ._linearize import check_hvp
from .implicit import (_PHI_HINT, ImplicitInfo, _core, _flat_detached, _measured_curvature, _outer_grads,
                       _implicit_vjp, solved_point)
from .linalg.base import LinearSolver
from .linalg.hvp import DEFAULT_HVP_MODE
from .linalg.registry import get as get_linear_solver
from .problem import InnerProblem
from .solvers.base import Solver

__all__ = ["hypergradient"]


def hypergradient(problem: InnerProblem, outer: Callable[[Any, Any], torch.Tensor], theta: Any, phi: Any,
                  data: Any = None, *, linear_solver: str | LinearSolver = "cg",
                  hvp: str = DEFAULT_HVP_MODE, constants: _bounds.Constants | None = None,
                  target_error: float | None = None,
                  solver: str | Solver | Callable | None = None) -> tuple[Any, ImplicitInfo]:
    r"""``dF/dtheta`` for ``F(theta) = outer(phi*(theta), theta)``, direct term included.

    Parameters
    ----------
    problem:
        The inner problem.
    outer:
        ``outer(phi, theta) -> scalar`` (a closure over the outer data).
    theta:
        Outer variables (tensor or tree).
    phi:
        An (approximate) minimiser of ``G(., theta)``, or the :class:`bilevel.SolveResult` of
        ``bl.solve`` for this ``theta`` and ``data`` (its last ``grad_norm`` is reused, see
        :func:`bilevel.implicit_vjp`).
    data:
        The inner problem's data.
    linear_solver, hvp:
        As in :func:`implicit_vjp`. With ``target_error``, the solver's
        tolerance is chosen for you (a name is built with ``max_iter=1000``;
        an instance is copied and keeps its ``max_iter``).
    constants:
        A :class:`bilevel.bounds.Constants` (``mu``, ``L``, ``rho``, ...). When
        given, ``info.certificate`` holds an a-posteriori bound on
        ``||g - dF/dtheta||`` (:func:`bilevel.bounds.certificate`); it costs one
        extra Hessian-vector product (the true linear residual), plus the
        Lanczos steps of an estimated ``mu`` (``constants.mu=None``).
    target_error:
        Adaptive mode: a bound ``eps > 0`` on ``||g - dF/dtheta(theta)||`` to
        certify. Without ``constants`` (a :class:`bilevel.ProximalProblem` only), ``mu``
        and ``L`` are estimated at ``phi`` by Lanczos and ``rho`` is assumed 0; the
        certificate then says so (``rigorous=False``, ``estimated``). Half of ``eps`` goes to the inexact
        ``phi`` and half to the linear solve: ``phi`` is re-solved, starting
        from the given ``phi``, until ``||grad_phi G|| <= mu * delta`` with
        ``delta`` small enough for its half, then the linear solver runs to the
        residual that makes ``delta' <= eps / 2``; this repeats (tightening the
        part that fell short) until the certificate is ``<= eps``. If it cannot
        (an inner solver or linear solver that stops early, negative curvature,
        a target below floating-point precision), a
        :class:`bilevel.ConvergenceWarning` says why, and ``info.adaptive``
        (:class:`bilevel.bounds.AdaptiveReport`) has ``met=False`` and the reason.
    solver:
        Adaptive mode only: the inner solver for re-solving ``phi`` (a name,
        instance or callable; its ``tol`` is replaced). Default: ``"agd"``
        (``max_iter=10000``; with ``mu`` and ``smoothness=constants.beta`` when
        ``beta`` is known, else backtracking with adaptive restart).

    Returns
    -------
    grad, info:
        A tree like ``theta`` and an :class:`ImplicitInfo`. In adaptive mode,
        ``grad`` is computed at the re-solved ``phi`` (``info.adaptive.phi``),
        ``info.iterations`` / ``residual_norm`` describe the last linear solve,
        ``info.hvps`` counts all Hessian-vector products of the call, and
        ``info.adaptive`` the inner and linear iterations spent.

    Raises
    ------
    ValueError
        ``target_error`` not ``> 0``, or without ``constants`` for a general
        :class:`bilevel.InnerProblem`; ``solver`` without ``target_error``;
        constants the certificate needs but lacks.

    Notes
    -----
    The certificate follows the paper's Lemma 3 (see
    :func:`bilevel.bounds.certificate`): ``delta = ||grad_phi G(phi)|| / mu``
    bounds ``||phi - phi*||`` and ``delta' = lam ||r|| / mu`` the linear-solve
    error of ``g = lam v`` (iMAML), with ``r`` the residual of
    ``(d2G/dphi2) v = grad_phi f``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> ref = bl.testing.proximal_quadratic(dim=5, seed=0)
    >>> phi = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("newton_cg", tol=1e-11)).phi
    >>> g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data)
    >>> bool(torch.allclose(g, ref.hypergradient(), atol=1e-8))
    True

    A certificate, and the adaptive mode from a rough ``phi`` (``mu = lam`` is
    rigorous here: the training loss is convex; ``L`` bounds the test Hessian):

    >>> L = float(torch.linalg.eigvalsh(torch.func.hessian(lambda p: ref.outer(p, ref.theta))(phi))[-1])
    >>> c = bl.bounds.Constants(mu=5.0, L=L, rho=0.0)
    >>> g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data, constants=c)
    >>> info.certificate.bound < 1e-8
    True
    >>> g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, constants=c,
    ...                            target_error=1e-6)
    >>> info.adaptive.met, info.certificate.bound <= 1e-6
    (True, True)
    >>> float((g - ref.hypergradient()).norm()) <= 1e-6
    True
    """
    phi, known_norm = solved_point(phi)
    problem.validate(theta, data)
    problem.check_phi(phi, theta, "phi")
    if constants is not None and not isinstance(constants, _bounds.Constants):
        raise TypeError(f"constants must be a bilevel.bounds.Constants (or None), got {type(constants).__name__}.")
    if (constants is not None or target_error is not None) and in_transform():
        raise RuntimeError("certificates and target_error read values back, which torch.func.vmap (or another "
                           "torch.func transform) cannot do; compute them per task outside the transform.")
    if target_error is not None:
        if isinstance(target_error, bool) or not isinstance(target_error, numbers.Real) or \
                not (math.isfinite(target_error) and target_error > 0):
            raise ValueError(f"Invalid target_error: {target_error!r}; it must be a finite number > 0 (a bound on "
                             f"||g - dF/dtheta||).")
        assumed: tuple[str, ...] = ()
        if constants is None:
            constants, assumed = _estimated_constants(problem, outer, theta, phi)
        _check_linear_solver_arg(linear_solver)
        check_hvp(problem, hvp)
        return _adaptive(problem, outer, theta, phi, data, linear_solver, hvp, constants, float(target_error),
                         solver, assumed)
    if solver is not None:
        raise ValueError("solver is used only in the adaptive mode (to re-solve phi); pass target_error=... too, "
                         "or drop solver.")
    cot, direct, depends_on_theta = _outer_grads(outer, theta, phi)
    if constants is None:
        vjp, info = _implicit_vjp(problem, theta, phi, data, cot, linear_solver, hvp, known_norm)
        return _tree.map(torch.add, direct, vjp), info
    check_finite_tree(phi, "phi", _PHI_HINT)
    check_finite_tree(cot, "the outer gradient", "the outer loss gradient overflowed; check the outer loss")
    check_hvp(problem, hvp)
    cross = _resolve_cross(problem, constants, depends_on_theta)
    constants, curvature, estimated = _resolve_mu(problem, theta, phi, data, constants, hvp)
    theta_flat, theta_spec = _flat_detached(theta, "theta")
    phi_flat, phi_spec = _flat_detached(phi, "phi")
    cot_flat, _ = _flat_detached(cot, "cotangent")
    vjp, _, info = _core(problem, theta_flat, theta_spec, phi_flat, phi_spec, data, cot_flat,
                         get_linear_solver(linear_solver), hvp, [], check_residual=True, inner_grad_norm=known_norm)
    info.certificate = _bounds.certificate(
        constants, inner_grad_norm=info.inner_grad_norm, residual_norm=info.true_residual_norm,
        outer_grad_norm=torch.linalg.vector_norm(cot_flat).item(), estimated=estimated,
        measured_curvature=_measured_curvature(info), **cross)
    if info.certificate.contradicted:
        warnings.warn(f"hypergradient: the certificate is {info.certificate.message}", ConvergenceWarning,
                      stacklevel=2)
    info.curvature = curvature
    if curvature is not None:
        info.hvps += curvature.hvps
    return _tree.map(torch.add, direct, _tree.unflatten(vjp, theta_spec)), info
