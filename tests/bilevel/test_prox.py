"""bilevel.prox: proximal operators and projections.

Each operator is checked against a brute-force solution of its definition (cvxpy), the
projections for idempotence, feasibility and the variational inequality, the derivatives in
``x`` and ``theta`` (autograd, ``torch.func.vjp`` / ``jvp``) against central finite
differences, ``torch.func.vmap`` against a loop, ``value`` against its formula, and every
documented error.
"""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

import bilevel as bl
from bilevel import prox as P

DT = torch.float64
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def t(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=DT)


# --------------------------------------------------------------------------- random instances


def instance(name: str, rng: np.random.Generator, n: int) -> dict:
    """A random regulariser of kind ``name`` for ``n`` coordinates, with the same term written in cvxpy.

    Returns ``reg``, ``theta`` (what prox / value get), and ``cvx(z) -> (expression, constraints)``.
    Several parameters come as callables of ``theta`` or as per-coordinate tensors.
    """
    if name == "zero":
        return dict(reg=P.Zero(), theta=None, cvx=lambda z: (0, []))
    if name == "l1":
        s = rng.uniform(0.0, 1.5)
        return dict(reg=P.L1(s), theta=None, cvx=lambda z: (s * cp.norm1(z), []))
    if name == "l1_weights":                      # per-coordinate weights from a callable of theta
        log_w = rng.normal(size=n) - 0.5
        return dict(reg=P.L1(lambda th: th.exp()), theta=t(log_w),
                    cvx=lambda z: (cp.sum(cp.multiply(np.exp(log_w), cp.abs(z))), []))
    if name == "elastic_net":                     # a dict theta; l2 per coordinate, l1 a number
        l1, l2 = rng.uniform(0.0, 1.0), rng.uniform(0.0, 2.0, size=n)
        theta = {"l2": t(l2)}
        return dict(reg=P.ElasticNet(l1, lambda th: th["l2"]), theta=theta,
                    cvx=lambda z: (l1 * cp.norm1(z) + 0.5 * cp.sum(cp.multiply(l2, cp.square(z))), []))
    if name == "group_l1":                        # arbitrary groups, per-group strengths, sqrt-size weights
        n_groups = int(rng.integers(1, n + 1))
        ids = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, size=n - n_groups)])
        rng.shuffle(ids)
        lam = rng.uniform(0.0, 1.5, size=n_groups)
        members = [np.flatnonzero(ids == g) for g in range(n_groups)]
        weights = np.sqrt([len(m) for m in members])
        reg = P.GroupL1(t(lam), groups=[torch.as_tensor(m) for m in members], size_weighted=True)
        return dict(reg=reg, theta=None,
                    cvx=lambda z: (sum(lam[g] * weights[g] * cp.norm(z[members[g]], 2) for g in range(n_groups)),
                                   []))
    if name == "group_l1_blocks":                 # equal consecutive blocks given as a size, a log-strength
        size = int(rng.integers(1, 4))
        log_s = rng.normal() - 0.5
        m = n - n % size or size
        blocks = [list(range(i, i + size)) for i in range(0, m, size)]
        return dict(reg=P.GroupL1(lambda th: th.exp(), groups=size), theta=t(log_s), n=m,
                    cvx=lambda z: (math.exp(log_s) * sum(cp.norm(z[b], 2) for b in blocks), []))
    if name == "nonnegative":
        return dict(reg=P.NonNegative(), theta=None, cvx=lambda z: (0, [z >= 0]))
    if name == "box":                             # tensor lower (some -inf), callable upper
        lo = rng.normal(size=n)
        lo[rng.random(n) < 0.25] = -np.inf
        width = rng.uniform(0.0, 2.0, size=n)
        theta = t(width)
        hi = np.where(np.isfinite(lo), lo, -1.0) + width

        def cons(z):
            finite = np.flatnonzero(np.isfinite(lo))
            return [z[finite] >= lo[finite]] if len(finite) else []
        return dict(reg=P.Box(t(lo), lambda th: torch.where(torch.isinf(t(lo)), -1.0, t(lo)) + th),
                    theta=theta, cvx=lambda z: (0, cons(z) + [z <= hi]))
    if name == "simplex":
        r = rng.uniform(0.2, 3.0)
        return dict(reg=P.Simplex(r), theta=None, cvx=lambda z: (0, [z >= 0, cp.sum(z) == r]))
    if name == "l2_ball":                         # a log-radius
        log_r = rng.normal()
        return dict(reg=P.L2Ball(lambda th: th.exp()), theta=t(log_r),
                    cvx=lambda z: (0, [cp.norm(z, 2) <= math.exp(log_r)]))
    raise KeyError(name)


ALL = ["zero", "l1", "l1_weights", "elastic_net", "group_l1", "group_l1_blocks", "nonnegative", "box", "simplex",
       "l2_ball"]


def brute_force_prox(cvx, x: np.ndarray, step: float) -> np.ndarray:
    z = cp.Variable(x.shape[0])
    term, constraints = cvx(z)
    problem = cp.Problem(cp.Minimize(step * term + 0.5 * cp.sum_squares(z - x)), constraints)
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert problem.status == cp.OPTIMAL, problem.status
    return z.value


# --------------------------------------------------------------------------- prox = argmin of its definition


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(min_value=1, max_value=8), seed=seeds, step=st.floats(min_value=0.05, max_value=3.0),
       scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_prox_is_the_minimiser_of_its_definition(name, n, seed, step, scale):
    rng = np.random.default_rng(seed)
    case = instance(name, rng, n)
    n = case.get("n", n)
    x = rng.normal(size=n) * scale
    z = case["reg"].prox(t(x), step, case["theta"])
    assert z.shape == (n,) and z.dtype == DT
    expected = brute_force_prox(case["cvx"], x, step)
    np.testing.assert_allclose(z.numpy(), expected, atol=1e-6, rtol=0)
    # and the value it minimises is no larger than at the brute-force point
    obj = lambda v: step * float(case["reg"].value(t(v), case["theta"])) + 0.5 * float(((t(v) - t(x)) ** 2).sum())
    if not case["reg"].indicator:
        assert obj(z.numpy()) <= obj(expected) + 1e-9


def test_prox_of_a_tensor_of_any_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g, dtype=DT)
    # elementwise operators keep the shape; whole-tensor ones act on the flattened tensor
    assert torch.equal(P.L1(0.3).prox(x, 1.0), P.L1(0.3).prox(x.reshape(-1), 1.0).reshape(x.shape))
    for reg in (P.Simplex(2.0), P.L2Ball(0.5), P.GroupL1(0.4, groups=4), P.GroupL1(0.4, groups=torch.arange(24) % 5)):
        z = reg.prox(x, 1.0)
        assert z.shape == x.shape
        torch.testing.assert_close(z, reg.prox(x.reshape(-1), 1.0).reshape(x.shape))
    assert abs(float(P.Simplex(2.0).prox(x, 1.0).sum()) - 2.0) < 1e-12


def test_plain_functions_match_the_classes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, generator=g, dtype=DT) * 2
    lo, hi = -torch.rand(7, generator=g, dtype=DT), torch.rand(7, generator=g, dtype=DT)
    assert torch.equal(P.soft_threshold(x, 0.5), P.L1(0.5).prox(x, 1.0))
    assert torch.equal(P.soft_threshold(x, 0.5), torch.sign(x) * torch.clamp(x.abs() - 0.5, min=0))
    assert torch.equal(P.project_simplex(x, 1.5), P.Simplex(1.5).prox(x, 1.0))
    assert torch.equal(P.project_box(x, lo, hi), torch.minimum(torch.maximum(x, lo), hi))
    assert torch.equal(P.project_box(x, lower=0.0), torch.clamp(x, min=0.0))
    assert torch.equal(P.project_box(x, upper=hi), torch.minimum(x, hi))
    assert torch.equal(P.project_box(x), x)
    z = P.project_l2_ball(x, 0.5)
    torch.testing.assert_close(z, x * 0.5 / torch.linalg.vector_norm(x))
    assert torch.equal(P.project_l2_ball(x * 1e-3, 0.5), x * 1e-3)


def test_float32_inputs_stay_float32_and_are_not_modified():
    x = torch.tensor([1.0, -2.0, 0.25], dtype=torch.float32)
    before = x.clone()
    for reg in (P.L1(torch.tensor(0.5, dtype=DT)), P.ElasticNet(0.1, 0.2), P.GroupL1(0.5, groups=1), P.NonNegative(),
                P.Box(torch.tensor(-1.0, dtype=DT), 1.0), P.Simplex(), P.L2Ball(), P.Zero()):
        z = reg.prox(x, 0.7)
        assert z.dtype == torch.float32, reg
        assert reg.value(x).dtype == torch.float32, reg
        assert torch.equal(x, before), reg


# --------------------------------------------------------------------------- projections


def feasible_points(name: str, reg, theta, rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    """``k`` random points of the set, drawn without the projection."""
    if name == "nonnegative":
        return t(np.abs(rng.normal(size=(k, n))))
    if name == "box":
        lo = reg.bounds.lower.tensor.numpy()
        hi = reg.bounds.upper.fn(theta).numpy()
        base = np.where(np.isfinite(lo), lo, hi - 5.0)
        return t(base + rng.random((k, n)) * (hi - base))
    if name == "simplex":
        e = rng.exponential(size=(k, n))
        return t(reg.radius.number * e / e.sum(axis=1, keepdims=True))
    if name == "l2_ball":
        r = math.exp(float(theta))
        d = rng.normal(size=(k, n))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return t(d * r * rng.random((k, 1)) ** (1.0 / n))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["nonnegative", "box", "simplex", "l2_ball"])
@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(min_value=1, max_value=10), seed=seeds, scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_projections_are_idempotent_feasible_and_satisfy_the_variational_inequality(name, n, seed, scale):
    rng = np.random.default_rng(seed)
    case = instance(name, rng, n)
    reg, theta = case["reg"], case["theta"]
    assert reg.indicator
    x = t(rng.normal(size=n) * scale)
    p = reg.prox(x, float(rng.uniform(0.1, 5.0)), theta)
    assert float(reg.value(p, theta)) == 0.0                                     # feasible
    torch.testing.assert_close(reg.prox(p, 1.0, theta), p, rtol=0, atol=1e-12)  # idempotent
    z = feasible_points(name, reg, theta, rng, n, k=16)
    assert all(float(reg.value(zi, theta)) == 0.0 for zi in z)
    # <x - P(x), z - P(x)> <= 0 for every z in the set: P(x) is the closest point
    inner = (z - p) @ (x - p)
    assert float(inner.max()) <= 1e-9 * (1 + float(x.abs().max())) ** 2, inner.max()


# --------------------------------------------------------------------------- values


def test_values_match_their_definitions():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, generator=g, dtype=DT)
    w = torch.rand(6, generator=g, dtype=DT)
    assert float(P.Zero().value(z)) == 0.0
    torch.testing.assert_close(P.L1(0.7).value(z), 0.7 * z.abs().sum())
    torch.testing.assert_close(P.L1(w).value(z), (w * z.abs()).sum())
    torch.testing.assert_close(P.L1(lambda th: th.exp()).value(z, torch.tensor(0.5, dtype=DT)),
                               math.exp(0.5) * z.abs().sum())
    torch.testing.assert_close(P.ElasticNet(0.3, w).value(z), 0.3 * z.abs().sum() + 0.5 * (w * z ** 2).sum())
    norms = torch.stack([z[:2].norm(), z[2:4].norm(), z[4:].norm()])
    torch.testing.assert_close(P.GroupL1(0.5, groups=2).value(z), 0.5 * norms.sum())
    per_group = t([1.0, 2.0, 3.0])
    torch.testing.assert_close(P.GroupL1(per_group, groups=2, size_weighted=True).value(z),
                               math.sqrt(2) * (norms * per_group).sum())
    ids = torch.tensor([3, 3, 7, 3, 7, 9])                      # groups {0,1,3}, {2,4}, {5}
    uneven = torch.stack([z[[0, 1, 3]].norm(), z[[2, 4]].norm(), z[[5]].norm()])
    sizes = torch.tensor([3.0, 2.0, 1.0], dtype=DT)
    torch.testing.assert_close(P.GroupL1(0.5, groups=ids, size_weighted=True).value(z),
                               0.5 * (sizes.sqrt() * uneven).sum())


@pytest.mark.parametrize("reg, feasible, infeasible", [
    (P.NonNegative(), [0.0, 1.0, 2.0], [0.0, -1e-3, 2.0]),
    (P.Box(-1.0, torch.tensor([1.0, 2.0, 3.0])), [-1.0, 2.0, 0.0], [-1.0, 2.01, 0.0]),
    (P.Box(None, 1.0), [-1e9, 1.0, 0.0], [0.0, 1.001, 0.0]),
    (P.Simplex(2.0), [0.5, 1.5, 0.0], [0.5, 1.6, 0.0]),
    (P.Simplex(2.0), [0.5, 1.5, 0.0], [-0.1, 2.1, 0.0]),
    (P.L2Ball(5.0), [3.0, 4.0, 0.0], [3.0, 4.01, 0.0]),
])
def test_indicator_values_are_zero_on_the_set_and_inf_off_it(reg, feasible, infeasible):
    feasible, infeasible = t(feasible), t(infeasible)
    assert float(reg.value(feasible)) == 0.0
    assert float(reg.value(feasible + 1e-12)) == 0.0          # within the tolerance
    assert float(reg.value(infeasible)) == math.inf
    assert reg.value(infeasible).dtype == DT and reg.value(infeasible).shape == ()


def test_indicator_tolerance_follows_the_dtype():
    z = torch.tensor([-1e-5, 1.0], dtype=torch.float32)      # 1e-5 < sqrt(eps32) = 3.5e-4
    assert float(P.NonNegative().value(z)) == 0.0
    assert float(P.NonNegative().value(z.double())) == math.inf
    assert float(P.NonNegative(tol=1e-4).value(z.double())) == 0.0
    assert float(P.NonNegative(tol=0.0).value(t([-1e-300, 0.0]))) == math.inf
    assert float(P.Box(-math.inf, 1.0, tol=0.0).value(t([-1e300, 1.0]))) == 0.0   # no inf - inf = NaN


# --------------------------------------------------------------------------- derivatives


def fd_jacobian(f, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences: the Jacobian of ``f`` (tensor -> tensor) at ``v``, shape ``out + in``."""
    cols = []
    for i in range(v.numel()):
        e = torch.zeros(v.numel(), dtype=v.dtype)
        e[i] = eps
        e = e.reshape(v.shape)
        cols.append((f(v + e) - f(v - e)) / (2 * eps))
    out = f(v)
    return torch.stack(cols, dim=-1).reshape(*out.shape, *v.shape)


def derivative_case(name: str, rng: np.random.Generator, n: int):
    """``(f(x, theta), x, theta, margin)``: prox with every parameter a callable of a flat ``theta``."""
    step = float(rng.uniform(0.3, 2.0))
    if name == "l1":
        reg = P.L1(lambda th: th.exp())
        theta = t(rng.normal(size=n) - 0.5)
        margin = lambda x, th: ((x.abs() - step * th.exp()).abs()).min()
    elif name == "elastic_net":
        reg = P.ElasticNet(lambda th: th[0].exp(), lambda th: th[1].exp())
        theta = t(rng.normal(size=2) - 0.5)
        margin = lambda x, th: ((x.abs() - step * th[0].exp()).abs()).min()
    elif name == "group_l1":
        ids = torch.as_tensor(rng.integers(0, 3, size=n))
        ids[:3] = torch.arange(3)
        reg = P.GroupL1(lambda th: th.exp(), groups=ids, size_weighted=True)
        theta = t(rng.normal(size=3) - 0.5)
        sizes = torch.bincount(ids).to(DT)

        def margin(x, th):
            norms = torch.zeros(3, dtype=DT).index_add(0, ids, x * x).sqrt()
            return (norms - step * th.exp() * sizes.sqrt()).abs().min()
    elif name == "nonnegative":
        reg, theta = P.NonNegative(), t([0.0])
        margin = lambda x, th: x.abs().min()
    elif name == "box":
        reg = P.Box(lambda th: th[:n], lambda th: th[:n] + th[n:].exp())
        theta = t(np.concatenate([rng.normal(size=n) - 0.5, rng.normal(size=n)]))
        margin = lambda x, th: torch.minimum((x - th[:n]).abs(), (x - th[:n] - th[n:].exp()).abs()).min()
    elif name == "simplex":
        reg = P.Simplex(lambda th: th.exp().sum())
        theta = t([rng.normal()])

        def margin(x, th):
            z = P.project_simplex(x, th.exp().sum())
            i = int(torch.argmax(z))
            return (x - (x[i] - z[i])).abs().min()
    elif name == "l2_ball":
        reg = P.L2Ball(lambda th: th.exp().reshape(()))
        theta = t([rng.normal()])
        margin = lambda x, th: (x.norm() - th.exp().sum()).abs()
    else:
        raise KeyError(name)
    return (lambda x, th: reg.prox(x, step, th)), theta, margin


DIFFERENTIABLE = ["l1", "elastic_net", "group_l1", "nonnegative", "box", "simplex", "l2_ball"]


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@pytest.mark.parametrize("seed", range(4))
def test_derivatives_in_x_and_theta_match_central_differences(name, seed):
    rng = np.random.default_rng(1000 * seed + DIFFERENTIABLE.index(name))
    n = 5
    f, theta, margin = derivative_case(name, rng, n)
    for _ in range(200):                                      # a point away from the kinks
        x = t(rng.normal(size=n) * 1.5)
        if float(margin(x, theta)) > 1e-3:
            break
    else:
        raise AssertionError("no point away from the kinks")
    jx_fd = fd_jacobian(lambda v: f(v, theta), x)
    jt_fd = fd_jacobian(lambda v: f(x, v), theta)
    # torch.func: reverse (vjp) and forward (jvp) mode, batched by vmap inside jacrev / jacfwd
    for jac in (jacrev, jacfwd):
        jx, jt = jac(f, argnums=(0, 1))(x, theta)
        torch.testing.assert_close(jx, jx_fd, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(jt, jt_fd, rtol=1e-6, atol=1e-7)
    # single products, and ordinary autograd
    u, dx, dt = (t(rng.normal(size=s)) for s in (n, n, theta.numel()))
    _, pullback = vjp(f, x, theta)
    gx, gt = pullback(u)
    torch.testing.assert_close(gx, u @ jx_fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gt, u @ jt_fd, rtol=1e-6, atol=1e-7)
    _, tangent = jvp(f, (x, theta), (dx, dt))
    torch.testing.assert_close(tangent, jx_fd @ dx + jt_fd @ dt, rtol=1e-6, atol=1e-7)
    xr, tr = x.clone().requires_grad_(), theta.clone().requires_grad_()
    ax, at = torch.autograd.grad(f(xr, tr) @ u, (xr, tr), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(ax, u @ jx_fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(at, u @ jt_fd, rtol=1e-6, atol=1e-7)


def test_l1_jacobian_is_the_active_set_diagonal_and_its_strength_derivative_is_minus_step_sign():
    x = t([3.0, -0.2, -2.5, 0.7, 0.0, -1.1])
    step, lam = 0.8, 1.0                                       # threshold 0.8
    reg = P.L1(lambda th: th)
    jx, jl = jacrev(lambda v, th: reg.prox(v, step, th), argnums=(0, 1))(x, t(lam))
    active = (x.abs() > step * lam).to(DT)
    assert torch.equal(jx, torch.diag(active))
    assert torch.equal(jl, -step * torch.sign(x) * active)
    jx_fwd = jacfwd(lambda v: reg.prox(v, step, t(lam)))(x)
    assert torch.equal(jx_fwd, torch.diag(active))


def test_derivatives_are_finite_at_zero_groups_and_the_origin():
    x = torch.zeros(4, dtype=DT, requires_grad=True)
    for reg in (P.GroupL1(0.5, groups=2), P.L2Ball(1.0), P.GroupL1(0.5, groups=torch.tensor([0, 1, 0, 1]))):
        z = reg.prox(x, 1.0)
        (g,) = torch.autograd.grad((z * t([1.0, 2.0, 3.0, 4.0])).sum() + reg.value(z), x)
        assert torch.isfinite(g).all(), reg
        assert torch.isfinite(jacfwd(lambda v: reg.prox(v, 1.0))(x.detach())).all(), reg


def test_simplex_jacobian_on_the_support_is_the_centering_projection():
    x = t([0.9, 0.1, 0.6, -1.0, 0.4])
    z = P.project_simplex(x, 1.0)
    support = z > 0
    k = int(support.sum())
    assert 1 < k < 5
    j = jacrev(P.project_simplex)(x)
    s = support.to(DT)
    torch.testing.assert_close(j, torch.diag(s) - torch.outer(s, s) / k, rtol=0, atol=1e-15)
    jr = jacrev(lambda r: P.project_simplex(x, r))(t(1.0))
    torch.testing.assert_close(jr, s / k, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", ALL)
def test_vmap_over_x_and_theta_equals_the_loop(name):
    rng = np.random.default_rng(ALL.index(name))
    n, batch = 6, 4
    case = instance(name, rng, n)
    reg, theta0, n = case["reg"], case["theta"], case.get("n", n)
    xs = t(rng.normal(size=(batch, n)) * 2)
    # a batch of theta: perturb the instance's own theta (keeps bounds ordered, strengths positive)
    if theta0 is None:
        thetas, in_dims = None, (0, None)
    elif isinstance(theta0, dict):
        thetas, in_dims = {k: v * t(rng.uniform(0.5, 1.5, size=(batch, *v.shape))) for k, v in theta0.items()}, (0, 0)
    else:
        thetas, in_dims = theta0 * t(rng.uniform(0.5, 1.5, size=(batch, *theta0.shape))), (0, 0)
    steps = t(rng.uniform(0.2, 2.0, size=batch))
    take = (lambda i: None) if thetas is None else \
        (lambda i: {k: v[i] for k, v in thetas.items()}) if isinstance(thetas, dict) else (lambda i: thetas[i])
    batched = vmap(lambda x, th: reg.prox(x, 0.7, th), in_dims=in_dims)(xs, thetas)
    looped = torch.stack([reg.prox(xs[i], 0.7, take(i)) for i in range(batch)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    # a batched step too, and the values
    batched = vmap(lambda x, s, th: reg.prox(x, s, th), in_dims=(0, 0, in_dims[1]))(xs, steps, thetas)
    looped = torch.stack([reg.prox(xs[i], steps[i], take(i)) for i in range(batch)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    points = torch.stack([reg.prox(xs[i], 0.7, take(i)) for i in range(batch)])
    points = torch.cat([points, xs])
    thetas2 = None if thetas is None else (
        {k: torch.cat([v, v]) for k, v in thetas.items()} if isinstance(thetas, dict) else torch.cat([thetas, thetas]))
    take2 = (lambda i: None) if thetas is None else (lambda i: take(i % batch))
    values = vmap(lambda z, th: reg.value(z, th), in_dims=in_dims)(points, thetas2)
    expected = torch.stack([reg.value(points[i], take2(i)) for i in range(2 * batch)])
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)


def test_vmap_of_the_theta_gradient_equals_the_loop():
    reg = P.Simplex(lambda th: th.exp())
    x = t([0.3, -0.2, 0.8, 0.1])
    log_r = t([-0.5, 0.0, 0.4])
    grad = torch.func.grad(lambda th: (reg.prox(x, 1.0, th) * t([1.0, 2.0, 3.0, 4.0])).sum())
    torch.testing.assert_close(vmap(grad)(log_r), torch.stack([grad(v) for v in log_r]))


# --------------------------------------------------------------------------- errors


X = t([1.0, -2.0, 0.5, 0.0])


def raises(kind, match, fn):
    with pytest.raises(kind, match=match):
        fn()


def test_negative_or_non_finite_strengths_are_refused_with_the_fix():
    fix = r"exp\(log_strength\)"
    raises(ValueError, rf"Invalid L1 strength: -1.0.*>= 0.*{fix}", lambda: P.L1(-1.0))
    raises(ValueError, rf"Invalid ElasticNet l2: nan.*{fix}", lambda: P.ElasticNet(0.1, float("nan")))
    raises(ValueError, rf"GroupL1 strength.*1 value\(s\) < 0.*{fix}", lambda: P.GroupL1(t([1.0, -1.0]), 2))
    raises(ValueError, rf"L1 strength.*1 non-finite.*{fix}", lambda: P.L1(t([1.0, math.inf])))
    raises(ValueError, rf"soft_threshold t.*{fix}", lambda: P.soft_threshold(X, -0.5))
    # a callable's values are checked when it is evaluated
    reg = P.L1(lambda th: th - 1.0)
    raises(ValueError, rf"L1 strength.*2 value\(s\) < 0.*returned by the callable strength\(theta\).*{fix}",
           lambda: reg.prox(X, 1.0, t([0.0, 0.5, 1.0, 2.0])))
    raises(ValueError, fix, lambda: reg.value(X, t(0.0)))
    raises(ValueError, fix, lambda: P.ElasticNet(lambda th: th, 1.0).prox(X, 1.0, t(float("nan"))))
    # a tensor strength modified in place after it was checked
    w = t([1.0, 1.0, 1.0, 1.0])
    reg = P.L1(w)
    reg.prox(X, 1.0)
    w[2] = -3.0
    raises(ValueError, rf"modified since it was given.*{fix}", lambda: reg.prox(X, 1.0))


def test_values_are_not_read_back_inside_vmap():
    reg = P.L1(lambda th: th - 1.0)                 # negative for theta < 1: caught outside transforms only
    out = vmap(lambda th: reg.prox(X, 1.0, th))(t([0.5, 2.0]))
    assert out.shape == (2, 4)


def test_empty_boxes_are_refused():
    raises(ValueError, r"Box: lower=1.0 > upper=0.0.*lower <= upper", lambda: P.Box(1.0, 0.0))
    raises(ValueError, r"Box: lower > upper at 1 coordinate.*lower=2, upper=1.*lower <= upper",
           lambda: P.Box(t([0.0, 2.0]), t([1.0, 1.0])))
    raises(ValueError, r"project_box: lower > upper.*lower <= upper", lambda: P.project_box(X, 1.0, t(0.0)))
    reg = P.Box(lambda th: th, 1.0)
    raises(ValueError, r"Box: lower > upper at 2 coordinate.*lower <= upper", lambda: reg.prox(X, 1.0, t([0, 0, 2, 3])))
    raises(ValueError, r"Box: lower > upper", lambda: reg.value(X, t(5.0)))
    raises(ValueError, r"Invalid Box lower: inf.*None or -inf", lambda: P.Box(math.inf, None))
    raises(ValueError, r"Invalid Box upper: -inf", lambda: P.Box(None, -math.inf))
    raises(ValueError, r"Box lower.*1 NaN", lambda: P.Box(t([0.0, float("nan")]), None))


def test_non_positive_radii_are_refused():
    raises(ValueError, r"Invalid Simplex radius: 0.0.*> 0.*exp\(log_radius\)", lambda: P.Simplex(0.0))
    raises(ValueError, r"Invalid L2Ball radius: -1.0.*radius > 0", lambda: P.L2Ball(-1.0))
    raises(ValueError, r"L2Ball radius.*1 value\(s\) <= 0", lambda: P.L2Ball(t(0.0)))
    raises(ValueError, r"project_simplex radius.*> 0", lambda: P.project_simplex(X, t(-2.0)))
    raises(ValueError, r"Invalid project_l2_ball radius: 0", lambda: P.project_l2_ball(X, 0))
    reg = P.Simplex(lambda th: th)
    raises(ValueError, r"Simplex radius.*<= 0.*returned by the callable radius\(theta\).*radius > 0",
           lambda: reg.prox(X, 1.0, t(-1.0)))


def test_groups_that_do_not_partition_the_coordinates_are_refused():
    raises(ValueError, r"group size 3 does not divide x's 4 coordinates", lambda: P.GroupL1(1.0, 3).prox(X, 1.0))
    raises(ValueError, r"do not partition.*\[1\] are in more than one group and \[3\] in none",
           lambda: P.GroupL1(1.0, [[0, 1], [1, 2]]))
    raises(ValueError, r"do not partition.*indices \[3\] lie outside", lambda: P.GroupL1(1.0, [[0, 1], [3]]))
    raises(ValueError, r"groups\[1\] is empty", lambda: P.GroupL1(1.0, [[0, 1], []]))
    raises(ValueError, r"partition 3 coordinates, but x has 4.*cover exactly", lambda: P.GroupL1(1.0, [[0, 2], [1]])
           .prox(X, 1.0))
    raises(ValueError, r"partition 5 coordinates, but x has 4", lambda: P.GroupL1(1.0, torch.arange(5)).value(X))
    raises(TypeError, r"flat list of ints.*ambiguous.*torch.tensor", lambda: P.GroupL1(1.0, [0, 0, 1, 1]))
    raises(TypeError, r"integer group ids", lambda: P.GroupL1(1.0, torch.zeros(4)))
    raises(ValueError, r"1-D.*reshape\(-1\)", lambda: P.GroupL1(1.0, torch.zeros(2, 2, dtype=torch.long)))
    raises(ValueError, r"group size must be >= 1", lambda: P.GroupL1(1.0, 0))
    raises(TypeError, r"group size \(int\), a list of index tensors or a tensor", lambda: P.GroupL1(1.0, "a"))
    raises(ValueError, r"one value or one per group.*shape \(3,\).*2 groups; use shape \(\) or \(2,\)",
           lambda: P.GroupL1(t([1.0, 1.0, 1.0]), 2).prox(X, 1.0))
    raises(TypeError, r"size_weighted must be True or False", lambda: P.GroupL1(1.0, 2, size_weighted=1))


def test_callables_must_return_tensors_of_the_right_shape():
    raises(TypeError, r"callable strength\(theta\) returned float.*must return a torch.Tensor.*theta.exp\(\)",
           lambda: P.L1(lambda th: 0.5).prox(X, 1.0, t(0.0)))
    raises(ValueError, r"L1 strength must broadcast against x's shape \(4,\).*shape \(3,\).*use shape \(\).*\(4,\)",
           lambda: P.L1(lambda th: th).prox(X, 1.0, t([1.0, 1.0, 1.0])))
    raises(ValueError, r"Box upper must broadcast", lambda: P.Box(None, lambda th: th).value(X, t([1.0, 2.0])))
    raises(ValueError, r"Simplex radius must be one value.*shape \(2,\).*0-d tensor",
           lambda: P.Simplex(lambda th: th).prox(X, 1.0, t([1.0, 2.0])))
    raises(ValueError, r"L1 strength must broadcast", lambda: P.L1(t([1.0, 2.0])).prox(X, 1.0))
    raises(ValueError, r"L2Ball radius must be one value.*one-element tensor", lambda: P.L2Ball(t([1.0, 2.0])))
    raises(TypeError, r"callable of theta, but theta is None; pass theta", lambda: P.L1(lambda th: th).prox(X, 1.0))
    raises(TypeError, r"returned dtype torch.bool", lambda: P.L1(lambda th: th > 0).prox(X, 1.0, t(1.0)))
    raises(TypeError, r"soft_threshold: t must be a number or a tensor, got a callable.*classes",
           lambda: P.soft_threshold(X, lambda th: th))


def test_bad_arguments_are_refused():
    raises(TypeError, r"L1 strength must be a number, a tensor or a callable.*got str", lambda: P.L1("big"))
    raises(TypeError, r"got a bool", lambda: P.L1(True))
    raises(TypeError, r"must hold real numbers.*float tensor", lambda: P.L1(torch.tensor([True])))
    raises(ValueError, r"Invalid step: -1.0.*>= 0", lambda: P.L1(1.0).prox(X, -1.0))
    raises(ValueError, r"step must be one value.*0-d tensor", lambda: P.L1(1.0).prox(X, t([1.0, 2.0])))
    raises(TypeError, r"step must be a number or a one-element tensor, got NoneType",
           lambda: P.Simplex().prox(X, None))
    raises(TypeError, r"L1: x has dtype torch.int64.*double\(\)", lambda: P.L1(1.0).prox(torch.tensor([1, 2]), 1.0))
    raises(TypeError, r"L2Ball: phi must be a torch.Tensor, got list.*as_tensor",
           lambda: P.L2Ball().value([1.0, 2.0]))
    raises(ValueError, r"Invalid NonNegative tol: -1.*>= 0", lambda: P.NonNegative(tol=-1))
    raises(NotImplementedError, r"must implement prox", lambda: P.Regulariser().prox(X, 1.0))
    raises(NotImplementedError, r"must implement value", lambda: P.Regulariser().value(X))


# --------------------------------------------------------------------------- contract


def test_reprs_and_the_regulariser_contract():
    def log_strength(theta):
        return theta.exp()

    assert repr(P.Zero()) == "Zero()"
    assert repr(P.L1(0.5)) == "L1(strength=0.5)"
    assert repr(P.L1(torch.ones(3))) == "L1(strength=<tensor of shape (3,)>)"
    assert repr(P.L1(log_strength)) == "L1(strength=<callable log_strength>)"
    assert repr(P.ElasticNet(1, 0.5)) == "ElasticNet(l1=1.0, l2=0.5)"
    assert repr(P.GroupL1(0.1, 3)) == "GroupL1(strength=0.1, groups=3)"
    assert repr(P.GroupL1(0.1, [[0, 1], [2, 3]], size_weighted=True)) == \
        "GroupL1(strength=0.1, groups=<2 groups of size 2>, size_weighted=True)"
    assert repr(P.GroupL1(0.1, torch.tensor([0, 1, 1]))) == "GroupL1(strength=0.1, groups=<2 groups of sizes 1..2>)"
    assert repr(P.NonNegative()) == "NonNegative()"
    assert repr(P.NonNegative(tol=1e-3)) == "NonNegative(tol=0.001)"
    assert repr(P.Box(0, None)) == "Box(lower=0.0, upper=None)"
    assert repr(P.Simplex()) == "Simplex(radius=1.0)"
    assert repr(P.L2Ball(2.0, tol=0.0)) == "L2Ball(radius=2.0, tol=0.0)"
    for name in P.__all__:
        obj = getattr(P, name)
        if isinstance(obj, type) and obj is not P.Regulariser:
            assert issubclass(obj, P.Regulariser), name
    assert bl.prox is P and "prox" in bl.__all__
    assert {c.indicator for c in (P.NonNegative, P.Box, P.Simplex, P.L2Ball)} == {True}
    assert {c.indicator for c in (P.Zero, P.L1, P.ElasticNet, P.GroupL1)} == {False}
