"""The SciPy and cvxpy inner solvers: options, statuses, dtype/device, and hypergradients through them."""

from __future__ import annotations

import builtins
import importlib.util
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import REFERENCE_PROBLEMS, SOLVER_SETTINGS, attainable_tol, rel_err, value_noise_floor

import bilevel as bl
from bilevel.solvers.cvxpy_solver import CvxpySolver, CvxpyStatusError
from bilevel.solvers.scipy_lbfgs import ScipyLBFGS
from bilevel.solvers.scipy_minimize import SCIPY_METHODS, ScipyMinimize

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None
needs_cvxpy = pytest.mark.skipif(not HAS_CVXPY, reason="cvxpy is not installed (pip install bilevel[cvxpy])")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TIGHT_CLARABEL = SOLVER_SETTINGS["cvxpy"][0]["solver_options"]


def prox_problem():
    """G = ||phi - d||^2 + lam/2 ||phi - theta||^2 with lam = 2: phi* = (2 d + 2 theta) / 4."""
    return bl.ProximalProblem(lambda phi, d: ((phi - d) ** 2).sum(), lam=2.0)


def hypergradient_through(ref, solver, **kwargs):
    theta = bl.tree.map(lambda t: t.clone().requires_grad_(True), ref.theta)
    phi, result = bl.argmin(ref.problem, theta, ref.data, solver=solver, phi0=kwargs.get("phi0", ref.phi0),
                            linear_solver=bl.linalg.get("cg", max_iter=500, tol=1e-13), full_output=True)
    ref.outer(phi, theta).backward()
    return theta.grad, result


# --------------------------------------------------------------------------------------------- scipy_lbfgs
def test_scipy_lbfgs_is_registered_with_documented_defaults():
    solver = bl.solvers.get("scipy_lbfgs")
    assert isinstance(solver, ScipyLBFGS)
    assert (solver.max_iter, solver.tol, solver.memory, solver.bounds) == (500, 1e-6, 10, None)
    assert repr(solver) == "ScipyLBFGS(max_iter=500, tol=1e-06, memory=10, bounds=None)"


def test_scipy_lbfgs_preserves_float32_in_and_out():
    problem = prox_problem()
    theta, d = torch.zeros(3, dtype=torch.float32), torch.ones(3, dtype=torch.float32)
    result = bl.solve(problem, theta, d, solver=bl.solvers.get("scipy_lbfgs", tol=1e-4))
    assert result.converged, result.message
    assert result.phi.dtype == torch.float32 and result.phi.device == theta.device
    assert torch.allclose(result.phi, torch.full((3,), 0.5, dtype=torch.float32), atol=1e-5)
    th = theta.clone().requires_grad_(True)
    phi = bl.argmin(problem, th, d, solver=bl.solvers.get("scipy_lbfgs", tol=1e-4))
    phi.sum().backward()
    assert th.grad.dtype == torch.float32
    assert torch.allclose(th.grad, torch.full((3,), 0.5, dtype=torch.float32), atol=1e-5)  # dphi*/dtheta = 1/2


def test_scipy_lbfgs_history_and_counters():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    solver = bl.solvers.get("scipy_lbfgs", tol=attainable_tol("scipy_lbfgs", ref, 1e-7))
    result = bl.solve(ref.problem, ref.theta, ref.data, solver=solver, phi0=ref.phi0)
    assert result.converged
    assert len(result.history["value"]) == len(result.history["grad_norm"]) == result.iterations + 1
    assert result.history["grad_norm"][-1] == pytest.approx(result.grad_norm)
    assert result.history["value"][-1] <= result.history["value"][0]
    assert result.stats["ngev"] >= result.iterations and result.stats["nhvp"] == 0


def test_scipy_lbfgs_max_iter_reports_scipy_message():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with pytest.warns(bl.ConvergenceWarning, match="increase max_iter"):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("scipy_lbfgs", max_iter=2))
    assert result.status is bl.SolverStatus.MAX_ITER and not result.converged and result.iterations == 2
    assert "SciPy l-bfgs-b stopped with" in result.message and "ITERATIONS REACHED LIMIT" in result.message
    with pytest.raises(bl.ConvergenceError, match="SciPy l-bfgs-b"):
        result.raise_if_failed()


def test_scipy_lbfgs_max_iter_zero_returns_the_start_point():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    with pytest.warns(bl.ConvergenceWarning):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("scipy_lbfgs", max_iter=0),
                          phi0=ref.phi0)
    assert result.iterations == 0 and torch.equal(result.phi, ref.phi0)


def test_scipy_lbfgs_inactive_bounds_do_not_change_the_answer():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    tol = attainable_tol("scipy_lbfgs", ref, 1e-7)
    free = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("scipy_lbfgs", tol=tol), phi0=ref.phi0)
    lower, upper = ref.solution() - 1.0, ref.solution() + 1.0
    boxed = bl.solve(ref.problem, ref.theta, ref.data, phi0=ref.phi0,
                     solver=bl.solvers.get("scipy_lbfgs", tol=tol, bounds=(lower, upper)))
    assert boxed.converged and torch.allclose(boxed.phi, free.phi, atol=1e-6)
    half_open = bl.solve(ref.problem, ref.theta, ref.data, phi0=ref.phi0,
                         solver=bl.solvers.get("scipy_lbfgs", tol=tol, bounds=(None, 1e3)))
    assert half_open.converged


def test_scipy_lbfgs_active_bound_is_reported_not_stationary():
    # phi* = 0.5, but phi <= 0.2: the bound binds and grad G != 0 there, so the implicit gradient would be wrong.
    with pytest.warns(bl.ConvergenceWarning, match="not stationary"):
        result = bl.solve(prox_problem(), torch.zeros(2), torch.ones(2),
                          solver=bl.solvers.get("scipy_lbfgs", bounds=(-1.0, 0.2)))
    assert result.status is bl.SolverStatus.NOT_STATIONARY and not result.converged
    assert torch.allclose(result.phi, torch.full((2,), 0.2))


def test_scipy_lbfgs_bounds_on_a_dict_phi():
    problem = bl.InnerProblem(lambda p, th, d: ((p["a"] - th["a"]) ** 2).sum() + ((p["b"] - 3.0) ** 2).sum())
    theta = {"a": torch.ones(2), "b": torch.zeros(1)}
    bounds = ({"a": torch.full((2,), -5.0), "b": torch.full((1,), -5.0)}, 10.0)
    result = bl.solve(problem, theta, solver=bl.solvers.get("scipy_lbfgs", tol=1e-9, bounds=bounds))
    assert result.converged and torch.allclose(result.phi["b"], torch.tensor([3.0]))


@pytest.mark.parametrize("bounds, error, match", [
    ((1.0, 0.0), ValueError, "lower 1.0 > upper 0.0"),
    ((0.0,), TypeError, r"pair \(lower, upper\)"),
    (("a", None), TypeError, "must be None, a number, or a tensor"),
    ((float("nan"), None), ValueError, "not NaN"),
])
def test_scipy_lbfgs_invalid_bounds_fail_in_the_constructor(bounds, error, match):
    with pytest.raises(error, match=match):
        bl.solvers.get("scipy_lbfgs", bounds=bounds)


def test_scipy_lbfgs_bounds_with_the_wrong_shape_fail_clearly():
    solver = bl.solvers.get("scipy_lbfgs", bounds=(torch.zeros(3), None))
    with pytest.raises(ValueError, match=r"the lower bound has shape \(3,\) but phi's structure expects \(2,\)"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=solver)
    solver = bl.solvers.get("scipy_lbfgs", bounds=(torch.zeros(2), torch.tensor([1.0, -1.0])))
    with pytest.raises(ValueError, match="lower > upper in 1 entries"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=solver)


@pytest.mark.parametrize("options, error, match", [
    ({"memory": 0}, ValueError, "Invalid memory"),
    ({"max_iter": -1}, ValueError, "Invalid max_iter"),
    ({"tol": -1.0}, ValueError, "Invalid tol"),
    ({"maxcor": 5}, TypeError, r"unknown option\(s\) 'maxcor'.*valid options: max_iter, tol, memory, bounds"),
])
def test_scipy_lbfgs_invalid_options(options, error, match):
    with pytest.raises(error, match=match):
        bl.solvers.get("scipy_lbfgs", **options)


# ---------------------------------------------------------------------------------------------------- scipy
def test_scipy_is_registered_with_documented_defaults():
    solver = bl.solvers.get("scipy")
    assert isinstance(solver, ScipyMinimize)
    assert (solver.method, solver.max_iter, solver.tol, solver.options) == ("Nelder-Mead", 500, 1e-6, {})


def test_unknown_scipy_method_lists_scipys_methods():
    with pytest.raises(ValueError, match=r"unknown scipy.optimize.minimize method 'newton'; available: "
                                         r"nelder-mead, powell, .*bfgs.*trust-ncg"):
        bl.solvers.get("scipy", method="newton")
    with pytest.raises(TypeError, match="method name"):
        bl.solvers.get("scipy", method=lambda *a: None)
    with pytest.raises(TypeError, match="options must be a dict"):
        bl.solvers.get("scipy", options=[("xatol", 1e-3)])


def test_nelder_mead_on_a_tiny_problem_converges_and_gives_the_hypergradient():
    ref = bl.testing.general_quadratic(n_phi=2, n_theta=2, seed=0)
    solver = bl.solvers.get("scipy", method="Nelder-Mead", tol=1e-4, options={"xatol": 1e-8, "fatol": 1e-12})
    grad, result = hypergradient_through(ref, solver)
    assert result.converged, result.message
    assert result.stats["ngev"] == 1 and result.stats["nhvp"] == 0  # derivative-free: only finish() asks for one
    # history[0] is the start point; SciPy's Nelder-Mead may skip the callback on its last iteration
    assert "grad_norm" not in result.history and len(result.history["value"]) in (result.iterations,
                                                                                  result.iterations + 1)
    # Lemma 3: the error is O(||phi - phi*||) <= O(grad_norm / mu), mu = 1 here
    assert rel_err(grad, ref.hypergradient()) < 1e3 * result.grad_norm


def test_nelder_mead_with_its_loose_defaults_reports_not_converged_honestly():
    ref = bl.testing.general_quadratic(n_phi=2, n_theta=2, seed=0)
    with pytest.warns(bl.ConvergenceWarning, match="not stationary"):
        result = bl.solve(ref.problem, ref.theta, ref.data, phi0=ref.phi0,
                          solver=bl.solvers.get("scipy", method="Nelder-Mead", tol=1e-4))
    assert not result.converged and result.grad_norm > 1e-4
    assert result.status is bl.SolverStatus.NOT_STATIONARY
    assert "SciPy nelder-mead stopped with: 'Optimization terminated successfully.'" in result.message


@pytest.mark.parametrize("method", sorted(SCIPY_METHODS))
def test_every_scipy_method_runs_and_is_judged_on_the_true_gradient(method):
    ref = bl.testing.ridge_regression(seed=1)
    tol = attainable_tol("scipy", ref, 1e-6)
    solver = bl.solvers.get("scipy", method=method, tol=tol, max_iter=3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # derivative-free methods may stop short of tol: that is reported
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=solver, phi0=ref.phi0)
    true_grad = torch.func.grad(lambda p: ref.problem(p, ref.theta, ref.data))(result.phi)
    assert result.grad_norm == pytest.approx(float(true_grad.norm()), rel=1e-6, abs=1e-14)
    assert result.converged == (result.grad_norm <= tol)
    uses_grad, second_order = SCIPY_METHODS[method]
    if not uses_grad:
        assert result.stats["ngev"] == 1  # jac is not passed to derivative-free methods
    else:
        assert result.converged, result.message
        assert result.stats["ngev"] > 1
        assert (result.stats["nhvp"] > 0) == (second_order is not None)


@pytest.mark.parametrize("method", ["BFGS", "trust-ncg", "trust-exact"])
def test_scipy_second_order_and_quasi_newton_hypergradients(method):
    ref = REFERENCE_PROBLEMS["logistic_regression"]()
    grad, result = hypergradient_through(ref, bl.solvers.get("scipy", method=method,
                                                             tol=attainable_tol("scipy", ref, 1e-8)))
    assert result.converged, result.message
    assert rel_err(grad, ref.hypergradient()) < max(1e-7, 1e3 * result.grad_norm)


def test_scipy_user_options_override_derived_ones():
    ref = REFERENCE_PROBLEMS["proximal_quadratic"]()
    with pytest.warns(bl.ConvergenceWarning, match="increase max_iter"):
        result = bl.solve(ref.problem, ref.theta, ref.data,
                          solver=bl.solvers.get("scipy", method="BFGS", max_iter=500, options={"maxiter": 3}))
    assert result.iterations == 3 and result.status is bl.SolverStatus.MAX_ITER
    assert "SciPy bfgs stopped with: 'Maximum number of iterations has been exceeded.'" in result.message


def test_scipy_max_iter_zero_returns_the_start_point():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    with pytest.warns(bl.ConvergenceWarning):
        result = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("scipy", max_iter=0), phi0=ref.phi0)
    assert result.iterations == 0 and result.status is bl.SolverStatus.MAX_ITER


def test_scipy_nonfinite_objective_is_reported():
    def G(phi, theta, data):  # finite only for phi > 0; the minimiser phi = 1 is inside
        return (phi - torch.log(phi)).sum()

    # from phi0 = 50 the first line-search trials step to phi < 0, where G is NaN
    for solver in (bl.solvers.get("scipy", method="BFGS"), bl.solvers.get("scipy_lbfgs")):
        with pytest.warns(bl.ConvergenceWarning, match="non-finite"):
            result = bl.solve(bl.InnerProblem(G), torch.zeros(2), phi0=torch.full((2,), 50.0), solver=solver)
        assert result.status is bl.SolverStatus.NONFINITE and not result.converged
        assert torch.isfinite(result.phi).all() and bool((result.phi > 0).all())  # the best finite point
        assert "stopped with" in result.message


@needs_cuda
def test_scipy_solvers_keep_cuda_tensors_on_cuda():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    data = {k: v.cuda() for k, v in ref.data.items()}
    tol = attainable_tol("scipy", ref, 1e-8)
    for solver in (bl.solvers.get("scipy_lbfgs", tol=tol), bl.solvers.get("scipy", method="trust-ncg", tol=tol)):
        theta = ref.theta.cuda().requires_grad_(True)
        phi, result = bl.argmin(ref.problem, theta, data, solver=solver, phi0=ref.phi0.cuda(), full_output=True)
        assert result.converged and phi.is_cuda and result.phi.is_cuda
        (0.5 * (phi ** 2).sum()).backward()
        assert theta.grad.is_cuda
        assert torch.allclose(phi.detach().cpu(), ref.solution(), atol=1e-7)


# ---------------------------------------------------------------------------------------------------- cvxpy
def ridge_build(theta, data):
    import cvxpy as cp

    X, y = data["X"].cpu().numpy(), data["y"].cpu().numpy()
    w = cp.Variable(X.shape[1])
    G = cp.sum_squares(X @ w - y) / (2 * len(y)) + 0.5 * cp.sum(cp.multiply(np.exp(theta), cp.square(w)))
    return cp.Problem(cp.Minimize(G)), w


def logistic_build(theta, data):
    import cvxpy as cp

    X, y = data["X"].numpy(), data["y"].numpy()
    w = cp.Variable(X.shape[1])
    G = cp.sum(cp.logistic(-cp.multiply(y, X @ w))) / len(y) + 0.5 * cp.sum(cp.multiply(np.exp(theta), cp.square(w)))
    return cp.Problem(cp.Minimize(G)), w


def clarabel(build, **kwargs):
    options = {"tol": 1e-8, "solver_options": TIGHT_CLARABEL, **kwargs}
    return CvxpySolver(build=build, solver="CLARABEL", **options)


@needs_cvxpy
@pytest.mark.parametrize("problem_name, build", [("ridge_regression", ridge_build),
                                                 ("logistic_regression", logistic_build)])
def test_cvxpy_hypergradient_agrees_with_reference(problem_name, build):
    ref = REFERENCE_PROBLEMS[problem_name]()
    grad, result = hypergradient_through(ref, clarabel(build))
    assert result.converged, result.message
    assert result.solver == "cvxpy" and result.grad_norm <= 1e-8
    # Lemma 3: the hypergradient error is O(||phi - phi*||) <= O(grad_norm / mu)
    assert rel_err(grad, ref.hypergradient()) < max(SOLVER_SETTINGS["cvxpy"][1], 1e3 * result.grad_norm)


@needs_cvxpy
def test_cvxpy_loose_conic_tolerances_are_reported_honestly():
    ref = REFERENCE_PROBLEMS["logistic_regression"]()
    with pytest.warns(bl.ConvergenceWarning, match="tighten them in solver_options"):
        result = bl.solve(ref.problem, ref.theta, ref.data, phi0=ref.phi0,
                          solver=CvxpySolver(build=logistic_build, solver="CLARABEL", tol=1e-10))
    assert result.status is bl.SolverStatus.NOT_STATIONARY and "returned status 'optimal'" in result.message
    # ...and the same answer is fine for a tol that matches the solver's accuracy
    loose = bl.solve(ref.problem, ref.theta, ref.data, phi0=ref.phi0,
                     solver=CvxpySolver(build=logistic_build, solver="CLARABEL", tol=1e-4))
    assert loose.converged


@needs_cvxpy
def test_cvxpy_theta_and_phi_trees():
    import cvxpy as cp

    target = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}

    def G(phi, theta, data):
        return sum(((phi[k] - theta[k] - data[k]) ** 2).sum() for k in phi)

    def build_tree(theta, data):
        assert isinstance(theta["a"], np.ndarray) and theta["a"].dtype == np.float64
        v = {"a": cp.Variable(2), "b": cp.Variable((1, 1))}
        obj = sum(cp.sum_squares(v[k] - theta[k] - data[k].numpy()) for k in v)
        return cp.Problem(cp.Minimize(obj)), v

    def build_flat(theta, data):
        v = cp.Variable(3)
        t = np.concatenate([(theta[k] + data[k].numpy()).ravel() for k in ("a", "b")])
        return cp.Problem(cp.Minimize(cp.sum_squares(v - t))), v

    theta = {"a": torch.zeros(2), "b": torch.ones(1, 1)}
    for build in (build_tree, build_flat):
        result = bl.solve(bl.InnerProblem(G), theta, target, solver=clarabel(build))
        assert result.converged, result.message
        assert torch.allclose(result.phi["a"], target["a"]) and torch.allclose(result.phi["b"], target["b"] + 1)


@needs_cvxpy
def test_cvxpy_preserves_float32_and_forwards_max_iter():
    problem = prox_problem()

    def build(theta, data):
        import cvxpy as cp

        phi = cp.Variable(theta.shape)
        return cp.Problem(cp.Minimize(cp.sum_squares(phi - data.numpy()) + cp.sum_squares(phi - theta))), phi

    d = torch.ones(3, dtype=torch.float32)
    result = bl.solve(problem, torch.zeros(3, dtype=torch.float32), d, solver=clarabel(build, tol=1e-5))
    assert result.converged and result.phi.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's own "Solution may be inaccurate" and the ConvergenceWarning
        result = bl.solve(problem, torch.zeros(3), d.double(),
                          solver=CvxpySolver(build=build, solver="SCS", max_iter=2, tol=1e-10))
    assert not result.converged and result.iterations <= 2


@needs_cvxpy
def test_cvxpy_infeasible_problem_raises_with_advice():
    import cvxpy as cp

    def build(theta, data):
        w = cp.Variable(2)
        return cp.Problem(cp.Minimize(cp.sum_squares(w - theta)), [w >= 1, w <= 0]), w

    with pytest.raises(CvxpyStatusError, match=r"returned status 'infeasible'.*check them") as info:
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=CvxpySolver(build=build))
    assert info.value.status == "infeasible" and isinstance(info.value, RuntimeError)


@needs_cvxpy
def test_cvxpy_unbounded_problem_raises_with_advice():
    import cvxpy as cp

    def build(theta, data):
        w = cp.Variable(2)
        return cp.Problem(cp.Minimize(cp.sum(w - theta))), w

    with pytest.raises(CvxpyStatusError, match=r"returned status 'unbounded'.*unbounded below.*check the builder"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=CvxpySolver(build=build))


@needs_cvxpy
def test_cvxpy_solver_failure_raises_with_advice():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    with pytest.raises(CvxpyStatusError, match=r"'solver_error'.*NOT_A_SOLVER.*try another solver") as info:
        bl.solve(ref.problem, ref.theta, ref.data, phi0=ref.phi0,
                 solver=CvxpySolver(build=ridge_build, solver="NOT_A_SOLVER"))
    assert info.value.status == "solver_error"


@needs_cvxpy
def test_cvxpy_builder_mistakes_fail_clearly():
    import cvxpy as cp

    def wrong_shape(theta, data):
        w = cp.Variable(3)
        return cp.Problem(cp.Minimize(cp.sum_squares(w))), w

    with pytest.raises(ValueError, match=r"build\(\) returned a variable of shape \(3,\), but phi0 is a tensor of "
                                         r"shape \(2,\); create cp.Variable\(\(2,\)\)"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=CvxpySolver(build=wrong_shape))
    with pytest.raises(TypeError, match=r"must return a pair \(cvxpy.Problem, cvxpy.Variable\)"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=CvxpySolver(build=lambda t, d: t))

    def not_a_variable(theta, data):
        w = cp.Variable(2)
        return cp.Problem(cp.Minimize(cp.sum_squares(w))), "w"

    with pytest.raises(TypeError, match="its variable is a str"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=CvxpySolver(build=not_a_variable))


def test_cvxpy_options_are_checked_in_the_constructor():
    with pytest.raises(TypeError, match=r"needs build=\.\.\., a function build\(theta_np, data\)"):
        bl.solvers.get("cvxpy")
    with pytest.raises(TypeError, match="build must be callable"):
        bl.solvers.get("cvxpy", build=3)
    with pytest.raises(ValueError, match="max_iter can be forwarded only to a named solver"):
        bl.solvers.get("cvxpy", build=ridge_build, max_iter=10)
    with pytest.raises(TypeError, match="solver_options must be a dict"):
        bl.solvers.get("cvxpy", build=ridge_build, solver_options=3)
    with pytest.raises(ValueError, match="Invalid tol"):
        bl.solvers.get("cvxpy", build=ridge_build, tol=-1.0)


def test_get_passes_a_solver_option_through():
    solver = bl.solvers.get("cvxpy", build=ridge_build, solver="SCS")
    assert solver.solver == "SCS"


def test_cvxpy_missing_import_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)  # `import cvxpy` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install bilevel\[cvxpy\]"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=CvxpySolver(build=ridge_build))


def test_cvxpy_missing_import_via_builtins_import(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cvxpy" or name.startswith("cvxpy."):
            raise ModuleNotFoundError("No module named 'cvxpy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"needs the cvxpy package.*pip install bilevel\[cvxpy\]"):
        bl.solve(prox_problem(), torch.zeros(2), torch.ones(2), solver=CvxpySolver(build=ridge_build))


@needs_cvxpy
@needs_cuda
def test_cvxpy_returns_phi_on_cuda():
    ref = REFERENCE_PROBLEMS["ridge_regression"]()
    data = {k: v.cuda() for k, v in ref.data.items()}
    theta = ref.theta.cuda().requires_grad_(True)
    phi, result = bl.argmin(ref.problem, theta, data, solver=clarabel(ridge_build), phi0=ref.phi0.cuda(),
                            full_output=True)
    assert result.converged and phi.is_cuda
    ref.outer(phi.cpu(), theta.cpu()).backward()
    assert theta.grad.is_cuda
    assert rel_err(theta.grad.cpu(), ref.hypergradient()) < 1e-6


# -------------------------------------------------------------------------------------------------- example
@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed "
                    "(the example loads its diabetes data set): pip install scikit-learn")
@needs_cvxpy
def test_cvxpy_hyperparameter_example_lowers_the_validation_loss():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "cvxpy_hyperparameters.py")], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    before = float(re.search(r"validation loss before:\s+(\S+)", out).group(1))
    after = float(re.search(r"validation loss after:\s+(\S+)", out).group(1))
    assert after < before, out
    assert re.search(r"step\s+0\s+validation loss", out)


@pytest.mark.parametrize("name, options", [("scipy", {"method": "BFGS"}), ("scipy_lbfgs", {"memory": 30})])
@pytest.mark.parametrize("problem_name", sorted(REFERENCE_PROBLEMS))
def test_value_line_searches_stall_within_the_value_noise_floor(name, options, problem_name):
    # Asked for the impossible (tol=1e-300), SciPy's line searches stop where G's values stop telling steps
    # apart: never far above `value_noise_floor`, which is why the tests ask them for twice that and no less.
    ref = REFERENCE_PROBLEMS[problem_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bl.solve(ref.problem, ref.theta, ref.data, phi0=ref.phi0,
                          solver=bl.solvers.get(name, tol=1e-300, max_iter=2000, **options))
    assert result.iterations < 2000, result.message  # it stopped by itself, not at the budget
    assert result.grad_norm <= 2.0 * value_noise_floor(ref)
