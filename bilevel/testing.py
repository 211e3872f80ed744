r"""Reference bilevel problems with known solutions, for testing solvers and engines.

Each builder returns a :class:`ReferenceProblem`: the inner problem, a
``theta``, the data, an outer objective, and exact (or high-accuracy)
``phi*(theta)``, ``F(theta)`` and ``dF/dtheta``. Use them to check your own
solvers::

    ref = bl.testing.proximal_quadratic()
    phi = bl.argmin(ref.problem, ref.theta, ref.data, solver=my_solver)
    ...compare with ref.hypergradient()

Builders
--------
:func:`proximal_quadratic`
    The paper's appendix F.1: ``G = 1/2 phi^T A phi + b^T phi + lam/2 ||phi - theta||^2``
    with ``dF/dtheta = Lambda (A + Lambda)^{-1} grad f(phi*)``.
:func:`ridge_regression`
    ``theta = log`` of per-feature ridge strengths; validation loss outside.
:func:`general_quadratic`
    ``G = 1/2 phi^T A phi - phi^T (B theta + c)``, with a direct ``theta`` term outside.
:func:`logistic_regression`
    L2-regularised logistic regression, ``theta = log`` strengths; no closed
    form, ``F`` evaluated by Newton's method (for finite differences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import tree as _tree
from .problem import InnerProblem, ProximalProblem

__all__ = [
    "ReferenceProblem",
    "proximal_quadratic",
    "ridge_regression",
    "general_quadratic",
    "logistic_regression",
    "random_spd",
]


@dataclass
class ReferenceProblem:
    """A bilevel problem with a known answer.

    Attributes
    ----------
    name:
        Short label.
    problem:
        The :class:`bilevel.InnerProblem`.
    theta:
        A starting ``theta`` (tensor or tree).
    data:
        The inner data.
    outer:
        ``outer(phi, theta) -> scalar``.
    phi0:
        A suggested starting point for the inner solver.
    strongly_convex:
        Lower bound on the eigenvalues of ``d2G/dphi2`` (``mu``) where known.
    smoothness:
        Upper bound on them (``L``) where known.
    """

    name: str
    problem: InnerProblem
    theta: Any
    data: Any
    outer: Callable[[Any, Any], torch.Tensor]
    phi0: Any
    _solution: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    _hypergradient: Callable[[torch.Tensor], torch.Tensor] | None = field(repr=False)
    _value: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    _lam_gradient: Callable[[torch.Tensor], torch.Tensor] | None = field(repr=False, default=None)
    strongly_convex: float | None = None
    smoothness: float | None = None

    def _flat_theta(self, theta: Any) -> tuple[torch.Tensor, _tree.TreeSpec]:
        theta = self.theta if theta is None else theta
        flat, spec = _tree.flatten(theta, "theta")
        return flat.detach(), spec

    def solution(self, theta: Any = None) -> Any:
        """``phi*(theta)`` (default: at :attr:`theta`), in ``phi0``'s structure."""
        flat, _ = self._flat_theta(theta)
        return _tree.unflatten(self._solution(flat), _tree.tree_spec(self.phi0))

    def value(self, theta: Any = None) -> torch.Tensor:
        """``F(theta) = outer(phi*(theta), theta)``."""
        flat, _ = self._flat_theta(theta)
        return self._value(flat)

    def hypergradient(self, theta: Any = None) -> Any:
        """The exact ``dF/dtheta`` in ``theta``'s structure (``None``-free: raises if unknown)."""
        if self._hypergradient is None:
            raise NotImplementedError(f"{self.name} has no closed-form hypergradient; use finite differences "
                                      f"of .value().")
        flat, spec = self._flat_theta(theta)
        return _tree.unflatten(self._hypergradient(flat), spec)

    def lam_gradient(self, theta: Any = None) -> torch.Tensor:
        """The exact ``dF/dlam`` (shape of ``lam``) for :func:`proximal_quadratic` with a tensor ``lam``."""
        if self._lam_gradient is None:
            raise NotImplementedError(f"{self.name} has no learned lam.")
        flat, _ = self._flat_theta(theta)
        return self._lam_gradient(flat)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_spd(n: int, condition_number: float, *, seed: int = 0, dtype: torch.dtype = torch.float64,
               min_eig: float = 1.0) -> torch.Tensor:
    """A random symmetric positive definite matrix with eigenvalues log-spaced in ``[min_eig, min_eig * kappa]``.

    Examples
    --------
    >>> A = random_spd(4, 10.0)
    >>> round(float(torch.linalg.cond(A)), 6)
    10.0
    """
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigs = min_eig * torch.logspace(0, torch.log10(torch.tensor(float(condition_number))).item(), n,
                                    dtype=torch.float64)
    return ((q * eigs) @ q.T).to(dtype)


def proximal_quadratic(dim: int = 50, lam: float = 5.0, condition_number: float = 50.0, *, seed: int = 0,
                       dtype: torch.dtype = torch.float64, structure: str = "tensor",
                       learn_lam: str | None = None) -> ReferenceProblem:
    r"""The paper's appendix F.1 problem: proximal linear regression.

    ``L(phi) = 1/2 phi^T A phi + b^T phi`` (train), ``f(phi) = 1/2 phi^T A' phi + b'^T phi``
    (test), ``G = L(phi) + lam/2 ||phi - theta||^2``. ``A`` is chosen so that
    ``G``'s Hessian ``A + lam I`` has condition number ``condition_number``
    (eigenvalues spread evenly over ``[lam, condition_number * lam]``).

    Parameters
    ----------
    dim:
        Dimension of ``phi`` and ``theta``.
    lam:
        Proximal strength.
    condition_number:
        ``kappa`` of the inner problem, ``>= 1``.
    structure:
        ``"tensor"``: ``theta`` is a vector. ``"dict"``: ``theta`` is a dict of
        two tensors (``"weight"`` of shape ``(dim - k, 1)`` and ``"bias"`` of
        shape ``(k,)`` with ``k = dim // 5``).
    learn_lam:
        ``None``: ``lam`` is a float. ``"scalar"``: a 0-d tensor that requires
        grad. ``"per_parameter"``: a tree like ``theta`` that requires grad,
        with values spread over ``[lam/2, 2 lam]``.

    Notes
    -----
    With ``Lambda = diag(lam)``: ``phi* = (A + Lambda)^{-1} (Lambda theta - b)``,
    ``dF/dtheta = Lambda (A + Lambda)^{-1} grad f(phi*)`` and
    ``dF/dlam_j = -[(A + Lambda)^{-1} grad f(phi*)]_j (phi*_j - theta_j)``.

    Examples
    --------
    >>> ref = proximal_quadratic(dim=10, seed=1)
    >>> ref.hypergradient().shape
    torch.Size([10])
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}.")
    if condition_number < 1:
        raise ValueError(f"condition_number must be >= 1, got {condition_number}.")
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigs = torch.linspace(0.0, (condition_number - 1.0) * lam, dim, dtype=torch.float64)
    A = (q * eigs) @ q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    X = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    A_test = X @ X.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    b_test = torch.randn(dim, generator=g, dtype=torch.float64)
    theta_flat = torch.randn(dim, generator=g, dtype=torch.float64)
    A, b, A_test, b_test, theta_flat = (t.to(dtype) for t in (A, b, A_test, b_test, theta_flat))

    if structure == "tensor":
        spec = _tree.tree_spec(theta_flat)
    elif structure == "dict":
        k = dim // 5
        spec = _tree.tree_spec({"weight": torch.zeros(dim - k, 1), "bias": torch.zeros(k)})
    else:
        raise ValueError(f"structure must be 'tensor' or 'dict', got {structure!r}.")

    def flat(tree: Any) -> torch.Tensor:
        return _tree.flatten(tree)[0]

    if learn_lam is None:
        lam_obj: Any = float(lam)
        lam_vec = lambda: torch.full((dim,), float(lam), dtype=dtype)  # noqa: E731
    elif learn_lam == "scalar":
        lam_obj = torch.tensor(float(lam), dtype=dtype, requires_grad=True)
        lam_vec = lambda: lam_obj.detach().expand(dim)  # noqa: E731
    elif learn_lam == "per_parameter":
        spread = torch.logspace(-0.30103, 0.30103, dim, dtype=torch.float64)  # [1/2, 2]
        spread = spread[torch.randperm(dim, generator=g)]
        lam_leaves = [t.clone().to(dtype).requires_grad_(True)
                      for t in _tree.leaves(_tree.unflatten(lam * spread, spec))]
        lam_obj = _tree.from_leaves(spec, lam_leaves)
        lam_vec = lambda: flat(_tree.map(lambda t: t.detach(), lam_obj))  # noqa: E731
    else:
        raise ValueError(f"learn_lam must be None, 'scalar' or 'per_parameter', got {learn_lam!r}.")

    data = {"A": A, "b": b}

    def loss(phi: Any, d: dict) -> torch.Tensor:
        x = flat(phi)
        return 0.5 * x @ (d["A"] @ x) + d["b"] @ x

    def outer(phi: Any, theta: Any) -> torch.Tensor:
        x = flat(phi)
        return 0.5 * x @ (A_test @ x) + b_test @ x

    problem = ProximalProblem(loss, lam_obj, name="proximal_quadratic")

    def solution(th: torch.Tensor) -> torch.Tensor:
        L = lam_vec()
        return torch.linalg.solve(A + torch.diag(L), L * th - b)

    def w_of(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = lam_vec()
        phi = solution(th)
        return phi, torch.linalg.solve(A + torch.diag(L), A_test @ phi + b_test)

    def hypergrad(th: torch.Tensor) -> torch.Tensor:
        return lam_vec() * w_of(th)[1]

    def lam_grad(th: torch.Tensor) -> Any:
        phi, w = w_of(th)
        per = -w * (phi - th)
        if learn_lam == "scalar":
            return per.sum()
        return _tree.unflatten(per, spec)

    def value(th: torch.Tensor) -> torch.Tensor:
        x = solution(th)
        return 0.5 * x @ (A_test @ x) + b_test @ x

    theta = _tree.unflatten(theta_flat.clone(), spec)
    if structure == "dict":
        theta = {k: v.clone() for k, v in theta.items()}
    return ReferenceProblem(
        "proximal_quadratic", problem, theta, data, outer, _tree.map(torch.zeros_like, theta),
        solution, hypergrad, value, lam_grad if learn_lam else None,
        strongly_convex=float(lam), smoothness=float(lam) * condition_number if learn_lam is None else None,
    )


def ridge_regression(n_train: int = 40, n_val: int = 40, n_features: int = 8, *, seed: int = 0,
                     dtype: torch.dtype = torch.float64, noise: float = 0.5) -> ReferenceProblem:
    r"""Ridge regression with ``theta = log`` of per-feature regularisation strengths.

    ``G(w, theta) = 1/(2n) ||X w - y||^2 + 1/2 sum_j exp(theta_j) w_j^2`` and
    ``F(theta) = 1/(2 n_val) ||X_val w*(theta) - y_val||^2``. ``theta`` enters
    through no proximal term, so this checks the general engine.

    Notes
    -----
    With ``H = X^T X / n + diag(exp(theta))``: ``w* = H^{-1} X^T y / n`` and
    ``dF/dtheta = -exp(theta) * w* * (H^{-1} grad_w f(w*))``.

    Examples
    --------
    >>> ref = ridge_regression(seed=0)
    >>> ref.hypergradient().shape
    torch.Size([8])
    """
    g = _gen(seed)
    w_true = torch.randn(n_features, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, 1, n_features, dtype=torch.float64)
    X = torch.randn(n_train, n_features, generator=g, dtype=torch.float64) * scales
    Xv = torch.randn(n_val, n_features, generator=g, dtype=torch.float64) * scales
    y = X @ w_true + noise * torch.randn(n_train, generator=g, dtype=torch.float64)
    yv = Xv @ w_true + noise * torch.randn(n_val, generator=g, dtype=torch.float64)
    X, Xv, y, yv = (t.to(dtype) for t in (X, Xv, y, yv))
    theta = torch.full((n_features,), -1.0, dtype=dtype) + 0.5 * torch.randn(n_features, generator=g).to(dtype)
    data = {"X": X, "y": y}

    def objective(w: torch.Tensor, th: torch.Tensor, d: dict) -> torch.Tensor:
        r = d["X"] @ w - d["y"]
        return 0.5 * (r @ r) / d["X"].shape[0] + 0.5 * (torch.exp(th) * w * w).sum()

    def outer(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        r = Xv @ w - yv
        return 0.5 * (r @ r) / n_val

    def hess(th: torch.Tensor) -> torch.Tensor:
        return X.T @ X / n_train + torch.diag(torch.exp(th))

    def solution(th: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(hess(th), X.T @ y / n_train)

    def hypergrad(th: torch.Tensor) -> torch.Tensor:
        w = solution(th)
        gf = Xv.T @ (Xv @ w - yv) / n_val
        return -torch.exp(th) * w * torch.linalg.solve(hess(th), gf)

    def value(th: torch.Tensor) -> torch.Tensor:
        return outer(solution(th), th)

    eig = torch.linalg.eigvalsh(hess(theta))
    return ReferenceProblem("ridge_regression", InnerProblem(objective, name="ridge"), theta, data, outer,
                            torch.zeros(n_features, dtype=dtype), solution, hypergrad, value,
                            strongly_convex=float(eig[0]), smoothness=float(eig[-1]))


def general_quadratic(n_phi: int = 6, n_theta: int = 4, *, condition_number: float = 10.0, seed: int = 0,
                      dtype: torch.dtype = torch.float64, direct: float = 0.3) -> ReferenceProblem:
    r"""``G(phi, theta) = 1/2 phi^T A phi - phi^T (B theta + c)`` with a direct ``theta`` term outside.

    ``F(theta) = 1/2 ||phi* - t||^2 + direct/2 ||theta||^2``, so
    ``dF/dtheta = B^T A^{-1} (phi* - t) + direct * theta`` with
    ``phi* = A^{-1} (B theta + c)``. ``phi`` and ``theta`` differ in size:
    pass ``phi0``.

    Examples
    --------
    >>> ref = general_quadratic(n_phi=3, n_theta=2)
    >>> ref.hypergradient().shape, ref.phi0.shape
    (torch.Size([2]), torch.Size([3]))
    """
    g = _gen(seed)
    A = random_spd(n_phi, condition_number, seed=seed + 1, dtype=torch.float64)
    B = torch.randn(n_phi, n_theta, generator=g, dtype=torch.float64)
    c = torch.randn(n_phi, generator=g, dtype=torch.float64)
    target = torch.randn(n_phi, generator=g, dtype=torch.float64)
    theta = torch.randn(n_theta, generator=g, dtype=torch.float64)
    A, B, c, target, theta = (t.to(dtype) for t in (A, B, c, target, theta))
    data = {"A": A, "B": B, "c": c}

    def objective(phi: torch.Tensor, th: torch.Tensor, d: dict) -> torch.Tensor:
        return 0.5 * phi @ (d["A"] @ phi) - phi @ (d["B"] @ th + d["c"])

    def outer(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((phi - target) ** 2).sum() + 0.5 * direct * (th ** 2).sum()

    def solution(th: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(A, B @ th + c)

    def hypergrad(th: torch.Tensor) -> torch.Tensor:
        return B.T @ torch.linalg.solve(A, solution(th) - target) + direct * th

    def value(th: torch.Tensor) -> torch.Tensor:
        return outer(solution(th), th)

    return ReferenceProblem("general_quadratic", InnerProblem(objective, name="general_quadratic"), theta, data,
                            outer, torch.zeros(n_phi, dtype=dtype), solution, hypergrad, value,
                            strongly_convex=1.0, smoothness=float(condition_number))


def logistic_regression(n_train: int = 60, n_val: int = 60, n_features: int = 5, *, seed: int = 0,
                        dtype: torch.dtype = torch.float64) -> ReferenceProblem:
    r"""L2-regularised logistic regression with ``theta = log`` of per-feature strengths.

    ``G(w, theta) = mean(softplus(-y * X w)) + 1/2 sum_j exp(theta_j) w_j^2``
    (labels in {-1, +1}); ``F`` is the validation logistic loss. No closed
    form: :meth:`ReferenceProblem.value` solves the inner problem by Newton's
    method to machine precision, for finite differences;
    :meth:`ReferenceProblem.hypergradient` applies the implicit formula with
    dense Hessians at that solution.

    Examples
    --------
    >>> ref = logistic_regression(n_features=3)
    >>> ref.hypergradient().shape
    torch.Size([3])
    """
    g = _gen(seed)
    w_true = 2.0 * torch.randn(n_features, generator=g, dtype=torch.float64)
    X = torch.randn(n_train, n_features, generator=g, dtype=torch.float64)
    Xv = torch.randn(n_val, n_features, generator=g, dtype=torch.float64)

    def labels(M: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(M @ w_true)
        return torch.where(torch.rand(M.shape[0], generator=g, dtype=torch.float64) < p, 1.0, -1.0)

    y, yv = labels(X), labels(Xv)
    X, Xv, y, yv = (t.to(dtype) for t in (X, Xv, y, yv))
    theta = torch.full((n_features,), -2.0, dtype=dtype) + 0.5 * torch.randn(n_features, generator=g).to(dtype)
    data = {"X": X, "y": y}

    def objective(w: torch.Tensor, th: torch.Tensor, d: dict) -> torch.Tensor:
        return torch.nn.functional.softplus(-d["y"] * (d["X"] @ w)).mean() + 0.5 * (torch.exp(th) * w * w).sum()

    def outer(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    def solution(th: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(n_features, dtype=dtype)
        for _ in range(100):
            grad = torch.func.grad(objective)(w, th, data)
            if float(torch.linalg.vector_norm(grad)) < 1e-14:
                break
            H = torch.func.hessian(objective)(w, th, data)
            w = w - torch.linalg.solve(H, grad)
        return w

    def hypergrad(th: torch.Tensor) -> torch.Tensor:
        w = solution(th)
        H = torch.func.hessian(objective)(w, th, data)
        gf = torch.func.grad(outer)(w, th)
        mixed = torch.func.jacrev(torch.func.grad(objective), argnums=1)(w, th, data)  # d(grad_w G)/dtheta
        return -mixed.T @ torch.linalg.solve(H, gf)

    def value(th: torch.Tensor) -> torch.Tensor:
        return outer(solution(th), th)

    return ReferenceProblem("logistic_regression", InnerProblem(objective, name="logistic"), theta, data, outer,
                            torch.zeros(n_features, dtype=dtype), solution, hypergrad, value,
                            strongly_convex=float(torch.exp(theta).min()))
