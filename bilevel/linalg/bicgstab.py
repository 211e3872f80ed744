"""BiCGStab (van der Vorst) for non-symmetric ``A`` on a matvec closure."""

from __future__ import annotations

import math

import torch

from .base import LinearSolveStatus, Matvec
from .driver import IterativeLinearSolver, LinearState, safe_divisor
from .registry import register

__all__ = ["BiCGStab"]


@register("bicgstab")
class BiCGStab(IterativeLinearSolver):
    r"""BiCGStab: the stabilised bi-conjugate gradient method, for non-symmetric ``A``.

    Parameters
    ----------
    max_iter:
        Maximum number of iterations (two matvecs each). Default 100.
    tol:
        Tolerance on the relative residual ``||b - A x|| / ||b||``. Default 1e-10.
    warn:
        Warn when ``max_iter`` is reached first (breakdowns and non-finite values always warn).
    damping:
        Solve ``(A + damping I) x = b`` (see :class:`LinearSolver`). Default 0.

    Notes
    -----
    Each iteration is a bi-conjugate gradient step (against the shadow residual
    ``r0_hat = r0``) followed by a one-dimensional minimal-residual step ``omega`` (van der Vorst,
    1992). It needs only products with ``A`` (no ``A^T``) and a fixed memory of 5 vectors (and
    2 temporaries), whatever the iteration count: cheaper than ``"gmres"`` per iteration in memory and work when
    ``n`` is large, but its residual is not monotone and it can break down.

    An iteration costs **two** matvecs (``A p`` and ``A s``), both counted in ``info.matvecs``
    (``iterations`` counts iterations): compare methods by matvecs, not iterations.

    **Breakdown.** The method divides by ``r0_hat^T r``, ``r0_hat^T A p`` and ``omega``. When one
    of them vanishes (relative to the norms of its factors, below the dtype's epsilon; exactly
    for ``omega``, which is set to 0 when ``s^T A s`` vanishes, as for a skew-symmetric ``A``), the
    iteration that would divide by it is discarded and the solve stops with
    :attr:`LinearSolveStatus.BREAKDOWN`, returning the last iterate (whose residual is exact).
    Restarting from it (``x0=x``) takes a new shadow residual; ``"gmres"`` does not break down.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> A = torch.tensor([[4.0, 1.0], [-2.0, 3.0]], dtype=torch.float64)  # not symmetric
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> x, info = bl.linalg.get("bicgstab")(lambda v: A @ v, b)
    >>> info.converged, info.iterations, info.matvecs
    (True, 2, 4)
    >>> torch.allclose(A @ x, b)
    True
    """

    symmetric = False
    matvecs_per_step = 2

    def init(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None, prepared: dict) -> LinearState:
        state = super().init(matvec, b, x0, prepared)
        one = torch.ones((), dtype=b.dtype, device=b.device)
        zeros = torch.zeros_like(b)
        state.aux = {"r_hat": state.r, "p": zeros, "v": zeros, "rho": one, "alpha": one, "omega": one}
        return state

    def step(self, matvec: Matvec, state: LinearState) -> tuple[LinearState, torch.Tensor]:
        a = state.aux
        eps = torch.finfo(state.r.dtype).eps
        r, r_hat, omega = state.r, a["r_hat"], a["omega"]
        norm_hat = torch.linalg.vector_norm(r_hat)
        rho = torch.dot(r_hat, r)
        beta = (rho / safe_divisor(a["rho"])) * (a["alpha"] / safe_divisor(omega))
        p = r + beta * (a["p"] - omega * a["v"])
        v = matvec(p)
        hat_v = torch.dot(r_hat, v)
        alpha = rho / safe_divisor(hat_v)
        s = r - alpha * v
        t = matvec(s)
        ts = torch.dot(t, s)
        # omega = 0 when t^T s vanishes (s = 0: solved; else stagnation): x, r stay exact, the next step breaks
        # down. A NaN is no vanishing: it stays in omega, and so in x and r, for the driver to see
        vanish = ts.abs() <= eps * torch.linalg.vector_norm(t) * torch.linalg.vector_norm(s)
        omega_new = torch.where(vanish, torch.zeros_like(ts), ts / safe_divisor(torch.dot(t, t)))
        x = state.x + alpha * p + omega_new * s
        r_new = s - omega_new * t
        broke = ((omega == 0) | ~(rho.abs() > eps * norm_hat * torch.linalg.vector_norm(r))
                 | ~(hat_v.abs() > eps * norm_hat * torch.linalg.vector_norm(v)))
        aux = {"r_hat": r_hat, "p": p, "v": v, "rho": rho, "alpha": alpha, "omega": omega_new}
        return LinearState(x, r_new, aux), broke

    def breakdown(self, new: LinearState) -> LinearSolveStatus:
        """A vanished divisor (:attr:`LinearSolveStatus.BREAKDOWN`), or a non-finite product (``NONFINITE``)."""
        finite = math.isfinite(float(new.aux["rho"])) and bool(torch.isfinite(new.aux["v"]).all())
        return LinearSolveStatus.BREAKDOWN if finite else LinearSolveStatus.NONFINITE
