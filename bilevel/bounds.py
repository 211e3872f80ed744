r"""How accurate is an implicit hypergradient? A-priori counts, a-posteriori certificates, curvature.

The paper (Rajeswaran et al., 2019, Theorem 1; appendix E) bounds the error of
the implicit meta-gradient in terms of how accurately the inner problem and
the linear system were solved. This module turns those statements into numbers:

* :func:`theorem2_iterations`: Theorem 2's a-priori iteration counts (AGD for
  ``phi``, CG for the linear system) that guarantee an error ``<= epsilon``.
* :func:`lemma3_bound`: Lemma 3, ``(2 lam rho B / mu^2 + lam L / mu) delta + delta'``.
* :func:`certificate`: an a-posteriori bound for a hypergradient already
  computed, from the inner stationarity residual ``||grad_phi G(phi)||`` and
  the linear-solve residual; :func:`bilevel.hypergradient` returns one in
  ``info.certificate`` when given ``constants=``, and with ``target_error=``
  it chooses the accuracies so that the certificate falls below the target.
* :func:`hessian_extremes`: extreme eigenvalues of the inner Hessian ``d2G/dphi2``
  (``mu``, ``beta``, ``kappa``) by :func:`bilevel.linalg.lanczos` on Hessian-vector products
  (``bounds.lanczos`` and ``bounds.CurvatureEstimate`` remain as aliases for older code).

Assumptions (the paper's Assumption 2, written for a general ``G``)
--------------------------------------------------------------------
``F(theta) = f(phi*(theta), theta)`` with ``phi*(theta) = argmin_phi G(phi, theta)``, and

1. ``G(., theta)`` is ``mu``-strongly convex in ``phi`` (everywhere, not only
   at ``phi*``) and ``beta``-smooth; ``kappa = beta / mu``.
2. ``d2G/dphi2`` is ``rho``-Lipschitz in ``phi`` (for iMAML's proximal ``G``,
   that of the training loss; ``rho = 0`` for a quadratic).
3. The outer objective ``f`` is ``B``-Lipschitz (``||grad_phi f|| <= B``) and
   ``L``-smooth (``grad_phi f`` is ``L``-Lipschitz) in ``phi``.
4. For a general ``G`` (not :class:`bilevel.ProximalProblem`): the mixed
   derivative ``J = d2G/dtheta dphi`` has operator norm ``<= cross`` and is
   ``cross_lipschitz``-Lipschitz in ``phi``. For the proximal ``G``,
   ``J = -lam I``: ``cross = lam`` (the largest ``lam`` for a per-parameter
   ``lam``) and ``cross_lipschitz = 0``.
5. If ``f`` depends on ``theta`` directly, ``grad_theta f`` is
   ``direct_lipschitz``-Lipschitz in ``phi``.

Nothing here checks these assumptions: the numbers are only as good as the
constants you supply (see :class:`Constants`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import tree as _tree
from ._checks import check_real
from ._linearize import check_hvp, linearize
from ._certificates import (CURVATURE_SLACK, AdaptiveReport, Certificate, Constants,  # noqa: F401
                           _check_precondition, certificate)
from .linalg.eig import CurvatureEstimate, lanczos  # noqa: F401  (aliases kept for older code)
from .linalg.hvp import DEFAULT_HVP_MODE

__all__ = [
    "Constants",
    "Certificate",
    "AdaptiveReport",
    "theorem2_iterations",
    "lemma3_bound",
    "certificate",
    "hessian_extremes",
]


# --------------------------------------------------------------------------------------------------
# a-priori: Theorem 2 and Lemma 3


def theorem2_iterations(*, kappa: float, D: float, B: float, L: float, rho: float, mu: float, lam: float,
                        epsilon: float) -> tuple[int, int]:
    r"""Theorem 2's iteration counts for an ``epsilon``-accurate implicit meta-gradient.

    Parameters
    ----------
    kappa:
        Condition number ``beta / mu`` of the inner objective ``G`` (``>= 1``).
    D:
        Radius of a ball holding the inner minimiser, ``||phi*|| <= D`` (``> 0``).
    B, L:
        The test loss is ``B``-Lipschitz and ``L``-smooth (``>= 0``).
    rho:
        The training loss has a ``rho``-Lipschitz Hessian (``>= 0``).
    mu:
        Strong-convexity modulus of ``G`` (``> 0``).
    lam:
        Proximal regularisation strength (``> 0``).
    epsilon:
        Target error of the meta-gradient (``> 0``).

    Returns
    -------
    (inner_iterations, cg_iterations):
        Iterations of Nesterov's accelerated gradient descent for ``phi`` and
        of conjugate gradient (or AGD) for the linear system, each rounded up
        (and 0 where the logarithm is not positive).

    Raises
    ------
    ValueError
        An argument out of range; the message names it.
    TypeError
        An argument is not a real number.

    Notes
    -----
    Under the paper's Assumption 2 (see the module docstring), with
    ``B1 = 2 lam rho B / mu^2 + lam L / mu``, Theorem 2 states that

    .. math::

        K_{\text{inner}} = 2\sqrt{\kappa} \log\Big(8 \kappa D \big(\tfrac{B_1}{\epsilon} + \tfrac{\rho}{\mu}\big)\Big),
        \qquad
        K_{\text{CG}} = 2\sqrt{\kappa} \log\Big(4 \kappa \tfrac{(\lambda/\mu) B}{\epsilon}\Big)

    iterations give ``||g - dF/dtheta|| <= epsilon`` (natural logarithms). It
    splits ``epsilon`` evenly: ``delta = min(epsilon / (2 B1), mu / (2 rho))``
    and ``delta' = epsilon / 2`` in :func:`lemma3_bound`. The counts are
    worst-case and usually pessimistic; :func:`bilevel.hypergradient` with
    ``target_error=`` stops on an a-posteriori certificate instead.

    Examples
    --------
    >>> theorem2_iterations(kappa=4.0, D=1.0, B=1.0, L=1.0, rho=0.0, mu=1.0, lam=1.0, epsilon=0.01)
    (33, 30)
    >>> theorem2_iterations(kappa=0.5, D=1.0, B=1.0, L=1.0, rho=0.0, mu=1.0, lam=1.0, epsilon=0.01)
    Traceback (most recent call last):
    ...
    ValueError: Invalid kappa: 0.5; it must be >= 1.
    """
    kappa = check_real(kappa, "kappa", at_least=1.0)
    D = check_real(D, "D", positive=True)
    B = check_real(B, "B")
    L = check_real(L, "L")
    rho = check_real(rho, "rho")
    mu = check_real(mu, "mu", positive=True)
    lam = check_real(lam, "lam", positive=True)
    epsilon = check_real(epsilon, "epsilon", positive=True)
    b1 = 2.0 * lam * rho * B / mu ** 2 + lam * L / mu
    scale = 2.0 * math.sqrt(kappa)

    def count(arg: float) -> int:
        if not arg > 1.0:
            return 0
        return int(math.ceil(scale * math.log(arg)))

    inner = count(8.0 * kappa * D * (b1 / epsilon + rho / mu))
    cg = count(4.0 * kappa * (lam / mu) * B / epsilon)
    return inner, cg


def _lemma3_coefficient(*, B: float, L: float, rho: float, mu: float, lam: float) -> float:
    """``2 lam rho B / mu^2 + lam L / mu``: Lemma 3's factor on ``delta`` (``B1`` in Theorem 2)."""
    return 2.0 * lam * rho * B / mu ** 2 + lam * L / mu


def lemma3_bound(*, delta: float, delta_prime: float, B: float, L: float, rho: float, mu: float,
                 lam: float) -> float:
    r"""Lemma 3: the error of an implicit meta-gradient from a ``delta``-accurate ``phi``.

    Parameters
    ----------
    delta:
        ``||phi - phi*(theta)|| <= delta`` (``>= 0``).
    delta_prime:
        The meta-gradient ``g`` solves the linear system at ``phi`` to within
        ``delta'``: ``||g - (I + H(phi)/lam)^{-1} grad L_test(phi)|| <= delta'`` (``>= 0``).
    B, L:
        The test loss is ``B``-Lipschitz and ``L``-smooth (``>= 0``).
    rho:
        The training loss has a ``rho``-Lipschitz Hessian (``>= 0``).
    mu:
        Strong-convexity modulus of ``G`` (``> 0``).
    lam:
        Proximal strength (``> 0``).

    Returns
    -------
    float
        ``(2 lam rho B / mu^2 + lam L / mu) delta + delta'``, an upper bound on
        ``||g - dF/dtheta||``.

    Raises
    ------
    ValueError
        When Lemma 3's precondition ``delta < mu / (2 rho)`` fails (the lemma
        says nothing then: solve the inner problem more accurately), or an
        argument is out of range.

    Notes
    -----
    Under Assumption 2 (module docstring). We raise rather than return
    ``inf`` on a violated precondition so that a bound is never silently
    vacuous; :func:`certificate` catches the case and reports it in
    ``Certificate.valid`` / ``message`` instead.

    The paper's proof bounds ``||(M + Delta)^{-1} - M^{-1}||`` by
    ``2 rho delta / mu^2`` using ``||M^{-1} Delta|| <= 1/2``, which is where
    the precondition and the factor 2 come from. Since Assumption 2 makes
    ``G`` ``mu``-strongly convex everywhere, ``M + Delta`` (the Hessian at
    ``phi*``) is itself ``>= mu``, and ``rho delta / mu^2`` holds without the
    precondition. We keep the paper's statement (it is the looser of the two).

    Examples
    --------
    >>> lemma3_bound(delta=1e-3, delta_prime=1e-4, B=2.0, L=1.0, rho=0.5, mu=1.0, lam=2.0)
    0.0061
    >>> lemma3_bound(delta=2.0, delta_prime=0.0, B=1.0, L=1.0, rho=0.5, mu=1.0, lam=1.0)
    Traceback (most recent call last):
    ...
    ValueError: Lemma 3 needs delta < mu / (2 rho) = 1, got delta = 2; solve the inner problem more accurately (a smaller ||grad_phi G||).
    """
    delta = check_real(delta, "delta")
    delta_prime = check_real(delta_prime, "delta_prime")
    B = check_real(B, "B")
    L = check_real(L, "L")
    rho = check_real(rho, "rho")
    mu = check_real(mu, "mu", positive=True)
    lam = check_real(lam, "lam", positive=True)
    _check_precondition(delta, mu, rho)
    return _lemma3_coefficient(B=B, L=L, rho=rho, mu=mu, lam=lam) * delta + delta_prime


# --------------------------------------------------------------------------------------------------
# curvature of the inner problem: Lanczos (bilevel.linalg.lanczos) on Hessian-vector products


def hessian_extremes(problem: Any, theta: Any, phi: Any, data: Any = None, *, max_iter: int = 20,
                     hvp: str = DEFAULT_HVP_MODE, generator: torch.Generator | None = None) -> CurvatureEstimate:
    r"""Extreme eigenvalues of the inner Hessian ``d2G/dphi2`` at ``phi``, from Hessian-vector products.

    Parameters
    ----------
    problem:
        A :class:`bilevel.InnerProblem` (or :class:`bilevel.ProximalProblem`).
    theta, phi:
        The point (trees, as elsewhere).
    data:
        The inner problem's data.
    max_iter:
        Lanczos steps (Hessian-vector products). Default 20.
    hvp:
        ``"reverse"`` (default) or ``"forward"`` Hessian-vector products, or
        ``"gauss_newton"`` (then the estimates are of the Gauss-Newton matrix).
    generator:
        For Lanczos' random start (default: seeded, private).

    Returns
    -------
    CurvatureEstimate
        ``lambda_min`` (a candidate for ``mu``), ``lambda_max`` (the
        smoothness ``beta`` of ``G``), ``kappa = beta / mu`` and the HVPs spent.

    Notes
    -----
    These are estimates at one point, not bounds: ``lambda_min`` over-estimates
    the smallest eigenvalue at ``phi`` (Lanczos approaches it from above), and
    ``mu`` of Assumption 2 must hold at every ``phi``. Using ``lambda_min`` as
    ``mu`` in a certificate is therefore not rigorous; scale it down
    (:meth:`bilevel.linalg.CurvatureEstimate.mu`, ``safety=0.5``). For a
    :class:`bilevel.ProximalProblem` with a convex loss, ``mu = lam`` is a
    rigorous lower bound; with a nonconvex loss (a neural network) it is not,
    and ``lambda_min`` may be far below ``lam`` or negative, which this
    function reports.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> ref = bl.testing.proximal_quadratic(dim=10, lam=5.0, condition_number=50.0)
    >>> est = bl.bounds.hessian_extremes(ref.problem, ref.theta, ref.theta, ref.data, max_iter=10)
    >>> round(est.lambda_min, 6), round(est.lambda_max, 6), round(est.kappa, 6), est.hvps
    (5.0, 250.0, 50.0, 10)
    """
    check_hvp(problem, hvp)
    problem.validate(theta, data)
    problem.check_phi(phi, theta, "phi")
    theta_flat, theta_spec = _tree.flatten(theta, "theta")
    phi_flat, phi_spec = _tree.flatten(phi, "phi")

    lin = linearize(problem, phi_flat.detach(), phi_spec, theta_flat.detach(), theta_spec, data, [], hvp)
    try:
        est = lanczos(lin.hvp, phi_flat.detach(), max_iter=max_iter, generator=generator)
    finally:
        lin.release()
    return est
