r"""The adjoint of a root: :func:`bilevel.root`, differentiable in ``theta``.

For ``F(phi*(theta), theta) = 0`` with ``dF/dphi`` invertible, the implicit function theorem gives,
for a cotangent ``c`` (the gradient of what is computed from ``phi``),

.. math::
    \frac{d\phi^*}{d\theta}^\top c = -\Big(\frac{\partial F}{\partial\theta}\Big)^\top u, \qquad
    \Big(\frac{\partial F}{\partial\phi}\Big)^\top u = c,

with ``u`` from an iterative linear solver on vector-Jacobian products of ``F`` (reverse mode: the
transposed products come for free). One linearisation at ``phi*`` serves the whole solve and the
final product.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .. import tree as _tree
from ..linalg.base import LinearSolver, LinearSolveStatus
from ..linalg.registry import get as get_linear_solver
from ..problem import InnerProblem
from .problems import CompositeProblem, RootProblem
from .result import RootResult
from .base import RootSolver, solve_root

__all__ = ["root"]


def _default_linear_solver(problem: RootProblem) -> str:
    from ..linalg import default_solver

    return default_solver(problem.symmetric)


class _RootFunction(torch.autograd.Function):
    """``theta leaves -> phi*`` (flat); the backward is the adjoint above."""

    @staticmethod
    def forward(ctx, engine: "_Adjoint", phi_flat: torch.Tensor, *theta_leaves: torch.Tensor) -> torch.Tensor:
        ctx.engine = engine
        return phi_flat.clone()

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor):
        grads = ctx.engine.vjp(cotangent)
        return (None, None, *grads)


class _Adjoint:
    def __init__(self, problem: RootProblem, theta: Any, data: Any, phi_flat: torch.Tensor, phi_spec,
                 linear_solver: LinearSolver, result: RootResult):
        self.problem, self.theta, self.data = problem, theta, data
        self.phi_flat, self.phi_spec = phi_flat, phi_spec
        self.linear_solver, self.result = linear_solver, result
        self.info = None

    def vjp(self, cotangent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not torch.isfinite(cotangent).all():
            raise ValueError("the gradient reaching bl.root's output is not finite (NaN or inf): the loss computed "
                             "from phi overflowed or is NaN; check it (and the inner solution's status) before "
                             "calling backward.")
        leaves = _tree.leaves(self.theta)
        spec = _tree.tree_spec(self.theta)
        t_flat = torch.cat([t.detach().reshape(-1) for t in leaves]) if leaves else torch.zeros(0)
        sizes = [t.numel() for t in leaves]
        problem, data, phi_spec = self.problem, self.data, self.phi_spec
        step = None  # a composite problem's condition: the gradient mapping at a step ~ 1 / L (any step is exact)
        if isinstance(problem, CompositeProblem):
            step = problem.estimate_step(_tree.unflatten(self.phi_flat, phi_spec), self.theta, data)

        def theta_of(t):
            parts = torch.split(t, sizes) if sizes else []
            return _tree.from_leaves(spec, [p.view_as(l) for p, l in zip(parts, leaves)])

        def F(x, t):
            phi, th = _tree.unflatten(x, phi_spec), theta_of(t)
            if step is not None:
                out = problem.residual_at_step(phi, th, data, step)
            else:
                out = problem.residual(phi, th, data)
            return _tree.flatten(out, "the residual")[0]

        with torch.enable_grad():
            _, vjp_fn = torch.func.vjp(F, self.phi_flat.detach(), t_flat)
        b = cotangent.detach().reshape(-1)

        def matvec(u):  # (dF/dphi)^T u
            return vjp_fn(u)[0]

        def rmatvec(w):  # (dF/dphi) w, for solvers that need both products
            return torch.func.jvp(lambda x: F(x, t_flat), (self.phi_flat.detach(),), (w,))[1]

        u, info = self.linear_solver(matvec, b, rmatvec=rmatvec)  # rmatvec: for solvers on normal equations
        self.info = info
        if info.status is LinearSolveStatus.NONFINITE or not torch.isfinite(u).all():
            raise ValueError(f"the implicit backward of bl.root met a non-finite value in its linear solve "
                             f"({info.solver}): dF/dphi at phi is not finite or singular; check the inner "
                             f"solution (result.status) and that F is differentiable there.")
        g = -vjp_fn(u)[1]
        out = []
        for part, leaf in zip(torch.split(g, sizes) if sizes else [], leaves):
            out.append(part.view_as(leaf) if leaf.requires_grad else None)
        return tuple(out)


def root(problem: RootProblem | InnerProblem, theta: Any = None, data: Any = None, *,
         solver: str | RootSolver | Callable | None = None, linear_solver: str | LinearSolver | None = None,
         phi0: Any = None, full_output: bool = False) -> Any:
    r"""Solve ``F(phi, theta, data) = 0`` as a differentiable operation of ``theta``.

    The forward pass runs ``solver`` without building a graph; the backward applies the implicit
    function theorem at the returned ``phi`` (see :mod:`bilevel.roots.adjoint`).

    Parameters
    ----------
    problem:
        A :class:`bilevel.RootProblem`, :class:`bilevel.FixedPointProblem` or
        :class:`bilevel.CompositeProblem`; a smooth :class:`bilevel.InnerProblem` is handed to
        :func:`bilevel.argmin` (its condition ``grad_phi G = 0`` is a root problem with a symmetric
        Jacobian; ``solver`` is then an inner solver).
    theta:
        Outer variables: a tensor or tree (leaves that require grad get gradients), or None.
    data:
        Passed to ``F`` untouched (not differentiated).
    solver:
        A root solver: a name (``bl.roots.available()``), a :class:`bilevel.roots.RootSolver` or a callable;
        default ``"fista"`` for a composite problem, ``"anderson"`` for the others (``"gd"``, an inner
        solver, for an :class:`bilevel.InnerProblem`).
    linear_solver:
        The backward's linear solver; default by symmetry: ``"cg"`` when ``problem.symmetric``, else
        ``"gmres"``.
    phi0:
        The start (default: ``theta``). Never modified.
    full_output:
        Also return the :class:`bilevel.roots.RootResult`.

    Returns
    -------
    phi, or (phi, result)
        ``phi`` in the structure of ``phi0``, carrying gradients to ``theta``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> theta = torch.tensor([8.0], dtype=torch.float64, requires_grad=True)
    >>> problem = bl.RootProblem(lambda phi, theta, data: phi ** 3 - theta)
    >>> phi = bl.root(problem, theta, solver="newton_krylov", phi0=torch.ones(1, dtype=torch.float64))
    >>> phi.backward()
    >>> round(float(theta.grad), 8)  # d theta^(1/3) / d theta = 1 / (3 theta^(2/3)) = 1/12
    0.08333333
    """
    if isinstance(problem, InnerProblem):
        from .._argmin import argmin

        kwargs = {} if linear_solver is None else {"linear_solver": linear_solver}
        return argmin(problem, theta, data, solver="gd" if solver is None else solver, phi0=phi0,
                      full_output=full_output, **kwargs)
    if solver is None:
        solver = "fista" if isinstance(problem, CompositeProblem) else "anderson"
    lin = get_linear_solver(linear_solver if linear_solver is not None else _default_linear_solver(problem))
    result = solve_root(problem, theta, data, solver=solver, phi0=phi0)
    phi_flat, phi_spec = _tree.flatten(result.phi, "phi")
    leaves = [t for t in _tree.leaves(theta)] if theta is not None else []
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves) or not torch.is_grad_enabled():
        return (result.phi, result) if full_output else result.phi
    if isinstance(problem, CompositeProblem) and not result.converged:
        warnings.warn("bl.root: the composite solve did not converge; the hypergradient is exact on the active "
                      "set of a solution, not of this point.", stacklevel=2)
    engine = _Adjoint(problem, theta, data, phi_flat.detach(), phi_spec, lin, result)
    out = _RootFunction.apply(engine, phi_flat.detach(), *leaves)
    phi = _tree.unflatten(out, phi_spec)
    return (phi, result) if full_output else phi
