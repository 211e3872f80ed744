r"""Proximal operators and projections: non-smooth and constrained terms of an inner problem.

An inner objective of the form ``G(phi, theta) = smooth(phi, theta) + R(phi, theta)`` with a
convex term ``R`` that is not differentiable (an L1 penalty) or that is an indicator (a
constraint) has no gradient to set to zero; it is handled through the *proximal operator* of
``R``,

.. math::

   \operatorname{prox}_{s R}(x) = \operatorname*{argmin}_z \; s\, R(z, \theta)
   + \tfrac12 \lVert z - x\rVert^2 ,

the point that trades a step ``s > 0`` of ``R`` against the distance to ``x``. Its solution is
unique (the objective is strongly convex), and the stationary points of ``G`` (its minimisers,
when the smooth part is convex too) are exactly the fixed points of a proximal-gradient step,
``phi* = prox_{sR}(phi* - s grad smooth(phi*))``.

Every term here is a :class:`Regulariser`: ``value(phi, theta)`` is ``R`` and
``prox(x, step, theta)`` is its proximal operator.

* Penalties: :class:`Zero`, :class:`L1` (soft-thresholding), :class:`ElasticNet`,
  :class:`GroupL1` (block soft-thresholding).
* Indicators of convex sets: :class:`NonNegative`, :class:`Box`, :class:`Simplex`,
  :class:`L2Ball`. The indicator is ``0`` on the set and ``+inf`` off it, so its proximal
  operator is the Euclidean projection onto the set, whatever the step (``step`` is accepted
  and ignored). Their ``value`` is ``0`` when ``phi`` satisfies the constraints to within
  ``tol * (1 + scale)`` (``scale``: the size of the set's own parameters, such as the radius
  or the bounds; ``tol`` defaults to the square root of the machine epsilon of ``phi``'s
  dtype) and ``+inf`` otherwise.
* The same operations as plain functions: :func:`soft_threshold`, :func:`project_simplex`,
  :func:`project_box`, :func:`project_l2_ball`.

Strengths, bounds and radii may depend on the outer variables. Each such parameter is a
number, a tensor (per-coordinate weights broadcast against ``x``), or a callable
``theta -> tensor`` such as ``bl.prox.L1(lambda theta: theta.exp())`` for a log-strength
(``theta`` is whatever the caller passes: a tensor or a dict / list / tuple tree).

Why the operators are differentiable
------------------------------------
Every operator is written with differentiable torch operations (no in-place writes, no
``.item()``), so autograd and :mod:`torch.func` (``vjp``, ``jvp``, ``vmap``) differentiate
``prox(x, step, theta)`` in ``x`` and in ``theta`` wherever it is differentiable, which is
everywhere except on the measure-zero set of kinks (such as ``|x| = step * strength``).
Soft-thresholding is ``sign(x) * relu(|x| - step * strength)``: its Jacobian in ``x`` is the
0/1 diagonal of the active set ``{i : |x_i| > step * strength}`` and its derivative in the
strength is ``-step * sign(x)`` there. The implicit function theorem applied to the
fixed-point equation above needs exactly these two derivatives, so a hypergradient built on
them is exact once the active set is identified. A projection is differentiated the same way:
the simplex projection through the values of its sort, the box through its clamp.

Values are checked where they can be read: numbers when an object is built, tensors when it is
built and again after they are modified in place, and what a callable returns at every
evaluation outside :mod:`torch.func` transforms (one read-back for all of a call's checks).
Inside a transform nothing is read back; shapes are checked everywhere.

Examples
--------
>>> import torch, bilevel as bl
>>> reg = bl.prox.L1(0.5)
>>> reg.prox(torch.tensor([2.0, -0.25, -1.0]), step=1.0)
tensor([ 1.5000, -0.0000, -0.5000])
>>> float(reg.value(torch.tensor([2.0, -0.25, -1.0])))
1.625
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence, Union

import torch

from ._functorch import in_transform

__all__ = [
    "Regulariser",
    "Zero",
    "L1",
    "ElasticNet",
    "GroupL1",
    "NonNegative",
    "Box",
    "Simplex",
    "L2Ball",
    "soft_threshold",
    "project_simplex",
    "project_box",
    "project_l2_ball",
]

#: A strength, bound or radius: a number, a tensor, or a callable ``theta -> tensor``.
Parameter = Union[float, torch.Tensor, Callable[[Any], torch.Tensor]]

_LEARN_HINT = {
    "nonnegative": "parametrise a learned strength as exp(log_strength), e.g. lambda theta: theta.exp(), "
                   "or clamp it at 0",
    "positive": "pass a radius > 0; parametrise a learned radius as exp(log_radius), e.g. lambda theta: "
                "theta.exp()",
    "lower": "pass a lower bound that is not NaN and below +inf (use None or -inf for no lower bound)",
    "upper": "pass an upper bound that is not NaN and above -inf (use None or +inf for no upper bound)",
}


# --------------------------------------------------------------------------------------------------
# value checks: collected during a call, read back once (outside torch.func transforms only)


class _Checks:
    """Value checks of one call, read back together: one ``.tolist()`` for all of them."""

    def __init__(self) -> None:
        self._items: list[tuple[torch.Tensor, Callable[[], str]]] = []

    def add(self, bad: Callable[[], torch.Tensor], message: Callable[[], str]) -> None:
        """``bad()``: a 0-d bool tensor, true when the check fails; ``message()``: the error's text."""
        if not in_transform():  # nothing is computed, let alone read back, inside a transform
            self._items.append((bad().reshape(()), message))

    def run(self) -> None:
        if not self._items:
            return
        device = self._items[0][0].device
        flags = torch.stack([bad.to(device) for bad, _ in self._items]).tolist()  # the one read-back
        for flag, (_, message) in zip(flags, self._items):
            if flag:
                raise ValueError(message())


def _bad_values(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A 0-d bool tensor: does ``t`` hold a value that ``kind`` forbids?"""
    t = t.detach()
    if kind == "nonnegative":
        ok = torch.isfinite(t) & (t >= 0)
    elif kind == "positive":
        ok = torch.isfinite(t) & (t > 0)
    elif kind == "lower":
        ok = ~torch.isnan(t) & (t < math.inf)
    else:  # upper
        ok = ~torch.isnan(t) & (t > -math.inf)
    return ~ok.all()


def _describe_bad(t: torch.Tensor, kind: str) -> str:
    t = t.detach()
    if kind in ("nonnegative", "positive"):
        n_nonfinite = int((~torch.isfinite(t)).sum())
        n_low = int((torch.isfinite(t) & ((t < 0) if kind == "nonnegative" else (t <= 0))).sum())
        rule = ">= 0" if kind == "nonnegative" else "> 0"
        return f"finite and {rule}, but it holds {n_low} value(s) {'< 0' if kind == 'nonnegative' else '<= 0'} " \
               f"and {n_nonfinite} non-finite value(s)"
    n_nan = int(torch.isnan(t).sum())
    n_inf = int((t == (math.inf if kind == "lower" else -math.inf)).sum())
    sign = "+inf" if kind == "lower" else "-inf"
    return f"not NaN and not {sign}, but it holds {n_nan} NaN and {n_inf} {sign} value(s)"


# --------------------------------------------------------------------------------------------------
# parameters: a number, a tensor, or a callable of theta


class _Param:
    """One strength, bound or radius of an operator, with the rules it must follow.

    ``kind``: ``"nonnegative"`` (strengths), ``"positive"`` (radii), ``"lower"`` / ``"upper"``
    (bounds, which may be infinite). ``shape``: ``"elementwise"`` (broadcasts against ``x``),
    ``"scalar"`` (one value) or ``"group"`` (one value, or one per group).
    """

    def __init__(self, value: Any, owner: str, name: str, kind: str, shape: str):
        self.owner, self.name, self.kind, self.shape = owner, name, kind, shape
        self.number: float | None = None
        self.tensor: torch.Tensor | None = None
        self.fn: Callable | None = None
        self._checked_version: int | None = None
        if isinstance(value, bool):
            raise TypeError(f"{self.label} must be a number, a tensor or a callable theta -> tensor, got a bool.")
        if isinstance(value, numbers.Real):
            self.number = self._check_number(float(value))
        elif isinstance(value, torch.Tensor):
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{self.label} must hold real numbers, got dtype {value.dtype}; pass a float tensor, "
                                f"e.g. torch.tensor([...], dtype=torch.float64).")
            if shape == "scalar" and value.numel() != 1:
                raise ValueError(f"{self.label} must be one value, got a tensor of shape {tuple(value.shape)}; "
                                 f"pass a number or a one-element tensor.")
            self.tensor = value
            self._check_tensor_now(value, f"the tensor {self.name}")
        elif callable(value):
            self.fn = value
        else:
            raise TypeError(f"{self.label} must be a number, a tensor or a callable theta -> tensor, "
                            f"got {type(value).__name__}.")

    @property
    def label(self) -> str:
        return f"{self.owner} {self.name}"

    def _check_number(self, v: float) -> float:
        bad = {"nonnegative": not (math.isfinite(v) and v >= 0), "positive": not (math.isfinite(v) and v > 0),
               "lower": math.isnan(v) or v == math.inf, "upper": math.isnan(v) or v == -math.inf}[self.kind]
        if bad:
            rule = {"nonnegative": "finite and >= 0", "positive": "finite and > 0",
                    "lower": "a number below +inf (not NaN)", "upper": "a number above -inf (not NaN)"}[self.kind]
            raise ValueError(f"Invalid {self.label}: {v}; it must be {rule}. Fix: {_LEARN_HINT[self.kind]}.")
        return v

    def _check_tensor_now(self, t: torch.Tensor, what: str) -> None:
        if in_transform():
            return
        if bool(_bad_values(t, self.kind)):
            raise ValueError(self._message(t, what))
        try:
            self._checked_version = t._version
        except RuntimeError:  # an inference tensor: no version counter, it cannot change
            self._checked_version = None

    def _message(self, t: torch.Tensor, what: str) -> str:
        return f"{self.label} must be {_describe_bad(t, self.kind)} ({what}). Fix: {_LEARN_HINT[self.kind]}."

    @property
    def is_number(self) -> bool:
        return self.number is not None

    def resolve(self, theta: Any, x: torch.Tensor, checks: _Checks, groups: int | None = None
                ) -> float | torch.Tensor:
        """The value for this call: a float, or a tensor in ``x``'s dtype whose shape fits ``x``."""
        if self.number is not None:
            return self.number
        if self.fn is not None:
            if theta is None:
                raise TypeError(f"{self.label} is a callable of theta, but theta is None; pass theta to "
                                f"value / prox (e.g. reg.prox(x, step, theta)).")
            value = self.fn(theta)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{self.label}: the callable {self.name}(theta) returned {type(value).__name__}, but "
                                f"it must return a torch.Tensor built from theta with torch operations (so that it "
                                f"can be differentiated), e.g. lambda theta: theta.exp(); pass a number instead "
                                f"for a fixed {self.name}.")
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{self.label}: the callable {self.name}(theta) returned dtype {value.dtype}; "
                                f"return a real floating-point tensor.")
            what = f"returned by the callable {self.name}(theta)"
            t = self._fit(value, x, groups, what)
            checks.add(lambda: _bad_values(t, self.kind), lambda: self._message(t, what))
            return t
        t = self.tensor
        if not in_transform():
            try:
                version = t._version
            except RuntimeError:
                version = self._checked_version
            if version != self._checked_version:  # modified in place since it was checked
                self._check_tensor_now(t, f"the tensor {self.name}, modified since it was given")
        return self._fit(t, x, groups, f"the tensor {self.name}")

    def _fit(self, t: torch.Tensor, x: torch.Tensor, groups: int | None, what: str) -> torch.Tensor:
        if t.dtype != x.dtype:
            t = t.to(x.dtype)
        shape = tuple(t.shape)
        if self.shape == "scalar" or (self.shape == "group" and t.numel() == 1):
            if t.numel() != 1:
                raise ValueError(f"{self.label} must be one value, but {what} has shape {shape}; return a 0-d "
                                 f"tensor (e.g. theta.exp().sum() or theta['radius'].reshape(())).")
            return t.reshape(())
        if self.shape == "group":
            if shape != (groups,):
                raise ValueError(f"{self.label} must be one value or one per group, but {what} has shape {shape} "
                                 f"and there are {groups} groups; use shape () or ({groups},).")
            return t
        try:
            ok = torch.broadcast_shapes(t.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{self.label} must broadcast against x's shape {tuple(x.shape)}, but {what} has shape "
                             f"{shape}; use shape () (one value) or {tuple(x.shape)} (one per coordinate).")
        return t

    def __repr__(self) -> str:
        if self.number is not None:
            return repr(self.number)
        if self.tensor is not None:
            return f"<tensor of shape {tuple(self.tensor.shape)}>"
        return f"<callable {getattr(self.fn, '__name__', type(self.fn).__name__)}>"


# --------------------------------------------------------------------------------------------------
# arguments of every call


def _check_x(x: Any, what: str, owner: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {what} must be a torch.Tensor, got {type(x).__name__}; convert it with "
                        f"torch.as_tensor({what}, dtype=torch.float64).")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {what} has dtype {x.dtype}, but the operator needs real floating point; convert "
                        f"it, e.g. {what}.double() (torch.tensor([1, 2]) is int64: write [1.0, 2.0]).")
    return x


def _check_step(step: Any, x: torch.Tensor, owner: str) -> float | torch.Tensor:
    """A number (checked: finite, >= 0) or a one-element tensor (shape checked; its value is not read back)."""
    if isinstance(step, bool) or not isinstance(step, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{owner}: step must be a number or a one-element tensor, got {type(step).__name__}.")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"{owner}: step must be one value, got a tensor of shape {tuple(step.shape)}; pass the "
                             f"step size as a number or a 0-d tensor.")
        return step.reshape(()).to(x.dtype)
    v = float(step)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"Invalid step: {step} ({owner}); the step size must be finite and >= 0 (the proximal "
                         f"operator of step * R).")
    return v


def _fixed(value: Any, owner: str, name: str) -> Any:
    """A plain function's parameter: a number, a tensor or ``None``, never a callable of theta."""
    if callable(value) and not isinstance(value, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a number or a tensor, got a callable; call it first "
                        f"({owner}(x, {name}(theta))) or use the regulariser classes of bilevel.prox, which "
                        f"accept callables of theta.")
    return value


def _check_tol(tol: Any, owner: str) -> float | None:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"Invalid {owner} tol: {tol!r}; pass a finite number >= 0, or None for the square root of "
                         f"the machine epsilon of phi's dtype.")
    return float(tol)


def _tol(tol: float | None, x: torch.Tensor) -> float:
    return math.sqrt(torch.finfo(x.dtype).eps) if tol is None else tol


def _indicator(feasible: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``0`` where ``feasible`` (a 0-d bool tensor) holds, ``+inf`` otherwise, in ``phi``'s dtype."""
    return torch.where(feasible, phi.new_zeros(()), phi.new_full((), math.inf))


def _safe_norm(sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(sq)`` with finite derivatives at ``sq = 0`` (returns the norm and ``sq > 0``)."""
    positive = sq > 0
    root = torch.sqrt(torch.where(positive, sq, torch.ones_like(sq)))
    return torch.where(positive, root, torch.zeros_like(sq)), positive


# --------------------------------------------------------------------------------------------------
# kernels (no validation): the differentiable formulas


def _soft(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - t)


def _simplex(x: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    n = flat.shape[0]
    u, _ = torch.sort(flat, descending=True)
    excess = torch.cumsum(u, dim=0) - radius                  # sum of the k largest, minus the radius
    k = torch.arange(1, n + 1, device=x.device)
    support = u * k.to(x.dtype) > excess                      # u_k > (sum_{j<=k} u_j - radius) / k
    rho = torch.where(support, k, torch.zeros_like(k)).amax(dim=0, keepdim=True)
    tau = torch.gather(excess, 0, rho - 1) / rho.to(x.dtype)  # differentiable through the sorted values
    return torch.relu(flat - tau).reshape(x.shape)


def _box(x: torch.Tensor, lower: Any, upper: Any) -> torch.Tensor:
    if lower is None and upper is None:
        return x
    if isinstance(lower, torch.Tensor) or isinstance(upper, torch.Tensor):  # clamp takes two numbers or two tensors
        lower, upper = (b if b is None or isinstance(b, torch.Tensor) else torch.as_tensor(b, dtype=x.dtype,
                                                                                           device=x.device)
                        for b in (lower, upper))
    return torch.clamp(x, min=lower, max=upper)


def _ball(x: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    norm, positive = _safe_norm((x * x).sum())
    outside = norm > radius
    scale = torch.where(outside, radius / torch.where(positive, norm, torch.ones_like(norm)),
                        torch.ones_like(norm))
    return x * scale


# --------------------------------------------------------------------------------------------------
# the regularisers


class Regulariser:
    """``R(phi, theta)``: a convex, possibly non-smooth or indicator term, with its proximal operator.

    Subclasses implement :meth:`value` and :meth:`prox`; the built-in ones are listed in
    :mod:`bilevel.prox`. A term of your own needs only these two methods, written with
    differentiable torch operations (so that ``torch.func`` can differentiate them).

    Attributes
    ----------
    indicator : bool
        ``True`` for the indicator of a set (``value`` is ``0`` or ``+inf`` and ``prox`` is the
        projection, whatever the step).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> class Shrink(bl.prox.Regulariser):
    ...     '''R(z) = 1/2 ||z||^2, whose proximal operator is x / (1 + step).'''
    ...     def value(self, phi, theta=None):
    ...         return 0.5 * (phi ** 2).sum()
    ...     def prox(self, x, step, theta=None):
    ...         return x / (1 + step)
    >>> Shrink().prox(torch.tensor([2.0, 4.0]), 1.0)
    tensor([1., 2.])
    """

    indicator: bool = False

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        """``R(phi, theta)`` as a 0-d tensor in ``phi``'s dtype.

        For an indicator: ``0`` when ``phi`` satisfies the constraints (to a small tolerance),
        ``+inf`` otherwise. ``theta`` is needed only when a parameter is a callable of it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement value(phi, theta).")

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        """``argmin_z step * R(z, theta) + 1/2 ||z - x||^2``, a tensor shaped like ``x``.

        ``step`` is a number ``>= 0`` or a one-element tensor (the latter's value is not read
        back). For an indicator the result is the projection of ``x`` and ``step`` is ignored.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement prox(x, step, theta).")

    # shared by the built-in terms
    def _begin(self, x: Any, what: str) -> tuple[torch.Tensor, _Checks]:
        return _check_x(x, what, type(self).__name__), _Checks()


class Zero(Regulariser):
    """No regulariser: ``R = 0`` and ``prox(x) = x``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> bl.prox.Zero().prox(torch.tensor([1.0, -2.0]), step=0.5)
    tensor([ 1., -2.])
    >>> float(bl.prox.Zero().value(torch.tensor([1.0, -2.0])))
    0.0
    """

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, _ = self._begin(phi, "phi")
        return phi.new_zeros(())

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, _ = self._begin(x, "x")
        _check_step(step, x, "Zero")
        return x

    def __repr__(self) -> str:
        return "Zero()"


class L1(Regulariser):
    """The L1 penalty ``R(z) = sum_i strength_i |z_i|``; its proximal operator is soft-thresholding.

    Parameters
    ----------
    strength:
        ``>= 0``: a number, a tensor that broadcasts against ``x`` (one weight per
        coordinate), or a callable ``theta -> tensor`` (e.g. ``lambda theta: theta.exp()`` to
        learn a log-strength).

    Notes
    -----
    ``prox(x, s) = sign(x) * relu(|x| - s * strength)``. Its Jacobian in ``x`` is the 0/1
    diagonal of the active set ``{i : |x_i| > s * strength_i}`` and its derivative in the
    strength is ``-s * sign(x)`` on that set and zero off it: the exact derivatives of the
    lasso solution once its support is known.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> reg = bl.prox.L1(lambda theta: theta.exp())      # a learned log-strength
    >>> log_strength = torch.tensor(0.0, requires_grad=True)
    >>> z = reg.prox(torch.tensor([3.0, 0.5, 2.0]), 1.0, log_strength)
    >>> z
    tensor([2., 0., 1.], grad_fn=<MulBackward0>)
    >>> z.sum().backward()   # -step * sign(x) * e^0 from each of the two active coordinates
    >>> log_strength.grad
    tensor(-2.)
    """

    def __init__(self, strength: Parameter):
        self.strength = _Param(strength, "L1", "strength", "nonnegative", "elementwise")

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, checks = self._begin(phi, "phi")
        lam = self.strength.resolve(theta, phi, checks)
        checks.run()
        return (lam * phi.abs()).sum()

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, checks = self._begin(x, "x")
        step = _check_step(step, x, "L1")
        lam = self.strength.resolve(theta, x, checks)
        checks.run()
        return _soft(x, step * lam)

    def __repr__(self) -> str:
        return f"L1(strength={self.strength!r})"


class ElasticNet(Regulariser):
    """The elastic net ``R(z) = sum_i l1_i |z_i| + 1/2 sum_i l2_i z_i^2``.

    Parameters
    ----------
    l1, l2:
        ``>= 0``; each a number, a tensor that broadcasts against ``x``, or a callable
        ``theta -> tensor``.

    Notes
    -----
    ``prox(x, s) = soft_threshold(x, s * l1) / (1 + s * l2)``: differentiable in ``x``, ``l1``
    and ``l2`` off the kinks ``|x_i| = s * l1_i``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> reg = bl.prox.ElasticNet(l1=1.0, l2=1.0)
    >>> reg.prox(torch.tensor([3.0, 0.5, -5.0]), step=1.0)
    tensor([ 1.,  0., -2.])
    >>> float(reg.value(torch.tensor([1.0, 0.0, -2.0])))
    5.5
    """

    def __init__(self, l1: Parameter, l2: Parameter):
        self.l1 = _Param(l1, "ElasticNet", "l1", "nonnegative", "elementwise")
        self.l2 = _Param(l2, "ElasticNet", "l2", "nonnegative", "elementwise")

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, checks = self._begin(phi, "phi")
        l1, l2 = self.l1.resolve(theta, phi, checks), self.l2.resolve(theta, phi, checks)
        checks.run()
        return (l1 * phi.abs()).sum() + 0.5 * (l2 * phi * phi).sum()

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, checks = self._begin(x, "x")
        step = _check_step(step, x, "ElasticNet")
        l1, l2 = self.l1.resolve(theta, x, checks), self.l2.resolve(theta, x, checks)
        checks.run()
        return _soft(x, step * l1) / (1 + step * l2)

    def __repr__(self) -> str:
        return f"ElasticNet(l1={self.l1!r}, l2={self.l2!r})"


class _Groups:
    """A partition of ``n`` coordinates: consecutive blocks of one size, or group ids."""

    def __init__(self, groups: Any):
        self.size: int | None = None      # consecutive blocks of this size (the fast path)
        self.ids: torch.Tensor | None = None
        self.sizes: torch.Tensor | None = None
        self.n: int | None = None
        self._on: dict = {}
        if isinstance(groups, bool):
            raise TypeError("GroupL1 groups must be a group size (int), a list of index tensors or a tensor of group "
                            "ids, got a bool.")
        if isinstance(groups, numbers.Integral):
            if groups < 1:
                raise ValueError(f"Invalid GroupL1 groups: {groups}; a group size must be >= 1 (it must divide "
                                 f"the number of coordinates).")
            self.size = int(groups)
            return
        if isinstance(groups, torch.Tensor):
            ids = self._ids_from_tensor(groups)
        elif isinstance(groups, (list, tuple)):
            ids = self._ids_from_indices(groups)
        else:
            raise TypeError(f"GroupL1 groups must be a group size (int), a list of index tensors or a tensor of "
                            f"group ids, got {type(groups).__name__}.")
        self.n = ids.numel()
        self.sizes = torch.bincount(ids)
        g = int(self.sizes[0])
        if bool((self.sizes == g).all()) and torch.equal(ids, torch.arange(self.n) // g):
            self.size = g                 # consecutive blocks of equal size: reshape instead of scatter
        else:
            self.ids = ids

    @staticmethod
    def _ids_from_tensor(groups: torch.Tensor) -> torch.Tensor:
        if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            raise TypeError(f"GroupL1 groups given as a tensor must hold integer group ids (one per coordinate), got "
                            f"dtype {groups.dtype}; pass e.g. torch.tensor([0, 0, 1, 1, 1]).")
        if groups.dim() != 1 or groups.numel() == 0:
            raise ValueError(f"GroupL1 groups given as a tensor must be 1-D with one group id per coordinate, got "
                             f"shape {tuple(groups.shape)}; pass ids.reshape(-1).")
        _, ids = torch.unique(groups.detach().cpu().long(), return_inverse=True)
        return ids

    @staticmethod
    def _ids_from_indices(groups: Sequence) -> torch.Tensor:
        if len(groups) == 0:
            raise ValueError("GroupL1 groups is an empty list; pass at least one group of indices.")
        if all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in groups):
            raise TypeError(f"GroupL1 groups={list(groups)[:8]} is a flat list of ints, which is ambiguous: pass group "
                            f"ids as a tensor (torch.tensor([0, 0, 1, 1])), a list of index lists "
                            f"([[0, 1], [2, 3]]), or a group size as an int.")
        parts = []
        for i, g in enumerate(groups):
            t = torch.as_tensor(g).detach().cpu().reshape(-1)
            if t.numel() == 0:
                raise ValueError(f"GroupL1 groups[{i}] is empty; every group needs at least one index (drop it).")
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"GroupL1 groups[{i}] must hold integer indices, got dtype {t.dtype}; pass e.g. "
                                f"torch.tensor([0, 2]).")
            parts.append(t.long())
        index = torch.cat(parts)
        n = index.numel()
        owner = torch.cat([torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(parts)])
        if bool((index < 0).any()) or bool((index >= n).any()):
            bad = index[(index < 0) | (index >= n)][:5].tolist()
            raise ValueError(f"GroupL1 groups do not partition the coordinates 0..{n - 1} (the {n} indices they "
                             f"hold): indices {bad} lie outside. Every coordinate must be in exactly one group; put "
                             f"the coordinates that need no penalty in groups of their own or use L1 for them.")
        counts = torch.bincount(index, minlength=n)
        if bool((counts != 1).any()):
            twice = torch.nonzero(counts > 1).reshape(-1)[:5].tolist()
            missing = torch.nonzero(counts == 0).reshape(-1)[:5].tolist()
            raise ValueError(f"GroupL1 groups do not partition the coordinates 0..{n - 1}: indices {twice} are in "
                             f"more than one group and {missing} in none. Every coordinate must be in exactly one "
                             f"group.")
        ids = torch.empty(n, dtype=torch.long)
        ids[index] = owner
        return ids

    def count(self, n: int) -> int:
        """The number of groups for ``n`` coordinates (checks that the partition fits ``n``)."""
        if self.size is not None and self.n is None:
            if n % self.size != 0:
                raise ValueError(f"GroupL1: the group size {self.size} does not divide x's {n} coordinates; pass a "
                                 f"group size that divides {n}, or the groups as a list of index tensors.")
            return n // self.size
        if n != self.n:
            raise ValueError(f"GroupL1 groups partition {self.n} coordinates, but x has {n}; pass groups that cover "
                             f"exactly x's coordinates 0..{n - 1}.")
        return self.sizes.numel()

    def on(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The ids (or ``None`` for equal blocks) on ``x``'s device and the group sizes in ``x``'s dtype."""
        key = (x.device, x.dtype)
        if key not in self._on:
            ids = None if self.ids is None else self.ids.to(x.device)
            sizes = None if self.sizes is None else self.sizes.to(device=x.device, dtype=x.dtype)
            self._on[key] = (ids, sizes)
        return self._on[key]

    def norms(self, flat: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's 2-norm (finite derivatives at zero) and whether it is positive."""
        if self.ids is None:
            sq = (flat.reshape(n_groups, self.size) ** 2).sum(dim=1)
        else:
            ids, _ = self.on(flat)
            sq = torch.zeros(n_groups, dtype=flat.dtype, device=flat.device).index_add(0, ids, flat * flat)
        return _safe_norm(sq)

    def expand(self, per_group: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` times each coordinate's group value."""
        if self.ids is None:
            return (flat.reshape(-1, self.size) * per_group.unsqueeze(-1)).reshape(-1)
        ids, _ = self.on(flat)
        return flat * per_group[ids]

    def weights(self, x: torch.Tensor) -> float | torch.Tensor:
        """``sqrt(group size)``: a number for equal sizes, else one per group."""
        if self.ids is None:
            return math.sqrt(self.size)
        return torch.sqrt(self.on(x)[1])

    def __repr__(self) -> str:
        if self.ids is None and self.n is None:
            return str(self.size)
        if self.ids is None:
            return f"<{self.n // self.size} groups of size {self.size}>"
        return f"<{self.sizes.numel()} groups of sizes {int(self.sizes.min())}..{int(self.sizes.max())}>"


class GroupL1(Regulariser):
    """The group lasso ``R(z) = sum_g strength_g w_g ||z_g||_2``; its proximal operator is block soft-thresholding.

    ``x`` is taken as its flattened view ``x.reshape(-1)``, whose coordinates the groups
    partition.

    Parameters
    ----------
    strength:
        ``>= 0``: a number, a tensor of shape ``()`` or ``(number of groups,)`` (one
        strength per group), or a callable ``theta -> tensor`` of one of those shapes.
    groups:
        The partition of the coordinates: an ``int`` group size that divides the number of
        coordinates (consecutive blocks), a list of index tensors (or lists), one per
        group, that together hold every coordinate exactly once, or an integer tensor of
        group ids, one per coordinate (ids are sorted: group ``g`` is the ``g``-th smallest id).
    size_weighted:
        ``False`` (default): ``w_g = 1``, the plain sum of the groups' 2-norms. ``True``:
        ``w_g = sqrt(size of group g)``, the usual group-lasso weighting, which keeps large
        groups from being favoured over small ones.

    Notes
    -----
    ``prox(x, s)_g = x_g * max(0, 1 - s strength_g w_g / ||x_g||)``: a group whose norm is at
    most the threshold becomes zero, the others shrink towards zero. On an active group the
    Jacobian in ``x`` is ``(1 - t/||x_g||) I + t x_g x_g^T / ||x_g||^3`` (``t`` the threshold),
    on an inactive one zero; norms are computed with finite derivatives at zero groups.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> reg = bl.prox.GroupL1(1.0, groups=2)            # groups {0, 1} and {2, 3}
    >>> reg.prox(torch.tensor([3.0, 4.0, 0.3, -0.4]), step=1.0)
    tensor([2.4000, 3.2000, 0.0000, -0.0000])
    >>> reg = bl.prox.GroupL1(1.0, groups=[[0, 2], [1, 3]], size_weighted=True)
    >>> float(reg.value(torch.tensor([3.0, 1.0, 4.0, 0.0])))  # sqrt(2) * (5 + 1)
    8.485...
    """

    def __init__(self, strength: Parameter, groups: int | Sequence | torch.Tensor, *, size_weighted: bool = False):
        self.strength = _Param(strength, "GroupL1", "strength", "nonnegative", "group")
        self.groups = _Groups(groups)
        if not isinstance(size_weighted, bool):
            raise TypeError(f"GroupL1 size_weighted must be True or False, got {size_weighted!r}.")
        self.size_weighted = size_weighted

    def _threshold(self, theta: Any, flat: torch.Tensor, n_groups: int, checks: _Checks):
        lam = self.strength.resolve(theta, flat, checks, groups=n_groups)
        return lam * self.groups.weights(flat) if self.size_weighted else lam

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, checks = self._begin(phi, "phi")
        flat = phi.reshape(-1)
        n_groups = self.groups.count(flat.shape[0])
        weight = self._threshold(theta, flat, n_groups, checks)
        checks.run()
        norms, _ = self.groups.norms(flat, n_groups)
        return (weight * norms).sum()

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, checks = self._begin(x, "x")
        step = _check_step(step, x, "GroupL1")
        flat = x.reshape(-1)
        n_groups = self.groups.count(flat.shape[0])
        t = step * self._threshold(theta, flat, n_groups, checks)
        checks.run()
        norms, positive = self.groups.norms(flat, n_groups)
        safe = torch.where(positive, norms, torch.ones_like(norms))
        scale = torch.where(norms > t, 1 - t / safe, torch.zeros_like(norms))
        return self.groups.expand(scale, flat).reshape(x.shape)

    def __repr__(self) -> str:
        weighted = ", size_weighted=True" if self.size_weighted else ""
        return f"GroupL1(strength={self.strength!r}, groups={self.groups!r}{weighted})"


class _Indicator(Regulariser):
    indicator = True

    def _tol_repr(self) -> str:
        return "" if self.tol is None else f", tol={self.tol!r}"


class NonNegative(_Indicator):
    """The indicator of the non-negative orthant ``{z : z >= 0}``; its proximal operator is ``relu``.

    Parameters
    ----------
    tol:
        ``value`` is ``0`` when every ``z_i >= -tol``; ``None`` (default): the square root of
        the machine epsilon of ``phi``'s dtype.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> reg = bl.prox.NonNegative()
    >>> reg.prox(torch.tensor([1.5, -2.0]), step=1.0)
    tensor([1.5000, 0.0000])
    >>> float(reg.value(torch.tensor([1.5, -2.0])))
    inf
    """

    def __init__(self, *, tol: float | None = None):
        self.tol = _check_tol(tol, "NonNegative")

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, _ = self._begin(phi, "phi")
        return _indicator((phi >= -_tol(self.tol, phi)).all(), phi)

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, _ = self._begin(x, "x")
        _check_step(step, x, "NonNegative")
        return torch.relu(x)

    def __repr__(self) -> str:
        return f"NonNegative({self._tol_repr()[2:]})"


def _margin(bound: float | torch.Tensor, tol: float, sign: float) -> float | torch.Tensor:
    """``bound + sign * tol * (1 + |bound|)``, with infinite bounds left as they are."""
    if isinstance(bound, float):
        return bound if math.isinf(bound) else bound + sign * tol * (1 + abs(bound))
    return torch.where(torch.isinf(bound), bound, bound + sign * tol * (1 + bound.abs()))


class _BoxBounds:
    """The bounds of :class:`Box` and :func:`project_box`: resolved, shape- and order-checked."""

    def __init__(self, lower: Parameter | None, upper: Parameter | None, owner: str):
        self.owner = owner
        self.lower = None if lower is None else _Param(lower, owner, "lower", "lower", "elementwise")
        self.upper = None if upper is None else _Param(upper, owner, "upper", "upper", "elementwise")
        if self.lower is not None and self.upper is not None:
            lo, hi = self.lower, self.upper
            if lo.is_number and hi.is_number:
                if lo.number > hi.number:
                    raise ValueError(f"{owner}: lower={lo.number} > upper={hi.number}, so the box is empty; pass "
                                     f"lower <= upper (swap them?).")
            elif lo.fn is None and hi.fn is None and not in_transform():
                a, b = self._as_tensor(lo), self._as_tensor(hi)
                if bool((a > b).any()):
                    raise ValueError(self._order_message(a, b))

    @staticmethod
    def _as_tensor(p: _Param) -> torch.Tensor:
        return torch.as_tensor(p.number) if p.is_number else p.tensor.detach()

    def _order_message(self, lo: Any, hi: Any) -> str:
        lo, hi = torch.as_tensor(lo).detach(), torch.as_tensor(hi).detach()
        lo, hi = torch.broadcast_tensors(lo, hi)
        bad = lo > hi
        i = torch.nonzero(bad.reshape(-1))[0, 0]
        return (f"{self.owner}: lower > upper at {int(bad.sum())} coordinate(s) (the first: lower="
                f"{lo.reshape(-1)[i].item():g}, upper={hi.reshape(-1)[i].item():g}), so the box is empty; pass "
                f"lower <= upper everywhere (swap them?).")

    def resolve(self, theta: Any, x: torch.Tensor, checks: _Checks) -> tuple[Any, Any]:
        lo = None if self.lower is None else self.lower.resolve(theta, x, checks)
        hi = None if self.upper is None else self.upper.resolve(theta, x, checks)
        if self.lower is not None and self.upper is not None and (self.lower.fn is not None
                                                                  or self.upper.fn is not None):
            a = lo if isinstance(lo, torch.Tensor) else torch.as_tensor(lo, dtype=x.dtype, device=x.device)
            b = hi if isinstance(hi, torch.Tensor) else torch.as_tensor(hi, dtype=x.dtype, device=x.device)
            checks.add(lambda: (a.detach() > b.detach()).any(), lambda: self._order_message(a, b))
        return lo, hi

    def __repr__(self) -> str:
        return f"lower={self.lower!r}, upper={self.upper!r}"


class Box(_Indicator):
    """The indicator of the box ``{z : lower <= z <= upper}``; its proximal operator is the clamp.

    Parameters
    ----------
    lower, upper:
        Each a number (``±inf`` allowed), a tensor that broadcasts against ``x``, a callable
        ``theta -> tensor``, or ``None`` for no bound on that side. ``lower <= upper``
        everywhere (checked for numbers and tensors when the box is built, for callables at
        every call outside ``torch.func`` transforms).
    tol:
        ``value`` is ``0`` when ``lower - tol (1 + |lower|) <= z <= upper + tol (1 + |upper|)``;
        ``None`` (default): the square root of the machine epsilon of ``phi``'s dtype.

    Notes
    -----
    ``prox(x) = clamp(x, lower, upper)``: its Jacobian in ``x`` is the 0/1 diagonal of the
    coordinates strictly inside the box, and its derivative in a bound is ``1`` where that
    bound is active.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> reg = bl.prox.Box(0.0, torch.tensor([1.0, 2.0, 3.0]))
    >>> reg.prox(torch.tensor([-1.0, 1.5, 4.0]), step=1.0)
    tensor([0.0000, 1.5000, 3.0000])
    >>> float(reg.value(torch.tensor([0.5, 2.5, 1.0])))
    inf
    """

    def __init__(self, lower: Parameter | None, upper: Parameter | None, *, tol: float | None = None):
        self.bounds = _BoxBounds(lower, upper, "Box")
        self.tol = _check_tol(tol, "Box")

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, checks = self._begin(phi, "phi")
        lo, hi = self.bounds.resolve(theta, phi, checks)
        checks.run()
        tol = _tol(self.tol, phi)
        ok = torch.ones_like(phi, dtype=torch.bool)
        if lo is not None:
            ok = ok & (phi >= _margin(lo, tol, -1.0))
        if hi is not None:
            ok = ok & (phi <= _margin(hi, tol, 1.0))
        return _indicator(ok.all(), phi)

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, checks = self._begin(x, "x")
        _check_step(step, x, "Box")
        lo, hi = self.bounds.resolve(theta, x, checks)
        checks.run()
        return _box(x, lo, hi)

    def __repr__(self) -> str:
        return f"Box({self.bounds!r}{self._tol_repr()})"


class Simplex(_Indicator):
    """The indicator of the simplex ``{z : z >= 0, sum(z) = radius}``; its proximal operator is the projection.

    The whole tensor is one point of the simplex (all its entries together sum to ``radius``).

    Parameters
    ----------
    radius:
        ``> 0``: a number, a one-element tensor, or a callable ``theta -> tensor`` with one
        element.
    tol:
        ``value`` is ``0`` when ``z_i >= -tol (1 + radius)`` and
        ``|sum(z) - radius| <= tol (1 + radius)``; ``None`` (default): the square root of the
        machine epsilon of ``phi``'s dtype.

    Notes
    -----
    The projection is ``relu(x - tau)`` with the threshold ``tau`` found by sorting ``x``
    (Held, Wolfe and Crowder 1974; Duchi et al. 2008): with ``u`` sorted in decreasing order,
    ``rho`` the largest ``k`` with ``u_k > (u_1 + ... + u_k - radius) / k``, and
    ``tau = (u_1 + ... + u_rho - radius) / rho``. It is differentiated through the sorted
    values: on the support ``S`` the Jacobian is ``I - 1 1^T / |S|`` and the derivative in
    the radius is ``1 / |S|``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> bl.prox.Simplex().prox(torch.tensor([0.5, 1.0, -1.0]), step=1.0)
    tensor([0.2500, 0.7500, 0.0000])
    >>> bl.prox.Simplex(radius=2.0)
    Simplex(radius=2.0)
    """

    def __init__(self, radius: Parameter = 1.0, *, tol: float | None = None):
        self.radius = _Param(radius, "Simplex", "radius", "positive", "scalar")
        self.tol = _check_tol(tol, "Simplex")

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, checks = self._begin(phi, "phi")
        r = self.radius.resolve(theta, phi, checks)
        checks.run()
        margin = _tol(self.tol, phi) * (1 + r)
        ok = (phi >= -margin).all() & ((phi.sum() - r).abs() <= margin)
        return _indicator(ok, phi)

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, checks = self._begin(x, "x")
        _check_step(step, x, "Simplex")
        r = self.radius.resolve(theta, x, checks)
        checks.run()
        return _simplex(x, r)

    def __repr__(self) -> str:
        return f"Simplex(radius={self.radius!r}{self._tol_repr()})"


class L2Ball(_Indicator):
    """The indicator of the ball ``{z : ||z||_2 <= radius}``; its proximal operator is the projection.

    The norm is that of the whole tensor.

    Parameters
    ----------
    radius:
        ``> 0``: a number, a one-element tensor, or a callable ``theta -> tensor`` with one
        element.
    tol:
        ``value`` is ``0`` when ``||z|| <= radius + tol (1 + radius)``; ``None`` (default):
        the square root of the machine epsilon of ``phi``'s dtype.

    Notes
    -----
    ``prox(x) = x * min(1, radius / ||x||)``. Outside the ball its Jacobian in ``x`` is
    ``(radius / ||x||) (I - x x^T / ||x||^2)`` and its derivative in the radius ``x / ||x||``;
    inside, the identity and zero.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> bl.prox.L2Ball(radius=1.0).prox(torch.tensor([3.0, 4.0]), step=1.0)
    tensor([0.6000, 0.8000])
    >>> float(bl.prox.L2Ball(radius=1.0).value(torch.tensor([0.6, 0.8])))
    0.0
    """

    def __init__(self, radius: Parameter = 1.0, *, tol: float | None = None):
        self.radius = _Param(radius, "L2Ball", "radius", "positive", "scalar")
        self.tol = _check_tol(tol, "L2Ball")

    def value(self, phi: torch.Tensor, theta: Any = None) -> torch.Tensor:
        phi, checks = self._begin(phi, "phi")
        r = self.radius.resolve(theta, phi, checks)
        checks.run()
        norm = torch.linalg.vector_norm(phi.reshape(-1))
        return _indicator(norm <= r + _tol(self.tol, phi) * (1 + r), phi)

    def prox(self, x: torch.Tensor, step: float | torch.Tensor, theta: Any = None) -> torch.Tensor:
        x, checks = self._begin(x, "x")
        _check_step(step, x, "L2Ball")
        r = self.radius.resolve(theta, x, checks)
        checks.run()
        return _ball(x, r)

    def __repr__(self) -> str:
        return f"L2Ball(radius={self.radius!r}{self._tol_repr()})"


# --------------------------------------------------------------------------------------------------
# plain functions


def soft_threshold(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Soft-thresholding ``sign(x) * relu(|x| - t)``, the proximal operator of ``t ||.||_1``.

    Parameters
    ----------
    x:
        A floating-point tensor of any shape.
    t:
        The threshold ``>= 0``: a number or a tensor that broadcasts against ``x``.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``; differentiable in ``x`` and ``t`` (see :class:`L1`).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> bl.prox.soft_threshold(torch.tensor([2.0, -0.5, -3.0]), 1.0)
    tensor([ 1., -0., -2.])
    """
    x = _check_x(x, "x", "soft_threshold")
    t = _Param(_fixed(t, "soft_threshold", "t"), "soft_threshold", "t", "nonnegative", "elementwise")
    return _soft(x, t.resolve(None, x, _Checks()))


def project_simplex(x: torch.Tensor, radius: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The Euclidean projection of ``x`` (the whole tensor) onto ``{z : z >= 0, sum(z) = radius}``.

    Parameters
    ----------
    x:
        A floating-point tensor of any shape.
    radius:
        ``> 0``: a number or a one-element tensor.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``; differentiable in ``x`` and ``radius`` (see :class:`Simplex`).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> bl.prox.project_simplex(torch.tensor([2.0, 0.0, 1.0]), radius=2.0)
    tensor([1.5000, 0.0000, 0.5000])
    """
    x = _check_x(x, "x", "project_simplex")
    r = _Param(_fixed(radius, "project_simplex", "radius"), "project_simplex", "radius", "positive",
               "scalar").resolve(None, x, _Checks())
    return _simplex(x, r)


def project_box(x: torch.Tensor, lower: float | torch.Tensor | None = None,
                upper: float | torch.Tensor | None = None) -> torch.Tensor:
    """The Euclidean projection of ``x`` onto ``{z : lower <= z <= upper}``: a clamp.

    Parameters
    ----------
    x:
        A floating-point tensor of any shape.
    lower, upper:
        Numbers (``±inf`` allowed), tensors that broadcast against ``x``, or ``None`` for no
        bound; ``lower <= upper``.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``; differentiable in ``x`` and the bounds (see :class:`Box`).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> bl.prox.project_box(torch.tensor([-2.0, 0.5, 2.0]), lower=-1.0, upper=1.0)
    tensor([-1.0000,  0.5000,  1.0000])
    """
    x = _check_x(x, "x", "project_box")
    bounds = _BoxBounds(_fixed(lower, "project_box", "lower"), _fixed(upper, "project_box", "upper"), "project_box")
    lo, hi = bounds.resolve(None, x, _Checks())
    return _box(x, lo, hi)


def project_l2_ball(x: torch.Tensor, radius: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The Euclidean projection of ``x`` (the whole tensor) onto ``{z : ||z||_2 <= radius}``.

    Parameters
    ----------
    x:
        A floating-point tensor of any shape.
    radius:
        ``> 0``: a number or a one-element tensor.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``; differentiable in ``x`` and ``radius`` (see :class:`L2Ball`).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> bl.prox.project_l2_ball(torch.tensor([0.0, 3.0, 4.0]), radius=2.5)
    tensor([0.0000, 1.5000, 2.0000])
    """
    x = _check_x(x, "x", "project_l2_ball")
    r = _Param(_fixed(radius, "project_l2_ball", "radius"), "project_l2_ball", "radius", "positive",
               "scalar").resolve(None, x, _Checks())
    return _ball(x, r)
