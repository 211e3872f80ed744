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

And one approximation, for losses of predictions (:class:`bilevel.PredictionLoss`):

``"gauss_newton"``
    ``J^T H_c J v + H_rest v``: a forward-mode product with the predictor's
    Jacobian ``J``, the criterion's Hessian ``H_c`` on the outputs, and a
    vector-Jacobian product back (the predictor's forward is re-run, so no
    graph outlives a product). Positive semi-definite for a convex
    criterion, exact for a linear predictor; no second derivative of the
    network is taken. Composes with ``torch.func.vmap``.

``"gauss_newton_jacobian"``
    The same matrix with the predictor's Jacobian ``J`` (``m`` outputs by ``n``
    parameters) built once, by ``m`` vector-Jacobian products, and the
    criterion's ``m x m`` Hessian beside it: every product is then two
    matrix-vector products with ``J`` instead of passes through the
    network. It pays when the outputs are few (few-shot
    support sets: 5-way 1-shot has ``m = 25`` logits) and costs ``m n``
    numbers of memory, so it is for small ``m`` only.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.utils._pytree as _pytree

from .._functorch import in_transform

__all__ = ["HVP_MODES", "EXACT_HVP_MODES", "GAUSS_NEWTON_MODES", "DEFAULT_HVP_MODE", "Linearization",
           "GaussNewtonLinearization", "hvp"]

#: The ways of computing curvature-vector products: two exact Hessian modes and Gauss-Newton (matrix-free, or
#: with the predictor's Jacobian built once).
HVP_MODES = ("reverse", "forward", "gauss_newton", "gauss_newton_jacobian")
#: The modes that use the Gauss-Newton matrix (they need a :class:`bilevel.PredictionLoss`).
GAUSS_NEWTON_MODES = ("gauss_newton", "gauss_newton_jacobian")
#: The modes whose products are exact Hessian-vector products (what :class:`Linearization` and :func:`hvp` take).
EXACT_HVP_MODES = ("reverse", "forward")
#: Chosen by ``benchmarks/hvp_modes.py``: on CPU, for one task, reverse-over-reverse
#: with the graph reused across products was faster (see benchmarks/README.md).
DEFAULT_HVP_MODE = "reverse"
#: torch's forward-mode AD keeps one dual level for the whole process, so two threads must not be inside
#: ``fwAD.dual_level()`` (or ``torch.func.jvp``) at once: the products below hold this lock for their forward-mode
#: passes (the modes ``"reverse"`` and ``"gauss_newton_jacobian"`` use none outside transforms). Re-entrant: a
#: forward-mode product may run inside another (``torch.func.jvp`` of a function that calls the engine).
_FORWARD_AD_LOCK = threading.RLock()


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`HVP_MODES`; otherwise raise ``ValueError`` listing them."""
    if not isinstance(mode, str) or mode not in HVP_MODES:
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
        if self.mode in GAUSS_NEWTON_MODES:
            raise ValueError("Linearization computes exact Hessian products; use GaussNewtonLinearization (built by "
                             "the engine from a PredictionLoss) for hvp='gauss_newton'.")
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
        with _FORWARD_AD_LOCK:
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


class GaussNewtonLinearization:
    """Gauss-Newton curvature of ``G(x, y) = criterion(predict(x)) + rest(x, y, extra)`` at a point.

    The same interface as :class:`Linearization` (``grad``, ``count``,
    ``hvp``, ``mixed_vjp``, ``release``); ``hvp(v)`` returns
    ``J^T H_c J v + d2rest/dx2 v`` with ``J = d predict / dx`` and ``H_c``
    the criterion's Hessian at the outputs. ``rest`` carries every
    dependence on ``y`` and ``extra``, so the mixed term is exact.

    Memory: each product is one forward-mode pass through ``predict`` and one
    reverse pass (its forward re-run); nothing is retained between products.
    With ``jacobian=True`` (mode ``"gauss_newton_jacobian"``) the Jacobian
    ``J`` (``m x n`` for ``m`` outputs) and ``H_c`` (``m x m``) are built once
    and kept until :meth:`release`; a product is then ``J^T (H_c (J v))``.
    ``rest_diagonal`` (flat, like ``x``): given when ``rest`` is the proximal
    term ``1/2 (x - y)^T D (x - y)`` with this constant diagonal ``D``
    (:meth:`bilevel.ProximalProblem.proximal_diagonal`); its Hessian ``D`` and,
    without ``extra``, its mixed term ``-D v`` are then used as they are instead
    of differentiating ``rest``.
    """

    def __init__(self, fn: Callable, predict: Callable, criterion: Callable, rest: Callable, x: torch.Tensor,
                 y: torch.Tensor, extra: Sequence[torch.Tensor] = (), *, jacobian: bool = False,
                 rest_diagonal: torch.Tensor | None = None, grad_norm: float | None = None):
        self.predict, self.criterion, self.rest = predict, criterion, rest
        self.mode = "gauss_newton_jacobian" if jacobian else "gauss_newton"
        self.x = x.detach()
        self.y = y.detach()
        self.extra = [e.detach() for e in extra]
        self.count = 0
        self._rest_diagonal = rest_diagonal
        self._J: torch.Tensor | None = None
        self._H: torch.Tensor | None = None
        #: ``||grad_x fn||`` when the caller knew it (an inner solver's last measurement): ``grad`` is then not
        #: computed (nothing here needs it but that norm)
        self.grad_norm = None if in_transform() else grad_norm
        if self.grad_norm is not None:
            self.grad = None
        elif in_transform():
            self.grad = torch.func.grad(fn, argnums=0)(self.x, self.y, self.extra).detach()
        else:  # autograd holds fewer temporaries than torch.func.grad here
            with torch.enable_grad():
                x0 = self.x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(fn(x0, self.y, self.extra), x0, allow_unused=True)
            self.grad = torch.zeros_like(self.x) if g is None else g.detach()
        self._crit_grad = torch.func.grad(criterion)
        self._rest_grad = torch.func.grad(rest, argnums=0)
        if jacobian:
            self._build_jacobian()

    def _build_jacobian(self) -> None:
        """The Jacobian's rows that matter, and the criterion's Hessian on the flattened outputs.

        Outside transforms ``H_c = U diag(s) U^T`` is factored and only its ``r`` directions with
        ``|s|`` above rounding are kept: ``R = diag(sqrt|s|) U^T`` (``r x m``), and ``R J`` is built
        with one vector-Jacobian product per row of ``R`` on one retained graph. Then
        ``J^T H_c J = (R J)^T diag(sign s) (R J)``: the same matrix, from fewer products where ``H_c``
        is singular (cross-entropy: each example's block has rank ``classes - 1``, so 5-way 1-shot
        needs 20 products instead of 25). Under ``vmap`` the whole Jacobian comes from
        :func:`torch.func.jacrev`.
        """
        with torch.enable_grad():
            if in_transform():
                x = self.x
            else:
                x = self.x.detach().requires_grad_(True)
            out = self.predict(x)
            leaves, out_spec = _pytree.tree_flatten(out)
            flat_out = torch.cat([t.reshape(-1) for t in leaves])
        shapes = [t.shape for t in leaves]
        sizes = [t.numel() for t in leaves]

        def crit_flat(z):
            parts = [p.reshape(shape) for p, shape in zip(torch.split(z, sizes), shapes)]
            return self.criterion(_pytree.tree_unflatten(parts, out_spec))

        # reverse over reverse (m x m, small): no forward mode, so tasks on several threads may build it at once
        H = torch.func.jacrev(torch.func.grad(crit_flat))(flat_out.detach()).detach()
        if in_transform():
            J = torch.func.jacrev(lambda z: torch.cat([t.reshape(-1) for t in
                                                       _pytree.tree_flatten(self.predict(z))[0]]))(x)
            self._J, self._H = J.detach(), H
            return
        s, U = torch.linalg.eigh(0.5 * (H + H.T))
        scale = float(s.abs().max()) if s.numel() else 0.0
        keep = s.abs() > scale * max(1, s.numel()) * torch.finfo(s.dtype).eps
        rows_of_r = (s[keep].abs().sqrt()[:, None] * U[:, keep].T).to(flat_out.dtype)
        r = rows_of_r.shape[0]
        rows = [torch.autograd.grad(flat_out, x, rows_of_r[i], retain_graph=i + 1 < r, allow_unused=True)[0]
                for i in range(r)]
        rows = [torch.zeros_like(self.x) if g is None else g.detach() for g in rows]
        self._J = torch.stack(rows) if rows else self.x.new_zeros((0, self.x.numel()))
        self._H = torch.sign(s[keep]).to(self.x.dtype)  # a diagonal of signs (+1 for a convex criterion)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``(J^T H_c J + d2rest/dx2) v`` (1-D, like ``x``)."""
        self.count += 1
        if self._J is not None:
            Jv = self._J @ v
            jt = self._J.T @ (self._H * Jv if self._H.dim() == 1 else self._H @ Jv)
        elif in_transform():  # under vmap: torch.func throughout
            with warnings.catch_warnings():  # torch's first forward-mode call emits an internal deprecation
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated",
                                        category=FutureWarning)
                out, jv = torch.func.jvp(self.predict, (self.x,), (v,))
            _, hjv = torch.func.jvp(self._crit_grad, (out,), (jv,))
            del jv
            _, pullback = torch.func.vjp(self.predict, self.x)
            (jt,) = pullback(hjv)
            del pullback, hjv
        else:  # outside transforms the autograd APIs hold fewer temporaries than torch.func's (measured on the
            # 4-conv net, 20-way 5-shot: the peak of a Gauss-Newton backward fell from 158 to 119 MiB)
            with _FORWARD_AD_LOCK, torch.no_grad(), fwAD.dual_level():
                duals = self.predict(fwAD.make_dual(self.x, v))
                out = _pytree.tree_map(lambda t: fwAD.unpack_dual(t).primal, duals)
                jv = _pytree.tree_map(lambda t: fwAD.unpack_dual(t).tangent, duals)
                del duals
            # H_c jv as the transposed product of grad(criterion) (H_c is symmetric): reverse mode, lock-free
            _, crit_pullback = torch.func.vjp(self._crit_grad, out)
            (hjv,) = crit_pullback(jv)
            del jv, crit_pullback
            with torch.enable_grad():
                x = self.x.detach().requires_grad_(True)
                outs, cots = _pytree.tree_flatten(self.predict(x))[0], _pytree.tree_flatten(hjv)[0]
                (jt,) = torch.autograd.grad(outs, x, cots)
            del hjv
        if self._rest_diagonal is not None:  # rest's Hessian is a known diagonal (the proximal term: lam)
            return jt + self._rest_diagonal * v
        _, rv = torch.func.jvp(lambda x: self._rest_grad(x, self.y, self.extra), (self.x,), (v,))
        return jt + rv

    def mixed_vjp(self, v: torch.Tensor) -> list[torch.Tensor]:
        """``[d_y <grad_x rest, v>, *d_extra <grad_x rest, v>]`` (the predictor does not depend on ``y``)."""
        if self._rest_diagonal is not None and not self.extra:
            # rest = 1/2 (x - y)^T D (x - y) (the proximal term, D = rest_diagonal): d_y <D (x - y), v> = -D v
            return [-self._rest_diagonal * v]

        def inner(y, extra):
            return torch.dot(self._rest_grad(self.x, y, extra), v)

        gy, ge = torch.func.grad(inner, argnums=(0, 1))(self.y, self.extra)
        return [gy, *ge]

    def release(self) -> None:
        """Drop the Jacobian (``jacobian=True``); otherwise nothing is retained between products."""
        self._J = self._H = None


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
