"""Every registered inner solver (and a user callable) on every reference problem; result contracts."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import WrongGradient, REFERENCE_PROBLEMS, SOLVER_SETTINGS, rel_err, tight_solver

import bilevel as bl

#: registered solvers that cannot run on a generic problem, with the reason and where they are tested instead
PROBLEM_SPECIFIC = {"cvxpy": "needs a cvxpy formulation of each problem (build=); see test_scipy_cvxpy_solvers.py"}
SOLVERS = [name for name in bl.solvers.available() if name not in PROBLEM_SPECIFIC]


def newton_with_python_line_search(problem, theta, data, phi0):
    """A user's black box: damped Newton with a backtracking line search written in plain Python."""
    phi = phi0.clone()

    def G(p):
        return float(problem(p, theta, data))

    for _ in range(50):
        grad = torch.func.grad(lambda p: problem(p, theta, data))(phi)
        if float(grad.norm()) < 1e-12:
            break
        H = torch.func.hessian(lambda p: problem(p, theta, data))(phi)
        step = torch.linalg.solve(H, grad)
        t = 1.0
        while G(phi - t * step) > G(phi) - 1e-4 * t * float(grad @ step) and t > 1e-10:
            t *= 0.5
        phi = phi - t * step
    return phi


SOLVER_CASES = [*SOLVERS, "user_callable"]


def make_solver(name, ref=None):
    if name == "user_callable":
        return bl.solvers.get(newton_with_python_line_search, tol=1e-9)
    return tight_solver(name, ref)


def test_every_registered_solver_has_a_tolerance_entry():
    missing = [s for s in SOLVERS if s not in SOLVER_SETTINGS]
    assert not missing, f"add {missing} to tests/helpers.py SOLVER_SETTINGS"


@pytest.mark.parametrize("problem_name", sorted(REFERENCE_PROBLEMS))
@pytest.mark.parametrize("solver_name", SOLVER_CASES)
def test_hypergradient_agrees_with_reference(solver_name, problem_name):
    ref = REFERENCE_PROBLEMS[problem_name]()
    theta = bl.tree.map(lambda t: t.clone().requires_grad_(True), ref.theta)
    phi, result = bl.argmin(ref.problem, theta, ref.data, solver=make_solver(solver_name, ref),
                            linear_solver=bl.linalg.get("cg", max_iter=500, tol=1e-13), phi0=ref.phi0,
                            full_output=True)
    assert result.converged, result.message
    ref.outer(phi, theta).backward()
    # Lemma 3: the hypergradient error is O(||phi - phi*||) <= O(grad_norm / mu)
    tolerance = max(SOLVER_SETTINGS.get(solver_name, ({}, 1e-6))[1], 1e3 * result.grad_norm)
    assert rel_err(theta.grad, ref.hypergradient()) < tolerance


@pytest.mark.parametrize("solver_name", SOLVER_CASES)
def test_result_contract(solver_name):
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    phi0 = ref.phi0.clone() + 0.1
    before = phi0.clone()
    result = bl.solve(ref.problem, ref.theta, ref.data, solver=make_solver(solver_name), phi0=phi0)
    for f in ("phi", "converged", "iterations", "grad_norm", "status", "message", "history", "value", "solver",
              "stats"):
        assert hasattr(result, f)
    assert {f.name for f in dataclasses.fields(result)} >= {"phi", "converged", "iterations", "grad_norm", "status",
                                                             "message", "history"}
    assert torch.equal(phi0, before), "phi0 was modified"
    assert result.phi.dtype == phi0.dtype and result.phi.device == phi0.device
    assert result.phi.shape == phi0.shape
    assert not result.phi.requires_grad
    assert isinstance(result.status, bl.SolverStatus) and result.message == result.status.value
    true_grad = torch.func.grad(lambda p: ref.problem(p, ref.theta, ref.data))(result.phi)
    assert result.grad_norm == pytest.approx(float(true_grad.norm()), rel=1e-6, abs=1e-14)
    assert result.converged == (result.grad_norm <= 1e-9 or result.grad_norm <= make_solver(solver_name).tol)


@pytest.mark.parametrize("step_size", [None, 0.01])
def test_gd_history_and_counters(step_size):
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("gd", step_size=step_size, tol=1e-8))
    assert result.converged
    hist = result.history["grad_norm"]
    assert len(hist) == result.iterations + 1
    assert hist[-1] == pytest.approx(result.grad_norm)
    assert result.history["value"][-1] <= result.history["value"][0]
    assert result.stats["ngev"] >= result.iterations


def test_max_iter_failure_is_reported_and_raisable():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with pytest.warns(bl.ConvergenceWarning, match="increase max_iter"):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("gd", max_iter=2))
    assert not result.converged and result.iterations == 2
    assert result.status is bl.SolverStatus.MAX_ITER
    with pytest.raises(bl.ConvergenceError, match="stopped after 2 iterations"):
        result.raise_if_failed()


def test_divergent_step_returns_last_finite_iterate():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with pytest.warns(bl.ConvergenceWarning, match="non-finite"):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("gd", step_size=10.0,
                                                                                   max_iter=10000))
    assert result.status is bl.SolverStatus.NONFINITE
    assert torch.isfinite(result.phi).all()
    assert not result.converged


def test_line_search_failure_is_reported():
    problem = bl.InnerProblem(lambda phi, th, d: WrongGradient.apply(phi - th))
    with pytest.warns(bl.ConvergenceWarning, match="line search"):
        result = bl.solve(problem, torch.zeros(3), phi0=torch.ones(3), solver=bl.solvers.get("gd"))
    assert result.status is bl.SolverStatus.LINE_SEARCH_FAILED


def test_inner_loop_builds_no_graph_and_does_not_touch_theta_grad():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    theta = ref.theta.clone().requires_grad_(True)
    result = bl.solve(ref.problem, theta, ref.data, solver=bl.solvers.get("gd", tol=1e-8))
    assert result.phi.grad_fn is None and theta.grad is None


def test_callable_returning_a_solve_result_and_a_non_stationary_point():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()

    def lazy(problem, theta, data, phi0):
        return bl.SolveResult(phi0, True, 7, 0.0, bl.SolverStatus.CONVERGED, "", {"x": [1.0]})

    with pytest.warns(bl.ConvergenceWarning, match="not stationary"):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=lazy, phi0=ref.phi0)
    assert not result.converged and result.iterations == 7 and result.status is bl.SolverStatus.NOT_STATIONARY


def test_callable_returning_wrong_structure_fails_clearly():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    with pytest.raises(ValueError, match="return phi in the structure of phi0"):
        bl.solve(ref.problem, ref.theta, ref.data, solver=lambda p, t, d, x: {"w": x}, phi0=ref.phi0)
    with pytest.raises(TypeError, match="must return phi"):
        bl.solve(ref.problem, ref.theta, ref.data, solver=lambda p, t, d, x: 3.0, phi0=ref.phi0)


def test_register_solver_makes_it_available_and_tested_by_name():
    @bl.register_solver("test_fixed_gd")
    class FixedGD(bl.solvers.GradientDescent):
        def __init__(self, *, max_iter: int = 100, tol: float = 1e-6):
            super().__init__(step_size=0.01, max_iter=max_iter, tol=tol)

    assert "test_fixed_gd" in bl.solvers.available()
    assert isinstance(bl.solvers.get("test_fixed_gd", max_iter=3), FixedGD)
    with pytest.raises(TypeError, match="subclass of Solver"):
        bl.register_solver("not_a_solver")(object)
    with pytest.raises(ValueError, match="registered already"):
        bl.register_solver("gd")(FixedGD)


def test_gd_is_quiet_when_converged():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("gd", tol=1e-6))


def test_tol_zero_is_a_fixed_budget_without_warning():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("gd", step_size=0.01, max_iter=7,
                                                                                   tol=0.0))
        x, info = bl.linalg.get("cg", max_iter=2, tol=0.0)(lambda v: 3.0 * v + v.flip(0), torch.ones(4))
    assert result.iterations == 7 and result.status is bl.SolverStatus.MAX_ITER and not result.converged
    assert info.iterations == 2 or info.converged


def test_budget_and_breakdown_warnings_can_be_told_apart():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.BudgetWarning)
        warnings.simplefilter("error", bl.BreakdownWarning)
        bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("gd", max_iter=2))  # budget: silent
        bl.linalg.get("cg", max_iter=1)(lambda v: 2.0 * v + v.flip(0), torch.ones(3))
        with pytest.raises(bl.BreakdownWarning, match="non-finite"):
            bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("gd", step_size=10.0, max_iter=10000))
        with pytest.raises(bl.BreakdownWarning, match="p\\^T A p <= 0"):
            bl.linalg.get("cg")(lambda v: -v, torch.ones(3))
    assert issubclass(bl.BudgetWarning, bl.ConvergenceWarning) and issubclass(bl.BreakdownWarning,
                                                                                bl.ConvergenceWarning)


# ----------------------------------------------------------------------- tol=0: no read-back per step

_FIXED = [("gd", {"step_size": 0.002}), ("agd", {"step_size": 0.002, "mu": 0.05}),
          ("agd", {"smoothness": 400.0, "restart": False})]


def _both_loops(problem, theta, data, name, options, max_iter, phi0=None):
    """The same solver with tol=0 (values read back once, at the end) and with a tol no iterate reaches
    (the step-by-step loop): everything they return must agree."""
    fast = bl.solve(problem, theta, data, solver=bl.solvers.get(name, max_iter=max_iter, tol=0.0, **options),
                    phi0=phi0)
    slow = bl.solve(problem, theta, data, solver=bl.solvers.get(name, max_iter=max_iter, tol=1e-300, **options),
                    phi0=phi0)
    return fast, slow


@pytest.mark.parametrize("name, options", _FIXED)
@pytest.mark.parametrize("max_iter", [0, 1, 7, 60])
def test_tol_zero_runs_without_per_step_read_back_and_equals_the_loop(name, options, max_iter, monkeypatch):
    ref = bl.testing.ridge_regression(seed=0)
    reads = []
    for attr in ("item", "__float__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, _attr=attr, **k):
            reads.append(_attr)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, counted)
    solver = bl.solvers.get(name, max_iter=max_iter, tol=0.0, **options)
    x0, spec = bl.tree.flatten(ref.theta)
    fun = bl.solvers.Objective(ref.problem, ref.theta, ref.data, spec)
    reads.clear()
    solver.run(fun, x0)
    assert len(reads) <= 2 + 2, f"{len(reads)} read-backs for {max_iter} steps: {reads[:8]}"  # grad norms, values
    monkeypatch.undo()
    fast, slow = _both_loops(ref.problem, ref.theta, ref.data, name, options, max_iter)
    assert torch.equal(fast.phi, slow.phi)
    assert (fast.status, fast.iterations, fast.converged) == (slow.status, slow.iterations, slow.converged)
    assert fast.history == slow.history and fast.grad_norm == slow.grad_norm and fast.value == slow.value


def test_tol_zero_stops_like_the_loop_at_an_exact_stationary_point_and_at_overflow():
    problem = bl.InnerProblem(lambda phi, theta, data: ((phi - theta) ** 2).sum())
    theta = torch.tensor([1.0, 2.0])
    fast, slow = _both_loops(problem, theta, None, "gd", {"step_size": 0.5}, 10,
                             phi0=torch.zeros(2))  # the exact minimiser after one step
    assert fast.status is slow.status is bl.SolverStatus.CONVERGED
    assert fast.iterations == slow.iterations == 1 and torch.equal(fast.phi, slow.phi)
    assert fast.history == slow.history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.ConvergenceWarning)
        fast, slow = _both_loops(problem, theta, None, "gd", {"step_size": 1e300}, 10, phi0=torch.zeros(2))
    assert fast.status is slow.status is bl.SolverStatus.NONFINITE
    assert fast.iterations == slow.iterations and torch.equal(fast.phi, slow.phi)
    assert torch.isfinite(fast.phi).all() and fast.history == slow.history


@pytest.mark.parametrize("kind", ["inner", "linear"])
def test_converged_and_message_follow_the_status(kind):
    if kind == "inner":
        result = bl.SolveResult(torch.zeros(2), False, 3, 1.0, bl.SolverStatus.MAX_ITER, "", {})
        other, contradiction = bl.SolverStatus.CONVERGED, lambda: bl.SolveResult(
            torch.zeros(2), True, 3, 1.0, bl.SolverStatus.MAX_ITER, "", {})
    else:
        result = bl.linalg.LinearSolveInfo(3, 1.0, 0.5, False, bl.LinearSolveStatus.MAX_ITER, 3)
        other, contradiction = bl.LinearSolveStatus.CONVERGED, lambda: bl.linalg.LinearSolveInfo(
            3, 1.0, 0.5, True, bl.LinearSolveStatus.MAX_ITER, 3)
    assert not result.converged and result.message == result.status.value
    result.status = other  # one assignment, and both derived fields follow
    assert result.converged and result.message == other.value
    with pytest.raises(AttributeError, match="assign status instead"):
        result.converged = False
    with pytest.raises(ValueError, match="converged=True contradicts status MAX_ITER"):
        contradiction()


def test_a_backend_detail_is_appended_to_the_advice():
    result = bl.SolveResult(torch.zeros(2), False, 3, 1.0, bl.SolverStatus.MAX_ITER, "", {})
    result.detail = "the backend said: stop."
    assert result.message == f"{bl.SolverStatus.MAX_ITER.value} the backend said: stop."


@pytest.mark.parametrize("name", ["gd", "agd", "newton_cg"])
def test_rtol_makes_the_stopping_test_independent_of_the_units(name):
    """Scaling G by 1e6 changes what an absolute tol means, not what a relative one means."""
    ref = bl.testing.ridge_regression(seed=0)
    for scale in (1.0, 1e6):
        problem = bl.InnerProblem(lambda phi, theta, data, s=scale: s * ref.problem(phi, theta, data))
        res = bl.solve(problem, ref.theta, ref.data, solver=bl.solvers.get(name, tol=0.0, rtol=1e-6, max_iter=5000),
                       phi0=ref.phi0)
        start, end = res.history["grad_norm"][0], res.grad_norm
        assert res.converged and end <= 1e-6 * start
        assert res.history["grad_norm"][-2] > 1e-6 * start  # it stopped at the first iterate below the threshold
    assert "rtol=1e-06" in repr(bl.solvers.get(name, rtol=1e-6))


def test_a_ridge_hyperparameter_loop_in_data_units_runs_without_warnings_with_rtol():
    """Targets in the hundreds (as in the diabetes data of JAXopt's ridge example) in float32 put an absolute
    tol of 1e-6 below round-off; a relative tol states the accuracy without knowing the units."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 10, generator=g, dtype=torch.float32)
    y = 150.0 + 80.0 * (X @ torch.randn(10, generator=g, dtype=torch.float32)) / 3.0
    problem = bl.InnerProblem(lambda w, t, d: 0.5 * ((d[0] @ w - d[1]) ** 2).sum() + 0.5 * t.exp() * (w @ w))
    theta = torch.tensor(0.0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=1e-6)
    w = torch.zeros(10, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        for _ in range(50):
            opt.zero_grad()
            w = bl.argmin(problem, theta, (X, y), solver=bl.solvers.get("gd", rtol=1e-5, max_iter=500),
                          phi0=torch.zeros(10, dtype=torch.float32))  # rtol: relative to a cold start
            (0.5 * ((X @ w - y) ** 2).mean()).backward()
            opt.step()
    with pytest.warns(bl.BudgetWarning):  # the absolute tol that the same budget cannot reach in these units
        bl.solve(problem, theta.detach(), (X, y), solver=bl.solvers.get("gd", tol=1e-6, max_iter=500),
                 phi0=torch.zeros(10, dtype=torch.float32))
