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
    "minres": {"max_iter": 500, "tol": 1e-13},
    "gmres": {"max_iter": 500, "tol": 1e-13, "restart": 30},
    "bicgstab": {"max_iter": 500, "tol": 1e-13},
    # CG on A^T A (kappa^2 <= 2500); the engine passes rmatvec = the Hessian-vector product (A is symmetric)
    "normal_cg": {"max_iter": 2000, "tol": 1e-13},
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


# ------------------------------------------------ tol=0: the shared driver reads back once, with the loop's result

#: options giving each registered iterative linear solver a fixed budget that runs without any read-back
FIXED_BUDGET = {"cg": {}, "neumann": {"step_size": 0.01}, "minres": {}, "gmres": {"restart": 7}, "bicgstab": {},
                "normal_cg": {}}


def _transposed(name, matvec):
    """``rmatvec`` for a solver that needs it: the systems here are symmetric, so it is ``matvec``."""
    return {"rmatvec": matvec} if bl.linalg.get(name).needs_rmatvec else {}


def _fixed_and_stepwise(name, matvec, b, max_iter, **options):
    """The same solver with tol=0 (one read-back, at the end) and with a tol no residual reaches (step by step)."""
    opts = {**FIXED_BUDGET[name], **options, "max_iter": max_iter, "warn": False}
    fast = bl.linalg.get(name, tol=0.0, **opts)(matvec, b, **_transposed(name, matvec))
    slow = bl.linalg.get(name, tol=1e-300, **opts)(matvec, b, **_transposed(name, matvec))
    return fast, slow


def _same(fast, slow):
    (xf, inf_), (xs, ins) = fast, slow
    assert torch.equal(xf, xs)
    for field in ("iterations", "residual_norm", "relative_residual", "converged", "status", "matvecs", "extra"):
        assert getattr(inf_, field) == getattr(ins, field), field


def test_every_iterative_linear_solver_has_a_fixed_budget_setting():
    iterative = [n for n in LINEAR if isinstance(bl.linalg.get(n), bl.linalg.IterativeLinearSolver)]
    assert sorted(FIXED_BUDGET) == sorted(iterative)


@pytest.mark.parametrize("name", sorted(FIXED_BUDGET))
@pytest.mark.parametrize("max_iter", [1, 5, 40])
def test_tol_zero_reads_back_once_and_equals_the_step_by_step_solve(name, max_iter, monkeypatch):
    A = bl.testing.random_spd(30, 50.0, seed=3)
    b = torch.linspace(-1.0, 1.0, 30, dtype=A.dtype)
    reads = []
    for attr in ("item", "__float__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, _attr=attr, **k):
            reads.append(_attr)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, counted)
    bl.linalg.get(name, tol=0.0, max_iter=max_iter, **FIXED_BUDGET[name])(lambda v: A @ v, b,
                                                                           **_transposed(name, lambda v: A @ v))
    # ||b||, the residuals at the end and the method's facts for info.extra: not one per step
    assert len(reads) <= 3, f"{len(reads)} read-backs for {max_iter} steps: {reads[:8]}"
    monkeypatch.undo()
    _same(*_fixed_and_stepwise(name, lambda v: A @ v, b, max_iter))


def test_tol_zero_cg_stops_like_the_loop_at_negative_curvature_an_exact_solution_and_nan():
    d = torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    b = torch.ones(4, dtype=torch.float64)
    with pytest.warns(bl.NegativeCurvatureWarning):
        fast, slow = _fixed_and_stepwise("cg", lambda v: d * v, b, 10)
    assert fast[1].status is bl.LinearSolveStatus.NEGATIVE_CURVATURE and fast[1].extra["min_curvature"] < 0
    _same(fast, slow)
    fast, slow = _fixed_and_stepwise("cg", lambda v: 2.0 * v, b, 10)  # solved exactly by the first step
    assert fast[1].status is bl.LinearSolveStatus.CONVERGED and fast[1].iterations == 1
    _same(fast, slow)
    d = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=torch.float64)

    def poisoned(v):  # a product that overflows to NaN on CG's fourth direction (||p|| = 0.27; the third's is 0.70)
        return d * v * (float("nan") if torch.linalg.vector_norm(v) < 0.5 else 1.0)
    with pytest.warns(bl.NonFiniteWarning):
        fast = bl.linalg.get("cg", tol=0.0, max_iter=10)(poisoned, b)
    with pytest.warns(bl.NonFiniteWarning):
        slow = bl.linalg.get("cg", tol=1e-300, max_iter=10)(poisoned, b)
    assert fast[1].status is bl.LinearSolveStatus.NONFINITE and torch.isfinite(fast[0]).all()
    assert fast[1].iterations == 3
    _same(fast, slow)


def test_tol_zero_neumann_stops_like_the_loop_when_it_diverges():
    d = torch.tensor([1.0, 5.0, 30.0], dtype=torch.float64)
    with pytest.warns(bl.DivergenceWarning):
        fast, slow = _fixed_and_stepwise("neumann", lambda v: d * v, torch.ones(3, dtype=torch.float64), 200,
                                         step_size=0.1)  # 0.1 > 2 / 30
    assert fast[1].status is bl.LinearSolveStatus.DIVERGED and fast[1].iterations < 200
    _same(fast, slow)
