"""The unrolled baselines: MAML, truncated back-propagation, first-order MAML, in closed form."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

import bilevel as bl


@pytest.fixture(scope="module")
def quad():
    return bl.testing.proximal_quadratic(dim=12, lam=2.0, condition_number=10.0, seed=11)


def unrolled_closed_form(ref, alpha, K, backprop=None):
    """phi_K and d(outer)/dtheta for K GD steps on G = 1/2 phi^T A phi + b^T phi + lam/2 ||phi - theta||^2.

    phi_{k+1} = M phi_k + alpha (lam theta - b) with M = I - alpha (A + lam I), phi_0 = theta.
    """
    A, b = ref.data["A"], ref.data["b"]
    lam, n = 2.0, A.shape[0]
    M = torch.eye(n) - alpha * (A + lam * torch.eye(n))
    theta = ref.theta
    phi = theta.clone()
    for _ in range(K):
        phi = M @ phi + alpha * (lam * theta - b)
    backprop = K if backprop is None else backprop
    jac = torch.zeros(n, n) if backprop < K else torch.eye(n)  # d phi_0 / d theta only if fully unrolled
    for k in range(backprop):
        jac = M @ jac + alpha * lam * torch.eye(n)
    if backprop == K:
        jac = torch.linalg.matrix_power(M, K) + sum(
            (torch.linalg.matrix_power(M, j) * alpha * lam for j in range(K)), torch.zeros(n, n))
    grad_f = torch.func.grad(lambda p: ref.outer(p, theta))(phi)
    return phi, jac.T @ grad_f, grad_f


@pytest.mark.parametrize("K", [1, 5, 30])
def test_maml_matches_closed_form_unrolled_gradient(quad, K):
    theta = quad.theta.clone().requires_grad_(True)
    phi = bl.unrolled.maml(quad.problem, theta, quad.data, step_size=0.02, num_steps=K)
    quad.outer(phi, theta).backward()
    phi_cf, grad_cf, _ = unrolled_closed_form(quad, 0.02, K)
    assert rel_err(phi.detach(), phi_cf) < 1e-12
    assert rel_err(theta.grad, grad_cf) < 1e-10


def test_maml_approaches_the_implicit_gradient_with_many_steps(quad):
    theta = quad.theta.clone().requires_grad_(True)
    phi = bl.unrolled.maml(quad.problem, theta, quad.data, step_size=0.04, num_steps=400)
    quad.outer(phi, theta).backward()
    assert rel_err(theta.grad, quad.hypergradient()) < 1e-8


@pytest.mark.parametrize("T", [1, 3])
def test_truncated_backprop_matches_closed_form(quad, T):
    theta = quad.theta.clone().requires_grad_(True)
    phi = bl.unrolled.truncated(quad.problem, theta, quad.data, step_size=0.02, num_steps=10, backprop_steps=T)
    quad.outer(phi, theta).backward()
    _, grad_cf, _ = unrolled_closed_form(quad, 0.02, 10, backprop=T)
    assert rel_err(theta.grad, grad_cf) < 1e-10


def test_truncated_with_all_steps_is_maml(quad):
    grads = []
    for fn in (bl.unrolled.maml, lambda *a, **k: bl.unrolled.truncated(*a, **k, backprop_steps=7)):
        theta = quad.theta.clone().requires_grad_(True)
        quad.outer(fn(quad.problem, theta, quad.data, step_size=0.02, num_steps=7), theta).backward()
        grads.append(theta.grad)
    assert rel_err(grads[1], grads[0]) < 1e-13


def test_first_order_maml_passes_grad_phi_through(quad):
    theta = quad.theta.clone().requires_grad_(True)
    phi = bl.unrolled.first_order_maml(quad.problem, theta, quad.data, step_size=0.02, num_steps=10)
    quad.outer(phi, theta).backward()
    phi_cf, _, grad_f = unrolled_closed_form(quad, 0.02, 10)
    assert rel_err(phi.detach(), phi_cf) < 1e-12
    assert rel_err(theta.grad, grad_f) < 1e-12


def test_first_order_maml_needs_matching_structure():
    problem = bl.InnerProblem(lambda phi, th, d: (phi ** 2).sum() + th.sum())
    with pytest.raises(ValueError, match="phi0 has shape"):
        bl.unrolled.first_order_maml(problem, torch.zeros(3), step_size=0.1, num_steps=1, phi0=torch.zeros(4))


def test_truncated_rejects_too_many_backprop_steps(quad):
    with pytest.raises(ValueError, match="backprop_steps \\(5\\) cannot exceed num_steps \\(3\\)"):
        bl.unrolled.truncated(quad.problem, quad.theta, quad.data, step_size=0.1, num_steps=3, backprop_steps=5)
