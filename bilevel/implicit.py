r"""Implicit differentiation of ``phi*(theta) = argmin_phi G(phi, theta)``.

Stationarity, :math:`\nabla_\phi G(\phi^*, \theta) = 0`, gives by the implicit
function theorem, for an outer objective :math:`F(\theta) = f(\phi^*(\theta), \theta)`,

.. math::

    \frac{dF}{d\theta} = \nabla_\theta f - \partial_\theta \langle \nabla_\phi G(\phi, \theta), v\rangle,
    \qquad \nabla^2_{\phi\phi} G \; v = \nabla_\phi f,

with ``v`` from an iterative linear solver on Hessian-vector products. For
iMAML's proximal ``G`` this is the paper's Eq. 6,
``g = (I + H / lam)^{-1} grad_phi L_test(phi)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import tree as _tree
from ._checks import check_finite_tree, check_scalar
from .linalg.base import LinearSolveInfo, LinearSolver, LinearSolveStatus
from .linalg.base import get as get_linear_solver
from .linalg.hvp import DEFAULT_HVP_MODE, Linearization, check_mode
from .problem import InnerProblem
from .solvers.base import Solver, SolveResult
from .solvers.base import get as get_solver
from .solvers.base import solve

__all__ = ["ImplicitInfo", "implicit_vjp", "hypergradient", "argmin"]

logger = logging.getLogger(__name__)


@dataclass
class ImplicitInfo:
    """Diagnostics of one implicit-differentiation step.

    Attributes
    ----------
    iterations, residual_norm, relative_residual, converged, status:
        Those of the linear solve ``(d2G/dphi2) v = cotangent`` (see
        :class:`bilevel.linalg.LinearSolveInfo`).
    hvps:
        Hessian-vector products spent.
    inner_grad_norm:
        ``||grad_phi G(phi, theta)||`` at the ``phi`` used: how stationary the
        inner solution was (the implicit gradient assumes 0).
    hvp_mode:
        ``"reverse"`` or ``"forward"``.
    linear_solve:
        The full :class:`bilevel.linalg.LinearSolveInfo`.
    """

    iterations: int
    residual_norm: float
    relative_residual: float
    converged: bool
    status: LinearSolveStatus
    hvps: int
    inner_grad_norm: float
    hvp_mode: str
    linear_solve: LinearSolveInfo = field(repr=False)

    @property
    def message(self) -> str:
        """Advice attached to :attr:`status`."""
        return self.status.value


def _core(problem: InnerProblem, theta_flat: torch.Tensor, theta_spec: _tree.TreeSpec, phi_flat: torch.Tensor,
          phi_spec: _tree.TreeSpec, data: Any, cotangent: torch.Tensor, linear_solver: LinearSolver,
          hvp: str, hyper: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], ImplicitInfo]:
    """Flat engine: returns ``(-d_theta <grad G, v>, [-d_hyper <grad G, v>], info)``."""
    use_hyper = bool(hyper)

    def fn(x, y, extra):
        return problem.value(_tree.unflatten(x, phi_spec), _tree.unflatten(y, theta_spec), data,
                             extra if use_hyper else None)

    lin = Linearization(fn, phi_flat, theta_flat, hyper, hvp)
    v, linfo = linear_solver(lin.hvp, cotangent.detach())
    mixed = lin.mixed_vjp(v)
    inner_gn = torch.linalg.vector_norm(lin.grad).item()
    lin.release()
    info = ImplicitInfo(linfo.iterations, linfo.residual_norm, linfo.relative_residual, linfo.converged,
                        linfo.status, lin.count, inner_gn, hvp, linfo)
    logger.debug("implicit solve: %s, %d HVPs, relative residual %.3g", linfo.status.name, lin.count,
                 linfo.relative_residual)
    return -mixed[0], [-m for m in mixed[1:]], info


def _flat_detached(tree: Any, what: str) -> tuple[torch.Tensor, _tree.TreeSpec]:
    flat, spec = _tree.flatten(tree, what)
    return flat.detach(), spec


def implicit_vjp(problem: InnerProblem, theta: Any, phi: Any, data: Any, cotangent: Any, *,
                 linear_solver: str | LinearSolver = "cg", hvp: str = DEFAULT_HVP_MODE) -> tuple[Any, ImplicitInfo]:
    r"""The engine: ``(dphi*/dtheta)^T cotangent = -(d2G/dtheta dphi) (d2G/dphi2)^{-1} cotangent``.

    Parameters
    ----------
    problem:
        The inner problem.
    theta:
        Outer variables (tensor or tree).
    phi:
        An (approximate) minimiser of ``G(., theta)``, e.g. ``bl.solve(...).phi``.
    data:
        The inner problem's data.
    cotangent:
        A tree like ``phi``: typically ``grad_phi`` of an outer loss.
    linear_solver:
        Name, options-free instance or callable (see :func:`bilevel.linalg.get`);
        default ``"cg"`` (``max_iter=100, tol=1e-10``).
    hvp:
        ``"reverse"`` (default) or ``"forward"`` Hessian-vector products.

    Returns
    -------
    vjp, info:
        A tree like ``theta`` and an :class:`ImplicitInfo`.

    Notes
    -----
    Needs ``d2G/dphi2`` positive definite at ``phi``; CG stops and warns at
    negative curvature. The error of the result is bounded by the paper's
    Lemma 3 in terms of ``||phi - phi*||`` and the linear-solve residual.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.ProximalProblem(lambda phi, d: 0.5 * (phi ** 2).sum(), lam=1.0)
    >>> theta = torch.ones(2)
    >>> phi = bl.solve(problem, theta, None, solver=bl.solvers.get("gd", tol=1e-12)).phi
    >>> vjp, info = bl.implicit_vjp(problem, theta, phi, None, torch.ones(2))
    >>> vjp  # dphi*/dtheta = lam / (1 + lam) = 0.5
    tensor([0.5000, 0.5000])
    """
    problem.validate(theta, data)
    problem.check_phi(phi, theta, "phi")
    check_finite_tree(phi, "phi", "the inner solve diverged; lower its step size or start closer")
    check_mode(hvp)
    theta_flat, theta_spec = _flat_detached(theta, "theta")
    phi_flat, phi_spec = _flat_detached(phi, "phi")
    cot_spec = _tree.tree_spec(cotangent, "cotangent")
    if not _tree.same_structure(cot_spec, phi_spec):
        raise ValueError(f"cotangent is {cot_spec.describe()} but phi is {phi_spec.describe()}; pass a "
                         f"cotangent with phi's structure (e.g. the gradient of the outer loss w.r.t. phi).")
    check_finite_tree(cotangent, "cotangent", "the outer loss gradient overflowed; check the outer loss")
    cot_flat, _ = _flat_detached(cotangent, "cotangent")
    vjp, _, info = _core(problem, theta_flat, theta_spec, phi_flat, phi_spec, data, cot_flat,
                         get_linear_solver(linear_solver), hvp, [])
    return _tree.unflatten(vjp, theta_spec), info


def hypergradient(problem: InnerProblem, outer: Callable[[Any, Any], torch.Tensor], theta: Any, phi: Any,
                  data: Any = None, *, linear_solver: str | LinearSolver = "cg",
                  hvp: str = DEFAULT_HVP_MODE) -> tuple[Any, ImplicitInfo]:
    r"""``dF/dtheta`` for ``F(theta) = outer(phi*(theta), theta)``, direct term included.

    Parameters
    ----------
    problem:
        The inner problem.
    outer:
        ``outer(phi, theta) -> scalar`` (a closure over the outer data).
    theta:
        Outer variables (tensor or tree).
    phi:
        An (approximate) minimiser of ``G(., theta)``.
    data:
        The inner problem's data.
    linear_solver, hvp:
        As in :func:`implicit_vjp`.

    Returns
    -------
    grad, info:
        A tree like ``theta`` and an :class:`ImplicitInfo`.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> ref = bl.testing.proximal_quadratic(dim=5, seed=0)
    >>> phi = bl.solve(ref.problem, ref.theta, ref.data, solver=bl.solvers.get("newton_cg", tol=1e-11)).phi
    >>> g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, phi, ref.data)
    >>> bool(torch.allclose(g, ref.hypergradient(), atol=1e-8))
    True
    """
    problem.validate(theta, data)
    problem.check_phi(phi, theta, "phi")
    with torch.enable_grad():
        th = _tree.map(lambda t: t.detach().requires_grad_(True), theta)
        ph = _tree.map(lambda t: t.detach().requires_grad_(True), phi)
        f = check_scalar(outer(ph, th), "the outer objective")
        lt, lp = _tree.leaves(th), _tree.leaves(ph)
        grads = torch.autograd.grad(f, lp + lt, allow_unused=True) if f.requires_grad else [None] * (len(lp) + len(lt))
    gp = [torch.zeros_like(p) if g is None else g for p, g in zip(lp, grads[: len(lp)])]
    gt = [torch.zeros_like(t) if g is None else g for t, g in zip(lt, grads[len(lp):])]
    cot = _tree.from_leaves(_tree.tree_spec(phi), gp)
    vjp, info = implicit_vjp(problem, theta, phi, data, cot, linear_solver=linear_solver, hvp=hvp)
    direct = _tree.from_leaves(_tree.tree_spec(theta), gt)
    return _tree.map(torch.add, direct, vjp), info


@dataclass
class _ArgminConfig:
    problem: InnerProblem
    data: Any
    solver: Solver
    linear_solver: LinearSolver
    hvp: str
    theta_spec: _tree.TreeSpec
    phi0: Any
    n_hyper: int
    result: SolveResult | None = None
    backward_info: ImplicitInfo | None = None


class _Argmin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _ArgminConfig, *inputs: torch.Tensor):
        n_theta = cfg.theta_spec.num_leaves
        theta = _tree.from_leaves(cfg.theta_spec, [t.detach() for t in inputs[:n_theta]])
        result = solve(cfg.problem, theta, cfg.data, solver=cfg.solver, phi0=cfg.phi0)
        cfg.result = result
        phi_leaves = [t.detach().clone() for t in _tree.leaves(result.phi)]
        ctx.cfg = cfg
        ctx.phi_spec = _tree.tree_spec(result.phi)
        ctx.save_for_backward(*inputs, *phi_leaves)
        return tuple(phi_leaves)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_phi: torch.Tensor):
        cfg: _ArgminConfig = ctx.cfg
        saved = ctx.saved_tensors
        n_theta = cfg.theta_spec.num_leaves
        theta_leaves = saved[:n_theta]
        hyper = list(saved[n_theta: n_theta + cfg.n_hyper])
        phi_leaves = saved[n_theta + cfg.n_hyper:]
        cot_leaves = [torch.zeros_like(p) if g is None else g for p, g in zip(phi_leaves, grad_phi)]
        theta_flat = torch.cat([t.detach().reshape(-1) for t in theta_leaves])
        phi_flat = torch.cat([p.reshape(-1) for p in phi_leaves])
        cot_flat = torch.cat([c.reshape(-1) for c in cot_leaves])
        vjp, hyper_grads, info = _core(cfg.problem, theta_flat, cfg.theta_spec, phi_flat, ctx.phi_spec, cfg.data,
                                       cot_flat, cfg.linear_solver, cfg.hvp, hyper)
        cfg.backward_info = info
        theta_grads = [g.view_as(t) for g, t in zip(torch.split(vjp, list(cfg.theta_spec.numels)), theta_leaves)]
        return (None, *theta_grads, *hyper_grads)


def argmin(problem: InnerProblem, theta: Any, data: Any = None, *, solver: str | Solver | Callable = "gd",
           linear_solver: str | LinearSolver = "cg", phi0: Any = None, hvp: str = DEFAULT_HVP_MODE,
           full_output: bool = False) -> Any:
    r"""Solve the inner problem as a differentiable operation of ``theta``.

    The forward pass runs ``solver`` without building a graph; the backward
    pass applies the implicit function theorem at the returned ``phi``. Any
    torch code on ``phi`` followed by ``.backward()`` fills ``theta``'s
    ``.grad`` (and that of a ``lam`` that requires grad).

    Parameters
    ----------
    problem:
        An :class:`bilevel.InnerProblem` or :class:`bilevel.ProximalProblem`.
    theta:
        A tensor or a dict / list / tuple of tensors.
    data:
        Passed to the objective untouched (not differentiated).
    solver:
        Inner solver: name, instance or callable (default ``"gd"``).
    linear_solver:
        Linear solver for the backward pass (default ``"cg"``).
    phi0:
        Starting point (default: ``theta``). Never modified.
    hvp:
        ``"reverse"`` (default) or ``"forward"`` Hessian-vector products.
    full_output:
        Also return the :class:`bilevel.SolveResult` of the forward solve.

    Returns
    -------
    phi, or (phi, result):
        ``phi`` in the structure of ``phi0``, attached to the autograd graph.

    Notes
    -----
    The backward pass is first-order only (``phi`` cannot be differentiated
    twice with respect to ``theta``). Memory does not grow with the solver's
    iterations: only the final point is differentiated.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> theta = torch.ones(3, requires_grad=True)
    >>> problem = bl.ProximalProblem(lambda phi, d: 0.5 * (phi ** 2).sum(), lam=1.0)
    >>> phi = bl.argmin(problem, theta, solver=bl.solvers.get("gd", tol=1e-12))
    >>> phi.sum().backward()
    >>> theta.grad
    tensor([0.5000, 0.5000, 0.5000])
    """
    solver_obj = get_solver(solver)
    linear_obj = get_linear_solver(linear_solver)
    check_mode(hvp)
    theta_spec = _tree.tree_spec(theta, "theta")
    hyper = problem.hyperparameters() if isinstance(problem, InnerProblem) else []
    cfg = _ArgminConfig(problem, data, solver_obj, linear_obj, hvp, theta_spec, phi0, len(hyper))
    out = _Argmin.apply(cfg, *_tree.leaves(theta), *hyper)
    phi = _tree.from_leaves(_tree.tree_spec(cfg.result.phi), list(out))
    if full_output:
        return phi, cfg.result
    return phi
