"""``bl.argmin``: the inner solution as an autograd operation that composes with ``torch.func``.

The forward pass runs the inner solver without a graph (:func:`bilevel.solve`); the backward
pass is the adjoint of :mod:`bilevel.implicit` at the returned ``phi``. Under ``torch.func.vmap``
the Function's vmap rule solves and differentiates one task at a time (any solver, exactly the
loop); under ``torch.func.grad`` the backward runs with ``torch.func`` derivatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.utils._pytree as _pytree

from . import tree as _tree
from ._checks import check_finite_tree
from ._functorch import explain_transform_errors, in_transform
from ._linearize import check_hvp
from .implicit import _PHI_HINT, ImplicitInfo, _core
from .linalg.base import LinearSolver
from .linalg.hvp import DEFAULT_HVP_MODE
from .linalg.registry import get as get_linear_solver
from .problem import InnerProblem
from .solvers.base import Solver
from .solvers.base import get as get_solver
from .solvers.base import solve
from .solvers.result import SolveResult

__all__ = ["argmin"]


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
    # (one read-back for both; the detailed checks run only to word the error)
    if not in_transform() and not bool(torch.isfinite(phi_flat).all() & torch.isfinite(cot_flat).all()):
        check_finite_tree(phi_flat, "phi (argmin's inner solution)", _PHI_HINT)
        check_finite_tree(cot_flat, "the gradient reaching argmin's phi from the outer loss",
                          "the outer loss (or what follows argmin) is not finite; check it, e.g. with "
                          "torch.autograd.set_detect_anomaly(True)")
    known = cfg.result.grad_norm if isinstance(cfg.result, SolveResult) else None  # the solver's last measurement
    vjp, hyper_grads, info = _core(cfg.problem, theta_flat, cfg.theta_spec, phi_flat, cfg.phi_spec, data,
                                   cot_flat, cfg.linear_solver, cfg.hvp, [h.detach() for h in hyper],
                                   inner_grad_norm=known if isinstance(known, float) and math.isfinite(known) else None)
    cfg.backward_info = info
    if isinstance(cfg.result, SolveResult):
        cfg.result.backward = info
    theta_grads = [g.view_as(t) for g, t in zip(torch.split(vjp, list(cfg.theta_spec.numels)), theta_leaves)]
    return (None, *theta_grads, *hyper_grads, *([None] * (n_in - len(theta_leaves) - len(hyper))))


_argmin_backward_once = torch.autograd.function.once_differentiable(_argmin_backward)


def _forward(cfg: _ArgminConfig, *inputs: torch.Tensor):
    theta_leaves, _, data, phi0 = cfg.split(inputs)
    theta = _tree.from_leaves(cfg.theta_spec, [t.detach() for t in theta_leaves])
    result = solve(cfg.problem, theta, data, solver=cfg.solver, phi0=phi0)
    cfg.result = result
    return tuple(t.detach().clone() for t in _tree.leaves(result.phi))


def _setup_context(ctx, inputs, output):
    cfg = inputs[0]
    ctx.cfg = cfg
    ctx.save_for_backward(*inputs[1:], *output)


def _backward(ctx, *grad_phi: torch.Tensor):
    # first-order only: plain autograd gets once_differentiable's error if differentiated again
    return (_argmin_backward if in_transform() else _argmin_backward_once)(ctx, *grad_phi)


class _Argmin(torch.autograd.Function):
    """``phi*(theta)`` as an autograd operation: the solver forward, the implicit function theorem backward.

    It composes with ``torch.func``: under :func:`torch.func.vmap` its rule solves and differentiates each
    task in turn (any solver, exactly the per-task loop); under :func:`torch.func.grad` the backward runs
    the adjoint with ``torch.func`` derivatives.
    """

    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)

    @staticmethod
    def vmap(info, in_dims, cfg: _ArgminConfig, *inputs: torch.Tensor):
        # one task at a time: each solve and each backward is exactly the unbatched one
        outputs, results = [], []
        with explain_transform_errors("bl.argmin under torch.func.vmap"):
            for b in range(info.batch_size):
                task = replace(cfg, result=None, backward_info=None)
                outputs.append(_Argmin.apply(task, *[x if d is None else x.select(d, b)
                                                     for x, d in zip(inputs, in_dims[1:])]))
                results.append(task.result)
        cfg.result = results
        stacked = tuple(torch.stack(column) for column in zip(*outputs))
        return stacked, (0,) * len(stacked)


class _ArgminBatched(torch.autograd.Function):
    """The same operation for a fixed budget (a vmappable inner solver with ``tol=0``, a vmappable linear
    solver): under :func:`torch.func.vmap` the forward and the backward run batched over the tasks (the
    solver's fixed-count path, CG's masked steps), which is what a GPU wants; the result is the per-task
    loop's, since a fixed budget takes the same steps either way."""

    generate_vmap_rule = True
    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


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
    of ``data`` and ``phi0`` may be batched when they sit in dicts, lists or tuples). With a fixed
    budget (a vmappable solver with ``tol=0``, such as ``gd`` with a ``step_size``, and a vmappable
    linear solver such as ``cg``) the tasks run batched instead, forward and backward, with the same
    result; ``full_output`` then gives one ``UNCHECKED`` result for the batch. ``torch.func.grad`` of
    a function of ``argmin``'s ``phi`` is the implicit hypergradient.

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
    batched = in_transform() and solver_obj.vmappable and solver_obj.tol == 0 and linear_obj.vmappable
    function = _ArgminBatched if batched else _Argmin
    with explain_transform_errors("bl.argmin under a torch.func transform"):
        out = function.apply(cfg, *_tree.leaves(theta), *hyper, *data_tensors, *phi0_leaves)
    phi = _tree.from_leaves(phi_spec, list(out))
    if full_output:
        return phi, cfg.result
    return phi
