"""Inner solutions defined by an optimality condition ``F(phi, theta, data) = 0``.

* :class:`RootProblem`: any residual ``F`` (a tree like ``phi``).
* :class:`FixedPointProblem`: ``phi = T(phi, theta, data)``, that is ``F = phi - T``.
* :class:`CompositeProblem`: ``min_phi f(phi, theta, data) + R(phi, theta)`` with ``R`` non-smooth or
  an indicator (a :class:`bilevel.prox.Regulariser`); its condition is the fixed point of the
  proximal-gradient map, ``phi = prox_{eta R}(phi - eta grad_phi f)``.

A smooth :class:`bilevel.InnerProblem` is the special case ``F = grad_phi G`` (symmetric Jacobian);
:func:`bilevel.root` hands it to :func:`bilevel.argmin`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import tree as _tree
from .._checks import check_finite_tree, check_floating, check_like, check_nonneg_float, check_scalar

__all__ = ["RootProblem", "FixedPointProblem", "CompositeProblem"]


def _like_phi(out: Any, phi: Any, what: str, fix: str) -> Any:
    """``out``, after checking that it has ``phi``'s structure and shapes (else a ValueError with ``fix``)."""
    spec, phi_spec = _tree.tree_spec(out, what), _tree.tree_spec(phi)
    if not _tree.same_structure(spec, phi_spec):
        raise ValueError(f"{what} returned {spec.describe()}, but phi is {phi_spec.describe()}; {fix}.")
    return out


class RootProblem:
    """An inner solution ``phi*(theta)`` defined by ``F(phi*, theta, data) = 0``.

    Parameters
    ----------
    residual:
        ``residual(phi, theta, data) -> F``, a tensor or tree with ``phi``'s structure, built from
        differentiable torch operations in ``phi`` and ``theta``.
    symmetric:
        Whether ``dF/dphi`` is symmetric (``F`` is a gradient). It picks the default linear solver of
        the implicit backward: CG for symmetric systems, GMRES otherwise. Default False.
    name:
        Optional label for messages.

    Notes
    -----
    The implicit function theorem needs ``dF/dphi`` invertible at ``phi*``; the hypergradient is
    ``-(dF/dtheta)^T u`` with ``(dF/dphi)^T u = grad_phi f``, solved on vector-Jacobian products.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.RootProblem(lambda phi, theta, data: phi ** 3 - theta)   # phi* = theta^(1/3)
    >>> problem.residual(torch.tensor([2.0]), torch.tensor([8.0]), None)
    tensor([0.])
    """

    def __init__(self, residual: Callable[[Any, Any, Any], Any], *, symmetric: bool = False,
                 name: str | None = None):
        if not callable(residual):
            raise TypeError(f"residual must be callable as residual(phi, theta, data) -> a tree like phi, "
                            f"got {type(residual).__name__}.")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}.")
        self._residual = residual
        self.symmetric = symmetric
        self.name = name or getattr(residual, "__name__", "residual")

    def residual(self, phi: Any, theta: Any, data: Any) -> Any:
        """``F(phi, theta, data)``, checked to have ``phi``'s structure."""
        return _like_phi(self._residual(phi, theta, data), phi, f"the residual of {self.name!r}",
                         "F must have phi's structure and shapes")

    def mapping(self, phi: Any, theta: Any, data: Any) -> Any:
        """The fixed-point map whose fixed points are the roots: ``phi - F(phi)`` (overridden by subclasses)."""
        return _tree.map(lambda p, f: p - f, phi, self.residual(phi, theta, data))

    def validate(self, theta: Any, data: Any) -> None:
        """Check ``theta`` and ``data`` before a solve."""
        check_floating(theta, "theta")
        check_finite_tree(theta, "theta", "the outer iterate diverged or was initialised badly; lower the outer "
                                          "learning rate or check the initialisation")
        check_finite_tree(data, "data", "clean the data (drop or impute NaN/inf entries)")

    def check_phi(self, phi: Any, theta: Any, what: str = "phi0") -> None:
        """Check ``phi``'s structure, dtype and device against ``theta``."""
        _tree.tree_spec(phi, what)
        check_floating(phi, what)
        check_like(phi, theta, what, "theta")

    def default_phi0(self, theta: Any) -> Any:
        """The start when ``phi0`` is not given: ``theta`` (detached), if it has phi's structure."""
        return _tree.map(lambda t: t.detach(), theta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class FixedPointProblem(RootProblem):
    """An inner solution defined by ``phi* = T(phi*, theta, data)`` (e.g. a deep-equilibrium layer).

    Parameters
    ----------
    mapping:
        ``mapping(phi, theta, data) -> T``, a tree with ``phi``'s structure.
    name:
        Optional label for messages.

    Notes
    -----
    The residual is ``F = phi - T(phi)``; its Jacobian ``I - dT/dphi`` is not symmetric, so the
    implicit backward solves with GMRES by default. It is invertible when ``T`` is a contraction.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.FixedPointProblem(lambda z, theta, data: 0.5 * z + theta)   # z* = 2 theta
    >>> bl.root(problem, torch.tensor([1.0]), phi0=torch.zeros(1))
    tensor([2.])
    """

    def __init__(self, mapping: Callable[[Any, Any, Any], Any], *, name: str | None = None):
        if not callable(mapping):
            raise TypeError(f"mapping must be callable as mapping(phi, theta, data) -> a tree like phi, "
                            f"got {type(mapping).__name__}.")
        self._mapping = mapping
        super().__init__(self._fixed_point_residual, symmetric=False,
                         name=name or getattr(mapping, "__name__", "mapping"))

    def _fixed_point_residual(self, phi: Any, theta: Any, data: Any) -> Any:
        return _tree.map(lambda p, t: p - t, phi, self.mapping(phi, theta, data))

    def residual(self, phi: Any, theta: Any, data: Any) -> Any:
        """``phi - T(phi, theta, data)`` (the mapping's structure is checked once, in :meth:`mapping`)."""
        return self._fixed_point_residual(phi, theta, data)

    def mapping(self, phi: Any, theta: Any, data: Any) -> Any:
        """``T(phi, theta, data)``, checked to have ``phi``'s structure."""
        return _like_phi(self._mapping(phi, theta, data), phi, f"the mapping {self.name!r}",
                         "T must map phi to a tree like phi")


class CompositeProblem(RootProblem):
    """``phi*(theta) = argmin_phi f(phi, theta, data) + R(phi, theta)``, ``f`` smooth, ``R`` with a prox.

    Parameters
    ----------
    smooth:
        ``smooth(phi, theta, data) -> scalar``, differentiable (twice, near ``phi*``) in ``phi``.
        ``phi`` is one tensor.
    regulariser:
        A :class:`bilevel.prox.Regulariser`: ``L1``, ``ElasticNet``, ``GroupL1``, ``NonNegative``,
        ``Box``, ``Simplex``, ``L2Ball``, ... Its strength may depend on ``theta``.
    step:
        The step ``eta > 0`` of the proximal-gradient map that defines the optimality condition and
        that the backward linearises (every ``eta`` gives the same solution and the same derivative;
        it changes only the conditioning). ``None`` (default): ``1 / L`` with ``L`` estimated at
        ``phi`` by power iteration on Hessian-vector products of ``smooth``.
    name:
        Optional label for messages.

    Notes
    -----
    ``phi*`` is the fixed point of ``T(phi) = prox_{eta R}(phi - eta grad_phi f(phi, theta), theta)`` for
    every ``eta > 0``. Differentiating that fixed point gives the hypergradient exactly on the active
    set (where the prox is differentiable, e.g. the non-zero coordinates of a lasso and the free
    coordinates of a box): coordinates that the prox clamps contribute nothing, as they should.
    Differentiating ``f + R`` as if it were smooth does not.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.CompositeProblem(lambda phi, theta, d: 0.5 * ((phi - d) ** 2).sum(), bl.prox.L1(0.5))
    >>> bl.root(problem, torch.tensor(0.0), torch.tensor([2.0, 0.2]), solver="fista", phi0=torch.zeros(2))
    tensor([1.5000, 0.0000])
    """

    def __init__(self, smooth: Callable[[Any, Any, Any], torch.Tensor], regulariser: Any, *,
                 step: float | None = None, name: str | None = None):
        if not callable(smooth):
            raise TypeError(f"smooth must be callable as smooth(phi, theta, data) -> scalar tensor, "
                            f"got {type(smooth).__name__}.")
        if not (hasattr(regulariser, "prox") and hasattr(regulariser, "value")):
            raise TypeError(f"regulariser must be a bilevel.prox.Regulariser (with prox(x, step, theta) and "
                            f"value(phi, theta)), e.g. bl.prox.L1(0.1); got {type(regulariser).__name__}.")
        self.smooth = smooth
        self.regulariser = regulariser
        self.step = None if step is None else check_nonneg_float(step, "step", positive=True)
        super().__init__(self._prox_residual, symmetric=False,
                         name=name or getattr(smooth, "__name__", "smooth"))

    def smooth_value(self, phi: torch.Tensor, theta: Any, data: Any) -> torch.Tensor:
        """``f(phi, theta, data)``, checked to be a real scalar."""
        return check_scalar(self.smooth(phi, theta, data), f"the smooth part {self.name!r}")

    def value(self, phi: torch.Tensor, theta: Any, data: Any) -> torch.Tensor:
        """The objective ``f + R``."""
        return self.smooth_value(phi, theta, data) + self.regulariser.value(phi, theta)

    def smooth_grad(self, phi: torch.Tensor, theta: Any, data: Any) -> torch.Tensor:
        """``grad_phi f`` (with torch.func: differentiable again, as the optimality condition needs)."""
        return torch.func.grad(lambda p: self.smooth_value(p, theta, data))(phi)

    def prox_gradient_map(self, phi: torch.Tensor, theta: Any, data: Any, step: float | torch.Tensor) -> torch.Tensor:
        """``T(phi) = prox_{step R}(phi - step grad_phi f(phi), theta)``."""
        return self.regulariser.prox(phi - step * self.smooth_grad(phi, theta, data), step, theta)

    def _prox_residual(self, phi: torch.Tensor, theta: Any, data: Any) -> torch.Tensor:
        return self.residual_at_step(phi, theta, data, self.step if self.step is not None else 1.0)

    def residual_at_step(self, phi: torch.Tensor, theta: Any, data: Any, step: float) -> torch.Tensor:
        """The gradient mapping ``(phi - T(phi)) / step``: zero exactly at the solution, for every step."""
        return (phi - self.prox_gradient_map(phi, theta, data, step)) / step

    def mapping(self, phi: Any, theta: Any, data: Any) -> Any:
        """The proximal-gradient map at the problem's ``step`` (1 when it is estimated)."""
        return self.prox_gradient_map(phi, theta, data, self.step if self.step is not None else 1.0)

    def estimate_step(self, phi: torch.Tensor, theta: Any, data: Any, iterations: int = 20) -> float:
        """``step`` if given, else ``1 / L`` with ``L`` the largest Hessian eigenvalue of ``f`` at ``phi`` (power iteration)."""
        if self.step is not None:
            return self.step
        from ..linalg.eig import power_iteration

        x = phi.detach()
        grad = torch.func.grad(lambda p: self.smooth_value(p, theta, data))

        def hvp(v):
            return torch.func.jvp(grad, (x,), (v.view_as(x),))[1].reshape(-1)
        lam, _ = power_iteration(hvp, x.reshape(-1), max_iter=iterations)
        if not lam > 0:  # f flat (or concave) along the iteration: any step works for the condition
            return 1.0
        return 1.0 / lam

    def check_phi(self, phi: Any, theta: Any, what: str = "phi0") -> None:
        if not isinstance(phi, torch.Tensor):
            raise TypeError(f"{what} must be one tensor for a CompositeProblem (the regulariser acts on it), got "
                            f"{type(phi).__name__}; concatenate the parameters (bl.tree.flatten) if needed.")
        check_floating(phi, what)
        if isinstance(theta, torch.Tensor):
            check_like(phi, theta, what, "theta")

    def __repr__(self) -> str:
        return f"CompositeProblem({self.name}, {self.regulariser!r})"
