"""bl.compiled_hypergradient: the closed form and finite differences for every solver it accepts, the
compiled graph equal to its eager run, diagnostics read back once (warnings as the eager path gives
them), clear errors, and a clean eager fallback when torch.compile fails."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl

F64 = torch.float64


def quadratic():
    return bl.testing.proximal_quadratic(dim=6, seed=3, condition_number=10.0)


def fixed_gd(ref, max_iter=400):
    return bl.solvers.get("gd", step_size=1.0 / ref.smoothness, max_iter=max_iter, tol=0.0)


def fixed_agd(ref, max_iter=150):
    return bl.solvers.get("agd", step_size=1.0 / ref.smoothness, mu=ref.strongly_convex, max_iter=max_iter,
                          tol=0.0)


def exact_callable(ref):
    """A callable inner solver in torch operations: the quadratic's minimiser by CG (itself fixed-budget)."""
    lam = ref.problem.lam
    inner_cg = bl.linalg.get("cg", max_iter=20, tol=1e-14, warn=False)

    def solve(problem, theta, data, phi0):
        phi, _ = inner_cg(lambda u: data["A"] @ u + lam * u, lam * theta - data["b"], x0=phi0)
        return phi
    return bl.solvers.get(solve, tol=1e-8)


SOLVERS = {"gd": fixed_gd, "agd": fixed_agd, "callable": exact_callable}

# every linear solver with a fixed-budget path (Neumann: with a fixed step, below 2 / L)
LINEAR = {name: (lambda ref, name=name: bl.linalg.get(name, max_iter=60, tol=1e-12))
          for name in ("cg", "minres", "gmres", "bicgstab", "normal_cg")}
LINEAR["neumann"] = lambda ref: bl.linalg.get("neumann", max_iter=400, tol=1e-12, step_size=1.0 / ref.smoothness)


@pytest.mark.parametrize("linear", sorted(LINEAR))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_the_closed_form_for_every_accepted_solver(solver, linear):
    ref = quadratic()
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=SOLVERS[solver](ref),
                                   linear_solver=LINEAR[linear](ref), compile=False)
    g, info = hg(ref.theta, ref.data, phi0=ref.phi0)
    torch.testing.assert_close(g, ref.hypergradient(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(info.phi, ref.solution(), rtol=1e-8, atol=1e-10)
    assert info.backward.converged and info.backward.residual_norm < 1e-9
    assert info.inner.grad_norm < 1e-7 and info.value == pytest.approx(float(ref.value()), rel=1e-9)
    assert not info.compiled


def test_finite_differences_of_the_outer_objective():
    """dF/dtheta against central differences of F(theta) = outer(phi*(theta), theta), phi* solved exactly."""
    ref = quadratic()
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=exact_callable(ref), linear_solver="cg",
                                   compile=False)
    g, _ = hg(ref.theta, ref.data, phi0=ref.phi0)
    A, b, lam = ref.data["A"], ref.data["b"], ref.problem.lam
    H = A + lam * torch.eye(6, dtype=F64)

    def F(theta):
        return ref.outer(torch.linalg.solve(H, lam * theta - b), theta)
    eps = 1e-6
    fd = torch.stack([(F(ref.theta + eps * e) - F(ref.theta - eps * e)) / (2 * eps) for e in torch.eye(6, dtype=F64)])
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_trees_and_outer_data():
    """theta as a dict, ProximalProblem on it, and a query set passed per call as outer_data."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=gen, dtype=F64), torch.randn(20, generator=gen, dtype=F64)
    xq, yq = torch.randn(15, 3, generator=gen, dtype=F64), torch.randn(15, generator=gen, dtype=F64)

    def loss(phi, data):
        xd, yd = data
        return ((xd @ phi["w"] + phi["b"] - yd) ** 2).mean()

    def outer(phi, theta, query):
        xd, yd = query
        return ((xd @ phi["w"] + phi["b"] - yd) ** 2).mean()

    problem = bl.ProximalProblem(loss, lam=2.0)
    theta = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros((), dtype=F64)}
    solver = bl.solvers.get("gd", step_size=0.2, max_iter=300, tol=0.0)
    hg = bl.compiled_hypergradient(problem, outer, solver=solver, linear_solver=bl.linalg.get("cg", max_iter=10),
                                   compile=False)
    g, info = hg(theta, (x, y), outer_data=(xq, yq))
    assert set(g) == {"w", "b"} and g["b"].shape == ()
    # the eager reference: bl.argmin and backward through the query loss
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    phi = bl.argmin(problem, leaves, (x, y), solver=solver, linear_solver=bl.linalg.get("cg", max_iter=10, tol=1e-12))
    outer(phi, leaves, (xq, yq)).backward()
    for k in theta:
        torch.testing.assert_close(g[k], leaves[k].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(info.phi["w"], phi["w"].detach(), rtol=1e-12, atol=1e-14)


def test_the_compiled_graph_equals_its_eager_run(compiled_or_skip):
    """One compile (second call), replayed at new theta values without recompiling; the same numbers as eager."""
    ref = bl.testing.proximal_quadratic(dim=4, seed=1)
    solver = bl.solvers.get("gd", step_size=1.0 / ref.smoothness, max_iter=30, tol=0.0)
    linear = bl.linalg.get("cg", max_iter=4, tol=1e-10, warn=False)
    compiled = bl.compiled_hypergradient(ref.problem, ref.outer, solver=solver, linear_solver=linear)
    eager = bl.compiled_hypergradient(ref.problem, ref.outer, solver=solver, linear_solver=linear, compile=False)
    thetas = [ref.theta, ref.theta + 0.1, ref.theta - 0.3]
    first, info0 = compiled(thetas[0], ref.data, phi0=ref.phi0)
    assert not info0.compiled  # the first call runs eagerly
    for theta in thetas:
        g, info = compiled_or_skip(lambda: compiled(theta, ref.data, phi0=ref.phi0))
        assert info.compiled
        g_e, info_e = eager(theta, ref.data, phi0=ref.phi0)
        torch.testing.assert_close(g, g_e, rtol=1e-10, atol=1e-12)
        assert info.backward.residual_norm == pytest.approx(info_e.backward.residual_norm, rel=1e-6, abs=1e-14)
        assert info.inner.grad_norm == pytest.approx(info_e.inner.grad_norm, rel=1e-6)
    assert compiled._compiled["single"] not in (None, False)


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    ref = quadratic()
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_agd(ref), linear_solver="cg")
    eager = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_agd(ref), linear_solver="cg",
                                      compile=False)

    def broken(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("simulated compiler failure")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    hg(ref.theta, ref.data)
    with pytest.warns(bl.CompileWarning, match="simulated compiler failure"):
        g, info = hg(ref.theta, ref.data)
    assert not info.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.CompileWarning)  # no second attempt, no second warning
        g2, _ = hg(ref.theta, ref.data)
    torch.testing.assert_close(g, eager(ref.theta, ref.data)[0], rtol=0, atol=0)
    torch.testing.assert_close(g2, g, rtol=0, atol=0)


def test_short_budgets_warn_as_the_eager_path_does():
    ref = quadratic()
    # a linear solve that cannot reach its tolerance in 2 iterations of a 6-dimensional system
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_agd(ref),
                                   linear_solver=bl.linalg.get("cg", max_iter=2, tol=1e-10), compile=False)
    with pytest.warns(bl.ConvergenceWarning, match="true relative residual"):
        _, info = hg(ref.theta, ref.data)
    assert not info.backward.converged and info.backward.relative_residual > 1e-10
    assert info.backward.status is bl.LinearSolveStatus.MAX_ITER
    # a callable whose answer is not stationary: judged by its tol, as bl.solve judges it
    rough = bl.solvers.get(lambda problem, theta, data, phi0: phi0, tol=1e-6)
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=rough, linear_solver="cg", compile=False)
    with pytest.warns(bl.ConvergenceWarning, match="did not reach"):
        _, info = hg(ref.theta, ref.data)
    assert not info.inner.converged and info.inner.grad_norm > 1e-6
    # a fixed inner budget (tol = 0) is not a failure: no warning
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_gd(ref, max_iter=5), linear_solver="cg",
                                   compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        _, info = hg(ref.theta, ref.data)
    assert info.inner.status is bl.SolverStatus.MAX_ITER and info.inner.iterations == 5


def test_non_finite_values_are_errors_that_name_their_source():
    ref = quadratic()
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_gd(ref), linear_solver="cg",
                                   compile=False)
    with pytest.raises(ValueError, match="theta contains 1 non-finite"):
        hg(ref.theta.clone().index_fill_(0, torch.tensor([2]), float("nan")), ref.data)
    diverging = bl.solvers.get("gd", step_size=10.0 / ref.smoothness, max_iter=400, tol=0.0)
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=diverging, linear_solver="cg", compile=False)
    with pytest.raises(ValueError, match="phi \\(the inner solution\\) contains"):
        hg(ref.theta, ref.data)


def test_bad_arguments_get_clear_errors():
    ref = quadratic()
    with pytest.raises(ValueError, match="fixed budget"):
        bl.compiled_hypergradient(ref.problem, ref.outer, solver="newton_cg")
    with pytest.raises(ValueError, match="fixed budget"):
        bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_gd(ref), linear_solver="neumann")
    with pytest.raises(TypeError, match="InnerProblem"):
        bl.compiled_hypergradient(lambda p, t, d: p.sum(), ref.outer, solver=fixed_gd(ref))
    with pytest.raises(TypeError, match="outer must be a callable"):
        bl.compiled_hypergradient(ref.problem, 3.0, solver=fixed_gd(ref))
    with pytest.raises(TypeError, match="compile must be True or False"):
        bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_gd(ref), compile="yes")
    with pytest.raises(TypeError, match="options must be a dict"):
        bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_gd(ref), options="max-autotune")
    learned = bl.testing.proximal_quadratic(dim=6, seed=3, learn_lam="scalar")
    with pytest.raises(ValueError, match="hyper-parameters"):
        bl.compiled_hypergradient(learned.problem, learned.outer, solver=fixed_gd(ref))


def test_compile_options_by_device():
    ref = quadratic()
    hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_gd(ref))
    assert hg.compile_options(torch.device("cpu")) == {"dynamic": False, "fullgraph": True,
                                                        "options": {"cpp_wrapper": True}}
    assert hg.compile_options(torch.device("cuda")) == {"dynamic": False, "fullgraph": True}
    mine = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_gd(ref),
                                     options={"mode": "reduce-overhead"})
    assert mine.compile_options(torch.device("cuda")) == {"dynamic": False, "fullgraph": True,
                                                          "mode": "reduce-overhead"}


def test_both_product_modes_agree_and_forward_mode_limits_are_explained():
    ref = quadratic()
    grads = {}
    for hvp in ("reverse", "forward"):
        hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=fixed_agd(ref), linear_solver="cg", hvp=hvp,
                                       compile=False)
        grads[hvp], info = hg(ref.theta, ref.data)
        assert info.backward.hvp_mode == hvp
    torch.testing.assert_close(grads["forward"], grads["reverse"], rtol=1e-10, atol=1e-12)
    # F.mse_loss writes into a zero tangent in forward mode: reverse (the default) runs it, forward says what to do
    x, y = torch.randn(8, 2, dtype=F64), torch.randn(8, dtype=F64)
    problem = bl.ProximalProblem(lambda phi, d: torch.nn.functional.mse_loss(d[0] @ phi, d[1]), lam=1.0)
    theta = torch.zeros(2, dtype=F64)
    solver = bl.solvers.get("gd", step_size=0.1, max_iter=200, tol=0.0)
    g, _ = bl.compiled_hypergradient(problem, lambda phi, t: phi.sum(), solver=solver, compile=False)(theta, (x, y))
    leaf = theta.clone().requires_grad_(True)
    bl.argmin(problem, leaf, (x, y), solver=solver, linear_solver=bl.linalg.get("cg", tol=1e-12)).sum().backward()
    torch.testing.assert_close(g, leaf.grad, rtol=1e-9, atol=1e-12)
    forward = bl.compiled_hypergradient(problem, lambda phi, t: phi.sum(), solver=solver, hvp="forward",
                                        compile=False)
    with pytest.raises(RuntimeError, match="elementwise operations"):
        forward(theta, (x, y))
    with pytest.raises(ValueError, match="hvp must be 'reverse' or 'forward'"):
        bl.compiled_hypergradient(problem, lambda phi, t: phi.sum(), solver=solver, hvp="gauss_newton")


def regression_tasks(tasks=4, n=10, q=7, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    support = (torch.randn(tasks, n, d, generator=gen, dtype=F64), torch.randn(tasks, n, generator=gen, dtype=F64))
    query = (torch.randn(tasks, q, d, generator=gen, dtype=F64), torch.randn(tasks, q, generator=gen, dtype=F64))

    def loss(phi, data):
        x, y = data
        return 0.5 * ((x @ phi["w"] + phi["b"] - y) ** 2).mean()

    def outer(phi, theta, data):
        x, y = data
        return 0.5 * ((x @ phi["w"] + phi["b"] - y) ** 2).mean()
    theta = {"w": torch.linspace(-0.5, 0.5, d, dtype=F64), "b": torch.tensor(0.3, dtype=F64)}
    return bl.ProximalProblem(loss, lam=1.5), outer, theta, support, query


def test_batched_is_the_mean_of_the_tasks():
    problem, outer, theta, support, query = regression_tasks()
    solver = bl.solvers.get("gd", step_size=0.3, max_iter=200, tol=0.0)
    hg = bl.compiled_hypergradient(problem, outer, solver=solver, linear_solver=bl.linalg.get("cg", max_iter=8),
                                   compile=False)
    mean, info = hg.batched(theta, support, outer_data=query)
    singles = [hg(theta, tuple(t[i] for t in support), outer_data=tuple(t[i] for t in query)) for i in range(4)]
    for k in theta:
        torch.testing.assert_close(mean[k], torch.stack([g[k] for g, _ in singles]).mean(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(info.phi[k], torch.stack([i.phi[k] for _, i in singles]), rtol=1e-12, atol=1e-14)
    assert info.values == pytest.approx([i.value for _, i in singles], rel=1e-12)
    assert info.relative_residuals == pytest.approx([i.backward.relative_residual for _, i in singles], rel=1e-6,
                                                    abs=1e-15)
    assert all(info.converged) and not any(info.breakdown) and not info.compiled
    # a task that diverges is named
    bad = (support[0].clone(), support[1].clone())
    bad[0][2] *= 1e3  # task 2: a step of 0.3 on a loss 1e6 times steeper
    with pytest.raises(ValueError, match=r"task\(s\) \[2\] of 4"):
        hg.batched(theta, bad, outer_data=query)
    # a budget too short for the tolerance: one warning counting the tasks
    short = bl.compiled_hypergradient(problem, outer, solver=solver,
                                      linear_solver=bl.linalg.get("cg", max_iter=1, tol=1e-10), compile=False)
    with pytest.warns(bl.ConvergenceWarning, match="4 of 4 tasks missed a tolerance"):
        _, info = short.batched(theta, support, outer_data=query)
    assert not any(info.converged)


def test_batched_compiled_equals_eager(compiled_or_skip):
    problem, outer, theta, support, query = regression_tasks(tasks=3)
    solver = bl.solvers.get("gd", step_size=0.3, max_iter=20, tol=0.0)
    linear = bl.linalg.get("cg", max_iter=4, tol=1e-10, warn=False)
    compiled = bl.compiled_hypergradient(problem, outer, solver=solver, linear_solver=linear)
    eager = bl.compiled_hypergradient(problem, outer, solver=solver, linear_solver=linear, compile=False)
    compiled.batched(theta, support, outer_data=query)
    g, info = compiled_or_skip(lambda: compiled.batched(theta, support, outer_data=query))
    assert info.compiled
    g_e, info_e = eager.batched(theta, support, outer_data=query)
    for k in theta:
        torch.testing.assert_close(g[k], g_e[k], rtol=1e-10, atol=1e-12)
    assert info.values == pytest.approx(info_e.values, rel=1e-10)


def test_negative_curvature_first_order_per_task():
    """G = a sum cos(phi) + lam/2 ||phi - theta||^2 at theta = 0: phi = 0 is stationary for either sign of a; its
    Hessian (lam - a) I is indefinite for a = 1, lam = 0.5 (CG meets negative curvature) and definite for a = -1,
    where dphi/dtheta = lam / (lam + 1) I. With f = <w, phi>: the implicit task gives w / 3, the first-order one w."""
    lam = 0.5
    problem = bl.ProximalProblem(lambda phi, d: (d * torch.cos(phi)).sum(), lam=lam)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    outer = lambda phi, theta: (w * phi).sum()  # noqa: E731
    theta = torch.zeros(3, dtype=F64)
    solver = bl.solvers.get("gd", step_size=0.1, max_iter=5, tol=0.0)
    tasks = torch.tensor([[1.0], [-1.0]], dtype=F64)  # a per task, broadcast over phi
    hg = bl.compiled_hypergradient(problem, outer, solver=solver, linear_solver=bl.linalg.get("cg", max_iter=5),
                                   negative_curvature="first_order", compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)  # handled per task: no warning
        mean, info = hg.batched(theta, tasks)
    assert info.breakdown == [True, False]
    torch.testing.assert_close(mean, (w + w / 3) / 2, rtol=1e-12, atol=1e-14)
    g, single = hg(theta, tasks[0])
    torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert single.backward.status is bl.LinearSolveStatus.NEGATIVE_CURVATURE
    # the default keeps CG's last iterate and says so
    plain = bl.compiled_hypergradient(problem, outer, solver=solver, linear_solver=bl.linalg.get("cg", max_iter=5),
                                      compile=False)
    with pytest.warns(bl.NegativeCurvatureWarning, match="did not reach"):
        plain(theta, tasks[0])
    with pytest.warns(bl.NegativeCurvatureWarning, match="1 of 2 tasks missed"):
        plain.batched(theta, tasks)
    with pytest.raises(ValueError, match="ProximalProblem"):
        bl.compiled_hypergradient(bl.InnerProblem(lambda p, t, d: (p * p).sum()), outer, solver=solver,
                                  negative_curvature="first_order")
    with pytest.raises(ValueError, match="'warn' or 'first_order'"):
        bl.compiled_hypergradient(problem, outer, solver=solver, negative_curvature="truncate")
