"""The fault catalogue: inputs that once failed silently or deep inside torch, each now a clear error or a
flagged, warned result whose message names the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl


def _quad(phi, data):
    return 0.5 * ((phi - data) ** 2).sum()


@pytest.fixture
def prox():
    return bl.ProximalProblem(_quad, lam=1.0)


def _exact_gd():
    return bl.solvers.get("gd", step_size=0.5, tol=1e-12, max_iter=200)


# -- non-finite inputs never become a finite (zero) gradient ----------------------------------------------


def test_a_nan_outer_loss_through_argmin_raises_like_hypergradient(prox):
    theta = torch.ones(3, dtype=torch.float64, requires_grad=True)
    data = torch.zeros(3, dtype=torch.float64)
    phi = bl.argmin(prox, theta, data, solver=_exact_gd())
    with pytest.raises(ValueError, match="outer loss.*not finite.*set_detect_anomaly"):
        (phi * float("nan")).sum().backward()
    assert theta.grad is None  # nothing was written
    with pytest.raises(ValueError, match="non-finite"):
        bl.hypergradient(prox, lambda p, t: (p * float("nan")).sum(), theta.detach(), phi.detach(), data)


def test_a_callable_solver_returning_nan_fails_in_argmin_and_hypergradient_alike(prox):
    theta = torch.ones(3, dtype=torch.float64, requires_grad=True)
    data = torch.zeros(3, dtype=torch.float64)

    def broken(problem, theta, data, phi0):
        return torch.full_like(phi0, float("nan"))

    with pytest.warns(bl.NonFiniteWarning) as record:
        phi = bl.argmin(prox, theta, data, solver=broken)
    assert record[0].message.status is bl.SolverStatus.NONFINITE
    with pytest.raises(ValueError, match="inner solve diverged or returned NaN.*result.status") as in_argmin:
        phi.sum().backward()
    assert theta.grad is None
    with pytest.raises(ValueError, match="inner solve diverged or returned NaN") as in_hypergradient:
        bl.hypergradient(prox, lambda p, t: p.sum(), theta.detach(), phi.detach(), data)
    assert type(in_argmin.value) is type(in_hypergradient.value)


# -- divergence is detected without a tolerance ------------------------------------------------------------


@pytest.mark.parametrize("tol", [0.0, 1e-10], ids=["fixed-budget", "with-tol"])
def test_a_diverging_gradient_descent_is_flagged_even_with_a_fixed_budget(prox, tol):
    theta = torch.ones(4, dtype=torch.float64)
    data = torch.zeros(4, dtype=torch.float64)
    # G's Hessian is 2 I: a step of 1.5 multiplies the distance to phi* by -2 each step (finite for 40 steps)
    solver = bl.solvers.get("gd", step_size=1.5, max_iter=40, tol=tol)
    with pytest.warns(bl.DivergenceWarning, match="lower step_size") as record:
        result = bl.solve(prox, theta, data, solver=solver, phi0=theta + 1.0)
    assert result.status is bl.SolverStatus.DIVERGED and not result.converged
    assert result.grad_norm > 1e10 and record[0].message.info is result
    assert issubclass(bl.DivergenceWarning, bl.BreakdownWarning)


def test_a_converging_fixed_budget_is_still_silent(prox):
    theta = torch.ones(4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bl.solve(prox, theta, torch.zeros(4, dtype=torch.float64),
                          solver=bl.solvers.get("gd", step_size=0.9, max_iter=5, tol=0.0))
    assert result.status is bl.SolverStatus.MAX_ITER


# -- certificates that the solver's own measurements contradict --------------------------------------------


def _diagonal_problem():
    h = torch.tensor([1.0, 10.0], dtype=torch.float64)
    problem = bl.InnerProblem(lambda phi, theta, d: 0.5 * (h * phi ** 2).sum() - (theta * phi).sum())
    theta = torch.tensor([1.0, 0.1], dtype=torch.float64)
    return problem, theta, theta / h  # phi* = theta / h exactly


def test_an_overstated_mu_is_contradicted_by_cg_and_the_certificate_says_so():
    problem, theta, phi = _diagonal_problem()
    c = bl.bounds.Constants(mu=50.0, L=1.0, rho=0.0, cross=1.0, cross_lipschitz=0.0)
    with pytest.warns(bl.ConvergenceWarning, match="contradicted"):
        _, info = bl.hypergradient(problem, lambda p, t: 0.5 * (p ** 2).sum(), theta, phi, constants=c)
    cert = info.certificate
    assert cert.contradicted and not cert.valid and cert.bound == float("inf")
    assert cert.measured_curvature < 50.0
    assert "mu=None" in cert.message and "no larger than the measured curvature" in cert.message
    # the true mu (1) is consistent with what CG measured: a valid certificate
    ok = bl.bounds.Constants(mu=1.0, L=1.0, rho=0.0, cross=1.0, cross_lipschitz=0.0)
    _, info = bl.hypergradient(problem, lambda p, t: 0.5 * (p ** 2).sum(), theta, phi, constants=ok)
    assert info.certificate.valid and not info.certificate.contradicted


def test_target_error_with_an_impossible_mu_is_not_reported_met():
    ref = bl.testing.proximal_quadratic(dim=10, seed=0)
    c = bl.bounds.Constants(mu=1e4, L=100.0, rho=0.0)
    with pytest.warns(bl.ConvergenceWarning, match="could not certify.*contradicted"):
        g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, constants=c,
                                   target_error=1e-3)
    assert not info.adaptive.met and info.certificate.contradicted


# -- objectives that cannot be differentiated --------------------------------------------------------------


def test_an_inner_objective_that_detaches_its_value_is_an_error():
    problem = bl.InnerProblem(lambda phi, theta, d: ((phi - theta) ** 2).sum().detach())
    with pytest.raises(ValueError, match=r"carries no gradient.*\.detach\(\).*torch operations"):
        bl.solve(problem, torch.ones(2), None, phi0=torch.zeros(2))


def test_a_proximal_loss_that_detaches_its_value_is_an_error():
    problem = bl.ProximalProblem(lambda phi, d: ((phi - d) ** 2).sum().detach(), lam=1.0)
    with pytest.raises(ValueError, match=r"the loss .* carries no gradient.*torch operations"):
        bl.solve(problem, torch.ones(2), torch.zeros(2))


# -- dtypes and devices are named ---------------------------------------------------------------------------


def test_integer_theta_names_the_argument_and_the_cast(prox):
    with pytest.raises(TypeError, match=r"theta has dtype torch.int64.*\.float\(\)"):
        bl.solve(prox, torch.tensor([1, 2]), torch.zeros(2))
    with pytest.raises(TypeError, match=r"theta at 'w' has dtype torch.int64"):
        bl.argmin(bl.ProximalProblem(lambda p, d: (p["w"] ** 2).sum(), lam=1.0), {"w": torch.tensor([1, 2])})


def test_phi0_of_another_dtype_or_device_than_theta_is_named(prox):
    theta = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"phi0 has dtype torch.float32 but theta has torch.float64.*"
                                        r"phi0.to\(theta.dtype\)"):
        bl.solve(prox, theta, torch.zeros(2, dtype=torch.float64), phi0=torch.zeros(2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"phi0 is on meta but theta is on cpu.*phi0.to\(theta.device\)"):
        bl.solve(prox, theta, torch.zeros(2, dtype=torch.float64),
                 phi0=torch.zeros(2, dtype=torch.float64, device="meta"))
    general = bl.InnerProblem(lambda phi, theta, d: ((phi - theta.sum()) ** 2).sum())
    with pytest.raises(TypeError, match="phi0 has dtype torch.float32"):
        bl.solve(general, theta, None, phi0=torch.zeros(3, dtype=torch.float32))


# -- what torch's transforms cannot run: named, with the way out ---------------------------------------------


def _regression(loss):
    torch.manual_seed(0)
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    return bl.ProximalProblem(loss, lam=1.0), (X, y)


def _fixed_gd():
    return bl.solvers.get("gd", step_size=0.05, max_iter=5, tol=0.0)


def test_mse_loss_with_forward_mode_products_names_the_rewrite():
    problem, data = _regression(lambda p, d: F.mse_loss(d[0] @ p, d[1]))
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    phi = bl.argmin(problem, theta, data, solver=_fixed_gd(), hvp="forward")
    with pytest.raises(RuntimeError, match=r"\(\(pred - target\) \*\* 2\)\.mean\(\).*hvp='reverse'"):
        phi.sum().backward()
    # the reverse mode runs it
    phi = bl.argmin(problem, theta, data, solver=_fixed_gd(), hvp="reverse")
    phi.sum().backward()
    assert torch.isfinite(theta.grad).all()


class _Square(torch.autograd.Function):  # an old-style Function: no setup_context
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_a_custom_autograd_function_under_vmap_names_setup_context_and_the_loop():
    problem, data = _regression(lambda p, d: _Square.apply(d[0] @ p - d[1]).sum())

    def one(theta):
        return bl.solve(problem, theta, data, solver=_fixed_gd()).phi

    with pytest.raises(RuntimeError, match=r"custom torch.autograd.Function.*setup_context.*hvp='reverse'"):
        torch.func.vmap(one)(torch.zeros(4, 3, dtype=torch.float64))
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    phi = bl.argmin(problem, theta, data, solver=_fixed_gd(), hvp="forward")
    with pytest.raises(RuntimeError, match="setup_context"):
        phi.sum().backward()


# -- breakdowns have types that code can test ---------------------------------------------------------------


def test_negative_curvature_is_a_typed_warning_carrying_the_solve():
    with pytest.warns(bl.NegativeCurvatureWarning) as record:
        _, info = bl.linalg.get("cg")(lambda v: -v, torch.ones(3))
    warning = record[0].message
    assert isinstance(warning, bl.BreakdownWarning) and "p^T A p <= 0" in str(warning)
    assert warning.status is bl.LinearSolveStatus.NEGATIVE_CURVATURE and warning.info is info
    assert warning.info.extra["min_curvature"] < 0


@pytest.mark.parametrize("family", [bl.SolverStatus, bl.LinearSolveStatus])
def test_every_status_family_shares_the_common_members(family):
    assert issubclass(family, bl.Status)
    for name in bl.status.SHARED_STATUSES:
        assert name in family.__members__, (family, name)
    assert family.CONVERGED.success and not family.MAX_ITER.success
    assert family.NONFINITE.warning is bl.NonFiniteWarning and family.DIVERGED.warning is bl.DivergenceWarning
    assert family.MAX_ITER.warning is bl.BudgetWarning and family.UNCHECKED.warning is None
    for member in family:
        assert member.advice == member.value and len(member.advice) > 20


def test_target_error_without_constants_estimates_them_and_says_so():
    ref = bl.testing.proximal_quadratic(dim=10, seed=0)
    g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, ref.theta, ref.data, target_error=1e-6)
    cert = info.certificate
    assert info.adaptive.met and not cert.rigorous and set(cert.estimated) == {"mu", "L", "rho"}
    assert "not rigorous" in cert.message
    assert float((g - ref.hypergradient()).norm()) <= 1e-6  # a quadratic G: rho = 0 is exact here


def test_per_task_tensors_captured_by_a_closure_under_vmap_are_named():
    X = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(4, 10, generator=torch.Generator().manual_seed(1)).sign()

    def one(theta, Xi, yi):
        problem = bl.ProximalProblem(lambda p, _: F.softplus(-yi * (Xi @ p)).mean(), lam=1.0)
        return bl.argmin(problem, theta, None, solver=bl.solvers.get("newton_cg", tol=1e-10))

    with pytest.raises(RuntimeError, match=r"per-task tensors must come in through argmin's own arguments.*data"):
        torch.func.vmap(one)(torch.zeros(4, 3), X, y)

    def through_data(theta, Xi, yi):  # the way that works: the same tensors as data
        problem = bl.ProximalProblem(lambda p, d: F.softplus(-d[1] * (d[0] @ p)).mean(), lam=1.0)
        return bl.argmin(problem, theta, (Xi, yi), solver=bl.solvers.get("newton_cg", tol=1e-10))

    batched = torch.func.vmap(through_data)(torch.zeros(4, 3), X, y)
    loop = torch.stack([through_data(torch.zeros(3), X[i], y[i]) for i in range(4)])
    assert torch.allclose(batched, loop, rtol=0, atol=1e-12)
