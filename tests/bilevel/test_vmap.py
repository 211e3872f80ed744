"""Inner solvers with a fixed iteration count run under torch.func.vmap over a batch of tasks."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl

N_TASKS = 5


@pytest.fixture(scope="module")
def tasks():
    refs = [bl.testing.ridge_regression(seed=s) for s in range(N_TASKS)]
    X = torch.stack([r.data["X"] for r in refs])
    y = torch.stack([r.data["y"] for r in refs])
    return refs[0].problem, refs[0].theta, X, y


VMAPPABLE = {
    "gd fixed step": lambda: bl.solvers.get("gd", step_size=0.002, max_iter=200, tol=0.0),
    "agd constant momentum": lambda: bl.solvers.get("agd", step_size=0.002, mu=0.05, max_iter=200, tol=0.0),
    "agd schedule, no restart": lambda: bl.solvers.get("agd", smoothness=400.0, restart=False, max_iter=200, tol=0.0),
}


@pytest.mark.parametrize("name", sorted(VMAPPABLE))
def test_vmap_over_tasks_matches_the_loop(tasks, name):
    problem, theta, X, y = tasks
    solver = VMAPPABLE[name]()
    assert solver.vmappable

    def solve_one(X, y):
        return bl.solve(problem, theta, {"X": X, "y": y}, solver=solver, phi0=torch.zeros(8)).phi

    batched = torch.func.vmap(solve_one)(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tol=0: a fixed budget, MAX_ITER without a warning
        loop = torch.stack([solve_one(X[i], y[i]) for i in range(N_TASKS)])
    assert batched.shape == (N_TASKS, 8)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
    # the tasks differ, so vmap really solved five problems
    assert float((batched[0] - batched[1]).norm()) > 1e-3


def test_vmap_over_theta_and_data_of_a_proximal_problem():
    ref = bl.testing.proximal_quadratic(dim=6, lam=2.0, condition_number=5.0, seed=0)
    thetas = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    solver = bl.solvers.get("gd", step_size=0.09, max_iter=400)
    phis = torch.func.vmap(lambda th: bl.solve(ref.problem, th, ref.data, solver=solver).phi)(thetas)
    exact = torch.stack([ref.solution(th) for th in thetas])
    torch.testing.assert_close(phis, exact, rtol=1e-10, atol=1e-10)


def test_result_under_vmap_is_unchecked_and_silent(tasks):
    problem, theta, X, y = tasks
    statuses = []

    def solve_one(X, y):
        result = bl.solve(problem, theta, {"X": X, "y": y}, solver=VMAPPABLE["gd fixed step"](),
                          phi0=torch.zeros(8))
        statuses.append((result.status, result.iterations, result.converged))
        return result.phi

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.func.vmap(solve_one)(X, y)
    assert statuses == [(bl.SolverStatus.UNCHECKED, 200, False)]


@pytest.mark.parametrize("solver", [
    lambda: bl.solvers.get("gd"),  # line search
    lambda: bl.solvers.get("agd", step_size=0.002),  # adaptive restart reads values
    lambda: bl.solvers.get("newton_cg"),
    lambda: bl.solvers.get("scipy_lbfgs"),
])
def test_solvers_that_cannot_run_under_vmap_say_so(tasks, solver):
    problem, theta, X, y = tasks
    s = solver()
    assert not s.vmappable
    with pytest.raises(RuntimeError, match="cannot run inside torch.func.vmap.*Use a fixed iteration count"):
        torch.func.vmap(lambda X, y: bl.solve(problem, theta, {"X": X, "y": y}, solver=s, phi0=torch.zeros(8)).phi)(
            X, y)


@pytest.mark.parametrize("max_iter", [1, 3, 8, 40])
def test_branch_free_cg_equals_the_reference_cg(max_iter):
    A = bl.testing.random_spd(12, 200.0, seed=max_iter)
    b = torch.randn(12, generator=torch.Generator().manual_seed(max_iter))
    cg = bl.linalg.CG(max_iter=max_iter, tol=1e-12, warn=False)
    x_ref, info = cg(lambda v: A @ v, b)
    torch.testing.assert_close(cg.solve_fixed(lambda v: A @ v, b), x_ref, rtol=1e-12, atol=1e-12)
    assert info.iterations == min(max_iter, info.iterations)


def test_branch_free_cg_freezes_at_negative_curvature_like_the_reference():
    A = torch.diag(torch.tensor([2.0, -1.0, 3.0]))
    cg = bl.linalg.CG(max_iter=5)
    with pytest.warns(bl.ConvergenceWarning, match="p\\^T A p <= 0"):
        x_ref, _ = cg(lambda v: A @ v, torch.ones(3))
    torch.testing.assert_close(cg.solve_fixed(lambda v: A @ v, torch.ones(3)), x_ref)


@pytest.mark.parametrize("name, options", [("cg", {"max_iter": 12}), ("neumann", {"max_iter": 400, "step_size": 0.05})])
def test_linear_solvers_under_vmap(name, options):
    As = torch.stack([bl.testing.random_spd(6, 10.0, seed=i) for i in range(4)])
    bs = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    solver = bl.linalg.get(name, **options)
    assert solver.vmappable
    xs = torch.func.vmap(lambda A, b: solver(lambda v: A @ v, b)[0])(As, bs)
    torch.testing.assert_close(xs, torch.linalg.solve(As, bs), rtol=1e-8, atol=1e-8)


def test_neumann_with_power_iteration_refuses_vmap():
    solver = bl.linalg.get("neumann")
    assert not solver.vmappable
    with pytest.raises(RuntimeError, match="cannot run inside torch.func.vmap"):
        torch.func.vmap(lambda b: solver(lambda v: 2.0 * v, b)[0])(torch.ones(3, 2))


def test_damping_solves_the_shifted_system_and_defines_an_indefinite_case():
    A = torch.diag(torch.tensor([2.0, -0.5, 3.0]))
    b = torch.ones(3)
    x, info = bl.linalg.get("cg", damping=1.0)(lambda v: A @ v, b)
    assert info.converged
    torch.testing.assert_close(x, b / torch.tensor([3.0, 0.5, 4.0]))
    x, info = bl.linalg.get("neumann", damping=1.0, step_size=0.2, max_iter=500)(lambda v: A @ v, b)
    torch.testing.assert_close(x, b / torch.tensor([3.0, 0.5, 4.0]))
    with pytest.raises(ValueError, match="Invalid damping"):
        bl.linalg.get("cg", damping=-1.0)


def test_damped_hypergradient_equals_a_larger_lam_in_the_backward_only():
    ref = bl.testing.proximal_quadratic(dim=8, lam=2.0, condition_number=5.0, seed=1)
    phi = ref.solution()
    g_damped, _ = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data,
                                   linear_solver=bl.linalg.get("cg", damping=0.5, tol=1e-13))
    grad_f = torch.func.grad(lambda p: ref.outer(p, ref.theta))(phi)
    expected = 2.0 * torch.linalg.solve(ref.data["A"] + 2.5 * torch.eye(8), grad_f)
    torch.testing.assert_close(g_damped, expected, rtol=1e-10, atol=1e-12)


def test_hypergradient_under_vmap_matches_the_loop():
    refs = [bl.testing.ridge_regression(seed=s) for s in range(3)]
    X = torch.stack([r.data["X"] for r in refs])
    y = torch.stack([r.data["y"] for r in refs])
    problem, theta = refs[0].problem, refs[0].theta
    solver = bl.solvers.get("gd", step_size=0.002, max_iter=300, tol=0.0)
    linear = bl.linalg.get("cg", max_iter=20, tol=0.0)

    def one(X, y):
        data = {"X": X, "y": y}
        phi = bl.solve(problem, theta, data, solver=solver, phi0=torch.zeros(8)).phi
        return bl.hypergradient(problem, lambda w, t: (w ** 2).sum() + t.sum(), theta, phi, data,
                                linear_solver=linear)[0]

    batched = torch.func.vmap(one)(X, y)
    loop = torch.stack([one(X[i], y[i]) for i in range(3)])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


def test_cg_under_vmap_flags_negative_curvature_per_system():
    As = torch.stack([torch.diag(torch.tensor([2.0, 1.0, 3.0])), torch.diag(torch.tensor([2.0, -1.0, 3.0]))])
    flags = torch.func.vmap(lambda A: bl.linalg.get("cg", max_iter=5)(lambda v: A @ v, torch.ones(3))[1]
                            .extra["negative_curvature"])(As)
    assert flags.tolist() == [False, True]
