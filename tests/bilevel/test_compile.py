"""compile=True on the fixed-step inner solvers: the eager solution and hypergradient (up to rounding), a clean
fallback with a CompileWarning when torch.compile fails, and option checks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl


def logistic(seed=0, n=60, d=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) > 0.5).double()

    def G(w, h, data):
        Xd, yd = data
        return F.binary_cross_entropy_with_logits(Xd @ w, yd) + 0.5 * (torch.exp(h) * w * w).sum()
    return bl.InnerProblem(G), torch.zeros(d, dtype=torch.float64, requires_grad=True), (X, y)


@pytest.mark.parametrize("name, options", [("gd", {"step_size": 0.5}), ("agd", {"step_size": 0.5, "mu": 0.1})])
def test_compiled_solver_gives_the_eager_solution_and_hypergradient(name, options, compiled_or_skip):
    problem, h, data = logistic()
    grads, phis = {}, {}
    for compile in (False, True):
        solver = bl.solvers.get(name, max_iter=60, tol=0.0, compile=compile, **options)
        theta = h.detach().clone().requires_grad_(True)

        def run():
            phi = bl.argmin(problem, theta, data, solver=solver, phi0=torch.zeros(5, dtype=torch.float64))
            (phi ** 2).sum().backward()
            return phi.detach()
        phis[compile] = compiled_or_skip(run) if compile else run()
        grads[compile] = theta.grad
        if compile:  # a second solve reuses the compiled code and agrees too
            again = bl.solve(problem, h.detach(), data, solver=solver, phi0=torch.zeros(5, dtype=torch.float64))
            torch.testing.assert_close(again.phi, phis[True], rtol=1e-12, atol=1e-14)
            assert "compile=True" in repr(solver)
    torch.testing.assert_close(phis[True], phis[False], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-9, atol=1e-12)


def test_a_failed_compile_warns_once_and_the_solve_goes_on_eagerly(monkeypatch):
    problem, h, data = logistic()
    eager = bl.solve(problem, h.detach(), data, solver=bl.solvers.get("gd", step_size=0.5, max_iter=30, tol=0.0))
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            calls.append(1)
            raise RuntimeError("InductorError: no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    solver = bl.solvers.get("gd", step_size=0.5, max_iter=30, tol=0.0, compile=True)
    with pytest.warns(bl.CompileWarning, match="the inner objective.*torch.compile failed.*no C\\+\\+ compiler"):
        res = bl.solve(problem, h.detach(), data, solver=solver)
    torch.testing.assert_close(res.phi, eager.phi, rtol=0, atol=0)  # the eager steps, exactly
    assert res.grad_norm == eager.grad_norm and res.status is eager.status
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.CompileWarning)  # the solver does not try (nor warn) again
        bl.solve(problem, h.detach(), data, solver=solver)
    assert len(calls) == 1


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile must be True or False"):
        bl.solvers.get("gd", step_size=0.1, compile="yes")
