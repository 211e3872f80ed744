"""The inner objective as a function of a flat vector: what every solver works on."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import tree as _tree
from .._checks import check_scalar, detached_objective_error
from .._functorch import in_transform
from ..linalg.hvp import hvp as _hvp
from ..problem import InnerProblem, ProximalProblem
from ..status import compile_failure

__all__ = ["Objective"]


class Objective:
    """The inner objective seen as a function of a flat vector ``x`` (no autograd graph kept).

    Solvers receive one. ``theta`` is detached, so nothing a solver does
    builds a graph back to the outer variables, and memory does not grow
    with the number of iterations.

    Attributes
    ----------
    problem, theta, data:
        What the solve is about (``theta`` detached, in the user's structure).
    spec:
        The :class:`bilevel.tree.TreeSpec` of ``phi``.
    nfev, ngev, nhvp:
        Counters of values, gradients and Hessian-vector products computed.
    functional:
        True inside a ``torch.func`` transform (e.g. ``vmap`` over tasks):
        derivatives then come from ``torch.func`` and no value is read back.
    """

    def __init__(self, problem: InnerProblem, theta: Any, data: Any, spec: _tree.TreeSpec):
        self.problem = problem
        self.theta = _tree.map(lambda t: t.detach(), theta)
        self.data = data
        self.spec = spec
        self.nfev = 0
        self.ngev = 0
        self.nhvp = 0
        #: inside a torch.func transform (vmap over tasks): derivatives by torch.func, no read-backs
        self.functional = in_transform()
        # iMAML's G = loss + lam/2 ||phi - theta||^2: the proximal term and its gradient on flat vectors
        self._proximal = (problem.flat_proximal(self.theta) if isinstance(problem, ProximalProblem)
                          and not self.functional else None)
        # a plain InnerProblem: its objective is called directly, and its output fully checked once
        self._plain = type(problem).value is InnerProblem.value
        self._checked = False
        # compile=True (enable_compile): gradients from torch.compile after the first, eager, evaluation
        self._compile = False
        self._compiled: Any = None
        #: set when compiling failed (the solve went on eagerly); its solver then stops trying
        self.compile_failed = False
        # phi is one 1-D tensor: the flat vector is phi itself, nothing to unflatten per evaluation
        self._flat_is_phi = spec.structure is None and len(spec.shapes[0]) == 1

    def enable_compile(self) -> None:
        """Compute :meth:`value_and_grad` with :func:`torch.compile` from the second evaluation on.

        The first evaluation runs eagerly, so a bad objective fails with this library's error, not
        the compiler's. The compiled function (``torch.func.grad_and_value`` of ``G`` in flat
        coordinates, static shapes) is cached by torch across solves of the same shapes, so only the
        first solve pays for compiling. Its values equal the eager ones up to rounding (fused
        kernels add in another order). If compiling fails, a :class:`bilevel.CompileWarning` says why
        and the solve continues eagerly (the same values). Not inside ``torch.func`` transforms.
        """
        self._compile = not self.functional

    def _compiled_value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._compiled is None:
            _ = (self.spec.numels, self.spec.size)  # cached before tracing: the compiled code's guards then hold for good
            self._compiled = torch.compile(torch.func.grad_and_value(self._g), dynamic=False)
        try:
            g, v = self._compiled(x)
        except Exception as e:  # the compiler's failure (unsupported code, no C++ toolchain): continue eagerly
            self._compile, self._compiled, self.compile_failed = False, None, True
            warnings.warn(compile_failure(
                f"compile=True, the inner objective {self.problem.name!r}", e,
                "the solve continues without compiling (the same values), and the solver does not try again"),
                stacklevel=4)
            return None
        return v.detach(), g.detach()

    def unflatten(self, x: torch.Tensor) -> Any:
        """``x`` as a tree in ``phi``'s structure (views)."""
        return _tree.unflatten(x, self.spec)

    def _g(self, x: torch.Tensor) -> torch.Tensor:
        return self.problem.value(self.unflatten(x), self.theta, self.data)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """``G(x)`` as a 0-d tensor, without building a graph."""
        self.nfev += 1
        if self.functional:
            return self._g(x)
        with torch.no_grad():
            if self._proximal is not None:
                return self._loss(x) + self._proximal_value(x - self._proximal[0])
            return self._g(x).detach()

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        """The loss part of a proximal problem (checked like :meth:`bilevel.ProximalProblem.value` does)."""
        return check_scalar(self.problem.loss(self.unflatten(x), self.data), f"the loss {self.problem.name!r}")

    def _proximal_value(self, d: torch.Tensor) -> torch.Tensor:
        lam = self._proximal[1]
        return 0.5 * lam * torch.dot(d, d) if isinstance(lam, float) else 0.5 * torch.dot(lam * d, d)

    def value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G(x), grad G(x))``, both detached; the graph is freed before returning."""
        self.nfev += 1
        self.ngev += 1
        if self.functional:
            g, v = torch.func.grad_and_value(self._g)(x)
            return v, g
        if self._compile and self.nfev > 1:
            out = self._compiled_value_and_grad(x)
            if out is not None:
                return out
        if not torch.is_grad_enabled():  # the usual case needs no context entered per step
            with torch.enable_grad():
                return self._value_and_grad(x)
        return self._value_and_grad(x)

    def _value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xx = x.detach().requires_grad_(True)
        if self._plain:
            val = self.problem.objective(xx if self._flat_is_phi else self.unflatten(xx), self.theta, self.data)
            if not self._checked or type(val) is not torch.Tensor or val.ndim:  # noqa: E721 (exact type)
                val = check_scalar(val, f"the inner objective {self.problem.name!r}")
                self._checked = True
            if not val.requires_grad:
                raise detached_objective_error(f"the inner objective {self.problem.name!r}")
            (g,) = torch.autograd.grad(val, xx, allow_unused=True)
            return val.detach(), (torch.zeros_like(x) if g is None else g)
        if self._proximal is not None:
            loss = self._loss(xx)
            if not loss.requires_grad:
                raise detached_objective_error(f"the loss {self.problem.name!r}")
            (g,) = torch.autograd.grad(loss, xx, allow_unused=True)
            d = x - self._proximal[0]
            step = self._proximal[1] * d
            return loss.detach() + self._proximal_value(d), step if g is None else g + step
        val = self.problem.value(self.unflatten(xx), self.theta, self.data)
        if not val.requires_grad:
            raise detached_objective_error(f"the inner objective {getattr(self.problem, 'name', 'G')!r}")
        (g,) = torch.autograd.grad(val, xx, allow_unused=True)
        return val.detach(), (torch.zeros_like(x) if g is None else g)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """``grad G(x)`` (detached)."""
        return self.value_and_grad(x)[1]

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``d2G/dphi2 (x) @ v`` (detached), for second-order solvers (by :func:`bilevel.linalg.hvp`)."""
        self.nhvp += 1
        return _hvp(lambda z: self._g(z), x.detach(), v, "forward" if self.functional else "reverse").detach()

    def stats(self) -> dict[str, int]:
        return {"nfev": self.nfev, "ngev": self.ngev, "nhvp": self.nhvp}
