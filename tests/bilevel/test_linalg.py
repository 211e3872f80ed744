"""Linear solvers (CG, Neumann, callables), their registry, HVPs and power iteration."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from bilevel.linalg import LinearSolveInfo, LinearSolveStatus
from bilevel.linalg import base as linalg_base

DT = torch.float64
EPS = torch.finfo(DT).eps


# --------------------------------------------------------------------------- helpers


def spd_system(n: int, cond: float, seed: int):
    """A random SPD matrix with eigenvalues log-spaced in [1, cond] (random orthogonal Q), and b."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    if n == 1:
        eig = torch.ones(1, dtype=DT)
    else:
        eig = torch.logspace(0.0, math.log10(cond), n, dtype=DT)
    scale = 10.0 ** (torch.rand((), dtype=DT, generator=g).item() * 4 - 2)  # 1e-2 .. 1e2
    A = (q * (scale * eig)) @ q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(n, dtype=DT, generator=g)
    return A, b, scale * eig


def true_residual(A, b, x) -> float:
    return torch.linalg.vector_norm(b - A @ x).item()


def rel(a, b) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


sizes = st.integers(min_value=1, max_value=30)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


# --------------------------------------------------------------------------- CG: properties


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=sizes, log_cond=st.floats(min_value=0.0, max_value=4.0), seed=seeds)
def test_cg_matches_dense_solve_on_random_spd(n, log_cond, seed):
    cond = 10.0 ** log_cond
    A, b, _ = spd_system(n, cond, seed)
    tol = 1e-10
    solver = bl.linalg.get("cg", tol=tol, max_iter=20 * n + 50)
    x, info = solver(lambda v: A @ v, b)
    assert info.converged, info
    assert info.status is LinearSolveStatus.CONVERGED
    assert info.relative_residual <= tol
    assert true_residual(A, b, x) / torch.linalg.vector_norm(b).item() <= 10 * tol
    x_ref = torch.linalg.solve(A, b)
    assert rel(x, x_ref) <= 10 * cond * tol + 1e-12
    assert info.matvecs == info.iterations
    assert x.dtype == DT and x.shape == b.shape


# --------------------------------------------------------------------------- Neumann: properties


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=sizes, cond=st.floats(min_value=1.0, max_value=20.0), seed=seeds)
def test_neumann_with_safe_step_matches_dense_solve(n, cond, seed):
    A, b, eig = spd_system(n, cond, seed)
    lam_max = eig.max().item()
    tol = 1e-9
    solver = bl.linalg.get("neumann", step_size=1.0 / lam_max, tol=tol, max_iter=1500)
    x, info = solver(lambda v: A @ v, b)
    assert info.converged, info
    assert info.status is LinearSolveStatus.CONVERGED
    assert info.relative_residual <= tol
    assert info.extra["step_size"] == pytest.approx(1.0 / lam_max)
    assert true_residual(A, b, x) / torch.linalg.vector_norm(b).item() <= 10 * tol
    assert rel(x, torch.linalg.solve(A, b)) <= 10 * cond * tol + 1e-12


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=sizes, cond=st.floats(min_value=1.0, max_value=20.0), seed=seeds)
def test_neumann_with_power_iteration_step_matches_dense_solve(n, cond, seed):
    A, b, eig = spd_system(n, cond, seed)
    tol = 1e-9
    solver = bl.linalg.get("neumann", tol=tol, max_iter=1500)
    assert solver.step_size is None
    x, info = solver(lambda v: A @ v, b)
    assert info.converged, info
    assert info.relative_residual <= tol
    est = info.extra["lambda_max_estimate"]
    # a Rayleigh quotient: never above lambda_max, and good enough for a safe step
    assert est <= eig.max().item() * (1 + 1e-12)
    assert est > 0.5 * eig.max().item()
    assert info.extra["step_size"] == pytest.approx(1.0 / est)
    assert info.matvecs > info.iterations  # the power-iteration matvecs are counted
    assert rel(x, torch.linalg.solve(A, b)) <= 10 * cond * tol + 1e-12


# --------------------------------------------------------------------------- CG: failures and edge cases


def _indefinite_diag():
    """A = diag(2, -1), b = (1, 1).

    Step 1: p = b, p^T A p = 1 > 0, alpha = 2, x1 = (2, 2), r1 = (-3, 3).
    Step 2: p = r1 + 9 p = (6, 12), p^T A p = 72 - 144 < 0: negative curvature.
    """
    A = torch.diag(torch.tensor([2.0, -1.0], dtype=DT))
    b = torch.tensor([1.0, 1.0], dtype=DT)
    return A, b


def test_cg_indefinite_reports_negative_curvature_and_returns_last_iterate():
    A, b = _indefinite_diag()
    with pytest.warns(bl.ConvergenceWarning, match=r"p\^T A p <= 0"):
        x, info = bl.linalg.get("cg")(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.NEGATIVE_CURVATURE
    assert info.converged is False
    assert not info.status.success
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, torch.tensor([2.0, 2.0], dtype=DT), rtol=0, atol=1e-14)
    assert info.iterations == 1
    assert info.matvecs == 2
    assert info.residual_norm == pytest.approx(math.sqrt(18.0), rel=1e-12)
    assert info.residual_norm == pytest.approx(true_residual(A, b, x), rel=1e-12)
    assert info.extra["min_curvature"] < 0


def test_cg_negative_curvature_at_first_step_returns_zero_not_nan():
    A = torch.diag(torch.tensor([-1.0, -2.0, -3.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    with pytest.warns(bl.ConvergenceWarning, match="not positive definite"):
        x, info = bl.linalg.get("cg")(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.NEGATIVE_CURVATURE
    assert not info.converged
    assert torch.equal(x, torch.zeros(3, dtype=DT))
    assert info.iterations == 0
    assert math.isfinite(info.residual_norm)


def test_cg_negative_curvature_warns_even_when_warn_false():
    A, b = _indefinite_diag()
    with pytest.warns(bl.ConvergenceWarning, match="did not converge"):
        _, info = bl.linalg.get("cg", warn=False)(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.NEGATIVE_CURVATURE


def test_cg_max_iter_warns():
    A, b, _ = spd_system(20, 1e3, seed=0)
    with pytest.warns(bl.ConvergenceWarning, match="maximum number of iterations"):
        x, info = bl.linalg.get("cg", max_iter=3)(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.MAX_ITER
    assert info.converged is False
    assert info.iterations == 3
    assert info.matvecs == 3
    assert info.relative_residual > 1e-10
    assert torch.isfinite(x).all()


def test_cg_max_iter_does_not_warn_when_warn_false():
    A, b, _ = spd_system(20, 1e3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = bl.linalg.get("cg", max_iter=3, warn=False)(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.MAX_ITER
    assert not info.converged
    with pytest.raises(bl.ConvergenceError, match="maximum number of iterations"):
        info.raise_if_failed()


def test_cg_functional_form_max_iter_warn_flag():
    A, b, _ = spd_system(10, 1e3, seed=1)
    with pytest.warns(bl.ConvergenceWarning):
        bl.linalg.cg(lambda v: A @ v, b, max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = bl.linalg.cg(lambda v: A @ v, b, max_iter=2, warn=False)
    assert info.status is LinearSolveStatus.MAX_ITER


def test_cg_zero_rhs_returns_zeros_converged():
    A, _, _ = spd_system(5, 10.0, seed=2)
    b = torch.zeros(5, dtype=DT)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = bl.linalg.get("cg")(matvec, b)
    assert torch.equal(x, torch.zeros(5, dtype=DT))
    assert info.converged is True
    assert info.status is LinearSolveStatus.CONVERGED
    assert info.iterations == 0
    assert info.residual_norm == 0.0
    assert info.relative_residual == 0.0
    assert calls == []


def test_cg_warm_start_at_solution_converges_in_zero_iterations():
    A, b, _ = spd_system(8, 50.0, seed=3)
    x_star = torch.linalg.solve(A, b)
    x, info = bl.linalg.get("cg", tol=1e-10)(lambda v: A @ v, b, x_star)
    assert info.converged
    assert info.iterations == 0
    assert info.matvecs == 1  # the initial residual
    torch.testing.assert_close(x, x_star, rtol=0, atol=0)
    assert x is not x_star  # x0 is not returned (or mutated) in place


def test_cg_warm_start_does_not_mutate_x0():
    A, b, _ = spd_system(8, 50.0, seed=4)
    x0 = torch.ones(8, dtype=DT)
    x0_copy = x0.clone()
    x, info = bl.linalg.get("cg")(lambda v: A @ v, b, x0)
    assert info.converged
    assert torch.equal(x0, x0_copy)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-7, atol=0)


def test_cg_exact_in_distinct_eigenvalue_count():
    # three distinct eigenvalues: CG terminates in 3 steps (up to rounding)
    d = torch.tensor([1.0, 1.0, 4.0, 4.0, 9.0, 9.0], dtype=DT)
    b = torch.arange(1.0, 7.0, dtype=DT)
    x, info = bl.linalg.get("cg", tol=1e-12)(lambda v: d * v, b)
    assert info.converged
    assert info.iterations <= 3
    torch.testing.assert_close(x, b / d, rtol=1e-10, atol=0)


@pytest.mark.parametrize("bad_b", [torch.zeros(2, 2, dtype=DT), torch.tensor(1.0, dtype=DT), [1.0, 2.0]])
def test_solver_rejects_non_1d_b(bad_b):
    with pytest.raises(ValueError, match="b must be a 1-D tensor"):
        bl.linalg.get("cg")(lambda v: v, bad_b)


def test_solver_rejects_x0_of_wrong_shape():
    with pytest.raises(ValueError, match=r"x0 has shape \(3,\) but b has \(2,\)"):
        bl.linalg.get("cg")(lambda v: v, torch.ones(2, dtype=DT), torch.ones(3, dtype=DT))


def test_cg_nonfinite_matvec_reports_nonfinite():
    b = torch.ones(3, dtype=DT)
    with pytest.warns(bl.ConvergenceWarning, match="non-finite"):
        x, info = bl.linalg.get("cg")(lambda v: v * float("nan"), b)
    assert info.status is LinearSolveStatus.NONFINITE
    assert not info.converged
    assert torch.isfinite(x).all()


# --------------------------------------------------------------------------- Neumann: failures


def test_neumann_too_large_step_diverges():
    A, b, eig = spd_system(10, 10.0, seed=5)
    lam_max = eig.max().item()
    with pytest.warns(bl.ConvergenceWarning, match="diverged"):
        x, info = bl.linalg.get("neumann", step_size=3.0 / lam_max, max_iter=200)(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.DIVERGED
    assert info.converged is False
    assert info.iterations < 200  # stopped early, not at max_iter
    assert info.residual_norm > 10 * torch.linalg.vector_norm(b).item()
    assert torch.isfinite(x).all()


def test_neumann_diverged_warns_even_when_warn_false():
    A, b, eig = spd_system(10, 10.0, seed=5)
    with pytest.warns(bl.ConvergenceWarning):
        _, info = bl.linalg.get("neumann", step_size=3.0 / eig.max().item(), warn=False)(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.DIVERGED


@pytest.mark.parametrize(
    "diag",
    [
        [-1.0, -2.0, -5.0],  # negative definite: the power iteration sees lambda < 0
        [5.0, 1.0, -1.0],  # indefinite, largest eigenvalue positive: the series diverges
        [1.0, 2.0, -6.0],  # indefinite, largest |eigenvalue| negative
    ],
)
def test_neumann_indefinite_auto_step_is_not_success(diag):
    d = torch.tensor(diag, dtype=DT)
    b = torch.ones(3, dtype=DT)
    with pytest.warns(bl.ConvergenceWarning):
        x, info = bl.linalg.get("neumann", max_iter=500)(lambda v: d * v, b)
    assert not info.status.success
    assert info.converged is False
    assert info.status in (LinearSolveStatus.NEGATIVE_CURVATURE, LinearSolveStatus.DIVERGED,
                           LinearSolveStatus.NONFINITE)
    assert torch.isfinite(x).all()


def test_neumann_max_iter_warns_and_respects_warn_false():
    A, b, eig = spd_system(10, 20.0, seed=6)
    step = 1.0 / eig.max().item()
    with pytest.warns(bl.ConvergenceWarning, match="maximum number of iterations"):
        _, info = bl.linalg.get("neumann", step_size=step, max_iter=3)(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.MAX_ITER and info.iterations == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = bl.linalg.get("neumann", step_size=step, max_iter=3, warn=False)(lambda v: A @ v, b)
    assert info.status is LinearSolveStatus.MAX_ITER


def test_neumann_known_series():
    # A = 2 I, alpha = 0.25: x_k = sum_{j<k} 0.25 * 0.5^j b  -> 0.5 b
    b = torch.tensor([1.0, -2.0], dtype=DT)
    x, info = bl.linalg.get("neumann", step_size=0.25, max_iter=2, warn=False)(lambda v: 2.0 * v, b)
    torch.testing.assert_close(x, (0.25 + 0.125) * b, rtol=1e-15, atol=0)
    assert info.residual_norm == pytest.approx(0.25 * torch.linalg.vector_norm(b).item(), rel=1e-14)


# --------------------------------------------------------------------------- info contract

INFO_FIELDS = ("iterations", "residual_norm", "relative_residual", "converged", "status", "matvecs",
               "message", "solver")


def _scenarios():
    A, b, eig = spd_system(12, 100.0, seed=7)
    lam = eig.max().item()
    Ai, bi = _indefinite_diag()
    d_neg = torch.tensor([-1.0, -2.0, -5.0], dtype=DT)

    def lstsq_solver(matvec, rhs):
        M = torch.stack([matvec(e) for e in torch.eye(rhs.shape[0], dtype=rhs.dtype)], dim=1)
        return torch.linalg.solve(M, rhs)

    return {
        "cg_converged": (bl.linalg.get("cg"), A, b, "cg"),
        "cg_max_iter": (bl.linalg.get("cg", max_iter=2), A, b, "cg"),
        "cg_warm": (bl.linalg.get("cg", max_iter=2), A, b, "cg"),
        "cg_negative_curvature": (bl.linalg.get("cg"), Ai, bi, "cg"),
        "neumann_converged": (bl.linalg.get("neumann", step_size=1 / lam, max_iter=5000, tol=1e-9), A, b,
                              "neumann"),
        "neumann_auto": (bl.linalg.get("neumann", max_iter=5000, tol=1e-9), A, b, "neumann"),
        "neumann_max_iter": (bl.linalg.get("neumann", step_size=1 / lam, max_iter=4), A, b, "neumann"),
        "neumann_diverged": (bl.linalg.get("neumann", step_size=3 / lam), A, b, "neumann"),
        "neumann_negative_definite": (bl.linalg.get("neumann"), torch.diag(d_neg),
                                      torch.ones(3, dtype=DT), "neumann"),
        "callable": (bl.linalg.get(lstsq_solver), A, b, "callable"),
    }


SCENARIOS = list(_scenarios())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_info_contract(scenario):
    solver, A, b, name = _scenarios()[scenario]
    x0 = torch.full_like(b, 0.1) if scenario == "cg_warm" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.ConvergenceWarning)
        x, info = solver(lambda v: A @ v, b, x0)
    assert isinstance(info, LinearSolveInfo)
    for f in INFO_FIELDS:
        assert hasattr(info, f), f
    assert isinstance(info.iterations, int) and info.iterations >= 0
    assert isinstance(info.matvecs, int) and info.matvecs >= 0
    assert isinstance(info.converged, bool)
    assert isinstance(info.status, LinearSolveStatus)
    assert info.converged == info.status.success
    assert info.converged == (info.relative_residual <= solver.tol)
    assert info.message == info.status.value and len(info.message) > 20
    assert info.solver == name
    assert isinstance(info.residual_norm, float) and isinstance(info.relative_residual, float)
    # the reported residual is the residual of the returned x
    r_true = true_residual(A, b, x)
    bnorm = torch.linalg.vector_norm(b).item()
    assert info.residual_norm == pytest.approx(r_true, rel=1e-6, abs=1e-9 * bnorm)
    assert info.relative_residual == pytest.approx(info.residual_norm / bnorm, rel=1e-12)
    assert x.shape == b.shape and x.dtype == b.dtype


def test_raise_if_failed():
    A, b, _ = spd_system(6, 10.0, seed=8)
    _, info = bl.linalg.get("cg")(lambda v: A @ v, b)
    assert info.raise_if_failed() is info
    _, info = bl.linalg.get("cg", max_iter=1, warn=False)(lambda v: A @ v, b)
    with pytest.raises(bl.ConvergenceError, match=r"cg stopped after 1 iterations"):
        info.raise_if_failed()


# --------------------------------------------------------------------------- registry


def test_available_contains_builtin_solvers():
    names = bl.linalg.available()
    assert "cg" in names and "neumann" in names
    assert names == sorted(names)


def test_get_builds_the_right_class():
    assert isinstance(bl.linalg.get("cg"), bl.linalg.CG)
    assert isinstance(bl.linalg.get("CG"), bl.linalg.CG)
    assert isinstance(bl.linalg.get("neumann"), bl.linalg.Neumann)
    s = bl.linalg.get("cg", max_iter=7, tol=1e-4, warn=False)
    assert (s.max_iter, s.tol, s.warn) == (7, 1e-4, False)
    assert "max_iter=7" in repr(s)


def test_get_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown linear solver 'nope'; available: .*cg.*neumann"):
        bl.linalg.get("nope")


def test_get_unknown_option_names_valid_options():
    with pytest.raises(TypeError, match=r"'maxiter'.*valid options: .*max_iter.*tol"):
        bl.linalg.get("cg", maxiter=3)
    with pytest.raises(TypeError, match=r"valid options: .*step_size"):
        bl.linalg.get("neumann", stepsize=0.1)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("cg", {"max_iter": 0}, r"Invalid max_iter: 0"),
        ("cg", {"max_iter": -5}, r"Invalid max_iter: -5"),
        ("cg", {"tol": -1}, r"Invalid tol: -1"),
        ("cg", {"tol": float("nan")}, r"Invalid tol"),
        ("neumann", {"step_size": 0}, r"Invalid step_size: 0"),
        ("neumann", {"step_size": -0.1}, r"Invalid step_size"),
        ("neumann", {"max_iter": 0}, r"Invalid max_iter"),
        ("neumann", {"power_iters": 0}, r"Invalid power_iters"),
    ],
)
def test_invalid_option_values_raise_in_constructor(name, options, match):
    with pytest.raises(ValueError, match=match):
        bl.linalg.get(name, **options)


@pytest.mark.parametrize("options", [{"max_iter": 2.5}, {"max_iter": True}, {"tol": "1e-3"}])
def test_wrongly_typed_option_values_raise_type_error(options):
    with pytest.raises(TypeError, match="must be"):
        bl.linalg.get("cg", **options)


def test_get_passes_instance_through():
    s = bl.linalg.CG(max_iter=4)
    assert bl.linalg.get(s) is s


def test_get_instance_with_options_raises():
    s = bl.linalg.CG(max_iter=4)
    with pytest.raises(TypeError, match=r"cannot be applied to an existing"):
        bl.linalg.get(s, tol=1e-3)


def test_get_rejects_non_callable():
    with pytest.raises(TypeError, match="must be a name"):
        bl.linalg.get(3)


def test_callable_solver_exact_is_converged():
    A, b, _ = spd_system(7, 30.0, seed=9)

    def exact(matvec, rhs):
        return torch.linalg.solve(A, rhs)

    solver = bl.linalg.get(exact)
    assert isinstance(solver, bl.linalg.LinearSolver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = solver(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert info.converged and info.status is LinearSolveStatus.CONVERGED
    assert info.solver == "callable"
    assert info.matvecs == 1
    assert info.residual_norm == pytest.approx(true_residual(A, b, x), abs=1e-14)


def test_callable_solver_inexact_is_judged_not_converged():
    A, b, _ = spd_system(7, 30.0, seed=9)

    def sloppy(matvec, rhs):
        return torch.linalg.solve(A, rhs) + 1e-3

    with pytest.warns(bl.ConvergenceWarning):
        x, info = bl.linalg.get(sloppy, tol=1e-8)(lambda v: A @ v, b)
    assert not info.converged
    assert info.relative_residual > 1e-8
    assert info.residual_norm == pytest.approx(true_residual(A, b, x), rel=1e-12)


def test_callable_solver_returning_tuple_and_wrong_shape():
    A, b, _ = spd_system(4, 3.0, seed=10)

    def with_info(matvec, rhs):
        return bl.linalg.cg(matvec, rhs)

    x, info = bl.linalg.get(with_info)(lambda v: A @ v, b)
    assert info.converged and info.iterations >= 1
    with pytest.raises(ValueError, match="must return a tensor shaped like b"):
        bl.linalg.get(lambda matvec, rhs: rhs[:2])(lambda v: A @ v, b)


def test_callable_solver_nonfinite():
    b = torch.ones(3, dtype=DT)
    with pytest.warns(bl.ConvergenceWarning):
        _, info = bl.linalg.get(lambda matvec, rhs: rhs * float("nan"))(lambda v: v, b)
    assert info.status is LinearSolveStatus.NONFINITE and not info.converged


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test disappear after it."""
    monkeypatch.setattr(linalg_base._REGISTRY, "_classes", dict(linalg_base._REGISTRY._classes))
    return linalg_base._REGISTRY


def test_register_subclass(scratch_registry):
    @bl.linalg.register("Test-Damped-CG")
    class DampedCG(bl.linalg.CG):
        pass

    assert "test_damped_cg" in bl.linalg.available()
    s = bl.linalg.get("test_damped_cg", max_iter=5)
    assert type(s) is DampedCG and s.max_iter == 5
    A, b, _ = spd_system(3, 2.0, seed=11)
    _, info = s(lambda v: A @ v, b)
    assert info.solver == "test_damped_cg" and info.converged


def test_register_clash_raises(scratch_registry):
    with pytest.raises(ValueError, match="registered already"):
        @bl.linalg.register("cg")
        class OtherCG(bl.linalg.CG):
            pass


@pytest.mark.parametrize("thing", [object, int, lambda matvec, b: b, bl.solvers.get("gd").__class__])
def test_register_rejects_non_subclass(scratch_registry, thing):
    with pytest.raises(TypeError, match="subclass of LinearSolver"):
        bl.linalg.register("test_not_a_solver")(thing)
    assert "test_not_a_solver" not in bl.linalg.available()


# --------------------------------------------------------------------------- Hessian-vector products


def _nonlinear(a):
    def f(x):
        return (x ** 3).sum() + (a @ x) ** 2 + torch.sin(x).sum()
    return f


@pytest.fixture
def hvp_point():
    g = torch.Generator().manual_seed(21)
    n = 6
    a = torch.randn(n, dtype=DT, generator=g)
    x = torch.randn(n, dtype=DT, generator=g)
    v = torch.randn(n, dtype=DT, generator=g)
    return a, x, v


@pytest.mark.parametrize("mode", bl.linalg.EXACT_HVP_MODES)
def test_hvp_matches_exact_hessian(mode, hvp_point):
    a, x, v = hvp_point
    f = _nonlinear(a)
    H = torch.autograd.functional.hessian(f, x)
    # the closed form, as a check on the reference itself
    H_closed = torch.diag(6 * x - torch.sin(x)) + 2 * torch.outer(a, a)
    torch.testing.assert_close(H, H_closed, rtol=1e-12, atol=1e-12)
    x_before = x.clone()
    hv = bl.linalg.hvp(f, x, v, mode=mode)
    torch.testing.assert_close(hv, H @ v, rtol=1e-12, atol=1e-12)
    assert hv.dtype == DT and hv.shape == v.shape
    assert torch.equal(x, x_before) and not x.requires_grad


@pytest.mark.parametrize("mode", bl.linalg.EXACT_HVP_MODES)
def test_linearization_hvp_and_grad(mode, hvp_point):
    a, x, v = hvp_point
    f = _nonlinear(a)
    lin = bl.linalg.Linearization(lambda xx, y, e: f(xx), x, torch.zeros(0, dtype=DT), (), mode=mode)
    H = torch.autograd.functional.hessian(f, x)
    grad = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(lin.grad, grad, rtol=1e-12, atol=1e-12)
    for k in range(3):  # repeated products reuse the linearisation
        w = v * (k + 1) - k
        torch.testing.assert_close(lin.hvp(w), H @ w, rtol=1e-12, atol=1e-12)
    assert lin.count == 3
    # as a matvec for CG: solve H x = v on an SPD Hessian
    if torch.linalg.eigvalsh(H).min() > 0:
        sol, info = bl.linalg.get("cg")(lin.hvp, v)
        assert info.converged
        torch.testing.assert_close(sol, torch.linalg.solve(H, v), rtol=1e-8, atol=1e-10)


def _coupled(x, y, e):
    # nonlinear in x, y and e; mixed derivatives non-trivial
    return (x ** 2 * y[: x.shape[0]]).sum() + (x @ y[: x.shape[0]]) ** 2 + torch.exp(e[0] * x).sum() \
        + (y ** 3).sum() + torch.sin(x.sum() * y[-1])


@pytest.mark.parametrize("mode", bl.linalg.EXACT_HVP_MODES)
def test_linearization_mixed_vjp_matches_exact(mode):
    g = torch.Generator().manual_seed(22)
    n, m = 4, 6
    x = torch.randn(n, dtype=DT, generator=g)
    y = torch.randn(m, dtype=DT, generator=g)
    e0 = torch.randn(n, dtype=DT, generator=g) * 0.3
    v = torch.randn(n, dtype=DT, generator=g)

    def grad_x(yy, ee):
        xx = x.detach().clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(_coupled(xx, yy, [ee]), xx, create_graph=True)
        return gx

    J_y, J_e = torch.autograd.functional.jacobian(grad_x, (y, e0))  # (n, m), (n, n)
    H_xx = torch.autograd.functional.hessian(lambda xx: _coupled(xx, y, [e0]), x)

    lin = bl.linalg.Linearization(_coupled, x, y, [e0], mode=mode)
    torch.testing.assert_close(lin.hvp(v), H_xx @ v, rtol=1e-12, atol=1e-12)
    gy, ge = lin.mixed_vjp(v)
    torch.testing.assert_close(gy, J_y.T @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ge, J_e.T @ v, rtol=1e-12, atol=1e-12)
    assert gy.shape == y.shape and ge.shape == e0.shape


@pytest.mark.parametrize("mode", bl.linalg.EXACT_HVP_MODES)
def test_mixed_vjp_zero_where_independent(mode):
    g = torch.Generator().manual_seed(23)
    x = torch.randn(3, dtype=DT, generator=g)
    y = torch.randn(2, dtype=DT, generator=g)
    e = torch.randn(1, dtype=DT, generator=g)
    # depends on y only through a term that is separable from x: zero mixed derivative
    lin = bl.linalg.Linearization(lambda xx, yy, ee: (xx ** 4).sum() + (yy ** 2).sum() * ee[0].sum(),
                                  x, y, [e], mode=mode)
    gy, ge = lin.mixed_vjp(torch.ones(3, dtype=DT))
    assert torch.equal(gy, torch.zeros(2, dtype=DT))
    assert torch.equal(ge, torch.zeros(1, dtype=DT))
    torch.testing.assert_close(lin.hvp(torch.ones(3, dtype=DT)), 12 * x ** 2, rtol=1e-12, atol=1e-12)


def test_unknown_hvp_mode_lists_modes():
    x = torch.ones(2, dtype=DT)
    with pytest.raises(ValueError, match=r"unknown hvp mode 'sideways'; available: reverse, forward, gauss_newton"):
        bl.linalg.hvp(lambda t: (t ** 2).sum(), x, x, mode="sideways")
    with pytest.raises(ValueError, match=r"available: reverse, forward"):
        bl.linalg.Linearization(lambda a, b, e: (a ** 2).sum(), x, x, (), mode="fwd")


@pytest.mark.parametrize("mode", bl.linalg.EXACT_HVP_MODES)
def test_linear_function_gives_zero_hvp(mode):
    a = torch.tensor([1.0, -2.0, 3.0], dtype=DT)
    x = torch.tensor([0.5, 0.1, -0.3], dtype=DT)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    hv = bl.linalg.hvp(lambda t: a @ t + 4.0, x, v, mode=mode)
    assert torch.equal(hv, torch.zeros(3, dtype=DT))
    # linear in x but coupled with y: zero Hessian, non-zero mixed term (d/dy <y, v> = v)
    y = torch.tensor([2.0, 0.0, 1.0], dtype=DT)
    lin = bl.linalg.Linearization(lambda xx, yy, e: xx @ yy, x, y, (), mode=mode)
    assert torch.equal(lin.hvp(v), torch.zeros(3, dtype=DT))
    torch.testing.assert_close(lin.grad, y)
    (gy,) = lin.mixed_vjp(v)
    torch.testing.assert_close(gy, v)


def test_default_hvp_mode_is_listed():
    assert bl.linalg.DEFAULT_HVP_MODE in bl.linalg.HVP_MODES
    assert set(bl.linalg.HVP_MODES) == {"reverse", "forward", "gauss_newton", "gauss_newton_jacobian"}
    assert set(bl.linalg.EXACT_HVP_MODES) == {"reverse", "forward"}
    assert set(bl.linalg.GAUSS_NEWTON_MODES) == set(bl.linalg.HVP_MODES) - set(bl.linalg.EXACT_HVP_MODES)


# --------------------------------------------------------------------------- power iteration


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_top_eigenvalue_diagonal(seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor([0.3, 1.0, 2.0, 3.0, 4.0, 8.0], dtype=DT)
    d = d[torch.randperm(6, generator=g)]
    est, n = bl.linalg.power_iteration(lambda v: d * v, torch.zeros(6, dtype=DT))
    assert est == pytest.approx(8.0, rel=1e-2)
    assert est <= 8.0 * (1 + 1e-12)  # a Rayleigh quotient never exceeds lambda_max
    assert 1 <= n <= 20


def test_power_iteration_tight_tolerance():
    d = torch.linspace(1.0, 10.0, 25, dtype=DT)
    est, n = bl.linalg.power_iteration(lambda v: d * v, torch.zeros(25, dtype=DT), max_iter=500, rtol=1e-10)
    assert est == pytest.approx(10.0, rel=1e-3)
    assert n <= 500


def test_power_iteration_largest_magnitude_negative():
    d = torch.tensor([1.0, 2.0, -6.0], dtype=DT)
    est, _ = bl.linalg.power_iteration(lambda v: d * v, torch.zeros(3, dtype=DT), max_iter=200, rtol=1e-10)
    assert est == pytest.approx(-6.0, rel=1e-2)


def test_power_iteration_does_not_touch_global_rng():
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    d = torch.tensor([1.0, 5.0, 2.0], dtype=DT)
    bl.linalg.power_iteration(lambda v: d * v, torch.zeros(3, dtype=DT))
    assert torch.equal(torch.get_rng_state(), state)
    # and Neumann's automatic step size (which uses it) does not either
    bl.linalg.get("neumann", tol=1e-6, max_iter=200)(lambda v: d * v, torch.ones(3, dtype=DT))
    assert torch.equal(torch.get_rng_state(), state)


def test_power_iteration_is_deterministic_and_uses_generator():
    d = torch.linspace(1.0, 3.0, 10, dtype=DT)
    like = torch.zeros(10, dtype=DT)
    a = bl.linalg.power_iteration(lambda v: d * v, like, max_iter=5)
    b = bl.linalg.power_iteration(lambda v: d * v, like, max_iter=5)
    assert a == b
    c = bl.linalg.power_iteration(lambda v: d * v, like, max_iter=5,
                                  generator=torch.Generator().manual_seed(99))
    assert c[0] != a[0]
