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
* :func:`lanczos` / :func:`hessian_extremes`: extreme eigenvalues of the inner
  Hessian ``d2G/dphi2`` from Hessian-vector products (``mu``, ``beta``, ``kappa``).

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
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import tree as _tree
from ._linearize import check_hvp, linearize
from .linalg.hvp import DEFAULT_HVP_MODE

__all__ = [
    "Constants",
    "Certificate",
    "CurvatureEstimate",
    "AdaptiveReport",
    "theorem2_iterations",
    "lemma3_bound",
    "certificate",
    "lanczos",
    "hessian_extremes",
]


# --------------------------------------------------------------------------------------------------
# validation


def _real(value: Any, name: str, *, positive: bool = False, at_least: float | None = None,
          allow_none: bool = False) -> float | None:
    """A finite real number (``> 0`` / ``>= at_least`` / ``>= 0``), or ``None`` where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {value}; it must be finite.")
    if at_least is not None:
        if v < at_least:
            raise ValueError(f"Invalid {name}: {value}; it must be >= {at_least:g}.")
    elif positive and not v > 0:
        raise ValueError(f"Invalid {name}: {value}; it must be > 0.")
    elif v < 0:
        raise ValueError(f"Invalid {name}: {value}; it must be >= 0.")
    return v


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
    kappa = _real(kappa, "kappa", at_least=1.0)
    D = _real(D, "D", positive=True)
    B = _real(B, "B")
    L = _real(L, "L")
    rho = _real(rho, "rho")
    mu = _real(mu, "mu", positive=True)
    lam = _real(lam, "lam", positive=True)
    epsilon = _real(epsilon, "epsilon", positive=True)
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
    delta = _real(delta, "delta")
    delta_prime = _real(delta_prime, "delta_prime")
    B = _real(B, "B")
    L = _real(L, "L")
    rho = _real(rho, "rho")
    mu = _real(mu, "mu", positive=True)
    lam = _real(lam, "lam", positive=True)
    _check_precondition(delta, mu, rho)
    return _lemma3_coefficient(B=B, L=L, rho=rho, mu=mu, lam=lam) * delta + delta_prime


def _precondition_message(delta: float, mu: float, rho: float) -> str | None:
    if rho > 0 and not delta < mu / (2.0 * rho):
        return (f"Lemma 3 needs delta < mu / (2 rho) = {mu / (2.0 * rho):.6g}, got delta = {delta:.6g}; "
                f"solve the inner problem more accurately (a smaller ||grad_phi G||).")
    return None


def _check_precondition(delta: float, mu: float, rho: float) -> None:
    msg = _precondition_message(delta, mu, rho)
    if msg is not None:
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------------
# a-posteriori certificates


@dataclass(frozen=True, kw_only=True)
class Constants:
    r"""Problem constants for :func:`certificate` and :func:`bilevel.hypergradient` (``constants=``).

    Parameters
    ----------
    mu:
        Strong-convexity modulus of ``G(., theta)`` in ``phi`` (``> 0``): a
        lower bound on the eigenvalues of ``d2G/dphi2`` everywhere. ``None``:
        :func:`bilevel.hypergradient` estimates it by :func:`hessian_extremes`
        at ``phi`` and uses ``mu_safety * lambda_min``; the certificate is then
        flagged ``rigorous=False`` (Lanczos over-estimates ``lambda_min``, and
        the Hessian at ``phi`` says nothing about other points).
    L:
        Smoothness of the outer objective in ``phi``: ``grad_phi f`` is
        ``L``-Lipschitz (``>= 0``).
    rho:
        ``d2G/dphi2`` is ``rho``-Lipschitz in ``phi`` (``>= 0``; 0 for a quadratic ``G``).
    B:
        A bound on ``||grad_phi f||`` near ``phi*`` (``>= 0``). ``None``
        (default): the a-posteriori ``||grad_phi f(phi)|| + L delta``, which
        is rigorous given ``L`` and usually much tighter than a global ``B``.
        When given, the smaller of the two is used.
    lam:
        Proximal strength. For a :class:`bilevel.ProximalProblem` leave it
        ``None``: it is read from the problem (its largest value for a
        per-parameter ``lam``). Used as ``cross`` when given.
    cross:
        General ``G`` only: a bound on the operator norm of
        ``d2G/dtheta dphi`` at ``phi`` (``>= 0``).
    cross_lipschitz:
        General ``G`` only: ``d2G/dtheta dphi`` is ``cross_lipschitz``-Lipschitz
        in ``phi`` (``>= 0``; 0 when ``G`` is bilinear in ``(phi, theta)`` plus
        terms in one of them alone).
    direct_lipschitz:
        Only when the outer objective depends on ``theta`` directly:
        ``grad_theta f`` is ``direct_lipschitz``-Lipschitz in ``phi`` (0 when
        ``f`` is a sum of a term in ``phi`` and a term in ``theta``).
    beta:
        Smoothness of ``G`` in ``phi`` (largest Hessian eigenvalue), if known;
        the adaptive mode passes it to its default inner solver.
    mu_safety:
        Factor in ``(0, 1]`` applied to an estimated ``mu``. Default 0.5.

    Notes
    -----
    ``mu`` must hold at every point (Assumption 2), not only at ``phi``. For
    :class:`bilevel.ProximalProblem` with a **convex** training loss,
    ``mu = lam`` (the smallest ``lam``) is a rigorous choice, since
    ``d2G/dphi2 = H_L + lam I`` and ``H_L >= 0``. For a nonconvex loss (a
    neural network) ``H_L`` has negative eigenvalues and ``lambda_min`` can be
    well below ``lam``, or negative: then no ``mu`` exists globally and the
    certificate holds only where the assumptions hold locally.

    Examples
    --------
    >>> import bilevel as bl
    >>> bl.bounds.Constants(mu=5.0, L=2.0, rho=0.0)
    Constants(mu=5.0, L=2.0, rho=0.0, B=None, lam=None, cross=None, cross_lipschitz=None, direct_lipschitz=None, beta=None, mu_safety=0.5)
    >>> bl.bounds.Constants(mu=0.0, L=2.0, rho=0.0)
    Traceback (most recent call last):
    ...
    ValueError: Invalid mu: 0.0; it must be > 0.
    """

    mu: float | None
    L: float
    rho: float
    B: float | None = None
    lam: float | None = None
    cross: float | None = None
    cross_lipschitz: float | None = None
    direct_lipschitz: float | None = None
    beta: float | None = None
    mu_safety: float = 0.5

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "mu", _real(self.mu, "mu", positive=True, allow_none=True))
        set_(self, "L", _real(self.L, "L"))
        set_(self, "rho", _real(self.rho, "rho"))
        set_(self, "B", _real(self.B, "B", allow_none=True))
        set_(self, "lam", _real(self.lam, "lam", positive=True, allow_none=True))
        set_(self, "cross", _real(self.cross, "cross", allow_none=True))
        set_(self, "cross_lipschitz", _real(self.cross_lipschitz, "cross_lipschitz", allow_none=True))
        set_(self, "direct_lipschitz", _real(self.direct_lipschitz, "direct_lipschitz", allow_none=True))
        set_(self, "beta", _real(self.beta, "beta", positive=True, allow_none=True))
        s = _real(self.mu_safety, "mu_safety", positive=True)
        if s > 1:
            raise ValueError(f"Invalid mu_safety: {self.mu_safety}; it must lie in (0, 1].")
        set_(self, "mu_safety", s)
        if self.mu is not None and self.beta is not None and self.mu > self.beta:
            raise ValueError(f"Invalid mu={self.mu} > beta={self.beta}: the strong-convexity modulus cannot exceed "
                             f"the smoothness constant; check both.")


@dataclass(frozen=True)
class Certificate:
    r"""An a-posteriori upper bound on ``||g - dF/dtheta(theta)||`` for a computed hypergradient ``g``.

    Attributes
    ----------
    bound:
        ``phi_term + delta_prime``: the certified bound (``inf`` when not
        :attr:`valid`).
    delta:
        ``inner_grad_norm / mu >= ||phi - phi*||`` (strong convexity).
    delta_prime:
        ``cross * residual_norm / mu``: the error the truncated linear solve
        adds at ``phi``.
    coefficient:
        The factor on ``delta``; for iMAML, Lemma 3's ``2 lam rho B / mu^2 + lam L / mu``.
    phi_term:
        ``coefficient * delta``: the error from an inexact ``phi``.
    inner_grad_norm:
        ``||grad_phi G(phi, theta)||``.
    residual_norm:
        ``||grad_phi f(phi) - (d2G/dphi2) v||`` of the linear solve, recomputed
        with one Hessian-vector product (not CG's recurrence).
    outer_grad_norm:
        ``||grad_phi f(phi)||`` (``nan`` if not supplied).
    B:
        The bound on ``||grad_phi f(phi*)||`` used.
    cross, cross_lipschitz, direct_lipschitz:
        The constants of the mixed and direct terms used (``lam``, 0, 0 for iMAML).
    constants:
        The :class:`Constants` used (with an estimated ``mu`` filled in).
    valid:
        False when Lemma 3's precondition ``delta < mu / (2 rho)`` fails.
    rigorous:
        False when a constant was estimated (see :attr:`estimated`).
    estimated:
        Names of the constants that were estimated rather than given.
    message:
        What the certificate says, or why it is not valid.
    """

    bound: float
    delta: float
    delta_prime: float
    coefficient: float
    phi_term: float
    inner_grad_norm: float
    residual_norm: float
    outer_grad_norm: float
    B: float
    cross: float
    cross_lipschitz: float
    direct_lipschitz: float
    constants: Constants = field(repr=False)
    valid: bool = True
    rigorous: bool = True
    estimated: tuple[str, ...] = ()
    message: str = ""


def certificate(constants: Constants, *, inner_grad_norm: float, residual_norm: float,
                outer_grad_norm: float | None = None, cross: float | None = None,
                cross_lipschitz: float | None = None, direct_lipschitz: float | None = None,
                estimated: tuple[str, ...] = ()) -> Certificate:
    r"""Certify a computed hypergradient from its two residuals.

    Parameters
    ----------
    constants:
        The problem constants; ``constants.mu`` must be set.
    inner_grad_norm:
        ``||grad_phi G(phi, theta)||`` at the ``phi`` used.
    residual_norm:
        ``||grad_phi f(phi) - (d2G/dphi2)(phi) v||`` for the ``v`` the linear
        solver returned.
    outer_grad_norm:
        ``||grad_phi f(phi)||``; needed when ``constants.B`` is ``None``.
    cross, cross_lipschitz, direct_lipschitz:
        Default to the fields of ``constants`` (``cross`` to ``constants.lam``
        when unset; ``cross_lipschitz`` and ``direct_lipschitz`` to 0).
    estimated:
        Names of constants that were estimated; the certificate is then not rigorous.

    Returns
    -------
    Certificate

    Raises
    ------
    ValueError
        ``mu`` missing, neither ``B`` nor ``outer_grad_norm`` given, or no ``cross``.

    Notes
    -----
    The engine returns ``g = grad_theta f(phi) - J(phi)^T v`` with
    ``J = d2G/dtheta dphi`` and ``v`` an approximate solution of
    ``H(phi) v = grad_phi f(phi)``, ``H = d2G/dphi2``; the exact meta-gradient
    is the same expression at ``phi*`` with the exact solve. Write
    ``r = grad_phi f(phi) - H(phi) v`` and ``delta = ||grad_phi G(phi)|| / mu``
    (``>= ||phi - phi*||`` by strong convexity). Then

    .. math::

        \|g - g^*\| \le \underbrace{\tfrac{c \|r\|}{\mu}}_{\delta'}
        + \Big[c\big(\tfrac{2 \rho B}{\mu^2} + \tfrac{L}{\mu}\big)
        + \tfrac{c_J B}{\mu} + L_\theta\Big] \delta,

    with ``c = cross >= ||J(phi)||``, ``c_J = cross_lipschitz``,
    ``L_theta = direct_lipschitz`` and ``B >= ||grad_phi f(phi*)||``; by
    default ``B = ||grad_phi f(phi)|| + L delta``. The terms come from
    ``J^T (v - v_phi)``, ``J^T (v_phi - v*)`` (Lemma 3's two terms),
    ``(J(phi) - J(phi*))^T v*`` and the direct term.

    For iMAML's proximal ``G``, ``J = -lam I`` and ``g = lam v``, so ``c = lam``,
    ``c_J = 0`` and this is exactly :func:`lemma3_bound` with
    ``delta' = lam ||r|| / mu`` (since ``||g - lam H^{-1} grad f|| = lam ||H^{-1} r||``
    and ``lambda_min(H(phi)) >= mu``).

    The bound is rigorous when the constants are (and up to the rounding in
    the two residual norms, which matters only near machine precision).

    Examples
    --------
    >>> import bilevel as bl
    >>> c = bl.bounds.Constants(mu=2.0, L=1.0, rho=0.0, lam=2.0)
    >>> cert = bl.bounds.certificate(c, inner_grad_norm=1e-6, residual_norm=1e-5, outer_grad_norm=3.0)
    >>> cert.delta, cert.delta_prime, round(cert.bound, 12)  # lam L/mu * 5e-7 + lam/mu * 1e-5
    (5e-07, 1e-05, 1.05e-05)
    """
    if not isinstance(constants, Constants):
        raise TypeError(f"constants must be a bilevel.bounds.Constants, got {type(constants).__name__}.")
    mu = constants.mu
    if mu is None:
        raise ValueError("constants.mu is None; pass mu (a lower bound on the eigenvalues of d2G/dphi2), or let "
                         "bilevel.hypergradient estimate it.")
    gG = _real(inner_grad_norm, "inner_grad_norm")
    r = _real(residual_norm, "residual_norm")
    gf = _real(outer_grad_norm, "outer_grad_norm", allow_none=True)
    c = cross if cross is not None else (constants.cross if constants.cross is not None else constants.lam)
    if c is None:
        raise ValueError("no bound on ||d2G/dtheta dphi||: pass cross= (general G) or lam= (proximal G).")
    c = _real(c, "cross")
    cj = _real(cross_lipschitz if cross_lipschitz is not None else (constants.cross_lipschitz or 0.0),
               "cross_lipschitz")
    ld = _real(direct_lipschitz if direct_lipschitz is not None else (constants.direct_lipschitz or 0.0),
               "direct_lipschitz")
    L, rho = constants.L, constants.rho
    delta = gG / mu
    candidates = []
    if constants.B is not None:
        candidates.append(constants.B)
    if gf is not None:
        candidates.append(gf + L * delta)
    if not candidates:
        raise ValueError("need a bound on ||grad_phi f(phi*)||: pass outer_grad_norm= (the a-posteriori bound "
                         "||grad_phi f(phi)|| + L delta is then used) or constants.B.")
    B = min(candidates)
    coef = c * (2.0 * rho * B / mu ** 2 + L / mu) + cj * B / mu + ld
    phi_term = coef * delta
    delta_prime = c * r / mu
    rigorous = not estimated
    common = dict(delta=delta, delta_prime=delta_prime, coefficient=coef, phi_term=phi_term, inner_grad_norm=gG,
                  residual_norm=r, outer_grad_norm=float("nan") if gf is None else gf, B=B, cross=c,
                  cross_lipschitz=cj, direct_lipschitz=ld, constants=constants, rigorous=rigorous,
                  estimated=tuple(estimated))
    bad = _precondition_message(delta, mu, rho)
    if bad is not None:
        return Certificate(bound=math.inf, valid=False, message=bad, **common)
    bound = phi_term + delta_prime
    note = "" if rigorous else f" (not rigorous: {', '.join(estimated)} estimated)"
    msg = (f"||g - dF/dtheta|| <= {bound:.3g} = {phi_term:.3g} (inexact phi, delta = {delta:.3g}) + "
           f"{delta_prime:.3g} (linear solve){note}")
    return Certificate(bound=bound, valid=True, message=msg, **common)


# --------------------------------------------------------------------------------------------------
# curvature: Lanczos on Hessian-vector products


@dataclass(frozen=True)
class CurvatureEstimate:
    """Extreme eigenvalues of a symmetric operator, estimated by :func:`lanczos`.

    Attributes
    ----------
    lambda_min, lambda_max:
        The extreme Ritz values. ``lambda_min`` is an **upper** estimate of the
        true smallest eigenvalue and ``lambda_max`` a **lower** estimate of the
        largest (Cauchy interlacing): both err on the optimistic side.
    kappa:
        ``lambda_max / lambda_min`` (``inf`` if ``lambda_min <= 0``).
    hvps:
        Matrix-vector (Hessian-vector) products spent.
    iterations:
        Lanczos steps taken (the Krylov dimension).
    residual_min, residual_max:
        Ritz residuals ``||A y - theta y||`` of the two extreme Ritz pairs: an
        eigenvalue of ``A`` lies within that distance of each Ritz value
        (0: an invariant subspace was found and the values are eigenvalues).
    """

    lambda_min: float
    lambda_max: float
    kappa: float
    hvps: int
    iterations: int
    residual_min: float
    residual_max: float

    def mu(self, safety: float = 0.5) -> float:
        """``safety * lambda_min``: a heuristic strong-convexity modulus (not a guaranteed lower bound).

        Examples
        --------
        >>> CurvatureEstimate(2.0, 8.0, 4.0, 5, 5, 0.0, 0.0).mu()
        1.0
        """
        s = _real(safety, "safety", positive=True)
        return s * self.lambda_min


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, *, max_iter: int = 20,
            generator: torch.Generator | None = None) -> CurvatureEstimate:
    r"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Parameters
    ----------
    matvec:
        ``v -> A v`` on 1-D tensors, ``A`` symmetric.
    like:
        A 1-D tensor with the length, dtype and device of the vectors.
    max_iter:
        Maximum Krylov dimension (matvecs), capped at ``len(like)``. Default 20.
    generator:
        For the random start vector; default a private generator seeded with 0
        (the global RNG is never touched).

    Returns
    -------
    CurvatureEstimate

    Notes
    -----
    ``k`` steps build an orthonormal basis ``Q`` of the Krylov space and the
    tridiagonal ``T = Q^T A Q``; the extreme eigenvalues of ``T`` (Ritz values)
    converge to those of ``A`` quickly, at a rate governed by the gaps. Every
    new vector is orthogonalised against all previous ones (twice), which
    costs ``O(k n)`` memory and keeps spurious copies of converged Ritz values
    away. The iteration stops early when the Krylov space becomes invariant.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
    >>> est = lanczos(lambda v: A @ v, torch.zeros(4, dtype=torch.float64))
    >>> round(est.lambda_min, 8), round(est.lambda_max, 8), est.hvps
    (1.0, 10.0, 4)
    """
    if not isinstance(like, torch.Tensor) or like.dim() != 1 or like.numel() == 0:
        raise ValueError(f"like must be a non-empty 1-D tensor, got {getattr(like, 'shape', type(like).__name__)}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter!r}; it must be an int >= 1.")
    n = like.numel()
    k_max = min(int(max_iter), n)
    if generator is None:
        generator = torch.Generator(device=like.device).manual_seed(0)
    q = torch.randn(n, dtype=like.dtype, device=like.device, generator=generator)
    q = q / torch.linalg.vector_norm(q)
    Q = torch.empty(k_max, n, dtype=like.dtype, device=like.device)
    alphas: list[float] = []
    betas: list[float] = []
    hvps = 0
    beta_last = 0.0
    for j in range(k_max):
        Q[j] = q
        w = matvec(q).detach()
        hvps += 1
        if not bool(torch.isfinite(w).all()):
            raise ValueError("the matvec returned non-finite values; check the operator (e.g. the inner problem at phi).")
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        basis = Q[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - basis.T @ (basis @ w)
        beta = float(torch.linalg.vector_norm(w))
        beta_last = beta
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if j + 1 == k_max or beta <= 1e-12 * max(scale, 1e-300):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    res = (beta_last * evecs[-1].abs()).tolist()
    lmin, lmax = float(evals[0]), float(evals[-1])
    kappa = lmax / lmin if lmin > 0 else math.inf
    return CurvatureEstimate(lmin, lmax, kappa, hvps, k, float(res[0]), float(res[-1]))


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
    (:meth:`CurvatureEstimate.mu`, ``safety=0.5``). For a
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


# --------------------------------------------------------------------------------------------------
# adaptive mode report


@dataclass
class AdaptiveReport:
    """What :func:`bilevel.hypergradient` did to meet ``target_error`` (``info.adaptive``).

    Attributes
    ----------
    target:
        The requested bound on ``||g - dF/dtheta||``.
    met:
        Whether the final certificate is valid and ``<= target``.
    bound:
        The final certificate's bound.
    rounds:
        Rounds of (re-solve ``phi``, linear solve, certify).
    inner_iterations:
        Inner-solver iterations spent re-solving ``phi`` (all rounds; 0 when
        the given ``phi`` was accurate enough).
    cg_iterations:
        Linear-solver iterations (all rounds).
    hvps:
        Hessian-vector products (all rounds, curvature estimate included).
    inner_tol:
        The last stationarity tolerance asked of the inner solver.
    linear_tol:
        The last relative tolerance asked of the linear solver.
    phi:
        The ``phi`` the hypergradient was computed at (re-solved or as given).
    message:
        What happened; when not :attr:`met`, why and what to change.
    history:
        One dict per round (tolerances, iterations, residuals, bound).
    """

    target: float
    met: bool
    bound: float
    rounds: int
    inner_iterations: int
    cg_iterations: int
    hvps: int
    inner_tol: float
    linear_tol: float
    phi: Any = field(repr=False)
    message: str = ""
    history: list[dict] = field(default_factory=list, repr=False)
