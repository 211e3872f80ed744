"""Baselines that differentiate through the solver path instead of the optimality condition.

* :func:`maml` keeps the autograd graph of ``num_steps`` gradient steps and
  differentiates through all of them (memory grows linearly with the steps).
* :func:`truncated` runs the first steps without a graph and keeps it for the
  last ``backprop_steps`` only (truncated back-propagation, Shaban et al. 2019).
* :func:`first_order_maml` treats the adapted ``phi`` as a constant offset of
  ``theta``: ``dphi/dtheta = I`` (first-order MAML; Reptile's direction up to scale).

These are what the paper compares implicit gradients against; use
:func:`bilevel.argmin` for the implicit version.
"""

from __future__ import annotations

from typing import Any

import torch

from . import tree as _tree
from ._checks import check_nonneg_float, check_positive_int
from .problem import InnerProblem

__all__ = ["maml", "truncated", "first_order_maml", "gd_steps"]


def gd_steps(problem: InnerProblem, theta: Any, data: Any, phi: Any, *, step_size: float, num_steps: int,
             create_graph: bool) -> Any:
    """Run ``num_steps`` of ``phi <- phi - step_size * grad_phi G(phi, theta)``.

    With ``create_graph=True`` the steps are recorded for differentiation
    (through ``phi`` and ``theta``); otherwise each step is detached.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.ProximalProblem(lambda phi, d: 0.5 * (phi ** 2).sum(), lam=1.0)
    >>> gd_steps(problem, torch.ones(1), None, torch.ones(1), step_size=0.5, num_steps=1, create_graph=False)
    tensor([0.5000])
    """
    step_size = check_nonneg_float(step_size, "step_size", positive=True)
    num_steps = check_positive_int(num_steps, "num_steps", allow_zero=True)
    for _ in range(num_steps):
        with torch.enable_grad():
            if not create_graph:
                phi = _tree.map(lambda t: t.detach().requires_grad_(True), phi)
                th = _tree.map(lambda t: t.detach(), theta)
            else:
                th = theta
                phi = _tree.map(lambda t: t if t.requires_grad else t.detach().requires_grad_(True), phi)
            value = problem.value(phi, th, data)
            grads = torch.autograd.grad(value, _tree.leaves(phi), create_graph=create_graph, allow_unused=True)
        new = [p - step_size * (torch.zeros_like(p) if g is None else g) for p, g in zip(_tree.leaves(phi), grads)]
        if not create_graph:
            new = [t.detach() for t in new]
        phi = _tree.from_leaves(_tree.tree_spec(phi), new)
    return phi


def _start(problem: InnerProblem, theta: Any, data: Any, phi0: Any) -> Any:
    problem.validate(theta, data)
    if phi0 is None:
        return theta
    problem.check_phi(phi0, theta, "phi0")
    return phi0


def maml(problem: InnerProblem, theta: Any, data: Any = None, *, step_size: float, num_steps: int,
         phi0: Any = None) -> Any:
    """MAML's adapted parameters: ``num_steps`` of gradient descent on ``G``, differentiable through the path.

    Parameters
    ----------
    problem:
        The inner problem; for classic MAML an :class:`bilevel.InnerProblem`
        whose objective ignores ``theta``, started at ``phi0 = theta``.
    theta:
        Outer variables.
    data:
        The inner data.
    step_size, num_steps:
        The gradient-descent schedule.
    phi0:
        Start (default: ``theta`` itself, graph included).

    Returns
    -------
    phi
        In ``phi0``'s structure, with the full graph of all steps (memory and
        backward time grow linearly with ``num_steps``).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> theta = torch.ones(1, requires_grad=True)
    >>> problem = bl.InnerProblem(lambda phi, th, d: 0.5 * (phi ** 2).sum())
    >>> phi = bl.unrolled.maml(problem, theta, step_size=0.5, num_steps=2)
    >>> phi.sum().backward(); theta.grad  # (1 - 0.5)^2
    tensor([0.2500])
    """
    phi = _start(problem, theta, data, phi0)
    return gd_steps(problem, theta, data, phi, step_size=step_size, num_steps=num_steps,
                    create_graph=torch.is_grad_enabled())


def truncated(problem: InnerProblem, theta: Any, data: Any = None, *, step_size: float, num_steps: int,
              backprop_steps: int, phi0: Any = None) -> Any:
    """Truncated back-propagation: ``num_steps`` of GD, differentiated through the last ``backprop_steps``.

    The first ``num_steps - backprop_steps`` steps run without a graph, so
    memory grows with ``backprop_steps`` only. The gradient reaches ``theta``
    through ``G``'s explicit dependence in the recorded steps (for
    :class:`bilevel.ProximalProblem`, the proximal term).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> theta = torch.ones(2, requires_grad=True)
    >>> problem = bl.ProximalProblem(lambda phi, d: 0.5 * (phi ** 2).sum(), lam=1.0)
    >>> phi = bl.unrolled.truncated(problem, theta, step_size=0.5, num_steps=50, backprop_steps=50)
    >>> phi.sum().backward(); theta.grad  # the implicit value is lam / (1 + lam) = 0.5
    tensor([0.5000, 0.5000])
    """
    num_steps = check_positive_int(num_steps, "num_steps", allow_zero=True)
    backprop_steps = check_positive_int(backprop_steps, "backprop_steps", allow_zero=True)
    if backprop_steps > num_steps:
        raise ValueError(f"backprop_steps ({backprop_steps}) cannot exceed num_steps ({num_steps}).")
    phi = _start(problem, theta, data, phi0)
    phi = gd_steps(problem, theta, data, phi, step_size=step_size, num_steps=num_steps - backprop_steps,
                   create_graph=False)
    return gd_steps(problem, theta, data, phi, step_size=step_size, num_steps=backprop_steps,
                    create_graph=torch.is_grad_enabled())


def first_order_maml(problem: InnerProblem, theta: Any, data: Any = None, *, step_size: float, num_steps: int,
                     phi0: Any = None) -> Any:
    """First-order MAML: adapt without a graph, then let gradients pass to ``theta`` as if ``dphi/dtheta = I``.

    Returns ``theta + (phi_K - theta).detach()``, so ``outer(phi).backward()``
    puts ``grad_phi outer`` at ``phi_K`` into ``theta.grad``. ``phi`` and
    ``theta`` must share a structure.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> theta = torch.ones(1, requires_grad=True)
    >>> problem = bl.InnerProblem(lambda phi, th, d: 0.5 * (phi ** 2).sum())
    >>> phi = bl.unrolled.first_order_maml(problem, theta, step_size=0.5, num_steps=2)
    >>> phi.sum().backward(); theta.grad
    tensor([1.])
    """
    start = _start(problem, theta, data, phi0)
    _tree.tree_spec(theta, "theta")
    from ._checks import check_structure

    check_structure(_tree.tree_spec(start, "phi0"), _tree.tree_spec(theta, "theta"), "phi0", "theta")
    phi = gd_steps(problem, theta, data, start, step_size=step_size, num_steps=num_steps, create_graph=False)
    return _tree.map(lambda t, p: t + (p - t).detach(), theta, phi)
