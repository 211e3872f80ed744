"""Hypergradients of the implicit engine against closed forms, finite differences and gradcheck."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import rel_err

import bilevel as bl

TIGHT_GD = dict(tol=1e-11, max_iter=20000)


def tight(**extra):
    return bl.solvers.get("gd", **{**TIGHT_GD, **extra})


def cg_to_tol():
    return bl.linalg.get("cg", max_iter=500, tol=1e-14)


# --- the paper's appendix F.1 problem ------------------------------------------------------


@pytest.fixture(scope="module")
def f1():
    return bl.testing.proximal_quadratic(dim=50, lam=5.0, condition_number=50.0, seed=0)


def _f1_meta_gradient(f1, linear_solver):
    theta = f1.theta.clone().requires_grad_(True)
    phi, result = bl.argmin(f1.problem, theta, f1.data, solver=bl.solvers.get("gd", tol=1e-10, max_iter=20000),
                            linear_solver=linear_solver, full_output=True)
    f1.outer(phi, theta).backward()
    return theta.grad, result


def test_f1_problem_is_as_specified(f1):
    hess = f1.data["A"] + 5.0 * torch.eye(50)
    eig = torch.linalg.eigvalsh(hess)
    assert float(eig[-1] / eig[0]) == pytest.approx(50.0, rel=1e-8)


def test_f1_argmin_backward_matches_exact_meta_gradient(f1):
    grad, result = _f1_meta_gradient(f1, cg_to_tol())
    assert result.converged and result.grad_norm < 1e-10
    assert rel_err(grad, f1.hypergradient()) < 1e-8


def test_f1_truncated_cg_error_shrinks_with_iterations(f1):
    exact = f1.hypergradient()
    errors = {}
    for k in (1, 2, 5, 20):
        grad, _ = _f1_meta_gradient(f1, bl.linalg.get("cg", max_iter=k, warn=False))
        errors[k] = rel_err(grad, exact)
    assert errors[1] > errors[2] > errors[5] > errors[20]
    assert errors[2] > 1e-3  # a truncated solve is visibly inexact on this conditioning
    assert errors[20] < 0.05


@pytest.mark.parametrize("hvp", ["reverse", "forward"])
@pytest.mark.parametrize("linear_solver", ["cg", "neumann"])
def test_hvp_modes_and_linear_solvers_agree(f1, hvp, linear_solver):
    phi = bl.solve(f1.problem, f1.theta, f1.data, solver=tight()).phi
    options = {"max_iter": 500, "tol": 1e-13} if linear_solver == "cg" else {"max_iter": 3000, "tol": 1e-12}
    g, info = bl.hypergradient(f1.problem, f1.outer, f1.theta, phi, f1.data,
                               linear_solver=bl.linalg.get(linear_solver, **options), hvp=hvp)
    assert info.converged and info.hvp_mode == hvp
    assert info.hvps >= info.iterations
    assert info.inner_grad_norm < 1e-10
    assert rel_err(g, f1.hypergradient()) < 1e-8


def test_implicit_vjp_is_transpose_of_exact_jacobian(f1, gen):
    phi = bl.solve(f1.problem, f1.theta, f1.data, solver=tight()).phi
    cot = torch.randn(50, generator=gen)
    vjp, info = bl.implicit_vjp(f1.problem, f1.theta, phi, f1.data, cot, linear_solver=cg_to_tol())
    hess = f1.data["A"] + 5.0 * torch.eye(50)
    exact = 5.0 * torch.linalg.solve(hess, cot)  # dphi*/dtheta = lam (A + lam I)^-1, symmetric
    assert info.converged
    assert rel_err(vjp, exact) < 1e-10


# --- general G: theta outside any proximal term -------------------------------------------------


@pytest.mark.parametrize("builder", [bl.testing.ridge_regression, bl.testing.general_quadratic])
def test_general_inner_problem_matches_closed_form(builder):
    ref = builder(seed=2)
    theta = ref.theta.clone().requires_grad_(True)
    phi = bl.argmin(ref.problem, theta, ref.data, solver=tight(), linear_solver=cg_to_tol(), phi0=ref.phi0)
    assert rel_err(phi, ref.solution()) < 1e-8
    ref.outer(phi, theta).backward()  # general_quadratic's outer also uses theta directly
    assert rel_err(theta.grad, ref.hypergradient()) < 1e-8


def test_hypergradient_includes_direct_term():
    ref = bl.testing.general_quadratic(seed=3, direct=0.7)
    phi = bl.solve(ref.problem, ref.theta, ref.data, solver=tight(), phi0=ref.phi0).phi
    g, _ = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data, linear_solver=cg_to_tol())
    assert rel_err(g, ref.hypergradient()) < 1e-8
    no_direct, _ = bl.hypergradient(ref.problem, lambda p, t: ref.outer(p, t.detach()), ref.theta, phi, ref.data,
                                    linear_solver=cg_to_tol())
    assert rel_err(g - no_direct, 0.7 * ref.theta) < 1e-8


# --- tree-structured theta and learned lam --------------------------------------------------------


def test_theta_as_dict_of_two_tensors():
    ref = bl.testing.proximal_quadratic(dim=30, condition_number=30.0, seed=1, structure="dict")
    theta = {k: v.clone().requires_grad_(True) for k, v in ref.theta.items()}
    phi = bl.argmin(ref.problem, theta, ref.data, solver=tight(), linear_solver=cg_to_tol())
    assert isinstance(phi, dict) and set(phi) == {"weight", "bias"}
    assert phi["weight"].shape == theta["weight"].shape
    ref.outer(phi, theta).backward()
    exact = ref.hypergradient()
    for key in theta:
        assert rel_err(theta[key].grad, exact[key]) < 1e-8


@pytest.mark.parametrize("structure", ["tensor", "dict"])
def test_learned_per_parameter_lam(structure):
    ref = bl.testing.proximal_quadratic(dim=20, condition_number=20.0, seed=2, structure=structure,
                                        learn_lam="per_parameter")
    theta = bl.tree.map(lambda t: t.clone().requires_grad_(True), ref.theta)
    phi = bl.argmin(ref.problem, theta, ref.data, solver=tight(), linear_solver=cg_to_tol())
    ref.outer(phi, theta).backward()
    lam = ref.problem.lam
    lam_grad = bl.tree.map(lambda t: t.grad, lam)
    assert rel_err(lam_grad, ref.lam_gradient()) < 1e-8
    assert rel_err(bl.tree.map(lambda t: t.grad, theta), ref.hypergradient()) < 1e-8


def test_learned_scalar_lam_through_a_reparametrisation():
    ref = bl.testing.proximal_quadratic(dim=15, condition_number=10.0, seed=4, learn_lam="scalar")
    log_lam = torch.log(ref.problem.lam.detach()).requires_grad_(True)
    problem = bl.ProximalProblem(ref.problem.loss, torch.exp(log_lam))  # lam is a non-leaf tensor
    theta = ref.theta.clone().requires_grad_(True)
    phi = bl.argmin(problem, theta, ref.data, solver=tight(), linear_solver=cg_to_tol())
    ref.outer(phi, theta).backward()
    expected = ref.lam_gradient() * torch.exp(log_lam.detach())  # chain rule through exp
    assert float(log_lam.grad) == pytest.approx(float(expected), rel=1e-8)


# --- nonlinear problems: finite differences and gradcheck ---------------------------------------


def test_logistic_regression_matches_central_finite_differences():
    ref = bl.testing.logistic_regression(n_features=4, seed=7)
    theta = ref.theta.clone().requires_grad_(True)
    phi = bl.argmin(ref.problem, theta, ref.data, solver=tight(), linear_solver=cg_to_tol(), phi0=ref.phi0)
    ref.outer(phi, theta).backward()
    eps = 1e-5
    fd = torch.stack([
        (ref.value(ref.theta + eps * e) - ref.value(ref.theta - eps * e)) / (2 * eps)
        for e in torch.eye(4)
    ])
    assert rel_err(theta.grad, fd) < 1e-6
    assert rel_err(theta.grad, ref.hypergradient()) < 1e-8


def test_gradcheck_on_the_implicit_op():
    ref = bl.testing.general_quadratic(n_phi=4, n_theta=3, seed=8)

    def exact_solver(problem, theta, data, phi0):  # a user callable: a direct solve
        return torch.linalg.solve(data["A"], data["B"] @ theta + data["c"])

    def f(theta):
        return bl.argmin(ref.problem, theta, ref.data, solver=exact_solver, linear_solver=cg_to_tol(),
                         phi0=ref.phi0)

    theta = ref.theta.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (theta,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_with_dict_theta_and_learned_lam():
    ref = bl.testing.proximal_quadratic(dim=6, condition_number=5.0, seed=9, structure="dict")
    lam = torch.tensor(2.0, requires_grad=True)

    def f(w, b, lam):
        problem = bl.ProximalProblem(ref.problem.loss, lam)
        phi = bl.argmin(problem, {"weight": w, "bias": b}, ref.data, solver=bl.solvers.get("gd", tol=1e-13,
                                                                                              max_iter=50000),
                        linear_solver=cg_to_tol())
        return phi["weight"], phi["bias"]

    inputs = (ref.theta["weight"].clone().requires_grad_(True), ref.theta["bias"].clone().requires_grad_(True), lam)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# --- behaviour of the op ------------------------------------------------------------------------


def test_argmin_without_grad_is_a_plain_solve(f1):
    phi = bl.argmin(f1.problem, f1.theta, f1.data, solver=tight())
    assert not phi.requires_grad
    assert rel_err(phi, f1.solution()) < 1e-9


def test_argmin_phi_is_a_leaf_of_the_graph_not_the_solver_path(f1):
    theta = f1.theta.clone().requires_grad_(True)
    phi = bl.argmin(f1.problem, theta, f1.data, solver=tight())
    assert phi.grad_fn is not None
    # the graph holds one node between phi and theta, whatever the number of iterations
    assert phi.grad_fn.next_functions[-1][0] is not None
    assert len(phi.grad_fn.next_functions) == 1


def test_backward_reports_negative_curvature_when_hessian_is_indefinite():
    # G = -1/2 ||phi||^2 + 1/2 ||phi - theta||^2 * 0.5 has a concave direction: no minimiser.
    problem = bl.InnerProblem(lambda phi, th, d: (-0.5 * phi ** 2 + 0.25 * (phi - th) ** 2).sum())
    theta = torch.ones(3, requires_grad=True)

    def at_stationary_point(problem, theta, data, phi0):
        return -theta  # grad = -phi + 0.5 (phi - theta) = 0 at phi = -theta

    phi = bl.argmin(problem, theta, solver=at_stationary_point)
    with pytest.warns(bl.ConvergenceWarning, match="p\\^T A p <= 0"):
        phi.sum().backward()


def test_inner_non_convergence_warns_but_still_differentiates(f1):
    theta = f1.theta.clone().requires_grad_(True)
    with pytest.warns(bl.ConvergenceWarning, match="did not converge after 3 iterations"):
        phi, result = bl.argmin(f1.problem, theta, f1.data, solver=bl.solvers.get("gd", max_iter=3),
                                full_output=True)
    assert not result.converged and result.status is bl.SolverStatus.MAX_ITER
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f1.outer(phi, theta).backward()
    assert torch.isfinite(theta.grad).all()


def test_float32_and_dtype_preserved():
    ref = bl.testing.proximal_quadratic(dim=10, condition_number=5.0, seed=3, dtype=torch.float32)
    theta = ref.theta.clone().requires_grad_(True)
    phi = bl.argmin(ref.problem, theta, ref.data, solver=bl.solvers.get("gd", tol=1e-5),
                    linear_solver=bl.linalg.get("cg", tol=1e-6))
    assert phi.dtype == torch.float32
    ref.outer(phi, theta).backward()
    assert theta.grad.dtype == torch.float32
    assert rel_err(theta.grad.double(), ref.hypergradient().double()) < 1e-3


def test_full_output_exposes_the_backward_diagnostics(f1):
    theta = f1.theta.clone().requires_grad_(True)
    phi, result = bl.argmin(f1.problem, theta, f1.data, solver=tight(),
                            linear_solver=bl.linalg.get("cg", max_iter=5, tol=0.0), full_output=True)
    assert result.backward is None
    f1.outer(phi, theta).backward()
    assert isinstance(result.backward, bl.ImplicitInfo)
    assert result.backward.iterations == 5 and result.backward.hvps == 5
    assert result.backward.status is bl.LinearSolveStatus.MAX_ITER
