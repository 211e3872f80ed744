"""Algorithm-specific behaviour of the accelerated ("agd") and Hessian-free Newton ("newton_cg") inner solvers.

The registry-wide contracts (hypergradients on the reference problems, result fields) live in
test_solvers.py; here: acceleration, line searches on non-quadratic G, negative curvature,
non-convergence and option validation.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import WrongGradient, REFERENCE_PROBLEMS

import bilevel as bl
from bilevel.solvers.base import prepare

# --------------------------------------------------------------------------------------------
# AGD against GD on an ill-conditioned quadratic


KAPPA = 1000.0
DIM = 50


def _quadratic():
    A = bl.testing.random_spd(DIM, KAPPA, seed=0)
    b = torch.randn(DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    problem = bl.InnerProblem(lambda phi, theta, d: 0.5 * phi @ (A @ phi) - b @ phi, name="quadratic_kappa_1000")
    eigs = torch.linalg.eigvalsh(A)
    return problem, A, b, float(eigs[0]), float(eigs[-1])


@pytest.fixture(scope="module")
def gd_on_quadratic():
    problem, A, b, mu, L = _quadratic()
    result = bl.solve(problem, torch.zeros(DIM, dtype=torch.float64), phi0=torch.zeros(DIM, dtype=torch.float64),
                      solver=bl.solvers.get("gd", step_size=1.0 / L, tol=1e-8, max_iter=40000))
    assert result.converged, result.message
    return result


AGD_CASES = {
    "fixed step 1/L": lambda mu, L: {"step_size": 1.0 / L},
    "step_size=None (backtracking)": lambda mu, L: {"step_size": None},
    "mu and L known (constant momentum)": lambda mu, L: {"mu": mu, "smoothness": L},
}


@pytest.mark.parametrize("case", list(AGD_CASES))
def test_agd_needs_at_most_a_fifth_of_gd_iterations_at_kappa_1000(case, gd_on_quadratic):
    problem, A, b, mu, L = _quadratic()
    assert L / mu == pytest.approx(KAPPA)
    options = AGD_CASES[case](mu, L)
    result = bl.solve(problem, torch.zeros(DIM), phi0=torch.zeros(DIM),
                      solver=bl.solvers.get("agd", tol=1e-8, max_iter=5000, **options))
    gd = gd_on_quadratic
    print(f"\n[kappa={KAPPA:g}, ||grad G|| < 1e-8] GD (step 1/L): {gd.iterations} iterations, "
          f"{gd.stats['ngev']} gradients | AGD ({case}): {result.iterations} iterations, "
          f"{result.stats['ngev']} gradients, {sum(result.history['restart'])} restarts | iteration ratio "
          f"{result.iterations / gd.iterations:.3f}")
    assert result.converged and result.grad_norm < 1e-8
    assert 5 * result.iterations <= gd.iterations
    assert torch.allclose(result.phi, torch.linalg.solve(A, b), atol=1e-7)


def test_agd_history_and_cost_per_iteration():
    problem, A, b, mu, L = _quadratic()
    fixed = bl.solve(problem, torch.zeros(DIM), phi0=torch.zeros(DIM),
                     solver=bl.solvers.get("agd", step_size=1.0 / L, tol=1e-8, max_iter=5000))
    h = fixed.history
    assert len(h["grad_norm"]) == fixed.iterations + 1
    assert len(h["step_size"]) == len(h["momentum"]) == len(h["restart"]) == fixed.iterations
    assert set(h["step_size"]) == {1.0 / L}
    # one gradient at y and one at phi_{k+1} per iteration, none at y when beta = 0 (start, restarts)
    n_zero_beta = sum(beta == 0.0 for beta in h["momentum"])
    assert fixed.stats["ngev"] == 1 + 2 * fixed.iterations - n_zero_beta
    assert any(h["restart"]), "expected the adaptive restart to fire on a kappa=1000 quadratic"

    constant = bl.solve(problem, torch.zeros(DIM), phi0=torch.zeros(DIM),
                        solver=bl.solvers.get("agd", mu=mu, smoothness=L, tol=1e-8, max_iter=5000))
    q = math.sqrt(L / mu)
    assert constant.history["momentum"] == pytest.approx([(q - 1) / (q + 1)] * constant.iterations)
    assert not any(constant.history["restart"])


def test_agd_backtracking_on_logistic_regression_from_a_far_start():
    problem, theta, data = _logistic_problem()
    result = bl.solve(problem, theta, data, phi0=10 * theta, solver=bl.solvers.get("agd", tol=1e-8, max_iter=5000))
    assert result.converged
    steps = result.history["step_size"]
    assert len(steps) == result.iterations and all(s > 0 for s in steps)


def test_agd_divergent_fixed_step_returns_last_finite_iterate():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with pytest.warns(bl.ConvergenceWarning, match="non-finite"):
        result = bl.solve(ref.problem, ref.theta, ref.data,
                          solver=bl.solvers.get("agd", step_size=10.0, max_iter=100000))
    assert result.status is bl.SolverStatus.NONFINITE and not result.converged
    assert torch.isfinite(result.phi).all()


# --------------------------------------------------------------------------------------------
# Newton-CG on a non-quadratic G


def _logistic_problem(n: int = 200, features: int = 20, lam: float = 0.1, seed: int = 8):
    """iMAML's G with a logistic loss: mean softplus(-y x^T phi) + lam/2 ||phi - theta||^2.

    Labels are drawn from a logistic model on standard normal features; the loss sees the features
    scaled by 2, which makes G far from quadratic at phi0 = 10 theta (Newton's unit step overshoots there).
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=g, dtype=torch.float64)
    w = torch.randn(features, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w), 1.0, -1.0)
    theta = torch.randn(features, generator=g, dtype=torch.float64)

    def logistic(phi, d):
        return torch.nn.functional.softplus(-d["y"] * (d["X"] @ phi)).mean()

    return bl.ProximalProblem(logistic, lam=lam), theta, {"X": 2.0 * X, "y": y}


def test_newton_cg_converges_in_few_iterations_with_a_line_search_from_a_far_start():
    problem, theta, data = _logistic_problem()
    results = {}
    for cg_max_iter in (50, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ConvergenceWarning: negative curvature etc. must not occur
            results[cg_max_iter] = bl.solve(problem, theta, data, phi0=10 * theta,
                                            solver=bl.solvers.get("newton_cg", cg_max_iter=cg_max_iter, tol=1e-8))
    exact, paper = results[50], results[5]
    print(f"\n[logistic, 200 x 20, lam=0.1, phi0=10 theta, ||grad G|| < 1e-8] newton_cg cg_max_iter=50: "
          f"{exact.iterations} iterations, {exact.stats['nhvp']} HVPs, steps {exact.history['step_size']} | "
          f"cg_max_iter=5: {paper.iterations} iterations, {paper.stats['nhvp']} HVPs")
    assert exact.converged and exact.grad_norm < 1e-8
    assert exact.iterations <= 10
    assert min(exact.history["step_size"]) < 1.0, "the line search never shortened the Newton step"
    assert exact.history["step_size"][-1] == 1.0  # the unit step is accepted near the solution
    values = exact.history["value"]
    assert all(b <= a for a, b in zip(values, values[1:])), "the Armijo line search must decrease G"
    assert paper.converged and paper.grad_norm < 1e-8
    assert torch.allclose(paper.phi, exact.phi, atol=1e-8)
    for r, cap in ((exact, 50), (paper, 5)):
        cg = r.history["cg_iterations"]
        assert len(cg) == len(r.history["step_size"]) == r.iterations
        assert all(1 <= c <= cap for c in cg)
        assert r.stats["nhvp"] == sum(cg)
        assert not any(r.history["negative_curvature"])


def test_newton_cg_records_cg_iterations_in_aux():
    problem, theta, data = _logistic_problem()
    solver = bl.solvers.get("newton_cg", cg_max_iter=3)
    fun, x0 = prepare(problem, theta, data, 10 * theta)
    state = solver.init(fun, x0)
    assert state.aux["cg_iterations"] == 0
    state = solver.step(fun, state, 0)
    assert 1 <= state.aux["cg_iterations"] <= 3 and fun.nhvp == state.aux["cg_iterations"]


def _double_well(lam: float = 0.05, n: int = 10):
    """G = sum(phi^4/4 - phi^2/2) + lam/2 ||phi - theta||^2, Hessian diag(3 phi^2 - 1 + lam): indefinite near 0."""
    theta = 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    problem = bl.ProximalProblem(lambda phi, d: (phi ** 4 / 4 - phi ** 2 / 2).sum(), lam=lam, name="double_well")
    return problem, theta


@pytest.mark.parametrize("start", ["near the local maximum", "saddle: half the coordinates at a well"])
@pytest.mark.parametrize("cg_max_iter", [5, 50])
def test_newton_cg_escapes_negative_curvature(start, cg_max_iter):
    problem, theta = _double_well()
    n = theta.numel()
    phi0 = torch.zeros(n) if start.startswith("near") else torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)])
    g0 = float(problem(phi0, theta, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bl.solve(problem, theta, phi0=phi0, solver=bl.solvers.get("newton_cg", cg_max_iter=cg_max_iter,
                                                                            tol=1e-10))
    assert torch.isfinite(result.phi).all() and all(math.isfinite(v) for v in result.history["value"])
    assert result.value < g0 - 1.0, "G must decrease well below its value at the saddle"
    values = result.history["value"]
    assert all(b <= a for a, b in zip(values, values[1:]))
    neg = result.history["negative_curvature"]
    if start.startswith("near"):  # curvature is negative along -grad G itself: the step is steepest descent
        assert neg[0] and result.history["cg_iterations"][0] == 1
    else:  # curvature turns at a later CG iteration: the last CG iterate is used
        assert any(nc and c > 1 for nc, c in zip(neg, result.history["cg_iterations"]))
    # it ends at a local minimum: stationary, with every coordinate in a well (Hessian positive definite)
    assert result.converged
    assert bool((result.phi.abs() > 0.9).all())


def test_newton_cg_damping_handles_indefinite_hessian():
    problem, theta = _double_well()
    result = bl.solve(problem, theta, phi0=torch.zeros(theta.numel()),
                      solver=bl.solvers.get("newton_cg", damping=2.0, tol=1e-10, max_iter=100))
    assert result.converged and not any(result.history["negative_curvature"])


# --------------------------------------------------------------------------------------------
# Failures reported, not hidden


@pytest.mark.parametrize("name", ["agd", "newton_cg"])
def test_max_iter_failure_is_reported(name):
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with pytest.warns(bl.ConvergenceWarning, match="increase max_iter"):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get(name, max_iter=2, tol=1e-12))
    assert not result.converged and result.status is bl.SolverStatus.MAX_ITER
    assert result.iterations == 2 and len(result.history["step_size"]) == 2
    with pytest.raises(bl.ConvergenceError, match="stopped after 2 iterations"):
        result.raise_if_failed()


def test_newton_cg_line_search_failure_is_reported():
    problem = bl.InnerProblem(lambda phi, th, d: WrongGradient.apply(phi - th))
    with pytest.warns(bl.ConvergenceWarning, match="line search"):
        result = bl.solve(problem, torch.zeros(3), phi0=torch.ones(3), solver=bl.solvers.get("newton_cg"))
    assert result.status is bl.SolverStatus.LINE_SEARCH_FAILED
    assert torch.equal(result.phi, torch.ones(3))
    assert result.history["step_size"] == [0.0] and result.history["negative_curvature"] == [True]


def test_agd_line_search_failure_is_reported():
    # the first trial step (1.0) is far above 1/L = 1/100 and one trial is all it may take
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with pytest.warns(bl.ConvergenceWarning, match="line search"):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("agd", max_backtracks=1))
    assert result.status is bl.SolverStatus.LINE_SEARCH_FAILED
    assert torch.equal(result.phi, ref.theta)
    assert result.history["step_size"] == [0.0]


INVALID = [
    ("agd", {"step_size": 0.0}, ValueError, r"Invalid step_size: 0.0; it must be > 0"),
    ("agd", {"step_size": "big"}, TypeError, r"step_size must be a real number"),
    ("agd", {"mu": 0}, ValueError, r"Invalid mu: 0; it must be > 0"),
    ("agd", {"smoothness": float("inf")}, ValueError, r"Invalid smoothness: inf; it must be finite"),
    ("agd", {"mu": 10.0, "smoothness": 1.0}, ValueError, r"mu=10.0 > smoothness=1.0"),
    ("agd", {"mu": 2.0, "step_size": 1.0}, ValueError, r"mu \* step_size = 2 > 1"),
    ("agd", {"restart": "yes"}, TypeError, r"restart must be a bool"),
    ("agd", {"growth": 0.5}, ValueError, r"Invalid growth: 0.5"),
    ("agd", {"shrink": 1.0}, ValueError, r"Invalid shrink: 1.0"),
    ("agd", {"max_backtracks": 0}, ValueError, r"Invalid max_backtracks: 0"),
    ("agd", {"max_iter": -1}, ValueError, r"Invalid max_iter: -1"),
    ("agd", {"momentum": 0.9}, TypeError, r"unknown option\(s\) 'momentum'.*valid options: step_size, mu"),
    ("newton_cg", {"cg_max_iter": 0}, ValueError, r"Invalid cg_max_iter: 0; it must be >= 1"),
    ("newton_cg", {"cg_max_iter": 2.5}, TypeError, r"cg_max_iter must be an int"),
    ("newton_cg", {"cg_tol": 1.0}, ValueError, r"Invalid cg_tol: 1.0; the relative CG tolerance must lie in"),
    ("newton_cg", {"cg_tol": -1e-3}, ValueError, r"Invalid cg_tol"),
    ("newton_cg", {"damping": -1.0}, ValueError, r"Invalid damping: -1.0; it must be >= 0"),
    ("newton_cg", {"armijo": 0.6}, ValueError, r"Invalid armijo: 0.6"),
    ("newton_cg", {"shrink": 1.5}, ValueError, r"Invalid shrink: 1.5"),
    ("newton_cg", {"max_backtracks": True}, TypeError, r"max_backtracks must be an int"),
    ("newton_cg", {"tol": float("nan")}, ValueError, r"Invalid tol"),
    ("newton_cg", {"step_size": 1.0}, TypeError, r"unknown option\(s\) 'step_size'.*valid options: max_iter"),
]


@pytest.mark.parametrize("name, options, error, match", INVALID,
                         ids=[f"{n}-{'-'.join(o)}" for n, o, _, _ in INVALID])
def test_invalid_options_raise(name, options, error, match):
    with pytest.raises(error, match=match):
        bl.solvers.get(name, **options)


def test_repr_shows_the_options():
    assert repr(bl.solvers.get("agd", mu=1.0)) == ("AcceleratedGradientDescent(max_iter=500, tol=1e-06, "
                                                  "step_size=None, mu=1.0, smoothness=None, restart=True)")
    assert repr(bl.solvers.get("newton_cg")) == ("NewtonCG(max_iter=50, tol=1e-06, cg_max_iter=5, cg_tol=None, "
                                                 "damping=0.0)")
