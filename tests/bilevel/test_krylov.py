"""The Krylov solvers beyond CG: MINRES, GMRES(m), BiCGStab and CG on the normal equations.

Checked against ``torch.linalg.solve`` on random symmetric indefinite and non-symmetric systems (float64),
under ``torch.func.vmap`` against the per-system loop, with ``tol=0`` against the step-by-step solve, and
at their failures: a NaN product, a breakdown, a missing ``rmatvec``, GMRES's restarts.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl

DT = torch.float64
NEW = ["minres", "gmres", "bicgstab", "normal_cg"]


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    return q * torch.sign(torch.diagonal(r))


def symmetric_indefinite(n: int, cond: float, seed: int):
    """``Q diag(lam) Q^T`` with ``|lam|`` log-spaced in [1, cond] and both signs (for n >= 2), a random scale; b."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(0.0, math.log10(cond), n, dtype=DT) if n > 1 else torch.ones(1, dtype=DT)
    signs = torch.where(torch.rand(n, generator=g, dtype=DT) < 0.5, -1.0, 1.0)
    if n > 1:
        signs[0], signs[-1] = -1.0, 1.0  # indefinite for sure
    q = _orthogonal(n, g)
    scale = 10.0 ** (4 * torch.rand((), generator=g, dtype=DT).item() - 2)
    A = (q * (scale * signs * mags)) @ q.T
    return 0.5 * (A + A.T), torch.randn(n, generator=g, dtype=DT)


def nonsymmetric(n: int, skew: float, seed: int):
    """``s (I + skew K + 0.3 G)``, ``||K|| = ||G|| = 1``, K skew-symmetric: far from symmetric, yet
    ``x^T A x >= 0.7 s ||x||^2`` and ``kappa(A) <= (1.3 + skew) / 0.7`` (at most 4.7)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, n, dtype=DT, generator=g)
    K = K - K.T
    G = torch.randn(n, n, dtype=DT, generator=g)
    eye = torch.eye(n, dtype=DT)
    norm = lambda M: torch.linalg.matrix_norm(M, 2).clamp_min(1e-300)  # noqa: E731
    scale = 10.0 ** (4 * torch.rand((), generator=g, dtype=DT).item() - 2)
    A = scale * (eye + skew * K / norm(K) + 0.3 * G / norm(G))
    return A, torch.randn(n, generator=g, dtype=DT)


def solve(name, A, b, x0=None, **options):
    """``name`` on ``A x = b`` (``rmatvec`` for the solver that needs it)."""
    solver = bl.linalg.get(name, **options)
    transposed = {"rmatvec": lambda v: A.T @ v} if solver.needs_rmatvec else {}
    return solver(lambda v: A @ v, b, x0, **transposed)


def check_solution(A, b, x, info, tol):
    """Converged; the reported residual is the returned x's; x is torch.linalg.solve's to kappa * tol."""
    exact = torch.linalg.solve(A, b)
    true_res = torch.linalg.vector_norm(b - A @ x).item()
    bnorm = torch.linalg.vector_norm(b).item()
    assert info.converged, (info.status, info.relative_residual, info.iterations)
    assert info.relative_residual <= tol
    assert true_res == pytest.approx(info.residual_norm, rel=1e-3, abs=1e-12 * bnorm)
    kappa = torch.linalg.cond(A).item()
    assert (torch.linalg.vector_norm(x - exact) / torch.linalg.vector_norm(exact)).item() <= 10 * kappa * tol


# ------------------------------------------------------------------ against torch.linalg.solve


@pytest.mark.parametrize("name", ["minres", "gmres", "bicgstab"])
@settings(max_examples=15, deadline=None, derandomize=True)
@given(n=st.integers(1, 16), log_cond=st.floats(0.0, 1.5), seed=st.integers(0, 2**31 - 1))
def test_symmetric_indefinite_systems_are_solved(name, n, log_cond, seed):
    A, b = symmetric_indefinite(n, 10.0 ** log_cond, seed)
    options = {"restart": n} if name == "gmres" else {}  # restarted GMRES can stall on an indefinite A
    x, info = solve(name, A, b, max_iter=400, tol=1e-10, **options)
    check_solution(A, b, x, info, 1e-10)


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "normal_cg"])
@settings(max_examples=15, deadline=None, derandomize=True)
@given(n=st.integers(1, 24), skew=st.floats(0.0, 2.0), seed=st.integers(0, 2**31 - 1))
def test_nonsymmetric_systems_are_solved(name, n, skew, seed):
    A, b = nonsymmetric(n, skew, seed)
    options = {"restart": 10} if name == "gmres" else {}  # restarted: a cycle of 10 for up to 24 unknowns
    x, info = solve(name, A, b, max_iter=300, tol=1e-10, **options)
    check_solution(A, b, x, info, 1e-10)
    per_step = {"gmres": 1, "bicgstab": 2, "normal_cg": 2}[name]
    assert info.matvecs == per_step * info.iterations + (name == "normal_cg")  # normal_cg: A^T r0 first


@pytest.mark.parametrize("name", NEW)
def test_a_warm_start_is_used_and_counted(name):
    A, b = nonsymmetric(40, 1.0, seed=11) if name != "minres" else symmetric_indefinite(40, 10.0, seed=11)
    exact = torch.linalg.solve(A, b)
    x0 = exact + 1e-6 * torch.ones_like(b)
    cold, cold_info = solve(name, A, b, max_iter=200, tol=1e-10)
    warm, warm_info = solve(name, A, b, x0, max_iter=200, tol=1e-10)
    assert warm_info.converged and warm_info.iterations < cold_info.iterations
    per_step = 1 if name in ("minres", "gmres") else 2
    assert warm_info.matvecs == per_step * warm_info.iterations + (2 if name == "normal_cg" else 1)
    assert torch.allclose(warm, exact, rtol=1e-8, atol=0)


def test_cg_cannot_do_what_minres_does():
    A, b = symmetric_indefinite(12, 10.0, seed=2)
    with pytest.warns(bl.NegativeCurvatureWarning):
        _, info = solve("cg", A, b)
    assert info.status is bl.LinearSolveStatus.NEGATIVE_CURVATURE
    x, info = solve("minres", A, b, max_iter=200)
    check_solution(A, b, x, info, 1e-10)


@pytest.mark.parametrize("max_iter", [3, 200])
@pytest.mark.parametrize("name", NEW)
def test_info_contract(name, max_iter):
    A, b = symmetric_indefinite(20, 10.0, seed=4) if name == "minres" else nonsymmetric(20, 1.0, seed=4)
    x, info = solve(name, A, b, max_iter=max_iter, tol=1e-9, warn=False)
    assert info.solver == name and isinstance(info.status, bl.LinearSolveStatus)
    assert info.converged == (max_iter == 200) == info.status.success
    assert info.status is (bl.LinearSolveStatus.CONVERGED if info.converged else bl.LinearSolveStatus.MAX_ITER)
    assert isinstance(info.iterations, int) and isinstance(info.matvecs, int)
    assert isinstance(info.residual_norm, float) and isinstance(info.relative_residual, float)
    assert info.converged == (info.relative_residual <= 1e-9)
    bnorm = torch.linalg.vector_norm(b).item()
    assert info.residual_norm == pytest.approx(torch.linalg.vector_norm(b - A @ x).item(), rel=1e-6,
                                               abs=1e-12 * bnorm)
    assert info.relative_residual == pytest.approx(info.residual_norm / bnorm, rel=1e-12)
    assert x.shape == b.shape and x.dtype == b.dtype


# ------------------------------------------------------------------ GMRES restarts


def test_gmres_restarts_until_it_converges():
    A, b = nonsymmetric(40, 1.5, seed=3)
    x, info = solve("gmres", A, b, restart=5, max_iter=400, tol=1e-10)
    check_solution(A, b, x, info, 1e-10)
    assert info.iterations > 3 * 5  # several cycles
    _, full = solve("gmres", A, b, restart=40, max_iter=400, tol=1e-10)
    assert full.converged and full.iterations < info.iterations  # a longer cycle converges in fewer iterations
    # a budget of exactly one cycle stops where the cycle does, and a second cycle improves on it
    _, one = solve("gmres", A, b, restart=5, max_iter=5, tol=1e-10, warn=False)
    _, two = solve("gmres", A, b, restart=5, max_iter=10, tol=1e-10, warn=False)
    assert one.status is bl.LinearSolveStatus.MAX_ITER and two.residual_norm < 0.9 * one.residual_norm


def test_gmres_restart_is_validated_and_shown():
    with pytest.raises(ValueError, match=r"Invalid restart: 0"):
        bl.linalg.get("gmres", restart=0)
    with pytest.raises(TypeError, match=r"restart must be an int"):
        bl.linalg.get("gmres", restart=2.5)
    assert repr(bl.linalg.get("gmres", restart=7)) == "GMRES(max_iter=100, tol=1e-10, warn=True, restart=7)"


# ------------------------------------------------------------------ vmap and tol=0


def _batch(name, batch=4, n=9, seed=0):
    if name == "minres":
        systems = [symmetric_indefinite(n, 10.0, seed + i) for i in range(batch)]
    else:
        systems = [nonsymmetric(n, 1.0, seed + i) for i in range(batch)]
    return torch.stack([A for A, _ in systems]), torch.stack([b for _, b in systems])


@pytest.mark.parametrize("tol", [0.0, 1e-4])
@pytest.mark.parametrize("name", NEW)
def test_vmap_over_systems_equals_the_loop(name, tol):
    As, bs = _batch(name)
    options = {"restart": 4} if name == "gmres" else {}
    solver = bl.linalg.get(name, max_iter=12, tol=tol, warn=False, **options)
    assert solver.vmappable

    infos = []

    def one(A, b):
        transposed = {"rmatvec": lambda v: A.T @ v} if solver.needs_rmatvec else {}
        x, info = solver(lambda v: A @ v, b, **transposed)
        infos.append(info)
        return x

    batched = torch.func.vmap(one)(As, bs)
    assert infos[0].status is bl.LinearSolveStatus.UNCHECKED
    assert infos[0].matvecs == {"minres": 12, "gmres": 12, "bicgstab": 24, "normal_cg": 25}[name]
    loop = torch.stack([one(A, b) for A, b in zip(As, bs)])
    assert torch.allclose(batched, loop, rtol=1e-12, atol=1e-12)
    if tol:  # the systems stop early (frozen under vmap)
        assert min(info.iterations for info in infos[1:]) < 12


def _stepwise_pair(name, A, b, max_iter, **options):
    """tol=0 (read back once) and a tol no residual reaches (read back every step)."""
    fast = solve(name, A, b, tol=0.0, max_iter=max_iter, **options)
    slow = solve(name, A, b, tol=1e-300, max_iter=max_iter, **options)
    return fast, slow


def _same(fast, slow):
    (xf, f), (xs, s) = fast, slow
    assert torch.equal(xf, xs)
    for field in ("iterations", "residual_norm", "relative_residual", "status", "matvecs", "extra"):
        assert getattr(f, field) == getattr(s, field), field


@pytest.mark.parametrize("name", NEW)
def test_tol_zero_equals_the_step_by_step_solve(name):
    A, b = symmetric_indefinite(15, 10.0, seed=5) if name == "minres" else nonsymmetric(15, 2.0, seed=5)
    options = {"restart": 6} if name == "gmres" else {}
    _same(*_stepwise_pair(name, A, b, 25, warn=False, **options))


# ------------------------------------------------------------------ failures


def _poisoned(A, at: int):
    """``v -> A v`` that returns NaN on its ``at``-th call, and whenever it gets that call's ``v`` again
    (a function of ``v``, as a solve with ``tol=0`` replays its steps after an early stop)."""
    calls, bad = [0], []

    def matvec(v):
        calls[0] += 1
        if calls[0] == at:
            bad.append(v.clone())
        return A @ v * (float("nan") if any(torch.equal(v, u) for u in bad) else 1.0)
    return matvec


@pytest.mark.parametrize("tol", [1e-10, 0.0])
@pytest.mark.parametrize("name", NEW)
def test_a_nan_product_stops_with_nonfinite_and_a_finite_x(name, tol):
    A, b = symmetric_indefinite(10, 10.0, seed=6) if name == "minres" else nonsymmetric(10, 1.0, seed=6)
    solver = bl.linalg.get(name, tol=tol, max_iter=50)
    transposed = {"rmatvec": lambda v: A.T @ v} if solver.needs_rmatvec else {}
    with pytest.warns(bl.NonFiniteWarning):
        x, info = solver(_poisoned(A, 5), b, **transposed)
    assert info.status is bl.LinearSolveStatus.NONFINITE and not info.converged
    assert torch.isfinite(x).all() and 0 < info.iterations <= 5
    # the last finite iterate, with its own residual
    assert torch.linalg.vector_norm(b - A @ x).item() == pytest.approx(info.residual_norm, rel=1e-8)


def test_bicgstab_breakdown_is_reported_and_keeps_the_last_iterate():
    # [[1, 0], [0, J]] with J skew-symmetric (J^T = -J): the second iteration divides by zero
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=DT)
    b = torch.ones(3, dtype=DT)
    for tol in (1e-10, 0.0):
        with pytest.warns(bl.BreakdownWarning, match="could not continue"):
            x, info = solve("bicgstab", A, b, tol=tol)
        assert info.status is bl.LinearSolveStatus.BREAKDOWN and not info.converged
        assert info.status.breakdown and "gmres" in info.message
        assert info.iterations == 1 and torch.isfinite(x).all()
        assert torch.linalg.vector_norm(b - A @ x).item() == pytest.approx(info.residual_norm, rel=1e-12)
        assert info.matvecs == 2 * (info.iterations + 1)  # the discarded iteration's products too
    with pytest.warns(bl.BreakdownWarning):
        _same(*_stepwise_pair("bicgstab", A, b, 10))  # tol=0 replays up to the breakdown: the same result
    x, info = solve("gmres", A, b)  # GMRES does not break down
    check_solution(A, b, x, info, 1e-10)


def test_normal_cg_on_a_singular_system_stops_with_breakdown_at_the_least_squares_solution():
    A = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    with pytest.warns(bl.BreakdownWarning):
        x, info = solve("normal_cg", A, b)
    assert info.status is bl.LinearSolveStatus.BREAKDOWN
    assert torch.allclose(x, torch.tensor([0.5, 1.0, 0.0], dtype=DT))


def test_normal_cg_without_rmatvec_says_how_to_pass_it():
    A, b = nonsymmetric(5, 1.0, seed=7)
    solver = bl.linalg.get("normal_cg")
    with pytest.raises(ValueError, match=r"normal_cg needs the transposed product: pass rmatvec="):
        solver(lambda v: A @ v, b)
    with pytest.raises(ValueError, match=r"rmatvec="):  # the fixed-budget entry point too
        solver.solve_fixed(lambda v: A @ v, b)
    with pytest.raises(ValueError, match=r"rmatvec="):  # and inside vmap
        torch.func.vmap(lambda bb: solver(lambda v: A @ v, bb)[0])(b.expand(2, 5))
    with pytest.raises(TypeError, match=r"rmatvec must be a callable"):
        solver(lambda v: A @ v, b, rmatvec=A.T)


def test_normal_cg_damps_both_products():
    A, b = nonsymmetric(8, 1.0, seed=8)
    x, info = solve("normal_cg", A, b, damping=0.5, tol=1e-12, max_iter=200)
    assert info.converged
    assert torch.allclose(x, torch.linalg.solve(A + 0.5 * torch.eye(8, dtype=DT), b), rtol=1e-9, atol=0)


def test_rmatvec_is_ignored_by_the_solvers_that_do_not_need_it():
    A, b = nonsymmetric(6, 1.0, seed=9)
    for name in ("gmres", "bicgstab"):
        plain = bl.linalg.get(name)(lambda v: A @ v, b)
        given_t = bl.linalg.get(name)(lambda v: A @ v, b, rmatvec=lambda v: A.T @ v)
        assert torch.equal(plain[0], given_t[0])

    class Legacy(bl.linalg.LinearSolver):  # a user's solver written before rmatvec existed
        def _solve(self, matvec, b, x0):
            return b / 2.0, bl.linalg.LinearSolveInfo(1, 0.0, 0.0, True, bl.LinearSolveStatus.CONVERGED, 1)

    x, info = Legacy()(lambda v: 2.0 * v, b, rmatvec=lambda v: 2.0 * v)
    assert info.converged and torch.equal(x, b / 2.0)


# ------------------------------------------------------------------ symmetric, default_solver, the engine


def test_symmetric_says_which_solvers_need_a_symmetric_matrix_and_default_solver_follows():
    needs = {name: bl.linalg.get(name).symmetric for name in ("cg", "neumann", "minres", "gmres", "bicgstab",
                                                              "normal_cg")}
    assert needs == {"cg": True, "neumann": True, "minres": True, "gmres": False, "bicgstab": False,
                     "normal_cg": False}
    assert bl.linalg.get(lambda matvec, b: b).symmetric is False
    assert bl.linalg.default_solver(symmetric=True) == "cg"
    assert bl.linalg.default_solver(symmetric=False) == "gmres"
    assert not bl.linalg.get(bl.linalg.default_solver(False)).symmetric
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        bl.linalg.default_solver("yes")


@pytest.mark.parametrize("name", NEW)
def test_argmin_with_a_fixed_budget_runs_batched_under_vmap_and_equals_the_loop(name):
    # the engine's Hessian is symmetric: it hands normal_cg rmatvec = the Hessian-vector product, inside vmap too
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(3, 8, 4, generator=g, dtype=DT), torch.randn(3, 8, generator=g, dtype=DT)
    thetas = torch.randn(3, 4, generator=g, dtype=DT)
    problem = bl.ProximalProblem(lambda phi, d: 0.5 * ((d[0] @ phi - d[1]) ** 2).mean(), lam=1.0)
    linear = bl.linalg.get(name, max_iter=6, tol=0.0)

    def outer(t, Xi, yi):
        phi = bl.argmin(problem, t, (Xi, yi), solver=bl.solvers.get("gd", step_size=0.3, max_iter=40, tol=0.0),
                        linear_solver=linear)
        return (phi ** 2).sum()

    batched = thetas.clone().requires_grad_(True)
    torch.func.vmap(outer)(batched, X, y).sum().backward()
    looped = thetas.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop's fixed budget warns about nothing
        sum(outer(looped[i], X[i], y[i]) for i in range(3)).backward()
    assert torch.allclose(batched.grad, looped.grad, rtol=1e-10, atol=1e-12)
