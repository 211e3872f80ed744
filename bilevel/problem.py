"""Inner problems: the objective ``G(phi, theta, data)`` that the inner solver minimises.

* :class:`InnerProblem` wraps any objective ``G``.
* :class:`ProximalProblem` is iMAML's ``G = loss(phi, data) + lam/2 ||phi - theta||^2``,
  with ``lam`` a number, a tensor or a tree like ``theta`` (per-parameter), which
  may itself require grad.
* :class:`PredictionLoss` is a loss written as ``criterion(predict(phi, data), data)``;
  given as a :class:`ProximalProblem`'s loss it enables Gauss-Newton curvature
  (``hvp="gauss_newton"``).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch

from . import tree as _tree
from ._checks import (check_finite_tree, check_floating, check_like, check_scalar, check_structure,
                      detached_objective_error)
from ._functorch import in_transform

__all__ = ["InnerProblem", "ProximalProblem", "PredictionLoss"]


class InnerProblem:
    """An inner problem ``phi*(theta) = argmin_phi G(phi, theta, data)``.

    Parameters
    ----------
    objective:
        ``objective(phi, theta, data) -> scalar tensor``. ``phi`` and ``theta``
        arrive in the structures you pass them in (a tensor or a dict / list /
        tuple of tensors); ``data`` is passed through untouched. It must be
        built from differentiable torch operations in ``phi`` and ``theta``
        (twice differentiable in ``phi``; once more in ``theta``).
    name:
        Optional label used in messages and ``repr``.

    Notes
    -----
    The hypergradient needs ``G`` to be twice differentiable near ``phi*``
    with a positive definite Hessian ``d2G/dphi2`` there (strong convexity);
    see :func:`bilevel.hypergradient`. Tensors the objective closes over get
    no implicit gradient: pass what you want to differentiate as ``theta``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> G = lambda phi, theta, data: 0.5 * ((phi - theta) ** 2).sum() + (phi * data).sum()
    >>> problem = bl.InnerProblem(G)
    >>> float(problem(torch.zeros(2), torch.ones(2), torch.ones(2)))
    1.0
    """

    def __init__(self, objective: Callable[[Any, Any, Any], torch.Tensor], *, name: str | None = None):
        if not callable(objective):
            raise TypeError(
                f"objective must be callable as objective(phi, theta, data) -> scalar tensor, "
                f"got {type(objective).__name__}."
            )
        self.objective = objective
        self.name = name or getattr(objective, "__name__", "objective")

    # -- hyper-parameters besides theta that the implicit backward differentiates ----------
    def hyperparameters(self) -> list[torch.Tensor]:
        """Tensors other than ``theta`` that ``G`` depends on and that require grad.

        The implicit backward of :func:`bilevel.argmin` returns their gradients
        too. Empty for a plain :class:`InnerProblem`.
        """
        return []

    def value(self, phi: Any, theta: Any, data: Any, hyper: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Evaluate ``G(phi, theta, data)`` and check that it is a real scalar.

        ``hyper`` replaces :meth:`hyperparameters` (used by functional transforms).
        """
        out = self.objective(phi, theta, data)
        return check_scalar(out, f"the inner objective {self.name!r}")

    __call__ = value

    def gauss_newton_parts(self) -> "GaussNewtonParts | None":
        """The split of ``G`` that Gauss-Newton curvature needs, or ``None`` (a plain objective has none).

        The split has attributes ``predict(phi, data)``, ``criterion(outputs, data)`` and
        ``rest(phi, theta, hyper)``, with ``G = criterion(predict(phi)) + rest``.
        :class:`ProximalProblem` returns one when its loss is a :class:`PredictionLoss`.
        """
        return None

    def validate(self, theta: Any, data: Any) -> None:
        """Check ``theta`` and ``data`` (and the problem's own constants) before a solve."""
        check_floating(theta, "theta")
        check_finite_tree(theta, "theta", "the outer iterate diverged or was initialised badly; "
                                          "lower the outer learning rate or check the initialisation")
        check_finite_tree(data, "data", "clean the data (drop or impute NaN/inf entries)")

    def default_phi0(self, theta: Any) -> Any:
        """The starting point when ``phi0`` is not given: ``theta`` itself (detached)."""
        return _tree.map(lambda t: t.detach(), theta)

    def check_phi(self, phi: Any, theta: Any, what: str = "phi0") -> None:
        """Check that ``phi`` has a structure the problem accepts (any, for a general ``G``), and theta's dtype and device."""
        _tree.tree_spec(phi, what)
        check_floating(phi, what)
        check_like(phi, theta, what, "theta")

    def __repr__(self) -> str:
        return f"InnerProblem(objective={self.name})"


class ProximalProblem(InnerProblem):
    """iMAML's inner problem ``G(phi, theta) = loss(phi, data) + lam/2 ||phi - theta||^2``.

    Parameters
    ----------
    loss:
        ``loss(phi, data) -> scalar tensor``, the task's training loss.
    lam:
        The regularisation strength, ``> 0``: a number; a tensor with one
        element; or a tree with the structure of ``theta`` whose leaves
        broadcast against ``theta``'s (a per-parameter or per-tensor ``lam``).
        A tensor ``lam`` that requires grad is learned: :func:`bilevel.argmin`
        returns its implicit gradient too.

    Notes
    -----
    With ``Lambda = diag(lam)`` the stationarity condition is
    ``grad L(phi) + Lambda (phi - theta) = 0``, so
    ``dphi/dtheta = (H + Lambda)^{-1} Lambda`` (the paper's Lemma 1 for a scalar lam).

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.ProximalProblem(lambda phi, data: ((phi - data) ** 2).sum(), lam=2.0)
    >>> float(problem(torch.zeros(2), torch.ones(2), torch.zeros(2)))
    2.0
    """

    def __init__(self, loss: Callable[[Any, Any], torch.Tensor], lam: Any, *, name: str | None = None):
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(phi, data) -> scalar tensor, got {type(loss).__name__}.")
        super().__init__(self._objective, name=name or getattr(loss, "__name__", "loss"))
        self.loss = loss
        self.lam = self._check_lam(lam)

    @staticmethod
    def _check_lam(lam: Any) -> Any:
        if isinstance(lam, bool):
            raise TypeError("lam must be a positive number, a tensor or a tree of tensors, got a bool.")
        if isinstance(lam, numbers.Real):
            v = float(lam)
            if not (v > 0) or v == float("inf"):
                raise ValueError(f"Invalid lam: {lam}; the proximal strength must be a finite number > 0.")
            return v
        try:
            lv = _tree.leaves(lam, "lam")
        except TypeError as e:
            raise TypeError(f"{e} (lam may also be a positive float)") from None
        for t in lv:
            if not t.is_floating_point():
                raise TypeError(f"lam must hold floating-point tensors, got dtype {t.dtype}; use a float tensor.")
        ProximalProblem._check_lam_values(lam)
        return lam

    @staticmethod
    def _check_lam_values(lam: Any) -> None:
        if isinstance(lam, float):
            return
        check_finite_tree(lam, "lam", "keep lam positive and finite (learn log(lam) if it drifts)")
        if in_transform():  # values cannot be read inside torch.func transforms
            return
        for t in _tree.leaves(lam):
            if bool((t.detach() <= 0).any()):
                raise ValueError(
                    "lam must be > 0 everywhere (the inner problem is then strongly convex), but it holds "
                    f"{int((t.detach() <= 0).sum())} value(s) <= 0; parametrise it as exp(log_lam) or clamp it."
                )

    def hyperparameters(self) -> list[torch.Tensor]:
        """The leaves of ``lam`` that require grad (empty for a fixed ``lam``)."""
        if isinstance(self.lam, float):
            return []
        return [t for t in _tree.leaves(self.lam) if t.requires_grad]

    def _lam_leaves(self, theta_leaves: list[torch.Tensor], hyper: Sequence[torch.Tensor] | None) -> list[Any]:
        if isinstance(self.lam, float):
            return [self.lam] * len(theta_leaves)
        lam_leaves = _tree.leaves(self.lam)
        if hyper is not None:
            it = iter(hyper)
            lam_leaves = [next(it) if t.requires_grad else t for t in lam_leaves]
        if len(lam_leaves) == 1 and lam_leaves[0].numel() == 1:
            return [lam_leaves[0].reshape(())] * len(theta_leaves)
        return lam_leaves

    def value(self, phi: Any, theta: Any, data: Any, hyper: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        loss = check_scalar(self.loss(phi, data), f"the loss {self.name!r}")
        if not loss.requires_grad and torch.is_grad_enabled() and not in_transform() and \
                any(t.requires_grad for t in _tree.leaves(phi)):
            raise detached_objective_error(f"the loss {self.name!r}")
        return loss + self.proximal_term(phi, theta, hyper)

    def proximal_term(self, phi: Any, theta: Any, hyper: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``lam/2 ||phi - theta||^2`` (with ``lam`` per leaf or per entry when it is a tree)."""
        lp, lt = _tree.leaves(phi), _tree.leaves(theta)
        lams = self._lam_leaves(lt, hyper)
        return sum(0.5 * (lam * (p - t) ** 2).sum() for lam, p, t in zip(lams, lp, lt))

    def gauss_newton_parts(self) -> "GaussNewtonParts | None":
        """``(predict, criterion, proximal_term)`` when the loss is a :class:`PredictionLoss`, else ``None``."""
        if not isinstance(self.loss, PredictionLoss):
            return None
        return GaussNewtonParts(self.loss.predict, self.loss.criterion, self.proximal_term, self.proximal_diagonal)

    def proximal_diagonal(self, theta: Any, hyper: Sequence[torch.Tensor] | None = None) -> Any:
        """The Hessian of :meth:`proximal_term` in ``phi``, a diagonal: ``lam`` broadcast to ``theta``'s leaves.

        Examples
        --------
        >>> import torch, bilevel as bl
        >>> problem = bl.ProximalProblem(lambda phi, d: (phi["w"] ** 2).sum(), lam={"w": torch.tensor([1.0, 3.0])})
        >>> problem.proximal_diagonal({"w": torch.zeros(2)})
        {'w': tensor([1., 3.])}
        """
        lt = _tree.leaves(theta)
        lams = self._lam_leaves(lt, hyper)
        diag = [torch.broadcast_to(torch.as_tensor(lam, dtype=t.dtype, device=t.device).detach(), t.shape)
                for lam, t in zip(lams, lt)]
        return _tree.unflatten(torch.cat([d.reshape(-1) for d in diag]), _tree.tree_spec(theta))

    __call__ = value

    def _objective(self, phi: Any, theta: Any, data: Any) -> torch.Tensor:
        return self.value(phi, theta, data)

    def flat_proximal(self, theta: Any) -> "tuple[torch.Tensor, float | torch.Tensor] | None":
        """``(theta_flat, lam)`` for computing the proximal term and its gradient on flat vectors, or ``None``.

        ``lam`` is a float, or a flat tensor like ``theta_flat`` (the diagonal of
        :meth:`proximal_diagonal`). ``None`` when that shortcut would not be this problem's value:
        a subclass that redefines :meth:`value` or :meth:`proximal_term`, or a learned ``lam``
        (a tensor that requires grad). Solvers then add ``lam/2 ||x - theta||^2`` and
        ``lam (x - theta)`` to the loss and its gradient themselves instead of differentiating the
        term leaf by leaf (the same numbers, a few tensor operations per step instead of several per leaf).

        Examples
        --------
        >>> import torch, bilevel as bl
        >>> bl.ProximalProblem(lambda phi, d: phi.sum(), lam=2.0).flat_proximal(torch.ones(2))
        (tensor([1., 1.]), 2.0)
        """
        cls = type(self)
        if cls.value is not ProximalProblem.value or cls.proximal_term is not ProximalProblem.proximal_term:
            return None
        if self.hyperparameters():
            return None
        theta_flat, _ = _tree.flatten(theta, "theta")
        theta_flat = theta_flat.detach()
        if isinstance(self.lam, float):
            return theta_flat, self.lam
        lam_flat, _ = _tree.flatten(self.proximal_diagonal(theta))
        return theta_flat, lam_flat.detach()

    def validate(self, theta: Any, data: Any) -> None:
        super().validate(theta, data)
        self._check_lam_values(self.lam)
        if isinstance(self.lam, float):
            return
        lam_leaves = _tree.leaves(self.lam)
        if len(lam_leaves) == 1 and lam_leaves[0].numel() == 1:
            return
        lam_spec, theta_spec = _tree.tree_spec(self.lam, "lam"), _tree.tree_spec(theta, "theta")
        if lam_spec.structure != theta_spec.structure:
            raise ValueError(
                f"lam is {lam_spec.describe()} but theta is {theta_spec.describe()}; give lam as a "
                f"number, a one-element tensor, or a tree with theta's keys whose tensors broadcast "
                f"against theta's."
            )
        for lam_t, th, path in zip(lam_leaves, _tree.leaves(theta), theta_spec.paths):
            try:
                shape = torch.broadcast_shapes(lam_t.shape, th.shape)
            except RuntimeError:
                shape = None
            if shape != th.shape:
                raise ValueError(
                    f"lam at {path!r} has shape {tuple(lam_t.shape)}, which does not broadcast to "
                    f"theta's {tuple(th.shape)}; use shape {tuple(th.shape)} (per parameter) or () (per tensor)."
                )

    def check_phi(self, phi: Any, theta: Any, what: str = "phi0") -> None:
        check_structure(_tree.tree_spec(phi, what), _tree.tree_spec(theta, "theta"), what, "theta")
        check_floating(phi, what)
        check_like(phi, theta, what, "theta")

    def __repr__(self) -> str:
        lam = self.lam if isinstance(self.lam, float) else f"<{_tree.describe(self.lam)}>"
        return f"ProximalProblem(loss={self.name}, lam={lam})"


# --------------------------------------------------------------------------------------------------
# losses of predictions: the structure Gauss-Newton curvature needs


def _cross_entropy(outputs: torch.Tensor, data: Any) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, _targets(data, "cross_entropy"))


def _mse(outputs: torch.Tensor, data: Any) -> torch.Tensor:
    # written out: forward-mode AD through F.mse_loss's backward fails on the targets' zero tangent
    return 0.5 * ((outputs - _targets(data, "mse")) ** 2).mean()


def _targets(data: Any, name: str) -> torch.Tensor:
    if isinstance(data, (tuple, list)) and len(data) >= 2 and isinstance(data[-1], torch.Tensor):
        return data[-1]
    raise TypeError(f"criterion {name!r} reads the targets as data[-1], so data must be a tuple such as (x, y); "
                    f"got {type(data).__name__}. Pass criterion=callable(outputs, data) for another layout.")


#: Built-in criteria of :class:`PredictionLoss`, by name: ``criterion(outputs, data)`` with the targets
#: in ``data[-1]``. ``"cross_entropy"``: mean cross-entropy of logits; ``"mse"``: half the mean squared error.
CRITERIA: dict[str, Callable[[Any, Any], torch.Tensor]] = {"cross_entropy": _cross_entropy, "mse": _mse}


class PredictionLoss:
    """A loss of predictions, ``loss(phi, data) = criterion(predict(phi, data), data)``.

    It is called like any loss; written this way it also tells the engine
    where the network ends and the loss begins, which Gauss-Newton curvature
    (``hvp="gauss_newton"`` in :func:`bilevel.hypergradient`,
    :func:`bilevel.argmin`, :func:`bilevel.implicit_vjp`) needs: the Hessian
    ``J^T H_c J`` of the criterion through the predictor's Jacobian ``J``,
    which drops the term of the predictor's own second derivatives. It is
    positive semi-definite whenever the criterion is convex in the outputs,
    so ``lam I + J^T H_c J`` never has negative curvature, and it is the exact
    Hessian when ``predict`` is linear in ``phi``.

    Parameters
    ----------
    predict:
        ``predict(phi, data) -> outputs`` (a tensor, or a tree of tensors),
        for example a network's logits ``torch.func.functional_call(net, phi, (x,))``.
    criterion:
        ``criterion(outputs, data) -> scalar tensor``, convex in ``outputs``
        for Gauss-Newton to be positive semi-definite; or the name of a
        built-in one: ``"cross_entropy"`` (mean cross-entropy of logits) or
        ``"mse"`` (half the mean squared error), which read the targets from
        ``data[-1]``.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> loss = bl.PredictionLoss(lambda phi, data: data[0] @ phi, "mse")
    >>> X, y = torch.eye(2), torch.tensor([1.0, 3.0])
    >>> float(loss(torch.tensor([1.0, 1.0]), (X, y)))
    1.0
    """

    def __init__(self, predict: Callable[[Any, Any], Any], criterion: str | Callable[[Any, Any], torch.Tensor]
                 = "cross_entropy"):
        if not callable(predict):
            raise TypeError(f"predict must be callable as predict(phi, data) -> outputs, got {type(predict).__name__}.")
        if isinstance(criterion, str):
            if criterion not in CRITERIA:
                raise ValueError(f"unknown criterion {criterion!r}; available: {', '.join(sorted(CRITERIA))}, "
                                 f"or a callable criterion(outputs, data) -> scalar.")
            self.criterion_name = criterion
            criterion = CRITERIA[criterion]
        elif callable(criterion):
            self.criterion_name = getattr(criterion, "__name__", "criterion")
        else:
            raise TypeError(f"criterion must be a name ({', '.join(sorted(CRITERIA))}) or a callable "
                            f"criterion(outputs, data) -> scalar, got {type(criterion).__name__}.")
        self.predict = predict
        self.criterion = criterion
        self.__name__ = f"{self.criterion_name}(predict)"

    def __call__(self, phi: Any, data: Any) -> torch.Tensor:
        return self.criterion(self.predict(phi, data), data)

    def __repr__(self) -> str:
        return f"PredictionLoss(predict={getattr(self.predict, '__name__', 'predict')}, criterion={self.criterion_name})"


class GaussNewtonParts:
    """``G(phi, theta) = criterion(predict(phi, data), data) + rest(phi, theta, hyper)``.

    What :meth:`InnerProblem.gauss_newton_parts` returns: ``rest`` holds
    everything that depends on ``theta`` or on hyper-parameters (for iMAML,
    the proximal term) and gets its exact Hessian; the prediction loss gets
    the Gauss-Newton one.

    ``rest_diagonal(theta, hyper)``, when given, returns the Hessian of
    ``rest`` in ``phi`` as a tree like ``theta`` of its diagonal (it must not
    depend on ``phi``): the engine then multiplies by it instead of
    differentiating ``rest`` twice for every product. For the proximal term
    it is ``lam`` broadcast to each parameter.
    """

    def __init__(self, predict: Callable, criterion: Callable, rest: Callable,
                 rest_diagonal: Callable | None = None):
        self.predict, self.criterion, self.rest = predict, criterion, rest
        self.rest_diagonal = rest_diagonal
