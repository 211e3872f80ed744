"""Extreme eigenvalue estimates of a symmetric operator from matvecs: power iteration and Lanczos."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from .base import Matvec

__all__ = ["power_iteration", "lanczos", "CurvatureEstimate"]


def power_iteration(matvec: Matvec, like: torch.Tensor, *, max_iter: int = 20, rtol: float = 1e-3,
                    generator: torch.Generator | None = None) -> tuple[float, int]:
    """Estimate the eigenvalue of largest magnitude of a symmetric operator.

    Parameters
    ----------
    matvec:
        ``v -> A v`` on 1-D tensors.
    like:
        A tensor with the dtype, device and length of the vectors.
    max_iter:
        Maximum number of matvecs.
    rtol:
        Stop when the Rayleigh quotient changes by less than this, relatively.

    Returns
    -------
    estimate, matvecs:
        The Rayleigh quotient of the last iterate (a lower bound on
        ``|lambda|_max`` for symmetric ``A``) and the matvecs spent.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 5.0]))
    >>> est, n = power_iteration(lambda v: A @ v, torch.zeros(3), max_iter=100, rtol=1e-8)
    >>> round(est, 3)
    5.0
    """
    if generator is None:  # a private, seeded stream: never disturb the user's RNG state
        generator = torch.Generator(device=like.device).manual_seed(0)
    v = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    v = v / torch.linalg.vector_norm(v)
    est = 0.0
    for k in range(1, max_iter + 1):
        w = matvec(v)
        new = torch.dot(v, w).item()
        wn = torch.linalg.vector_norm(w).item()
        if wn == 0 or wn != wn:
            return new, k
        v = w / wn
        if k > 1 and abs(new - est) <= rtol * abs(new):
            return new, k
        est = new
    return est, max_iter


@dataclass(frozen=True)
class CurvatureEstimate:
    """Extreme eigenvalues of a symmetric operator, estimated by :func:`lanczos`.

    Attributes
    ----------
    lambda_min, lambda_max:
        The extreme Ritz values. ``lambda_min`` is an **upper** estimate of the
        true smallest eigenvalue and ``lambda_max`` a **lower** estimate of the
        largest (Cauchy interlacing): both err on the optimistic side.
    kappa:
        ``lambda_max / lambda_min`` (``inf`` if ``lambda_min <= 0``).
    hvps:
        Matrix-vector (Hessian-vector) products spent.
    iterations:
        Lanczos steps taken (the Krylov dimension).
    residual_min, residual_max:
        Ritz residuals ``||A y - theta y||`` of the two extreme Ritz pairs: an
        eigenvalue of ``A`` lies within that distance of each Ritz value
        (0: an invariant subspace was found and the values are eigenvalues).
    """

    lambda_min: float
    lambda_max: float
    kappa: float
    hvps: int
    iterations: int
    residual_min: float
    residual_max: float

    def mu(self, safety: float = 0.5) -> float:
        """``safety * lambda_min``: a heuristic strong-convexity modulus (not a guaranteed lower bound).

        Examples
        --------
        >>> CurvatureEstimate(2.0, 8.0, 4.0, 5, 5, 0.0, 0.0).mu()
        1.0
        """
        if isinstance(safety, bool) or not isinstance(safety, numbers.Real) or not 0 < safety <= 1:
            raise ValueError(f"Invalid safety: {safety!r}; it must lie in (0, 1].")
        return float(safety) * self.lambda_min


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, *, max_iter: int = 20,
            generator: torch.Generator | None = None) -> CurvatureEstimate:
    r"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Parameters
    ----------
    matvec:
        ``v -> A v`` on 1-D tensors, ``A`` symmetric.
    like:
        A 1-D tensor with the length, dtype and device of the vectors.
    max_iter:
        Maximum Krylov dimension (matvecs), capped at ``len(like)``. Default 20.
    generator:
        For the random start vector; default a private generator seeded with 0
        (the global RNG is never touched).

    Returns
    -------
    CurvatureEstimate

    Notes
    -----
    ``k`` steps build an orthonormal basis ``Q`` of the Krylov space and the
    tridiagonal ``T = Q^T A Q``; the extreme eigenvalues of ``T`` (Ritz values)
    converge to those of ``A`` quickly, at a rate governed by the gaps. Every
    new vector is orthogonalised against all previous ones (twice), which
    costs ``O(k n)`` memory and keeps spurious copies of converged Ritz values
    away. The iteration stops early when the Krylov space becomes invariant.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
    >>> est = lanczos(lambda v: A @ v, torch.zeros(4, dtype=torch.float64))
    >>> round(est.lambda_min, 8), round(est.lambda_max, 8), est.hvps
    (1.0, 10.0, 4)
    """
    if not isinstance(like, torch.Tensor) or like.dim() != 1 or like.numel() == 0:
        raise ValueError(f"like must be a non-empty 1-D tensor, got {getattr(like, 'shape', type(like).__name__)}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter!r}; it must be an int >= 1.")
    n = like.numel()
    k_max = min(int(max_iter), n)
    if generator is None:
        generator = torch.Generator(device=like.device).manual_seed(0)
    q = torch.randn(n, dtype=like.dtype, device=like.device, generator=generator)
    q = q / torch.linalg.vector_norm(q)
    Q = torch.empty(k_max, n, dtype=like.dtype, device=like.device)
    alphas: list[float] = []
    betas: list[float] = []
    hvps = 0
    beta_last = 0.0
    for j in range(k_max):
        Q[j] = q
        w = matvec(q).detach()
        hvps += 1
        if not bool(torch.isfinite(w).all()):
            raise ValueError("the matvec returned non-finite values; check the operator (e.g. the inner problem at phi).")
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        basis = Q[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - basis.T @ (basis @ w)
        beta = float(torch.linalg.vector_norm(w))
        beta_last = beta
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if j + 1 == k_max or beta <= 1e-12 * max(scale, 1e-300):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    res = (beta_last * evecs[-1].abs()).tolist()
    lmin, lmax = float(evals[0]), float(evals[-1])
    kappa = lmax / lmin if lmin > 0 else math.inf
    return CurvatureEstimate(lmin, lmax, kappa, hvps, k, float(res[0]), float(res[-1]))
