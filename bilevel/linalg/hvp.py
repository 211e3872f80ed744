"""Hessian-vector products: the only module that differentiates twice.

Two modes, both exact:

``"reverse"`` (reverse-over-reverse)
    Build ``g = grad_phi G`` once with ``create_graph=True`` and differentiate
    ``<g, v>`` for each ``v``: one double-backward per product, the first
    forward/backward shared by all products and by the mixed term.
``"forward"`` (forward-over-reverse)
    ``torch.func.jvp`` of ``torch.func.grad``: every product re-runs the
    forward and backward with dual numbers. It composes with
    ``torch.func.vmap`` (a meta-batch of tasks), which the reverse mode does not.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

__all__ = ["HVP_MODES", "DEFAULT_HVP_MODE", "Linearization", "hvp"]

#: The two ways of computing Hessian-vector products.
HVP_MODES = ("reverse", "forward")
#: Chosen by ``benchmarks/hvp_modes.py``: on CPU, for one task, reverse-over-reverse
#: with the graph reused across products was faster (see benchmarks/README.md).
DEFAULT_HVP_MODE = "reverse"


def check_mode(mode: str) -> str:
    if mode not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {mode!r}; available: {', '.join(HVP_MODES)}.")
    return mode


class Linearization:
    """Second-order information of ``G(x, y)`` at a point, for implicit differentiation.

    ``fn(x, y, extra) -> scalar`` where ``x`` is the flat variable (``phi``),
    ``y`` the flat outer variable (``theta``) and ``extra`` a list of further
    tensors (hyper-parameters such as a learned ``lam``).

    Attributes
    ----------
    grad:
        ``grad_x G`` at the point (detached).
    count:
        Hessian-vector products performed so far.
    """

    def __init__(self, fn: Callable, x: torch.Tensor, y: torch.Tensor, extra: Sequence[torch.Tensor] = (),
                 mode: str = DEFAULT_HVP_MODE):
        self.mode = check_mode(mode)
        self.fn = fn
        self.x = x.detach()
        self.y = y.detach()
        self.extra = [e.detach() for e in extra]
        self.count = 0  # Hessian-vector products performed
        if self.mode == "reverse":
            with torch.enable_grad():
                self._x = self.x.requires_grad_()
                self._y = self.y.requires_grad_()
                self._e = [e.requires_grad_() for e in self.extra]
                value = fn(self._x, self._y, self._e)
                if value.requires_grad:
                    (g,) = torch.autograd.grad(value, self._x, create_graph=True, allow_unused=True)
                else:  # G does not depend on x, y or the extras at all
                    g = None
                if g is None:  # G does not depend on x: zero gradient and Hessian
                    g = torch.zeros_like(self._x)
            self._g = g
            self.grad = g.detach()
        else:
            self._gradfn = torch.func.grad(fn, argnums=0)
            with warnings.catch_warnings():  # torch's first forward-mode call emits an internal deprecation
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
                self.grad = self._gradfn(self.x, self.y, self.extra).detach()

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``d2G/dx2 @ v`` (1-D, like ``x``)."""
        self.count += 1
        if self.mode == "reverse":
            if not self._g.requires_grad:  # G is linear in x: zero Hessian
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(self._g, self._x, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv
        return torch.func.jvp(lambda x: self._gradfn(x, self.y, self.extra), (self.x,), (v,))[1]

    def mixed_vjp(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Mixed second derivatives applied to ``v``: ``[d_y <g, v>, *d_extra <g, v>]``."""
        if self.mode == "reverse":
            inputs = [self._y, *self._e]
            if not self._g.requires_grad:
                return [torch.zeros_like(t) for t in inputs]
            grads = torch.autograd.grad(self._g, inputs, v, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]

        def inner(y, extra):
            return torch.dot(self._gradfn(self.x, y, extra), v)

        gy, ge = torch.func.grad(inner, argnums=(0, 1))(self.y, self.extra)
        return [gy, *ge]

    def release(self) -> None:
        """Free the retained graph (reverse mode)."""
        self._g = None
        self._x = self._y = None
        self._e = []


def hvp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor,
        mode: str = DEFAULT_HVP_MODE) -> torch.Tensor:
    """One Hessian-vector product ``d2 fn/dx2 @ v`` of a scalar function of a 1-D tensor.

    Examples
    --------
    >>> import torch
    >>> hvp(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]), torch.ones(2))
    tensor([ 6., 12.])
    """
    lin = Linearization(lambda a, b, e: fn(a), x, torch.zeros(0, dtype=x.dtype, device=x.device), (), mode)
    return lin.hvp(v)
