"""bl.bounds: Theorem 2 counts, Lemma 3, a-posteriori certificates, Lanczos, and the adaptive mode."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bilevel as bl


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: thread start-up would dominate the runtime."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- Theorem 2 -------------------------------------------------------------------------------------------------


def test_theorem2_iterations_match_hand_computation():
    # B1 = lam L / mu = 1; inner: 2*sqrt(4)*ln(8*4*1*(1/0.01 + 0)) = 4 ln 3200 = 32.28;
    # CG: 4 ln(4*4*1*1/0.01) = 4 ln 1600 = 29.51
    assert bl.bounds.theorem2_iterations(kappa=4.0, D=1.0, B=1.0, L=1.0, rho=0.0, mu=1.0, lam=1.0,
                                         epsilon=0.01) == (33, 30)
    # B1 = 2*1.5*0.2*3/0.25 + 1.5*0.5/0.5 = 7.2 + 1.5 = 8.7
    # inner: 6 ln(8*9*2*(8.7/1e-3 + 0.2/0.5)) = 6 ln(1252857.6) = 84.25; CG: 6 ln(4*9*3*3/1e-3) = 6 ln(324000) = 76.13
    assert bl.bounds.theorem2_iterations(kappa=9.0, D=2.0, B=3.0, L=0.5, rho=0.2, mu=0.5, lam=1.5,
                                         epsilon=1e-3) == (85, 77)


def test_theorem2_iterations_grow_with_accuracy_and_vanish_for_trivial_targets():
    kw = dict(kappa=50.0, D=10.0, B=2.0, L=1.0, rho=0.1, mu=5.0, lam=5.0)
    counts = [bl.bounds.theorem2_iterations(epsilon=e, **kw) for e in (1e-2, 1e-4, 1e-8)]
    assert counts[0][0] < counts[1][0] < counts[2][0] and counts[0][1] < counts[1][1] < counts[2][1]
    # each factor of 100 in epsilon adds 2 sqrt(kappa) ln(100) iterations (to rounding)
    assert abs((counts[1][1] - counts[0][1]) - 2 * math.sqrt(50) * math.log(100)) <= 1
    assert bl.bounds.theorem2_iterations(kappa=1.0, D=1.0, B=0.0, L=0.0, rho=0.0, mu=1.0, lam=1.0,
                                         epsilon=1.0) == (0, 0)


@pytest.mark.parametrize("bad, match", [
    (dict(kappa=0.5), "Invalid kappa: 0.5; it must be >= 1"),
    (dict(mu=0.0), "Invalid mu: 0.0; it must be > 0"),
    (dict(mu=-1.0), "Invalid mu"),
    (dict(lam=0.0), "Invalid lam"),
    (dict(epsilon=0.0), "Invalid epsilon"),
    (dict(epsilon=float("inf")), "Invalid epsilon: inf; it must be finite"),
    (dict(D=0.0), "Invalid D"),
    (dict(B=-1.0), "Invalid B: -1.0; it must be >= 0"),
    (dict(L=-1.0), "Invalid L"),
    (dict(rho=-0.1), "Invalid rho"),
])
def test_theorem2_iterations_validates_each_argument(bad, match):
    kw = dict(kappa=4.0, D=1.0, B=1.0, L=1.0, rho=0.0, mu=1.0, lam=1.0, epsilon=0.01)
    with pytest.raises(ValueError, match=match):
        bl.bounds.theorem2_iterations(**{**kw, **bad})


def test_theorem2_iterations_is_keyword_only_and_typed():
    with pytest.raises(TypeError):
        bl.bounds.theorem2_iterations(4.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.01)
    with pytest.raises(TypeError, match="kappa must be a real number"):
        bl.bounds.theorem2_iterations(kappa="4", D=1.0, B=1.0, L=1.0, rho=0.0, mu=1.0, lam=1.0, epsilon=0.01)


# --- Lemma 3 ---------------------------------------------------------------------------------------------------


def test_lemma3_bound_matches_hand_computation():
    # (2*2*0.5*2/1 + 2*1/1) * 1e-3 + 1e-4 = 6e-3 + 1e-4
    assert bl.bounds.lemma3_bound(delta=1e-3, delta_prime=1e-4, B=2.0, L=1.0, rho=0.5, mu=1.0,
                                  lam=2.0) == pytest.approx(6.1e-3, rel=1e-14)
    # rho = 0: (lam L / mu) delta + delta' for any delta
    assert bl.bounds.lemma3_bound(delta=10.0, delta_prime=0.5, B=7.0, L=3.0, rho=0.0, mu=2.0,
                                  lam=4.0) == pytest.approx(6.0 * 10.0 + 0.5)


def test_lemma3_bound_refuses_when_its_precondition_fails():
    kw = dict(delta_prime=0.0, B=1.0, L=1.0, rho=0.5, mu=1.0, lam=1.0)
    bl.bounds.lemma3_bound(delta=0.99, **kw)  # mu / (2 rho) = 1
    with pytest.raises(ValueError, match=r"Lemma 3 needs delta < mu / \(2 rho\) = 1, got delta = 1;"):
        bl.bounds.lemma3_bound(delta=1.0, **kw)
    with pytest.raises(ValueError, match="Invalid delta_prime"):
        bl.bounds.lemma3_bound(delta=0.1, **{**kw, "delta_prime": -1.0})
    with pytest.raises(ValueError, match="Invalid mu"):
        bl.bounds.lemma3_bound(delta=0.1, **{**kw, "mu": 0.0})


# --- Constants and the certificate formula ---------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(mu=0.0), "Invalid mu"),
    (dict(L=-1.0), "Invalid L"),
    (dict(rho=float("nan")), "Invalid rho"),
    (dict(B=-1.0), "Invalid B"),
    (dict(lam=0.0), "Invalid lam"),
    (dict(mu_safety=1.5), r"Invalid mu_safety: 1.5; it must lie in \(0, 1\]"),
    (dict(mu=5.0, beta=1.0), "Invalid mu=5.0 > beta=1.0"),
])
def test_constants_validate_on_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        bl.bounds.Constants(**{**dict(mu=1.0, L=1.0, rho=0.0), **bad})


def test_constants_are_keyword_only():
    with pytest.raises(TypeError):
        bl.bounds.Constants(1.0, 1.0, 0.0)


def test_certificate_is_lemma3_for_the_proximal_case():
    c = bl.bounds.Constants(mu=2.0, L=1.5, rho=0.1, lam=3.0)
    cert = bl.bounds.certificate(c, inner_grad_norm=1e-3, residual_norm=2e-4, outer_grad_norm=4.0)
    delta = 1e-3 / 2.0
    B = 4.0 + 1.5 * delta
    assert cert.valid and cert.rigorous and cert.B == pytest.approx(B)
    assert cert.delta == pytest.approx(delta) and cert.delta_prime == pytest.approx(3.0 * 2e-4 / 2.0)
    assert cert.bound == pytest.approx(bl.bounds.lemma3_bound(delta=delta, delta_prime=3.0 * 2e-4 / 2.0, B=B, L=1.5,
                                                              rho=0.1, mu=2.0, lam=3.0), rel=1e-14)
    # a global B smaller than the a-posteriori one is used
    tight = bl.bounds.certificate(bl.bounds.Constants(mu=2.0, L=1.5, rho=0.1, lam=3.0, B=1.0), inner_grad_norm=1e-3,
                                  residual_norm=2e-4, outer_grad_norm=4.0)
    assert tight.B == 1.0 and tight.bound < cert.bound


def test_certificate_reports_a_violated_precondition_instead_of_a_number():
    c = bl.bounds.Constants(mu=1.0, L=1.0, rho=1.0, lam=1.0)
    cert = bl.bounds.certificate(c, inner_grad_norm=0.6, residual_norm=0.0, outer_grad_norm=1.0)  # delta 0.6 >= 0.5
    assert not cert.valid and cert.bound == math.inf
    assert "Lemma 3 needs delta < mu / (2 rho)" in cert.message


def test_certificate_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="constants.mu is None"):
        bl.bounds.certificate(bl.bounds.Constants(mu=None, L=1.0, rho=0.0, lam=1.0), inner_grad_norm=0.0,
                              residual_norm=0.0, outer_grad_norm=1.0)
    with pytest.raises(ValueError, match="outer_grad_norm"):
        bl.bounds.certificate(bl.bounds.Constants(mu=1.0, L=1.0, rho=0.0, lam=1.0), inner_grad_norm=0.0,
                              residual_norm=0.0)
    with pytest.raises(ValueError, match="cross="):
        bl.bounds.certificate(bl.bounds.Constants(mu=1.0, L=1.0, rho=0.0), inner_grad_norm=0.0, residual_norm=0.0,
                              outer_grad_norm=1.0)
    with pytest.raises(TypeError, match="Constants"):
        bl.bounds.certificate({"mu": 1.0}, inner_grad_norm=0.0, residual_norm=0.0)


# --- certificates on random strongly convex quadratic problems -------------------------------------------------


def _spd(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    e = lo + (hi - lo) * torch.rand(n, generator=g)
    e[0], e[-1] = lo, hi
    return (q * e) @ q.T


def certificate_case(seed: int, dim: int, log_kappa: float, log_lam: float, log_pert: float, cg_iters: int,
                     kind: str) -> tuple[float, float]:
    """A random strongly convex quadratic bilevel problem, a perturbed phi and a truncated CG: (bound, true error).

    ``kind="proximal"``: iMAML's G with a PSD ``A`` (``kappa(A + lam I)`` = 10**log_kappa).
    ``kind="general"``: ``G = 1/2 phi^T H phi - phi^T (B theta + c)`` with a direct theta term in the outer loss.
    ``phi = phi* + 10**log_pert * (1 + ||phi*||) * u`` for a random unit ``u``; the outer loss is a random
    convex quadratic. ``mu``, ``L`` (and ``||B||``) are exact, as a user who knows the problem would give them.
    """
    g = torch.Generator().manual_seed(seed)
    kappa, lam = 10.0 ** log_kappa, 10.0 ** log_lam
    C = _spd(dim, 0.0, 1.0, g) * float(5.0 * torch.rand(1, generator=g))
    d = torch.randn(dim, generator=g)
    if kind == "proximal":
        A = _spd(dim, 0.0, (kappa - 1.0) * lam, g)
        b = torch.randn(dim, generator=g)
        theta = torch.randn(dim, generator=g)
        problem = bl.ProximalProblem(lambda p, dd: 0.5 * p @ (dd["A"] @ p) + dd["b"] @ p, lam)
        data = {"A": A, "b": b}
        H = A + lam * torch.eye(dim)
        phi_star = torch.linalg.solve(H, lam * theta - b)
        exact = lam * torch.linalg.solve(H, C @ phi_star + d)

        def outer(p, th):
            return 0.5 * p @ (C @ p) + d @ p

        extra = {}
    else:
        n_theta = max(1, dim // 2)
        H = _spd(dim, lam, kappa * lam, g)
        Bm = torch.randn(dim, n_theta, generator=g)
        c = torch.randn(dim, generator=g)
        theta = torch.randn(n_theta, generator=g)
        problem = bl.InnerProblem(lambda p, th, dd: 0.5 * p @ (dd["H"] @ p) - p @ (dd["B"] @ th + dd["c"]))
        data = {"H": H, "B": Bm, "c": c}
        phi_star = torch.linalg.solve(H, Bm @ theta + c)
        exact = Bm.T @ torch.linalg.solve(H, C @ phi_star + d) + 0.3 * theta

        def outer(p, th):
            return 0.5 * p @ (C @ p) + d @ p + 0.15 * (th @ th)

        extra = dict(cross=float(torch.linalg.matrix_norm(Bm, 2)), cross_lipschitz=0.0, direct_lipschitz=0.0)
    mu = float(torch.linalg.eigvalsh(H)[0])
    L = float(torch.linalg.eigvalsh(C)[-1])
    u = torch.randn(dim, generator=g)
    phi = phi_star + (10.0 ** log_pert) * (1.0 + phi_star.norm()) * u / u.norm()
    constants = bl.bounds.Constants(mu=mu, L=L, rho=0.0, **extra)
    grad, info = bl.hypergradient(problem, outer, theta, phi, data, constants=constants,
                                  linear_solver=bl.linalg.get("cg", max_iter=cg_iters, tol=1e-12, warn=False))
    return info.certificate.bound, float((grad - exact).norm())


case_args = st.integers(2, 25).flatmap(lambda dim: st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "dim": st.just(dim),
    "log_kappa": st.floats(0.0, 2.0),
    "log_lam": st.floats(-1.0, 1.0),
    "log_pert": st.floats(-8.0, -1.0),
    "cg_iters": st.integers(1, dim),
    "kind": st.sampled_from(["proximal", "general"]),
}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_args)
def test_certificate_is_never_below_the_true_error(args):
    bound, err = certificate_case(**args)
    assert bound >= err, f"certificate {bound:.3e} below the true error {err:.3e} for {args}"


def test_certificate_ratio_distribution_is_not_vacuous(capsys):
    """Over 400 random problems (seeded): ratio bound / true error >= 1 always, median within 100."""
    rng = np.random.default_rng(2024)
    ratios = {"proximal": [], "general": []}
    for i in range(400):
        dim = int(rng.integers(2, 26))
        kind = ("proximal", "general")[i % 2]
        bound, err = certificate_case(seed=int(rng.integers(0, 2 ** 31 - 1)), dim=dim,
                                      log_kappa=float(rng.uniform(0, 2)), log_lam=float(rng.uniform(-1, 1)),
                                      log_pert=float(rng.uniform(-8, -1)), cg_iters=int(rng.integers(1, dim + 1)),
                                      kind=kind)
        ratios[kind].append(bound / err)
    every = np.array(ratios["proximal"] + ratios["general"])
    with capsys.disabled():
        for name, r in (("proximal", np.array(ratios["proximal"])), ("general", np.array(ratios["general"])),
                        ("all", every)):
            q = np.percentile(r, [10, 50, 90])
            print(f"\ncertificate / true error, {name} ({len(r)} problems): min {r.min():.3g}, p10 {q[0]:.3g}, "
                  f"median {q[1]:.3g}, p90 {q[2]:.3g}, max {r.max():.3g}", end="")
        print()
    assert every.min() >= 1.0
    assert np.median(every) <= 100.0


def _logcosh_problem(seed: int, dim: int = 6, n: int = 8, lam: float = 1.0):
    """A non-quadratic proximal problem with a known rho: L(phi) = sum_i s log cosh(w_i^T phi) (convex)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, dim, generator=g) / math.sqrt(dim)
    s = 2.0
    C = _spd(dim, 0.1, 2.0, g)
    d = torch.randn(dim, generator=g)
    theta = torch.randn(dim, generator=g)

    def loss(p, data):
        return s * torch.log(torch.cosh(data @ p)).sum()

    def outer(p, th):
        return 0.5 * p @ (C @ p) + d @ p

    problem = bl.ProximalProblem(loss, lam)
    # |d^3/du^3 log cosh u| = 2 sech^2 u |tanh u| <= 4 / (3 sqrt 3): rho <= s * that * sum ||w_i||^3
    rho = s * 4.0 / (3.0 * math.sqrt(3.0)) * float((W.norm(dim=1) ** 3).sum())
    phi = bl.solve(problem, theta, W, solver=bl.solvers.get("newton_cg", tol=1e-14, max_iter=100)).raise_if_failed().phi
    hess = torch.func.hessian(lambda p: problem(p, theta, W))(phi)
    exact = lam * torch.linalg.solve(hess, C @ phi + d)
    return problem, outer, theta, W, phi, exact, rho, float(torch.linalg.eigvalsh(C)[-1])


@pytest.mark.parametrize("seed", range(4))
def test_certificate_holds_with_a_lipschitz_hessian(seed):
    problem, outer, theta, data, phi_star, exact, rho, L = _logcosh_problem(seed)
    constants = bl.bounds.Constants(mu=1.0, L=L, rho=rho)  # mu = lam: the loss is convex
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(phi_star.shape, generator=g)
    for pert in (1e-9, 1e-7, 1e-5):
        phi = phi_star + pert * u / u.norm()
        grad, info = bl.hypergradient(problem, outer, theta, phi, data, constants=constants,
                                      linear_solver=bl.linalg.get("cg", max_iter=3, warn=False))
        cert = info.certificate
        assert cert.valid and cert.bound >= float((grad - exact).norm())
        assert cert.coefficient > L  # the rho term is in
    far = phi_star + 10.0 * u / u.norm()  # delta far above mu / (2 rho)
    _, info = bl.hypergradient(problem, outer, theta, far, data, constants=constants)
    assert not info.certificate.valid and info.certificate.bound == math.inf


def test_certificate_with_a_per_parameter_lam_uses_its_largest_value():
    ref = bl.testing.proximal_quadratic(dim=12, lam=2.0, condition_number=10.0, learn_lam="per_parameter", seed=1)
    lam = ref.problem.lam.detach()
    H = ref.data["A"] + torch.diag(lam)
    mu = float(torch.linalg.eigvalsh(H)[0])
    phi = ref.solution() + 1e-4
    L = float(torch.linalg.eigvalsh(torch.func.hessian(lambda p: ref.outer(p, ref.theta))(phi))[-1])
    grad, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data,
                                  constants=bl.bounds.Constants(mu=mu, L=L, rho=0.0),
                                  linear_solver=bl.linalg.get("cg", max_iter=4, warn=False))
    assert info.certificate.cross == pytest.approx(float(lam.max()))
    assert info.certificate.bound >= float((grad - ref.hypergradient()).norm())


def test_certificate_needs_the_constants_of_a_general_problem():
    ref = bl.testing.general_quadratic(seed=0)
    phi = ref.solution()
    with pytest.raises(ValueError, match="needs constants.cross and constants.cross_lipschitz"):
        bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data,
                         constants=bl.bounds.Constants(mu=1.0, L=1.0, rho=0.0))
    # its outer loss has a direct theta term
    with pytest.raises(ValueError, match="direct_lipschitz"):
        bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data,
                         constants=bl.bounds.Constants(mu=1.0, L=1.0, rho=0.0, cross=3.0, cross_lipschitz=0.0))


def test_constants_lam_below_the_problems_is_refused():
    ref = bl.testing.proximal_quadratic(dim=5, lam=5.0)
    with pytest.raises(ValueError, match="constants.lam=1 is below the problem's lam"):
        bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data,
                         constants=bl.bounds.Constants(mu=5.0, L=1.0, rho=0.0, lam=1.0))


def test_no_constants_no_certificate():
    ref = bl.testing.proximal_quadratic(dim=5)
    _, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data)
    assert info.certificate is None and info.adaptive is None and info.true_residual_norm is None


# --- curvature: Lanczos ----------------------------------------------------------------------------------------


def _rotated(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g))
    return (q * eigs) @ q.T


def test_lanczos_is_exact_on_a_full_krylov_space():
    eigs = torch.linspace(0.5, 40.0, 30)
    A = _rotated(eigs)
    est = bl.bounds.lanczos(lambda v: A @ v, torch.zeros(30), max_iter=30)
    assert est.lambda_min == pytest.approx(0.5, rel=1e-8) and est.lambda_max == pytest.approx(40.0, rel=1e-8)
    assert est.kappa == pytest.approx(80.0, rel=1e-8)
    assert est.hvps == 30 and est.iterations == 30


def test_lanczos_finds_isolated_extremes_in_few_steps_and_errs_inward():
    eigs = torch.cat([torch.tensor([1.0]), torch.linspace(3.0, 10.0, 198), torch.tensor([40.0])])
    A = _rotated(eigs, seed=1)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    est = bl.bounds.lanczos(matvec, torch.zeros(200), max_iter=20)
    assert est.hvps == 20 == len(calls)
    assert est.lambda_max == pytest.approx(40.0, rel=1e-6) and est.lambda_min == pytest.approx(1.0, rel=1e-4)
    # Ritz values lie inside the spectrum: lambda_min from above, lambda_max from below
    assert est.lambda_min >= 1.0 - 1e-10 and est.lambda_max <= 40.0 + 1e-10
    assert est.residual_max < 1e-3


def test_lanczos_stops_on_an_invariant_subspace():
    est = bl.bounds.lanczos(lambda v: 2.0 * v, torch.zeros(50), max_iter=20)
    assert est.hvps == 1 and est.lambda_min == pytest.approx(2.0) and est.lambda_max == pytest.approx(2.0)


def test_lanczos_validates_its_arguments():
    with pytest.raises(ValueError, match="like must be a non-empty 1-D tensor"):
        bl.bounds.lanczos(lambda v: v, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="Invalid max_iter"):
        bl.bounds.lanczos(lambda v: v, torch.zeros(2), max_iter=0)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hessian_extremes_of_the_f1_problem(mode):
    ref = bl.testing.proximal_quadratic(dim=50, lam=5.0, condition_number=50.0)
    est = bl.bounds.hessian_extremes(ref.problem, ref.theta, ref.theta, ref.data, max_iter=50, hvp=mode)
    assert est.hvps == 50
    assert est.lambda_min == pytest.approx(5.0, rel=1e-8) and est.lambda_max == pytest.approx(250.0, rel=1e-8)
    assert est.kappa == pytest.approx(50.0, rel=1e-8)
    short = bl.bounds.hessian_extremes(ref.problem, ref.theta, ref.theta, ref.data, max_iter=20, hvp=mode)
    assert short.hvps == 20 and short.lambda_max == pytest.approx(250.0, rel=1e-3)
    assert short.lambda_min >= 5.0 - 1e-9 and short.lambda_min == pytest.approx(5.0, rel=0.1)
    assert short.mu(0.5) == pytest.approx(0.5 * short.lambda_min)


def test_hessian_extremes_reports_negative_curvature():
    problem = bl.InnerProblem(lambda p, th, d: 0.5 * (p * d * p).sum() - (p * th).sum())
    est = bl.bounds.hessian_extremes(problem, torch.ones(4), torch.zeros(4), torch.tensor([-1.0, 1.0, 2.0, 3.0]),
                                     max_iter=4)
    assert est.lambda_min == pytest.approx(-1.0) and est.kappa == math.inf


# --- the adaptive mode (target_error) on the paper's F.1 problem -----------------------------------------------


@pytest.fixture(scope="module")
def f1():
    ref = bl.testing.proximal_quadratic(dim=50, lam=5.0, condition_number=50.0, seed=0)
    hess_f = torch.func.hessian(lambda p: ref.outer(p, ref.theta))(ref.theta)
    L = float(torch.linalg.eigvalsh(hess_f)[-1])
    return ref, bl.bounds.Constants(mu=5.0, L=L, rho=0.0)  # mu = lam: the training loss is convex


TARGETS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def test_adaptive_mode_meets_every_target_and_looser_targets_cost_less(f1, capsys):
    ref, constants = f1
    exact = ref.hypergradient()
    spent = []
    lines = []
    for eps in TARGETS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", bl.ConvergenceWarning)
            g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, constants=constants,
                                       target_error=eps)
        err = float((g - exact).norm())
        a = info.adaptive
        assert a.met and info.certificate.valid and info.certificate.rigorous
        assert err <= info.certificate.bound <= eps, (eps, err, info.certificate.bound)
        assert a.inner_iterations > 0 and a.cg_iterations > 0 and info.hvps >= a.cg_iterations
        spent.append((a.inner_iterations, a.cg_iterations))
        lines.append(f"target {eps:.0e}: true error {err:.2e}, certificate {info.certificate.bound:.2e}, "
                     f"{a.rounds} round(s), {a.inner_iterations} AGD + {a.cg_iterations} CG iterations")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    inner, cg = zip(*spent)
    assert list(inner) == sorted(inner) and list(cg) == sorted(cg)  # tighter target, never cheaper
    assert inner[0] < inner[-1] and cg[0] < cg[-1]


def test_adaptive_mode_skips_work_that_is_not_needed(f1):
    ref, constants = f1
    phi = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("newton_cg", tol=1e-12)).phi
    g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data, constants=constants,
                               target_error=1e-4)
    assert info.adaptive.met and info.adaptive.inner_iterations == 0
    assert float((g - ref.hypergradient()).norm()) <= 1e-4
    # a target looser than the whole gradient needs no linear solve either
    big = 10.0 * float(ref.hypergradient().norm()) + 100.0
    g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data, constants=constants,
                               target_error=big)
    assert info.adaptive.met and info.adaptive.cg_iterations == 0


def test_adaptive_mode_with_an_estimated_mu_is_flagged_not_rigorous(f1):
    ref, constants = f1
    est = bl.bounds.Constants(mu=None, L=constants.L, rho=0.0)
    g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, constants=est,
                               target_error=1e-6)
    assert info.adaptive.met and not info.certificate.rigorous and info.certificate.estimated == ("mu",)
    assert info.curvature is not None and info.curvature.hvps == 20
    assert info.certificate.constants.mu == pytest.approx(0.5 * info.curvature.lambda_min)
    assert float((g - ref.hypergradient()).norm()) <= 1e-6


def test_adaptive_mode_works_on_trees_and_with_a_named_solver():
    ref = bl.testing.proximal_quadratic(dim=20, lam=5.0, condition_number=20.0, structure="dict", seed=2)
    L = float(torch.linalg.eigvalsh(torch.func.hessian(
        lambda p: ref.outer(bl.tree.unflatten(p, bl.tree.tree_spec(ref.theta)), ref.theta))(
        bl.tree.flatten(ref.theta)[0]))[-1])
    g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data,
                               constants=bl.bounds.Constants(mu=5.0, L=L, rho=0.0), target_error=1e-7, solver="gd")
    assert set(g) == set(ref.theta) and set(info.adaptive.phi) == set(ref.theta)
    err = float(bl.tree.norm(bl.tree.map(torch.sub, g, ref.hypergradient())))
    assert info.adaptive.met and err <= 1e-7


def test_adaptive_mode_says_why_it_failed(f1):
    ref, constants = f1
    with pytest.warns(bl.ConvergenceWarning, match="could not certify target_error=1e-06.*raise its max_iter"):
        _, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, constants=constants,
                                   target_error=1e-6, linear_solver=bl.linalg.get("cg", max_iter=5))
    assert not info.adaptive.met and "linear solver stopped at max_iter" in info.adaptive.message
    with pytest.warns(bl.ConvergenceWarning, match="inner solver 'gd' stopped after 10 iterations"):
        _, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, constants=constants,
                                   target_error=1e-6, solver=bl.solvers.get("gd", max_iter=10))
    assert not info.adaptive.met and info.adaptive.inner_iterations == 10 and info.certificate.bound > 1e-6
    with pytest.warns(bl.ConvergenceWarning, match="precision"):
        _, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, constants=constants,
                                   target_error=1e-18, solver=bl.solvers.get("newton_cg", max_iter=50))
    assert not info.adaptive.met


def test_adaptive_mode_argument_errors(f1):
    ref, constants = f1
    args = (ref.problem, ref.outer, ref.theta, ref.theta, ref.data)
    general = bl.InnerProblem(lambda phi, theta, d: 0.5 * ((phi - theta) ** 2).sum())
    with pytest.raises(ValueError, match="target_error without constants can estimate the constants only for a "
                                         "ProximalProblem"):
        bl.hypergradient(general, lambda p, t: p.sum(), ref.theta, ref.theta, None, target_error=1e-3)
    with pytest.raises(ValueError, match="Invalid target_error: 0"):
        bl.hypergradient(*args, constants=constants, target_error=0)
    with pytest.raises(ValueError, match="Invalid target_error: nan"):
        bl.hypergradient(*args, constants=constants, target_error=float("nan"))
    with pytest.raises(ValueError, match="solver is used only in the adaptive mode"):
        bl.hypergradient(*args, solver="gd")
    with pytest.raises(TypeError, match="constants must be a bilevel.bounds.Constants"):
        bl.hypergradient(*args, constants={"mu": 1.0})


def test_certificates_refuse_vmap_while_plain_hypergradients_run_under_it():
    refs = [bl.testing.proximal_quadratic(dim=6, lam=2.0, condition_number=10.0, seed=s) for s in range(3)]
    A = torch.stack([r.data["A"] for r in refs])
    b = torch.stack([r.data["b"] for r in refs])
    theta = refs[0].theta
    problem = refs[0].problem
    solver = bl.solvers.get("gd", step_size=0.05, max_iter=400, tol=0.0)  # a fixed budget, like under vmap
    cg = bl.linalg.get("cg", max_iter=6, tol=0.0)

    def outer(p, t):
        return 0.5 * (p ** 2).sum() + (t * p).sum()

    def one(A_, b_, constants=None):
        phi = bl.solve(problem, theta, {"A": A_, "b": b_}, solver=solver).phi
        return bl.hypergradient(problem, outer, theta, phi, {"A": A_, "b": b_}, linear_solver=cg, hvp="forward",
                                constants=constants)[0]

    batched = torch.func.vmap(one)(A, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.ConvergenceWarning)
        looped = torch.stack([one(A[i], b[i]) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="certificates and target_error read values back"):
        torch.func.vmap(lambda A_, b_: one(A_, b_, bl.bounds.Constants(mu=2.0, L=1.0, rho=0.0)))(A, b)
