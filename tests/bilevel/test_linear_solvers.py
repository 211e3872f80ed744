"""Every registered linear solver (and a user callable) gives the exact hypergradient on every reference problem.

The linear-solver counterpart of tests/bilevel/test_solvers.py: parametrised over ``bl.linalg.available()``, so a
newly registered linear solver is tested here as soon as it has an entry in ``LINEAR_SETTINGS``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REFERENCE_PROBLEMS, rel_err, tight_solver

import bilevel as bl

#: linear solver name -> options for a solve to round-off on the reference problems (condition numbers <= 50)
LINEAR_SETTINGS = {
    "cg": {"max_iter": 500, "tol": 1e-13},
    "neumann": {"max_iter": 20000, "tol": 1e-12},  # 1 - 1/kappa per term: thousands of terms
}
LINEAR = [name for name in bl.linalg.available() if not name.startswith("test_")]


def dense_solve(matvec, b):
    """A user's linear solver: build the matrix column by column and call LAPACK."""
    A = torch.stack([matvec(e) for e in torch.eye(b.numel(), dtype=b.dtype, device=b.device)], dim=1)
    return torch.linalg.solve(A, b)


LINEAR_CASES = [*LINEAR, "user_callable"]


def make_linear_solver(name):
    if name == "user_callable":
        return bl.linalg.get(dense_solve, tol=1e-10)
    return bl.linalg.get(name, **LINEAR_SETTINGS[name])


def test_every_registered_linear_solver_has_settings():
    missing = [name for name in LINEAR if name not in LINEAR_SETTINGS]
    assert not missing, f"add {missing} to LINEAR_SETTINGS in tests/bilevel/test_linear_solvers.py"


@pytest.mark.parametrize("problem_name", sorted(REFERENCE_PROBLEMS))
@pytest.mark.parametrize("linear_name", LINEAR_CASES)
def test_hypergradient_agrees_with_the_closed_form(linear_name, problem_name):
    ref = REFERENCE_PROBLEMS[problem_name]()
    phi = bl.solve(ref.problem, ref.theta, ref.data, solver=tight_solver("newton_cg", ref), phi0=ref.phi0).phi
    g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data,
                               linear_solver=make_linear_solver(linear_name))
    assert info.converged, info.message
    assert rel_err(g, ref.hypergradient()) < 1e-7


@pytest.mark.parametrize("linear_name", LINEAR_CASES)
def test_argmin_backward_agrees_with_finite_differences(linear_name):
    ref = REFERENCE_PROBLEMS["logistic_regression"]()
    solver = tight_solver("newton_cg", ref)
    theta = bl.tree.map(lambda t: t.clone().requires_grad_(True), ref.theta)
    phi = bl.argmin(ref.problem, theta, ref.data, solver=solver, linear_solver=make_linear_solver(linear_name),
                    phi0=ref.phi0)
    ref.outer(phi, theta).backward()
    direction = bl.tree.map(lambda t: torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(0)),
                            ref.theta)

    def F(step):
        shifted = bl.tree.axpy(step, direction, ref.theta)
        return float(ref.outer(bl.solve(ref.problem, shifted, ref.data, solver=solver, phi0=ref.phi0).phi, shifted))

    h = 1e-5
    fd = (F(h) - F(-h)) / (2 * h)
    analytic = float(bl.tree.dot(bl.tree.map(lambda t: t.grad, theta), direction))
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic))
