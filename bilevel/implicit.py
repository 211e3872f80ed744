r"""The adjoint: implicit differentiation of ``phi*(theta) = argmin_phi G(phi, theta)``.

Linearise ``G`` at ``phi`` (``bilevel._linearize``), solve the linear system on
Hessian-vector products, and apply the mixed second derivative as one vector-Jacobian
product: :func:`implicit_vjp` does it for a given cotangent, :func:`argmin` as an autograd
operation. The outer objective's hypergradient, certified on request, is built on top of it in
``bilevel.certify``.

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
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.utils._pytree as _pytree

from . import bounds as _bounds
from . import tree as _tree
from ._checks import check_finite_tree, check_scalar
from ._functorch import explain_transform_errors, in_transform
from ._linearize import check_hvp, linearize
from .linalg.base import LinearSolveInfo, LinearSolver, LinearSolveStatus
from .linalg.hvp import DEFAULT_HVP_MODE
from .linalg.registry import get as get_linear_solver
from .problem import InnerProblem
from .solvers.base import Solver
from .solvers.result import SolveResult
from .solvers.base import get as get_solver
from .solvers.base import solve

__all__ = ["ImplicitInfo", "implicit_vjp", "argmin"]

logger = logging.getLogger(__name__)

_PHI_HINT = ("the inner solve diverged or returned NaN; lower its step size (or use a line search, step_size=None), "
             "start closer, or check the solver's result.status")


@dataclass
class ImplicitInfo:
    """Diagnostics of one implicit-differentiation step.

    Attributes
    ----------
    linear_solve:
        The :class:`bilevel.linalg.LinearSolveInfo` of the linear solve
        ``(d2G/dphi2) v = cotangent``; its ``iterations``, ``residual_norm``,
        ``relative_residual``, ``converged``, ``status`` and ``message`` are
        also properties of this object.
    hvps:
        Hessian-vector products spent.
    inner_grad_norm:
        ``||grad_phi G(phi, theta)||`` at the ``phi`` used: how stationary the
        inner solution was (the implicit gradient assumes 0).
    hvp_mode:
        ``"reverse"`` or ``"forward"``.
    true_residual_norm:
        ``||cotangent - (d2G/dphi2) v||`` recomputed with one extra
        Hessian-vector product (only when a certificate was asked for;
        ``None`` otherwise). CG's ``residual_norm`` comes from its recurrence.
    certificate:
        A :class:`bilevel.bounds.Certificate` (``hypergradient`` with
        ``constants=`` or ``target_error=``), else ``None``.
    adaptive:
        A :class:`bilevel.bounds.AdaptiveReport` (``hypergradient`` with
        ``target_error=``), else ``None``.
    curvature:
        The :class:`bilevel.linalg.CurvatureEstimate` behind an estimated
        ``mu`` (``constants.mu=None``), else ``None``.
    """

    linear_solve: LinearSolveInfo
    hvps: int
    inner_grad_norm: float
    hvp_mode: str
    true_residual_norm: float | None = None
    certificate: _bounds.Certificate | None = field(default=None, repr=False)
    adaptive: _bounds.AdaptiveReport | None = field(default=None, repr=False)
    curvature: _bounds.CurvatureEstimate | None = field(default=None, repr=False)

    # the linear solve's own facts, read from it rather than copied
    @property
    def iterations(self) -> int:
        """Iterations of the linear solve."""
        return self.linear_solve.iterations

    @property
    def residual_norm(self) -> float:
        """``||cotangent - (d2G/dphi2) v||`` from the linear solver's recurrence."""
        return self.linear_solve.residual_norm

    @property
    def relative_residual(self) -> float:
        """:attr:`residual_norm` relative to ``||cotangent||``."""
        return self.linear_solve.relative_residual

    @property
    def converged(self) -> bool:
        """Whether the linear solve met its tolerance."""
        return self.linear_solve.converged

    @property
    def status(self) -> LinearSolveStatus:
        """Why the linear solve stopped (a :class:`bilevel.linalg.LinearSolveStatus`; set: written through)."""
        return self.linear_solve.status

    @status.setter
    def status(self, value: LinearSolveStatus) -> None:
        self.linear_solve.status = value
        self.linear_solve.converged = value.success

    @property
    def message(self) -> str:
        """Advice attached to :attr:`status`."""
        return self.status.value


def _core(problem: InnerProblem, theta_flat: torch.Tensor, theta_spec: _tree.TreeSpec, phi_flat: torch.Tensor,
          phi_spec: _tree.TreeSpec, data: Any, cotangent: torch.Tensor, linear_solver: LinearSolver,
          hvp: str, hyper: list[torch.Tensor], *, check_residual: bool = False, x0: torch.Tensor | None = None,
          keep: dict | None = None) -> tuple[torch.Tensor, list[torch.Tensor], ImplicitInfo]:
    """Flat engine: returns ``(-d_theta <grad G, v>, [-d_hyper <grad G, v>], info)``.

    ``check_residual``: recompute ``||cotangent - H v||`` with one more HVP (for certificates).
    ``x0``: warm start of the linear solve. ``keep``: receives ``v`` under ``"v"``.
    """
    with explain_transform_errors(f"the implicit backward (hvp={hvp!r})"):
        # inside torch.func transforms (vmap over tasks) "reverse" runs as "forward"
        lin = linearize(problem, phi_flat, phi_spec, theta_flat, theta_spec, data, hyper, hvp)
        b = cotangent.detach()
        v, linfo = linear_solver(lin.hvp, b, x0)
        true_res = None
        if check_residual:
            true_res = torch.linalg.vector_norm(b - lin.hvp(v.detach())).item()
        mixed = lin.mixed_vjp(v)
        # values cannot be read back inside a torch.func transform (vmap over tasks)
        inner_gn = float("nan") if in_transform() else torch.linalg.vector_norm(lin.grad).item()
    lin.release()
    if keep is not None:
        keep["v"] = v.detach()
    info = ImplicitInfo(linfo, lin.count, inner_gn, lin.mode, true_res)
    logger.debug("implicit solve: %s, %d HVPs, relative residual %.3g", linfo.status.name, lin.count,
                 linfo.relative_residual)
    return -mixed[0], [-m for m in mixed[1:]], info


def _measured_curvature(info: ImplicitInfo) -> float | None:
    """The smallest curvature the linear solve met (CG reports it), or ``None``."""
    value = info.linear_solve.extra.get("min_curvature")
    if value is None or isinstance(value, torch.Tensor):
        return None
    value = float(value)
    return None if value == float("inf") else value


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
        ``"reverse"`` (default) or ``"forward"`` Hessian-vector products (inside ``torch.func.vmap``
        ``"reverse"`` runs as ``"forward"``: reverse-over-reverse cannot run there); or
        ``"gauss_newton"``, which replaces the loss's Hessian by its Gauss-Newton matrix (needs a
        :class:`bilevel.ProximalProblem` whose loss is a :class:`bilevel.PredictionLoss`; see
        :mod:`bilevel.linalg.hvp`): positive semi-definite, so no negative curvature, less than half the
        memory of the exact modes, exact when the predictor is linear in ``phi``.

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
    check_finite_tree(phi, "phi", _PHI_HINT)
    check_hvp(problem, hvp)
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


def _outer_grads(outer: Callable[[Any, Any], torch.Tensor], theta: Any, phi: Any) -> tuple[Any, Any, bool]:
    """``(grad_phi f, grad_theta f, f depends on theta)`` at ``(phi, theta)``, as trees like phi and theta.

    Inside a ``torch.func`` transform (``vmap`` over tasks) the gradients come from ``torch.func.grad``, and
    whether ``f`` depends on ``theta`` is not known (reported as False; certificates refuse transforms anyway).
    """
    if in_transform():
        def f_of(p, t):
            return check_scalar(outer(p, t), "the outer objective")

        gp, gt = torch.func.grad(f_of, argnums=(0, 1))(_tree.map(lambda t: t.detach(), phi),
                                                        _tree.map(lambda t: t.detach(), theta))
        return gp, gt, False
    with torch.enable_grad():
        th = _tree.map(lambda t: t.detach().requires_grad_(True), theta)
        ph = _tree.map(lambda t: t.detach().requires_grad_(True), phi)
        f = check_scalar(outer(ph, th), "the outer objective")
        lt, lp = _tree.leaves(th), _tree.leaves(ph)
        grads = torch.autograd.grad(f, lp + lt, allow_unused=True) if f.requires_grad else [None] * (len(lp) + len(lt))
    gp = [torch.zeros_like(p) if g is None else g for p, g in zip(lp, grads[: len(lp)])]
    gt = [torch.zeros_like(t) if g is None else g for t, g in zip(lt, grads[len(lp):])]
    depends_on_theta = any(g is not None for g in grads[len(lp):])
    return _tree.from_leaves(_tree.tree_spec(phi), gp), _tree.from_leaves(_tree.tree_spec(theta), gt), depends_on_theta


@dataclass
class _ArgminConfig:
    """What :class:`_Argmin` needs besides its tensor inputs (theta's leaves, ``hyper``, data's and phi0's tensors)."""

    problem: InnerProblem
    solver: Solver
    linear_solver: LinearSolver
    hvp: str
    theta_spec: _tree.TreeSpec
    phi_spec: _tree.TreeSpec
    n_hyper: int
    data_leaves: list  # data flattened by torch's pytree (the tensors that are inputs of the Function: None)
    data_tensors: list[int]  # positions of those tensors among data_leaves (only inside torch.func transforms)
    data_spec: Any
    n_phi0: int  # phi0's leaves among the inputs (inside torch.func transforms); 0: see phi0
    phi0: Any = None  # outside transforms, phi0 itself (or None: the problem's default)
    result: SolveResult | list[SolveResult] | None = None
    backward_info: ImplicitInfo | None = None

    def split(self, inputs: tuple) -> tuple[list, list, Any, Any]:
        """``(theta leaves, hyper, data, phi0)`` from the Function's tensor inputs."""
        n_theta = self.theta_spec.num_leaves
        theta = list(inputs[:n_theta])
        hyper = list(inputs[n_theta: n_theta + self.n_hyper])
        rest = inputs[n_theta + self.n_hyper:]
        leaves = list(self.data_leaves)
        for pos, t in zip(self.data_tensors, rest[: len(self.data_tensors)]):
            leaves[pos] = t
        data = _pytree.tree_unflatten(leaves, self.data_spec)
        phi0_leaves = rest[len(self.data_tensors):]
        phi0 = _tree.from_leaves(self.phi_spec, [t.detach() for t in phi0_leaves]) if self.n_phi0 else self.phi0
        return theta, hyper, data, phi0


def _argmin_backward(ctx, *grad_phi: torch.Tensor):
    """The implicit backward of :class:`_Argmin`: the adjoint at the saved ``phi``."""
    cfg: _ArgminConfig = ctx.cfg
    saved = ctx.saved_tensors
    n_in = len(saved) - cfg.phi_spec.num_leaves
    theta_leaves, hyper, data, _ = cfg.split(saved[:n_in])
    phi_leaves = saved[n_in:]
    cot_leaves = [torch.zeros_like(p) if g is None else g for p, g in zip(phi_leaves, grad_phi)]
    theta_flat = torch.cat([t.detach().reshape(-1) for t in theta_leaves])
    phi_flat = torch.cat([p.detach().reshape(-1) for p in phi_leaves])
    cot_flat = torch.cat([c.detach().reshape(-1) for c in cot_leaves])
    # as bl.hypergradient does: a non-finite input never becomes a finite (zero) gradient
    check_finite_tree(phi_flat, "phi (argmin's inner solution)", _PHI_HINT)
    check_finite_tree(cot_flat, "the gradient reaching argmin's phi from the outer loss",
                      "the outer loss (or what follows argmin) is not finite; check it, e.g. with "
                      "torch.autograd.set_detect_anomaly(True)")
    vjp, hyper_grads, info = _core(cfg.problem, theta_flat, cfg.theta_spec, phi_flat, cfg.phi_spec, data,
                                   cot_flat, cfg.linear_solver, cfg.hvp, [h.detach() for h in hyper])
    cfg.backward_info = info
    if isinstance(cfg.result, SolveResult):
        cfg.result.backward = info
    theta_grads = [g.view_as(t) for g, t in zip(torch.split(vjp, list(cfg.theta_spec.numels)), theta_leaves)]
    return (None, *theta_grads, *hyper_grads, *([None] * (n_in - len(theta_leaves) - len(hyper))))


_argmin_backward_once = torch.autograd.function.once_differentiable(_argmin_backward)


class _Argmin(torch.autograd.Function):
    """``phi*(theta)`` as an autograd operation: the solver forward, the implicit function theorem backward.

    It composes with ``torch.func``: under :func:`torch.func.vmap` its rule solves and differentiates each
    task in turn (any solver, exactly the per-task loop); under :func:`torch.func.grad` the backward runs
    the adjoint with ``torch.func`` derivatives.
    """

    @staticmethod
    def forward(cfg: _ArgminConfig, *inputs: torch.Tensor):
        theta_leaves, _, data, phi0 = cfg.split(inputs)
        theta = _tree.from_leaves(cfg.theta_spec, [t.detach() for t in theta_leaves])
        result = solve(cfg.problem, theta, data, solver=cfg.solver, phi0=phi0)
        cfg.result = result
        return tuple(t.detach().clone() for t in _tree.leaves(result.phi))

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg = inputs[0]
        ctx.cfg = cfg
        ctx.save_for_backward(*inputs[1:], *output)

    @staticmethod
    def backward(ctx, *grad_phi: torch.Tensor):
        # first-order only: plain autograd gets once_differentiable's error if differentiated again
        return (_argmin_backward if in_transform() else _argmin_backward_once)(ctx, *grad_phi)

    @staticmethod
    def vmap(info, in_dims, cfg: _ArgminConfig, *inputs: torch.Tensor):
        # one task at a time: each solve and each backward is exactly the unbatched one
        outputs, results = [], []
        for b in range(info.batch_size):
            task = replace(cfg, result=None, backward_info=None)
            outputs.append(_Argmin.apply(task, *[x if d is None else x.select(d, b)
                                                 for x, d in zip(inputs, in_dims[1:])]))
            results.append(task.result)
        cfg.result = results
        stacked = tuple(torch.stack(column) for column in zip(*outputs))
        return stacked, (0,) * len(stacked)


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
        ``"reverse"`` (default) or ``"forward"`` Hessian-vector products (inside ``torch.func.vmap``
        ``"reverse"`` runs as ``"forward"``: reverse-over-reverse cannot run there); or
        ``"gauss_newton"``, which replaces the loss's Hessian by its Gauss-Newton matrix (needs a
        :class:`bilevel.ProximalProblem` whose loss is a :class:`bilevel.PredictionLoss`; see
        :mod:`bilevel.linalg.hvp`): positive semi-definite, so no negative curvature, less than half the
        memory of the exact modes, exact when the predictor is linear in ``phi``.
    full_output:
        Also return the :class:`bilevel.SolveResult` of the forward solve (under
        :func:`torch.func.vmap`: a list of them, one per task).

    Returns
    -------
    phi, or (phi, result):
        ``phi`` in the structure of ``phi0``, attached to the autograd graph.

    Notes
    -----
    The backward pass is first-order only (``phi`` cannot be differentiated
    twice with respect to ``theta``). Memory does not grow with the solver's
    iterations: only the final point is differentiated.

    ``argmin`` composes with ``torch.func``: ``torch.func.vmap`` over tasks solves and
    differentiates each task in turn, with any solver, exactly as a Python loop would (the tensors
    of ``data`` and ``phi0`` may be batched when they sit in dicts, lists or tuples); and
    ``torch.func.grad`` of a function of ``argmin``'s ``phi`` is the implicit hypergradient.

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
    check_hvp(problem, hvp)
    theta_spec = _tree.tree_spec(theta, "theta")
    phi_spec = _tree.tree_spec(problem.default_phi0(theta) if phi0 is None else phi0, "phi0")
    hyper = problem.hyperparameters() if isinstance(problem, InnerProblem) else []
    data_leaves, data_spec = _pytree.tree_flatten(data)
    phi0_leaves = [] if phi0 is None else _tree.leaves(phi0, "phi0")
    positions: list[int] = []
    if in_transform():  # data and phi0 may be batched (vmap over tasks): they become inputs of the Function
        positions = [i for i, leaf in enumerate(data_leaves) if isinstance(leaf, torch.Tensor)]
    data_tensors = [data_leaves[i] for i in positions]
    for i in positions:
        data_leaves[i] = None
    cfg = _ArgminConfig(problem, solver_obj, linear_obj, hvp, theta_spec, phi_spec, len(hyper), data_leaves,
                        positions, data_spec, len(phi0_leaves) if in_transform() else 0,
                        None if in_transform() else phi0)
    if not in_transform():
        phi0_leaves = []
    out = _Argmin.apply(cfg, *_tree.leaves(theta), *hyper, *data_tensors, *phi0_leaves)
    phi = _tree.from_leaves(phi_spec, list(out))
    if full_output:
        return phi, cfg.result
    return phi
