"""Gauss-Newton curvature (hvp="gauss_newton"): the products are J^T H_c J v + lam v, exact for linear
predictors, positive semi-definite where the exact Hessian is not, and they run under vmap."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
from bilevel import tree as T
from bilevel._linearize import linearize

N, D, H, C = 24, 4, 6, 3


def mlp(phi, data):
    return torch.tanh(data[0] @ phi["w1"]) @ phi["w2"]


def softplus_criterion(out, data):  # a convex criterion given as a callable
    return F.softplus(out - data[1][:, None]).mean()


def make_data(gen, regression=False):
    X = torch.randn(N, D, generator=gen)
    y = torch.randn(N, C, generator=gen) if regression else torch.randint(0, C, (N,), generator=gen)
    return X, y


def random_phi(gen, scale=1.0):
    return {"w1": scale * torch.randn(D, H, generator=gen), "w2": scale * torch.randn(H, C, generator=gen)}


@pytest.mark.parametrize("mode", bl.linalg.GAUSS_NEWTON_MODES)
@pytest.mark.parametrize("criterion", ["cross_entropy", "mse", softplus_criterion])
def test_products_equal_the_explicit_gauss_newton_matrix(gen, criterion, mode):
    regression = criterion == "mse"
    X, y = make_data(gen, regression)
    if criterion is softplus_criterion:
        y = torch.randn(N, generator=gen)
    data = (X, y)
    lam = {"w1": torch.rand(D, H, generator=gen) + 0.1, "w2": torch.tensor(0.7)}
    problem = bl.ProximalProblem(bl.PredictionLoss(mlp, criterion), lam)
    phi, theta = random_phi(gen), random_phi(gen)
    x, spec = T.flatten(phi)
    y_flat, _ = T.flatten(theta)
    lin = linearize(problem, x, spec, y_flat, spec, data, [], mode)

    def outputs(v):
        return mlp(T.unflatten(v, spec), data).reshape(-1)

    J = torch.autograd.functional.jacobian(outputs, x)
    crit = problem.loss.criterion
    Hc = torch.autograd.functional.hessian(lambda o: crit(o.reshape(N, C), data), outputs(x))
    lam_diag = torch.cat([lam["w1"].reshape(-1), torch.full((H * C,), 0.7)])
    M = J.T @ Hc @ J + torch.diag(lam_diag)
    for _ in range(3):
        v = torch.randn(x.shape, generator=gen)
        torch.testing.assert_close(lin.hvp(v), M @ v, rtol=1e-10, atol=1e-12)
    # the gradient is the exact one, not an approximation
    exact = torch.func.grad(lambda v: problem.value(T.unflatten(v, spec), theta, data))(x)
    torch.testing.assert_close(lin.grad, exact)
    assert lin.count == 3 and lin.mode == mode


def test_linear_predictor_cross_entropy_gives_the_exact_hypergradient(gen):
    """For a linear predictor the Gauss-Newton matrix is the Hessian: same hypergradient as the exact modes."""
    X, y = make_data(gen)
    problem = bl.ProximalProblem(bl.PredictionLoss(lambda w, d: d[0] @ w, "cross_entropy"), lam=0.5)
    theta = torch.randn(D, C, generator=gen)
    phi = bl.solve(problem, theta, (X, y), solver=bl.solvers.get("newton_cg", tol=1e-12)).phi
    Xq, yq = make_data(gen)

    def outer(w, t):
        return F.cross_entropy(Xq @ w, yq)

    lin = bl.linalg.get("cg", max_iter=200, tol=1e-13)
    g_gn, info = bl.hypergradient(problem, outer, theta, phi, (X, y), linear_solver=lin, hvp="gauss_newton")
    g_ex, _ = bl.hypergradient(problem, outer, theta, phi, (X, y), linear_solver=lin, hvp="reverse")
    torch.testing.assert_close(g_gn, g_ex, rtol=1e-9, atol=1e-12)
    assert info.converged and info.hvp_mode == "gauss_newton"
    # and both agree with central finite differences of F(theta) = outer(phi*(theta))
    solver = bl.solvers.get("newton_cg", tol=1e-13)

    def F_of(t):
        return outer(bl.solve(problem, t, (X, y), solver=solver, phi0=phi).phi, t)

    e = torch.zeros_like(theta)
    e[1, 2] = 1e-5
    fd = (F_of(theta + e) - F_of(theta - e)) / 2e-5
    assert float(g_gn[1, 2]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_ridge_regression_matches_the_closed_form(gen):
    """MSE of a linear model: G = 1/2 mean||Xw - y||^2 + lam/2 ||w - theta||^2, solved in closed form."""
    n, d, lam = 30, 5, 0.8
    X, y = torch.randn(n, d, generator=gen), torch.randn(n, 1, generator=gen)
    Xv, yv = torch.randn(n, d, generator=gen), torch.randn(n, 1, generator=gen)
    problem = bl.ProximalProblem(bl.PredictionLoss(lambda w, dat: dat[0] @ w, "mse"), lam=lam)
    theta = torch.randn(d, 1, generator=gen)
    A = X.T @ X / n + lam * torch.eye(d)  # mse is averaged over the n entries of y (one column)
    w_star = torch.linalg.solve(A, X.T @ y / n + lam * theta)
    phi = bl.solve(problem, theta, (X, y), solver=bl.solvers.get("newton_cg", tol=1e-12)).phi
    torch.testing.assert_close(phi, w_star, rtol=1e-8, atol=1e-10)

    def outer(w, t):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    exact = lam * torch.linalg.solve(A, Xv.T @ (Xv @ w_star - yv) / n)
    g, _ = bl.hypergradient(problem, outer, theta, phi, (X, y), linear_solver=bl.linalg.get("cg", max_iter=50,
                                                                                            tol=1e-13),
                            hvp="gauss_newton")
    torch.testing.assert_close(g, exact, rtol=1e-8, atol=1e-10)


def test_learned_lam_gets_the_exact_gradient_through_argmin(gen):
    """The mixed term (theta and a learned lam) is exact: a linear predictor gives the same lam.grad as 'reverse'."""
    X, y = make_data(gen)
    theta0 = torch.randn(D, C, generator=gen)
    Xq, yq = make_data(gen)
    grads = {}
    for mode in ("reverse", "gauss_newton"):
        theta = theta0.clone().requires_grad_(True)
        log_lam = torch.zeros(D, C, requires_grad=True)
        problem = bl.ProximalProblem(bl.PredictionLoss(lambda w, d: d[0] @ w), lam=torch.exp(log_lam))
        phi = bl.argmin(problem, theta, (X, y), solver=bl.solvers.get("newton_cg", tol=1e-12),
                        linear_solver=bl.linalg.get("cg", max_iter=200, tol=1e-13), hvp=mode)
        F.cross_entropy(Xq @ phi, yq).backward()
        grads[mode] = (theta.grad, log_lam.grad)
    torch.testing.assert_close(grads["gauss_newton"][0], grads["reverse"][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads["gauss_newton"][1], grads["reverse"][1], rtol=1e-9, atol=1e-12)
    assert float(grads["gauss_newton"][1].abs().sum()) > 0


def test_no_negative_curvature_where_the_exact_hessian_has_some(gen):
    """A tanh network with a weak proximal term: the Hessian of G is indefinite, its Gauss-Newton matrix is not."""
    X, y = make_data(gen)
    problem = bl.ProximalProblem(bl.PredictionLoss(mlp), lam=1e-3)
    theta = random_phi(gen, scale=2.0)
    exact = bl.bounds.hessian_extremes(problem, theta, theta, (X, y), max_iter=40, hvp="reverse")
    gn = bl.bounds.hessian_extremes(problem, theta, theta, (X, y), max_iter=40, hvp="gauss_newton")
    assert exact.lambda_min < 0 < gn.lambda_min
    assert gn.lambda_min >= 1e-3 * (1 - 1e-6)

    def outer(p, t):
        return F.cross_entropy(mlp(p, (X, y)), y)

    lin = bl.linalg.get("cg", max_iter=60, tol=1e-10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info_ex = bl.hypergradient(problem, outer, theta, theta, (X, y), linear_solver=lin, hvp="reverse")
        _, info_gn = bl.hypergradient(problem, outer, theta, theta, (X, y), linear_solver=lin, hvp="gauss_newton")
    assert info_ex.status is bl.LinearSolveStatus.NEGATIVE_CURVATURE
    assert info_gn.status is not bl.LinearSolveStatus.NEGATIVE_CURVATURE
    assert any("p^T A p" in str(w.message) for w in caught)


@pytest.mark.parametrize("mode", bl.linalg.GAUSS_NEWTON_MODES)
def test_under_vmap_equals_the_loop(gen, mode):
    n_tasks = 3
    Xs, ys = torch.randn(n_tasks, N, D, generator=gen), torch.randint(0, C, (n_tasks, N), generator=gen)
    problem = bl.ProximalProblem(bl.PredictionLoss(mlp), lam=1.5)
    theta = random_phi(gen, scale=0.5)
    solver = bl.solvers.get("gd", step_size=0.1, max_iter=20, tol=0.0)
    lin = bl.linalg.get("cg", max_iter=6, tol=0.0)

    def one(X, y):
        phi = bl.solve(problem, theta, (X, y), solver=solver).phi
        g, _ = bl.hypergradient(problem, lambda p, t: F.cross_entropy(mlp(p, (X, y)), y), theta, phi, (X, y),
                                linear_solver=lin, hvp=mode)
        return g

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.ConvergenceWarning)
        batched = torch.func.vmap(one)(Xs, ys)
        looped = [one(Xs[i], ys[i]) for i in range(n_tasks)]
    for k in theta:
        torch.testing.assert_close(batched[k], torch.stack([g[k] for g in looped]), rtol=1e-10, atol=1e-12)


def test_clear_errors(gen):
    X, y = make_data(gen)
    theta = random_phi(gen)
    plain = bl.ProximalProblem(lambda p, d: F.cross_entropy(mlp(p, d), d[1]), lam=1.0)
    with pytest.raises(ValueError, match=r"hvp='gauss_newton' needs .*bl\.PredictionLoss\(predict, criterion\)"):
        bl.argmin(plain, theta, (X, y), hvp="gauss_newton")
    with pytest.raises(ValueError, match="gauss_newton"):
        bl.implicit_vjp(bl.InnerProblem(lambda p, t, d: (p["w1"] ** 2).sum()), theta, theta, None, theta,
                        hvp="gauss_newton")
    with pytest.raises(ValueError, match=r"hvp='gauss_newton_jacobian' needs .*bl\.PredictionLoss"):
        bl.argmin(plain, theta, (X, y), hvp="gauss_newton_jacobian")
    with pytest.raises(ValueError, match=r"unknown hvp mode 'gn'; available: reverse, forward, gauss_newton"):
        bl.implicit_vjp(plain, theta, theta, (X, y), theta, hvp="gn")
    with pytest.raises(ValueError, match=r"unknown criterion 'hinge'; available: cross_entropy, mse"):
        bl.PredictionLoss(mlp, "hinge")
    with pytest.raises(TypeError, match="predict must be callable"):
        bl.PredictionLoss("net")
    with pytest.raises(TypeError, match=r"reads the targets as data\[-1\]"):
        bl.PredictionLoss(lambda p, d: d @ p["w1"], "cross_entropy")(theta, X)
    with pytest.raises(ValueError, match="Linearization computes exact Hessian products"):
        bl.linalg.Linearization(lambda a, b, e: (a ** 2).sum(), torch.ones(2), torch.ones(2), (), "gauss_newton")


def test_prediction_loss_is_the_composed_loss(gen):
    X, y = make_data(gen)
    phi = random_phi(gen)
    loss = bl.PredictionLoss(mlp)
    assert float(loss(phi, (X, y))) == pytest.approx(float(F.cross_entropy(mlp(phi, (X, y)), y)), rel=1e-14)
    assert "cross_entropy" in repr(loss)
    problem = bl.ProximalProblem(loss, lam=2.0)
    assert problem.gauss_newton_parts() is not None
    assert bl.ProximalProblem(lambda p, d: loss(p, d), lam=2.0).gauss_newton_parts() is None


@pytest.mark.parametrize("mode", bl.linalg.GAUSS_NEWTON_MODES)
def test_tree_outputs_give_the_same_products_inside_and_outside_vmap(gen, mode):
    """predict may return a tree: (logits, extra output) with a criterion over both equals one stacked output."""
    X, y = make_data(gen)
    target = torch.randn(N, 2, generator=gen)

    def two_heads(phi, data):
        h = torch.tanh(data[0] @ phi["w1"])
        return {"logits": h @ phi["w2"], "reg": h[:, :2]}

    def crit_tree(out, data):
        return F.cross_entropy(out["logits"], data[1]) + 0.5 * ((out["reg"] - target) ** 2).mean()

    def stacked(phi, data):
        o = two_heads(phi, data)
        return torch.cat([o["logits"], o["reg"]], dim=1)

    def crit_stacked(out, data):
        return crit_tree({"logits": out[:, :C], "reg": out[:, C:]}, data)

    phi, theta = random_phi(gen), random_phi(gen)
    x, spec = T.flatten(phi)
    yf, _ = T.flatten(theta)
    v = torch.randn(x.shape, generator=gen)
    tree = linearize(bl.ProximalProblem(bl.PredictionLoss(two_heads, crit_tree), 0.5), x, spec, yf, spec, (X, y),
                     [], mode)
    flat = linearize(bl.ProximalProblem(bl.PredictionLoss(stacked, crit_stacked), 0.5), x, spec, yf, spec, (X, y),
                     [], "gauss_newton")
    expected = flat.hvp(v)
    torch.testing.assert_close(tree.hvp(v), expected, rtol=1e-12, atol=1e-12)
    batched = torch.func.vmap(tree.hvp)(torch.stack([v, 2 * v]))  # the torch.func branch
    torch.testing.assert_close(batched[1], 2 * expected, rtol=1e-12, atol=1e-12)



def test_jacobian_mode_builds_only_the_rows_the_criterion_needs(gen):
    """Cross-entropy's Hessian on the outputs has rank C - 1 per example: N (C - 1) vector-Jacobian
    products build the matrix, not N C, and the products stay those of J^T H_c J."""
    X, y = make_data(gen)
    problem = bl.ProximalProblem(bl.PredictionLoss(mlp, "cross_entropy"), 0.5)
    phi = random_phi(gen)
    x, spec = T.flatten(phi)
    lin = linearize(problem, x, spec, x.clone(), spec, (X, y), [], "gauss_newton_jacobian")
    assert lin._J.shape == (N * (C - 1), x.numel())
    free = linearize(problem, x, spec, x.clone(), spec, (X, y), [], "gauss_newton")
    for _ in range(3):
        v = torch.randn(x.shape, generator=gen)
        torch.testing.assert_close(lin.hvp(v), free.hvp(v), rtol=1e-10, atol=1e-12)


def test_jacobian_mode_keeps_the_sign_of_an_indefinite_criterion(gen):
    """A criterion that is not convex: its Hessian's negative directions are kept with their sign."""
    X, _ = make_data(gen)
    y = torch.randn(N, C, generator=gen)

    def wavy(out, data):
        return torch.cos(out - data[1]).sum() / N

    problem = bl.ProximalProblem(bl.PredictionLoss(mlp, wavy), 0.3)
    phi = random_phi(gen)
    x, spec = T.flatten(phi)
    data = (X, y)
    lin = linearize(problem, x, spec, x.clone(), spec, data, [], "gauss_newton_jacobian")
    assert bool((lin._H < 0).any()) and bool((lin._H > 0).any())

    def outputs(v):
        return mlp(T.unflatten(v, spec), data).reshape(-1)

    J = torch.autograd.functional.jacobian(outputs, x)
    Hc = torch.autograd.functional.hessian(lambda o: wavy(o.reshape(N, C), data), outputs(x))
    M = J.T @ Hc @ J + 0.3 * torch.eye(x.numel())
    v = torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(lin.hvp(v), M @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", *bl.linalg.GAUSS_NEWTON_MODES])
def test_a_solve_result_as_phi_reuses_its_gradient_norm(gen, mode):
    """bl.hypergradient / bl.implicit_vjp take bl.solve's result for phi: the same hypergradient, and the
    inner gradient's norm is the solver's last measurement (Gauss-Newton then skips computing it)."""
    X, y = make_data(gen)
    problem = bl.ProximalProblem(bl.PredictionLoss(mlp, "cross_entropy"), 0.5)
    theta = random_phi(gen)
    data = (X, y)
    result = bl.solve(problem, theta, data, solver=bl.solvers.get("gd", step_size=0.2, max_iter=5, tol=0.0))

    def outer(p, t):
        return F.cross_entropy(mlp(p, data), y) + 0.1 * (t["w2"] ** 2).sum()

    g_phi, info_phi = bl.hypergradient(problem, outer, theta, result.phi, data, hvp=mode)
    g_res, info_res = bl.hypergradient(problem, outer, theta, result, data, hvp=mode)
    for k in theta:
        torch.testing.assert_close(g_res[k], g_phi[k], rtol=1e-12, atol=1e-14)
    assert info_res.inner_grad_norm == result.grad_norm
    assert info_phi.inner_grad_norm == pytest.approx(result.grad_norm, rel=1e-10)
    cot = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    v_res, _ = bl.implicit_vjp(problem, theta, result, data, cot, hvp=mode)
    v_phi, _ = bl.implicit_vjp(problem, theta, result.phi, data, cot, hvp=mode)
    for k in theta:
        torch.testing.assert_close(v_res[k], v_phi[k], rtol=1e-12, atol=1e-14)
