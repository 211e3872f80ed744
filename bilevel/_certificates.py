r"""A-posteriori certificates of a computed hypergradient: :class:`Constants`, :class:`Certificate`,
:func:`certificate`, and the report of the adaptive mode (:class:`AdaptiveReport`).

The public names are documented in :mod:`bilevel.bounds`, which re-exports them; see its
docstring for the assumptions every bound here rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ._checks import check_real

__all__ = ["Constants", "Certificate", "AdaptiveReport", "certificate", "CURVATURE_SLACK"]


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
        set_(self, "mu", check_real(self.mu, "mu", positive=True, allow_none=True))
        set_(self, "L", check_real(self.L, "L"))
        set_(self, "rho", check_real(self.rho, "rho"))
        set_(self, "B", check_real(self.B, "B", allow_none=True))
        set_(self, "lam", check_real(self.lam, "lam", positive=True, allow_none=True))
        set_(self, "cross", check_real(self.cross, "cross", allow_none=True))
        set_(self, "cross_lipschitz", check_real(self.cross_lipschitz, "cross_lipschitz", allow_none=True))
        set_(self, "direct_lipschitz", check_real(self.direct_lipschitz, "direct_lipschitz", allow_none=True))
        set_(self, "beta", check_real(self.beta, "beta", positive=True, allow_none=True))
        s = check_real(self.mu_safety, "mu_safety", positive=True)
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
    measured_curvature:
        The smallest curvature ``p^T H p / p^T p`` the linear solver measured at ``phi``
        (an upper bound on ``lambda_min(H(phi))``), when it reported one; else ``None``.
    contradicted:
        True when that measurement is below ``mu``: the given (or estimated) ``mu`` is
        not a lower bound on the Hessian's eigenvalues at ``phi``, so the certificate is not valid.
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
    measured_curvature: float | None = None
    contradicted: bool = False


#: Relative slack before a measured curvature below ``mu`` counts as a contradiction (rounding in ``p^T H p``).
CURVATURE_SLACK = 1e-4


def certificate(constants: Constants, *, inner_grad_norm: float, residual_norm: float,
                outer_grad_norm: float | None = None, cross: float | None = None,
                cross_lipschitz: float | None = None, direct_lipschitz: float | None = None,
                estimated: tuple[str, ...] = (), measured_curvature: float | None = None) -> Certificate:
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
    measured_curvature:
        The smallest curvature ``p^T H p / p^T p`` that the linear solve met at ``phi`` (CG reports it
        as ``info.extra["min_curvature"]``), which no eigenvalue bound may exceed: when it is below
        ``mu`` the constants are contradicted and the certificate is not valid (``contradicted=True``).

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
    gG = check_real(inner_grad_norm, "inner_grad_norm")
    r = check_real(residual_norm, "residual_norm")
    gf = check_real(outer_grad_norm, "outer_grad_norm", allow_none=True)
    c = cross if cross is not None else (constants.cross if constants.cross is not None else constants.lam)
    if c is None:
        raise ValueError("no bound on ||d2G/dtheta dphi||: pass cross= (general G) or lam= (proximal G).")
    c = check_real(c, "cross")
    cj = check_real(cross_lipschitz if cross_lipschitz is not None else (constants.cross_lipschitz or 0.0),
               "cross_lipschitz")
    ld = check_real(direct_lipschitz if direct_lipschitz is not None else (constants.direct_lipschitz or 0.0),
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
    curvature = None if measured_curvature is None else float(measured_curvature)
    common["measured_curvature"] = curvature
    if curvature is not None and not curvature >= mu * (1.0 - CURVATURE_SLACK):
        where = "negative" if not curvature > 0 else f"{curvature:.3g}"
        msg = (f"not valid: mu = {mu:.3g} is contradicted by the linear solve, which measured curvature {where} "
               f"(p^T H p / p^T p) at phi, so d2G/dphi2 has an eigenvalue below mu there and the bound would not "
               f"hold. Pass a mu no larger than the measured curvature (a rigorous lower bound, e.g. lam for a "
               f"ProximalProblem with a convex loss), or mu=None to estimate it.")
        return Certificate(bound=math.inf, valid=False, message=msg, contradicted=True, **common)
    bad = _precondition_message(delta, mu, rho)
    if bad is not None:
        return Certificate(bound=math.inf, valid=False, message=bad, **common)
    bound = phi_term + delta_prime
    note = "" if rigorous else f" (not rigorous: {', '.join(estimated)} estimated)"
    msg = (f"||g - dF/dtheta|| <= {bound:.3g} = {phi_term:.3g} (inexact phi, delta = {delta:.3g}) + "
           f"{delta_prime:.3g} (linear solve){note}")
    return Certificate(bound=bound, valid=True, message=msg, **common)


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
