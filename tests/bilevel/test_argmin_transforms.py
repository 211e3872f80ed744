"""``bl.argmin`` composes with ``torch.func``: vmap over tasks and grad through it equal the per-task loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl

TASKS, DIM, N = 4, 5, 12


def _loss(phi, data):
    X, y = data["X"], data["y"]
    return F.softplus(-y * (X @ phi)).mean()


def _tasks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(TASKS, N, DIM, generator=g, dtype=torch.float64)
    y = torch.randn(TASKS, N, generator=g, dtype=torch.float64).sign()
    Xv = torch.randn(TASKS, N, DIM, generator=g, dtype=torch.float64)
    yv = torch.randn(TASKS, N, generator=g, dtype=torch.float64).sign()
    thetas = torch.randn(TASKS, DIM, generator=g, dtype=torch.float64)
    return thetas, {"X": X, "y": y}, {"X": Xv, "y": yv}


PROBLEM = bl.ProximalProblem(_loss, lam=2.0)
SOLVERS = {
    "newton_cg": lambda: bl.solvers.get("newton_cg", tol=1e-13, cg_max_iter=20),
    "gd-line-search": lambda: bl.solvers.get("gd", tol=1e-12, max_iter=5000),
}


def _outer(theta, data, val, solver):
    phi = bl.argmin(PROBLEM, theta, data, solver=solver(), linear_solver=bl.linalg.get("cg", max_iter=60, tol=1e-14))
    return _loss(phi, val)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_vmap_of_argmin_equals_the_loop_values_and_gradients(solver):
    thetas, data, val = _tasks()
    batched_thetas = thetas.clone().requires_grad_(True)
    batched = torch.func.vmap(lambda t, d, v: _outer(t, d, v, SOLVERS[solver]))(batched_thetas, data, val)
    batched.sum().backward()
    loop_thetas = thetas.clone().requires_grad_(True)
    values = []
    for i in range(TASKS):
        task = {k: v[i] for k, v in data.items()}
        check = {k: v[i] for k, v in val.items()}
        values.append(_outer(loop_thetas[i], task, check, SOLVERS[solver]))
    torch.stack(values).sum().backward()
    assert torch.allclose(batched, torch.stack(values), rtol=0, atol=1e-12)
    assert torch.allclose(batched_thetas.grad, loop_thetas.grad, rtol=0, atol=1e-10)


def test_grad_through_argmin_is_the_hypergradient():
    thetas, data, val = _tasks(1)
    theta = thetas[0]
    task = {k: v[0] for k, v in data.items()}
    check = {k: v[0] for k, v in val.items()}
    g = torch.func.grad(lambda t: _outer(t, task, check, SOLVERS["newton_cg"]))(theta)
    phi = bl.solve(PROBLEM, theta, task, solver=SOLVERS["newton_cg"]()).phi
    ref, _ = bl.hypergradient(PROBLEM, lambda p, t: _loss(p, check), theta, phi, task,
                              linear_solver=bl.linalg.get("cg", max_iter=60, tol=1e-14))
    assert torch.allclose(g, ref, rtol=0, atol=1e-10)


def test_vmap_of_grad_through_argmin_equals_the_loop():
    thetas, data, val = _tasks(2)
    per_task = torch.func.vmap(torch.func.grad(lambda t, d, v: _outer(t, d, v, SOLVERS["newton_cg"])))(
        thetas, data, val)
    for i in range(TASKS):
        task = {k: v[i] for k, v in data.items()}
        check = {k: v[i] for k, v in val.items()}
        theta = thetas[i].clone().requires_grad_(True)
        _outer(theta, task, check, SOLVERS["newton_cg"]).backward()
        assert torch.allclose(per_task[i], theta.grad, rtol=0, atol=1e-10)


def test_full_output_under_vmap_is_one_result_per_task():
    thetas, data, _ = _tasks(3)
    results = []

    def one(t, d):
        phi, res = bl.argmin(PROBLEM, t, d, solver=SOLVERS["newton_cg"](), full_output=True)
        results.append(res)
        return phi

    torch.func.vmap(one)(thetas, data)
    assert len(results[0]) == TASKS and all(r.converged for r in results[0])


def test_argmin_differentiated_twice_is_a_clear_error():
    thetas, data, val = _tasks(4)
    theta = thetas[0].clone().requires_grad_(True)
    task = {k: v[0] for k, v in data.items()}
    check = {k: v[0] for k, v in val.items()}
    (g,) = torch.autograd.grad(_outer(theta, task, check, SOLVERS["newton_cg"]), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_a_module_stands_for_its_named_parameters():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 1, dtype=torch.float64)

    def loss(phi, data):
        return ((torch.func.functional_call(net, phi, (data[0],)) - data[1]) ** 2).mean()

    problem = bl.ProximalProblem(loss, lam=1.0)
    solver = bl.solvers.get("newton_cg", tol=1e-12)
    phi = bl.argmin(problem, net, (X, y), solver=solver)
    assert set(phi) == {"weight", "bias"}
    loss(phi, (X, y)).backward()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    loss(bl.argmin(problem, params, (X, y), solver=solver), (X, y)).backward()
    assert torch.allclose(net.weight.grad, params["weight"].grad, rtol=0, atol=1e-12)
    assert torch.allclose(net.bias.grad, params["bias"].grad, rtol=0, atol=1e-12)


def test_vmap_of_argmin_with_a_batched_phi0_equals_the_loop():
    thetas, data, _ = _tasks(5)
    starts = thetas + 1.0

    def one(t, p0, d):
        return bl.argmin(PROBLEM, t, d, solver=SOLVERS["newton_cg"](), phi0=p0)

    batched = torch.func.vmap(one)(thetas, starts, data)
    loop = torch.stack([one(thetas[i], starts[i], {k: v[i] for k, v in data.items()}) for i in range(TASKS)])
    assert torch.allclose(batched, loop, rtol=0, atol=1e-12)


def test_a_fixed_budget_runs_batched_under_vmap_and_equals_the_loop():
    thetas, data, val = _tasks(6)
    solver = lambda: bl.solvers.get("gd", step_size=0.5, max_iter=30, tol=0.0)  # noqa: E731
    linear = lambda: bl.linalg.get("cg", max_iter=10, tol=0.0)  # noqa: E731

    def outer(t, d, v):
        return _loss(bl.argmin(PROBLEM, t, d, solver=solver(), linear_solver=linear()), v)

    calls = []
    original = bl._argmin._ArgminBatched.forward

    def counted(*args):
        calls.append(1)
        return original(*args)

    batched_thetas = thetas.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bl._argmin._ArgminBatched, "forward", staticmethod(counted))
        values = torch.func.vmap(outer)(batched_thetas, data, val)
    assert len(calls) == 1  # one batched forward, not one per task
    values.sum().backward()
    loop_thetas = thetas.clone().requires_grad_(True)
    loop = torch.stack([outer(loop_thetas[i], {k: x[i] for k, x in data.items()}, {k: x[i] for k, x in val.items()})
                        for i in range(TASKS)])
    loop.sum().backward()
    assert torch.allclose(values, loop, rtol=0, atol=1e-12)
    assert torch.allclose(batched_thetas.grad, loop_thetas.grad, rtol=0, atol=1e-10)
