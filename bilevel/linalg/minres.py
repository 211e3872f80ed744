"""MINRES (Paige and Saunders) for symmetric, possibly indefinite, ``A`` on a matvec closure."""

from __future__ import annotations

import torch

from .base import Matvec
from .driver import IterativeLinearSolver, LinearState, safe_divisor
from .registry import register

__all__ = ["MINRES"]


@register("minres")
class MINRES(IterativeLinearSolver):
    r"""MINRES: minimal residuals over Krylov subspaces, for symmetric (possibly indefinite) ``A``.

    Parameters
    ----------
    max_iter:
        Maximum number of iterations (one matvec each). Default 100.
    tol:
        Tolerance on the relative residual ``||b - A x|| / ||b||``. Default 1e-10.
    warn:
        Warn when ``max_iter`` is reached first (non-finite values always warn).
    damping:
        Solve ``(A + damping I) x = b`` (see :class:`LinearSolver`). Default 0.

    Notes
    -----
    The Lanczos process builds an orthonormal basis ``V_k`` of the Krylov subspace
    ``span{r0, A r0, ..., A^{k-1} r0}`` and a tridiagonal ``T_k`` with ``A V_k = V_{k+1} T_k``;
    Givens rotations turn ``T_k`` into a triangular factor one column per iteration, so that
    ``x_k`` minimises ``||b - A x||`` over ``x0 + span V_k`` with a three-term recurrence
    (Paige and Saunders, 1975). It needs ``A`` symmetric, but not positive definite: it is the
    method for an indefinite Hessian (a saddle point, an inner problem that is not strongly
    convex), where CG stops with ``NEGATIVE_CURVATURE``. Its residual never grows. Per
    iteration: one matvec and ``O(n)`` work (a dozen vector operations); it keeps 8 vectors.

    ``A`` must be symmetric: MINRES does not check it, and on a non-symmetric ``A`` its
    residual is not the one it minimises (use ``"gmres"``). The residual ``r = b - A x`` of
    the state is updated with the products ``A w`` of the search directions, which the
    recurrence gets from the Lanczos products at no extra matvec: ``info.residual_norm`` is
    that of the returned ``x`` (up to round-off), not an estimate.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)  # symmetric, indefinite
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> x, info = bl.linalg.get("minres")(lambda v: A @ v, b)
    >>> info.converged, info.iterations, torch.allclose(A @ x, b)
    (True, 2, True)
    """

    symmetric = True

    def init(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None, prepared: dict) -> LinearState:
        state = super().init(matvec, b, x0, prepared)
        beta1 = torch.linalg.vector_norm(state.r)
        zero = torch.zeros((), dtype=b.dtype, device=b.device)
        vec = torch.zeros_like(b)
        state.aux = {
            "v": state.r / safe_divisor(beta1), "v_prev": vec, "beta": zero,  # Lanczos: v_k, v_{k-1}, beta_k
            "cs": -torch.ones_like(zero), "sn": zero,  # the last Givens rotation
            "dbar": zero, "eps": zero, "phibar": beta1,  # the rotated T_k's last entries, the residual estimate
            "w": vec, "w_prev": vec, "Aw": vec, "Aw_prev": vec,  # search directions and their products
        }
        return state

    def step(self, matvec: Matvec, state: LinearState) -> tuple[LinearState, None]:
        a = state.aux
        v = a["v"]
        Av = matvec(v)
        z = Av - a["beta"] * a["v_prev"]
        alpha = torch.dot(v, z)
        z = z - alpha * v
        beta = torch.linalg.vector_norm(z)  # beta_{k+1}; 0 once the Krylov subspace is invariant
        # the last rotation applied to T_k's new column, then the rotation that annihilates beta_{k+1}
        cs, sn = a["cs"], a["sn"]
        delta = cs * a["dbar"] + sn * alpha
        gbar = sn * a["dbar"] - cs * alpha
        eps, dbar = sn * beta, -cs * beta  # the old rotation's fill-in for the next column
        gamma = torch.hypot(gbar, beta)
        cs, sn = gbar / safe_divisor(gamma), beta / safe_divisor(gamma)
        phi = cs * a["phibar"]
        w = (v - a["eps"] * a["w_prev"] - delta * a["w"]) / safe_divisor(gamma)
        Aw = (Av - a["eps"] * a["Aw_prev"] - delta * a["Aw"]) / safe_divisor(gamma)
        aux = {"v": z / safe_divisor(beta), "v_prev": v, "beta": beta, "cs": cs, "sn": sn, "dbar": dbar,
               "eps": eps, "phibar": sn * a["phibar"], "w": w, "w_prev": a["w"], "Aw": Aw,
               "Aw_prev": a["Aw"]}
        return LinearState(state.x + phi * w, state.r - phi * Aw, aux), None
