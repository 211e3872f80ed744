"""Roots, fixed points and composite (non-smooth, constrained) inner problems: closed forms and finite differences."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl

DT = torch.float64


def dense_solve(matvec, b):
    """A user's linear solver: the matrix column by column, then LAPACK."""
    A = torch.stack([matvec(e) for e in torch.eye(b.numel(), dtype=b.dtype)], dim=1)
    return torch.linalg.solve(A, b)


def central_difference(f, theta, eps=1e-6):
    return torch.stack([(f(theta + eps * e) - f(theta - eps * e)) / (2 * eps)
                        for e in torch.eye(theta.numel(), dtype=theta.dtype)])


# ------------------------------------------------------------------------------------ a deep-equilibrium layer

def deq(seed=0, n=6, m=3):
    g = torch.Generator().manual_seed(seed)
    W = 0.9 * torch.randn(n, n, generator=g, dtype=DT) / n ** 0.5
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)  # a contraction: ||W|| < 1, tanh is 1-Lipschitz
    U = torch.randn(n, m, generator=g, dtype=DT)
    target = torch.randn(n, generator=g, dtype=DT)
    problem = bl.FixedPointProblem(lambda x, theta, data: torch.tanh(W @ x + U @ theta), name="deq")
    theta = torch.randn(m, generator=g, dtype=DT)
    return problem, theta, target


@pytest.mark.parametrize("linear_solver", ["default", "dense"])
def test_a_deq_fixed_point_hypergradient_matches_finite_differences(linear_solver):
    problem, theta0, target = deq()
    lin = None if linear_solver == "default" else bl.linalg.get(dense_solve)
    theta = theta0.clone().requires_grad_(True)
    x = bl.root(problem, theta, solver=bl.roots.get("anderson", tol=1e-13), linear_solver=lin,
                phi0=torch.zeros(6, dtype=DT))
    ((x - target) ** 2).sum().backward()

    def loss(t):
        z = bl.solve_root(problem, t, solver=bl.roots.get("anderson", tol=1e-14), phi0=torch.zeros(6, dtype=DT)).phi
        return ((z - target) ** 2).sum()
    fd = central_difference(loss, theta0)
    torch.testing.assert_close(theta.grad, fd, rtol=1e-6, atol=1e-9)


def test_the_cube_root_has_its_closed_form_derivative():
    theta = torch.tensor([8.0, 27.0], dtype=DT, requires_grad=True)
    problem = bl.RootProblem(lambda phi, theta, data: phi ** 3 - theta)
    phi = bl.root(problem, theta, solver=bl.roots.get("newton_krylov", tol=1e-13), phi0=torch.ones(2, dtype=DT))
    torch.testing.assert_close(phi.detach(), torch.tensor([2.0, 3.0], dtype=DT), rtol=1e-12, atol=1e-12)
    phi.sum().backward()
    torch.testing.assert_close(theta.grad, 1 / (3 * theta.detach() ** (2 / 3)), rtol=1e-10, atol=0)


def test_a_tree_phi_and_a_tree_theta():
    problem = bl.FixedPointProblem(lambda z, th, d: {"a": 0.5 * z["b"] + th["u"], "b": 0.25 * z["a"] - th["v"]})
    theta = {"u": torch.tensor(1.0, dtype=DT, requires_grad=True), "v": torch.tensor(2.0, dtype=DT,
                                                                                       requires_grad=True)}
    z = bl.root(problem, theta, phi0={"a": torch.tensor(0.0, dtype=DT), "b": torch.tensor(0.0, dtype=DT)})
    # a = 0.5 b + u, b = 0.25 a - v  =>  a = (u - v/2) / (7/8), b = 0.25 a - v
    (z["a"] + z["b"]).backward()
    torch.testing.assert_close(theta["u"].grad, torch.tensor(1.25 * 8 / 7, dtype=DT))
    torch.testing.assert_close(theta["v"].grad, torch.tensor(-1.25 * 4 / 7 - 1.0, dtype=DT))


# --------------------------------------------------------------------------------- every registered root solver

def _contraction():
    A = torch.tensor([[0.3, 0.1], [-0.2, 0.4]], dtype=DT)
    return bl.FixedPointProblem(lambda z, th, d: torch.tanh(A @ z) + th), torch.tensor([0.5, -1.0], dtype=DT)


def _cvxpy_nonneg_build(theta, data):
    import cvxpy as cp

    z = cp.Variable(2)
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - theta)), [z >= 0]), z


#: solver -> (options, the problem kind it solves)
ROOT_SETTINGS = {
    "fixed_point": ({"tol": 1e-12}, "fixed_point"),
    "anderson": ({"tol": 1e-12}, "fixed_point"),
    "newton_krylov": ({"tol": 1e-12}, "fixed_point"),
    "ista": ({"tol": 1e-12}, "composite"),
    "fista": ({"tol": 1e-12}, "composite"),
    "cvxpy": ({"tol": 1e-6, "build": _cvxpy_nonneg_build, "solver": "CLARABEL"}, "composite"),
}


def test_every_registered_root_solver_has_settings():
    assert sorted(ROOT_SETTINGS) == bl.roots.available()


@pytest.mark.parametrize("name", sorted(ROOT_SETTINGS))
def test_every_root_solver_finds_the_solution_and_its_hypergradient(name):
    options, kind = ROOT_SETTINGS[name]
    if kind == "fixed_point":
        problem, theta0 = _contraction()
        z_ref = bl.solve_root(problem, theta0, solver=bl.roots.get("fixed_point", tol=1e-14),
                              phi0=torch.zeros(2, dtype=DT)).phi
    else:
        problem = bl.CompositeProblem(lambda z, th, d: 0.5 * ((z - th) ** 2).sum(), bl.prox.NonNegative())
        theta0 = torch.tensor([1.0, -1.0], dtype=DT)
        z_ref = torch.tensor([1.0, 0.0], dtype=DT)
    theta = theta0.clone().requires_grad_(True)
    z, res = bl.root(problem, theta, solver=bl.roots.get(name, **options), phi0=torch.zeros(2, dtype=DT),
                     full_output=True)
    assert res.converged and res.status is bl.RootStatus.CONVERGED, res
    torch.testing.assert_close(z.detach(), z_ref, rtol=0, atol=10 * options["tol"])
    z.sum().backward()
    if kind == "composite":  # d z / d theta = diag(1, 0): the bound coordinate does not move
        torch.testing.assert_close(theta.grad, torch.tensor([1.0, 0.0], dtype=DT), rtol=1e-6, atol=1e-6)
    else:
        fd = central_difference(lambda t: bl.solve_root(problem, t, solver=bl.roots.get("fixed_point", tol=1e-14),
                                                        phi0=torch.zeros(2, dtype=DT)).phi.sum(), theta0)
        torch.testing.assert_close(theta.grad, fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["fixed_point", "anderson"])
@pytest.mark.parametrize("max_iter", [1, 6, 30])
def test_a_fixed_budget_reads_back_once_with_the_step_by_step_result(name, max_iter):
    problem, theta = _contraction()
    fast = bl.solve_root(problem, theta, solver=bl.roots.get(name, tol=0.0, max_iter=max_iter),
                         phi0=torch.zeros(2, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.BudgetWarning)
        slow = bl.solve_root(problem, theta, solver=bl.roots.get(name, tol=1e-300, max_iter=max_iter),
                             phi0=torch.zeros(2, dtype=DT))
    assert torch.equal(fast.phi, slow.phi) and fast.history == slow.history
    assert (fast.status, fast.iterations) == (slow.status, slow.iterations)


def test_rtol_stops_relative_to_the_start_whatever_the_units():
    problem, theta = _contraction()
    iterations = []
    for scale in (1.0, 1e6):
        scaled = bl.FixedPointProblem(lambda z, th, d, s=scale: s * problem.mapping(z / s, th / s, d))
        res = bl.solve_root(scaled, theta * scale, solver=bl.roots.get("fixed_point", tol=0.0, rtol=1e-8,
                                                                        max_iter=1000),
                            phi0=torch.zeros(2, dtype=DT))
        assert res.converged
        iterations.append(res.iterations)
    assert iterations[0] == iterations[1]


def test_an_inner_problem_through_root_is_argmin():
    ref = bl.testing.ridge_regression(seed=0)
    solver = bl.solvers.get("newton_cg", tol=1e-12)
    t1 = ref.theta.clone().requires_grad_(True)
    t2 = ref.theta.clone().requires_grad_(True)
    ref.outer(bl.root(ref.problem, t1, ref.data, solver=solver, phi0=ref.phi0), t1).backward()
    ref.outer(bl.argmin(ref.problem, t2, ref.data, solver=solver, phi0=ref.phi0), t2).backward()
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ composite: lasso, box-QP

def lasso_data(seed=0, n=50, p=10):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    w_true = torch.zeros(p, dtype=DT)
    w_true[:3] = torch.tensor([2.0, -1.5, 1.0], dtype=DT)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n, p, generator=g, dtype=DT)
    yv = Xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT)
    return X, y, Xv, yv


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_lasso_and_elastic_net_hypergradients_are_exact_on_the_active_set(l2):
    X, y, Xv, yv = lasso_data()
    n = X.shape[0]
    reg = bl.prox.L1(lambda t: t.exp()) if l2 == 0 else bl.prox.ElasticNet(lambda t: t.exp(), l2)
    problem = bl.CompositeProblem(lambda w, t, d: 0.5 * ((d[0] @ w - d[1]) ** 2).sum() / n, reg)
    theta = torch.tensor(-2.0, dtype=DT, requires_grad=True)  # log of the l1 strength
    w = bl.root(problem, theta, (X, y), solver=bl.roots.get("fista", tol=1e-12), phi0=torch.zeros(10, dtype=DT))
    (0.5 * ((Xv @ w - yv) ** 2).mean()).backward()
    wd = w.detach()
    S = wd != 0
    assert 0 < int(S.sum()) < 10  # some coordinates are exactly zero: the non-smooth case
    # on the support: (X_S^T X_S / n + l2 I) w_S = X_S^T y / n - lam sign(w_S)  =>  dw_S/dlam = -A^-1 sign
    A = X[:, S].T @ X[:, S] / n + l2 * torch.eye(int(S.sum()), dtype=DT)
    dw = -torch.linalg.solve(A, torch.sign(wd[S]))
    g_val = (Xv.T @ (Xv @ wd - yv) / n)[S]
    exact = g_val @ dw * theta.detach().exp()
    torch.testing.assert_close(theta.grad, exact, rtol=1e-8, atol=1e-12)


def box_qp(seed=3, n=6, m=3):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = M @ M.T + n * torch.eye(n, dtype=DT)
    B = torch.randn(n, m, generator=g, dtype=DT)
    theta = 3.0 * torch.randn(m, generator=g, dtype=DT)
    return A, B, theta


def test_a_box_qp_whose_constraints_bind_through_the_composite_and_the_cvxpy_paths():
    cp = pytest.importorskip("cvxpy", reason="cvxpy is a declared dependency; this path needs it")
    A, B, theta0 = box_qp()
    lo, hi = -0.5, 0.5
    smooth = lambda z, t, d: 0.5 * z @ (A @ z) - (B @ t) @ z  # noqa: E731
    problem = bl.CompositeProblem(smooth, bl.prox.Box(lo, hi))

    def build(t, d):
        z = cp.Variable(6)
        objective = 0.5 * cp.quad_form(z, A.numpy()) - (B.numpy() @ t) @ z
        return cp.Problem(cp.Minimize(objective), [z >= lo, z <= hi]), z
    cvx = bl.roots.get("cvxpy", build=build, solver="CLARABEL", tol=1e-6,
                       solver_options={"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12})
    grads = {}
    for name, solver in {"fista": bl.roots.get("fista", tol=1e-12), "cvxpy": cvx}.items():
        theta = theta0.clone().requires_grad_(True)
        z = bl.root(problem, theta, solver=solver, phi0=torch.zeros(6, dtype=DT))
        zd = z.detach()
        free = (zd > lo + 1e-6) & (zd < hi - 1e-6)
        assert 0 < int(free.sum()) < 6  # some constraints bind
        z.sum().backward()
        grads[name] = theta.grad
        # closed form: bound coordinates are constant, free ones solve A_FF z_F = (B theta)_F - A_FC z_C
        exact = torch.zeros(6, 3, dtype=DT)
        exact[free] = torch.linalg.solve(A[free][:, free], B[free])
        torch.testing.assert_close(theta.grad, exact.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["fista"], grads["cvxpy"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- failures

def test_bad_problems_and_solvers_are_named():
    with pytest.raises(TypeError, match="bl.RootProblem"):
        bl.solve_root(object(), torch.zeros(2))
    with pytest.raises(TypeError, match="residual must be callable"):
        bl.RootProblem(3)
    problem, theta = _contraction()
    with pytest.raises(TypeError, match="solves a bl.CompositeProblem"):
        bl.solve_root(problem, theta, solver="ista", phi0=torch.zeros(2, dtype=DT))
    wrong = bl.RootProblem(lambda z, t, d: z.sum())
    with pytest.raises(ValueError, match="F must have phi's structure"):
        bl.solve_root(wrong, torch.zeros(2, dtype=DT))
    with pytest.raises(TypeError, match="regulariser must be a bilevel.prox.Regulariser"):
        bl.CompositeProblem(lambda z, t, d: z.sum(), "l1")
    with pytest.raises(ValueError, match="phi0 is needed"):
        bl.solve_root(problem, None)


def test_a_non_finite_cotangent_is_an_error_not_a_zero_gradient():
    problem, theta0 = _contraction()
    theta = theta0.clone().requires_grad_(True)
    z = bl.root(problem, theta, phi0=torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError, match="not finite"):
        (z * float("nan")).sum().backward()
    assert theta.grad is None


def test_a_diverging_map_is_flagged():
    problem = bl.FixedPointProblem(lambda z, t, d: 3.0 * z + t)
    with pytest.warns(bl.BreakdownWarning):
        res = bl.solve_root(problem, torch.ones(2, dtype=DT), solver=bl.roots.get("fixed_point", max_iter=50),
                            phi0=torch.zeros(2, dtype=DT))
    assert res.status in (bl.RootStatus.DIVERGED, bl.RootStatus.NONFINITE) and not res.converged
