"""Extreme eigenvalue estimates of a symmetric operator from matvecs."""

from __future__ import annotations

import torch

from .base import Matvec

__all__ = ["power_iteration"]


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
