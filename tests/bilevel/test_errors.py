"""Every documented error: bad names, options, structures, values and objectives."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def quad_loss(phi, data):
    return 0.5 * ((phi - data) ** 2).sum()


@pytest.fixture
def prox():
    return bl.ProximalProblem(quad_loss, lam=1.0)


def test_unknown_solver_name_lists_available(prox):
    with pytest.raises(ValueError, match=r"unknown inner solver 'sgdx'; available: .*gd"):
        bl.solvers.get("sgdx")
    with pytest.raises(ValueError, match="available"):
        bl.solve(prox, torch.zeros(2), torch.ones(2), solver="nope")


def test_unknown_linear_solver_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown linear solver 'qmr'; available: bicgstab, cg, .*neumann"):
        bl.linalg.get("qmr")  # 'gmres', the example here before, is registered now


def test_unknown_option_names_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'lr' for inner solver 'gd'; valid options: .*step_size"):
        bl.solvers.get("gd", lr=0.1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'maxiter' .*valid options: max_iter"):
        bl.linalg.get("cg", maxiter=5)
    with pytest.raises(TypeError, match="valid options: fn, tol"):
        bl.solvers.get(lambda *a: None, step_size=1.0)


@pytest.mark.parametrize("options, match", [
    ({"max_iter": -1}, "Invalid max_iter"),
    ({"max_iter": 2.5}, "max_iter must be an int"),
    ({"tol": -1e-3}, "Invalid tol"),
    ({"step_size": 0.0}, "Invalid step_size"),
    ({"step_size": float("nan")}, "must be finite"),
    ({"armijo": 1.5}, "must lie in"),
])
def test_invalid_option_values_fail_in_the_constructor(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bl.solvers.get("gd", **options)


def test_options_on_an_instance_are_rejected():
    with pytest.raises(TypeError, match="construct it with them instead"):
        bl.solvers.get(bl.solvers.get("gd"), tol=1.0)


def test_phi0_with_wrong_shape(prox):
    with pytest.raises(ValueError, match=r"phi0 has shape \(28, 28\) but theta's structure expects \(784,\); "
                                         r"pass phi0.reshape\(784,\)"):
        bl.solve(prox, torch.zeros(784), torch.zeros(784), phi0=torch.zeros(28, 28))


def test_phi0_with_wrong_keys(prox):
    theta = {"w": torch.zeros(2), "b": torch.zeros(1)}
    data = {"w": torch.ones(2), "b": torch.ones(1)}
    problem = bl.ProximalProblem(lambda phi, d: sum(((phi[k] - d[k]) ** 2).sum() for k in phi), lam=1.0)
    with pytest.raises(ValueError, match=r"phi0 is a dict \{w: \(2,\)\} but theta's structure expects a dict"):
        bl.solve(problem, theta, data, phi0={"w": torch.zeros(2)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_theta(prox, bad):
    theta = torch.tensor([0.0, bad])
    with pytest.raises(ValueError, match=r"theta contains 1 non-finite value\(s\).*lower the outer learning rate"):
        bl.solve(prox, theta, torch.ones(2))
    with pytest.raises(ValueError, match="theta contains"):
        bl.argmin(prox, theta.requires_grad_(True), torch.ones(2))


def test_non_finite_data(prox):
    with pytest.raises(ValueError, match=r"data\['x'\]\[1\] contains 2 non-finite"):
        bl.solve(prox, torch.zeros(2), {"x": [torch.ones(2), torch.full((2,), float("nan"))]})


def test_finite_check_is_exact_whatever_the_sums():
    """The finite check sums each tensor first: a sum that overflows on finite entries is no error, and a NaN
    anywhere (a complex one too, or beside an infinity of the other sign) is found and counted."""
    from bilevel._checks import check_finite_tree

    check_finite_tree({"big": torch.full((4,), 3e38), "small": torch.ones(2)}, "data")  # the sum is inf: no error
    check_finite_tree({"x": torch.tensor([1e308, 1e308], dtype=torch.float64)}, "data")
    with pytest.raises(ValueError, match=r"data\['z'\] contains 1 non-finite"):
        check_finite_tree({"z": torch.tensor([1 + 1j, complex("nan")]), "a": torch.ones(2)}, "data")
    with pytest.raises(ValueError, match=r"data\['x'\] contains 2 non-finite"):
        check_finite_tree({"x": torch.tensor([float("inf"), -float("inf"), 1.0])}, "data")  # a sum of nan


def test_non_finite_or_non_positive_lam():
    with pytest.raises(ValueError, match="Invalid lam: -1.0"):
        bl.ProximalProblem(quad_loss, lam=-1.0)
    with pytest.raises(ValueError, match="lam contains 1 non-finite"):
        bl.ProximalProblem(quad_loss, lam=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"lam must be > 0 everywhere.*exp\(log_lam\)"):
        bl.ProximalProblem(quad_loss, lam=torch.tensor([1.0, 0.0]))
    lam = torch.tensor([1.0, 1.0])
    problem = bl.ProximalProblem(quad_loss, lam=lam)
    lam[1] = float("inf")  # a learned lam that drifted: caught at the next solve
    with pytest.raises(ValueError, match="lam contains 1 non-finite"):
        bl.solve(problem, torch.zeros(2), torch.ones(2))


def test_lam_with_mismatched_structure():
    problem = bl.ProximalProblem(quad_loss, lam={"a": torch.ones(2)})
    with pytest.raises(ValueError, match="lam is a dict .* but theta is a tensor"):
        bl.solve(problem, torch.zeros(2), torch.ones(2))
    problem = bl.ProximalProblem(quad_loss, lam=torch.ones(3))
    with pytest.raises(ValueError, match=r"does not broadcast to theta's \(2,\)"):
        bl.solve(problem, torch.zeros(2), torch.ones(2))


@pytest.mark.parametrize("objective, exc, match", [
    (lambda phi, th, d: phi ** 2, ValueError, r"must return a scalar, got a tensor of shape \(3,\); reduce it"),
    (lambda phi, th, d: 1.0, TypeError, "must return a real scalar torch.Tensor, got float"),
    (lambda phi, th, d: (phi ** 2).sum().to(torch.complex128), TypeError, "real floating-point scalar"),
    (lambda phi, th, d: torch.tensor(3), TypeError, "real floating-point scalar, got dtype torch.int64"),
])
def test_objective_must_return_a_real_scalar(objective, exc, match):
    problem = bl.InnerProblem(objective)
    with pytest.raises(exc, match=match):
        bl.solve(problem, torch.zeros(3))


def test_outer_must_return_a_real_scalar(prox):
    phi = torch.zeros(2)
    with pytest.raises(ValueError, match="the outer objective must return a scalar"):
        bl.hypergradient(prox, lambda p, t: p, torch.zeros(2), phi, torch.ones(2))


def test_non_callable_objective_and_non_problem():
    with pytest.raises(TypeError, match="objective must be callable"):
        bl.InnerProblem(3.0)
    with pytest.raises(TypeError, match="wrap your objective as bl.InnerProblem"):
        bl.solve(lambda phi, th, d: phi.sum(), torch.zeros(2))


def test_theta_that_is_not_a_tree(prox):
    with pytest.raises(TypeError, match=r"theta must be a tensor or a dict/list/tuple of tensors, but found float at '\[0\]\[0\]'"):
        bl.solve(prox, [[1.0, 2.0]], torch.ones(2))


def test_cotangent_structure_and_hvp_mode(prox):
    theta, phi = torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match="cotangent is a tensor of shape \\(3,\\) but phi is"):
        bl.implicit_vjp(prox, theta, phi, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="unknown hvp mode 'fwd'; available: reverse, forward"):
        bl.implicit_vjp(prox, theta, phi, torch.ones(2), torch.ones(2), hvp="fwd")


def test_non_finite_phi_in_backward_inputs(prox):
    with pytest.raises(ValueError, match="phi contains 1 non-finite"):
        bl.implicit_vjp(prox, torch.zeros(2), torch.tensor([0.0, float("nan")]), torch.ones(2), torch.ones(2))
