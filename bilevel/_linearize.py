"""Build the curvature operator of an inner problem at a point, for any ``hvp`` mode (one place for the engine
and the curvature estimates)."""

from __future__ import annotations

from typing import Any

import torch

from . import tree as _tree
from ._functorch import in_transform
from .linalg.hvp import GAUSS_NEWTON_MODES, GaussNewtonLinearization, Linearization, check_mode
from .problem import InnerProblem


def gauss_newton_error(problem: InnerProblem, mode: str = "gauss_newton") -> ValueError:
    """The error for a Gauss-Newton ``hvp`` on a problem without a prediction/criterion split, with the fix."""
    return ValueError(
        f"hvp={mode!r} needs to know where the predictions end and the loss begins, and {problem!r} does "
        f"not say: build it as bl.ProximalProblem(bl.PredictionLoss(predict, criterion), lam) with "
        f"predict(phi, data) -> outputs and criterion(outputs, data) -> scalar (e.g. 'cross_entropy'), or use "
        f"hvp='reverse' / 'forward' (exact Hessian products).")


def check_hvp(problem: InnerProblem, mode: str) -> str:
    """Validate ``mode`` and, for Gauss-Newton, that ``problem`` has the structure it needs."""
    check_mode(mode)
    if mode in GAUSS_NEWTON_MODES and problem.gauss_newton_parts() is None:
        raise gauss_newton_error(problem, mode)
    return mode


def linearize(problem: InnerProblem, phi_flat: torch.Tensor, phi_spec: _tree.TreeSpec, theta_flat: torch.Tensor,
              theta_spec: _tree.TreeSpec, data: Any, hyper: list[torch.Tensor], mode: str,
              grad_norm: float | None = None) -> Linearization | GaussNewtonLinearization:
    """The curvature of ``G`` at ``(phi, theta)`` in flat coordinates.

    Inside a ``torch.func`` transform, ``"reverse"`` becomes ``"forward"``
    (reverse-over-reverse cannot run there). ``grad_norm``: ``||grad_phi G||`` at ``phi`` when
    already known; the Gauss-Newton modes then skip computing the gradient.
    """
    use_hyper = bool(hyper)

    def fn(x, y, extra):
        return problem.value(_tree.unflatten(x, phi_spec), _tree.unflatten(y, theta_spec), data,
                             extra if use_hyper else None)

    check_hvp(problem, mode)
    if mode in GAUSS_NEWTON_MODES:
        parts = problem.gauss_newton_parts()

        def predict(x):
            return parts.predict(_tree.unflatten(x, phi_spec), data)

        def criterion(out):
            return parts.criterion(out, data)

        def rest(x, y, extra):
            return parts.rest(_tree.unflatten(x, phi_spec), _tree.unflatten(y, theta_spec),
                              extra if use_hyper else None)

        diagonal = None
        if getattr(parts, "rest_diagonal", None) is not None:
            diagonal, _ = _tree.flatten(parts.rest_diagonal(_tree.unflatten(theta_flat, theta_spec),
                                                            hyper if use_hyper else None))
            diagonal = diagonal.detach()
        return GaussNewtonLinearization(fn, predict, criterion, rest, phi_flat, theta_flat, hyper,
                                        jacobian=mode == "gauss_newton_jacobian", rest_diagonal=diagonal,
                                        grad_norm=grad_norm)
    if mode == "reverse" and in_transform():
        mode = "forward"
    return Linearization(fn, phi_flat, theta_flat, hyper, mode)
