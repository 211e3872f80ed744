"""Restarted GMRES(m) with Givens rotations on a matvec closure, for any non-singular ``A``."""

from __future__ import annotations

import torch

from .._checks import check_positive_int
from .base import Matvec
from .driver import IterativeLinearSolver, LinearState, safe_divisor
from .registry import register

__all__ = ["GMRES"]


@register("gmres")
class GMRES(IterativeLinearSolver):
    r"""Restarted GMRES(m): minimal residuals over Krylov subspaces, for any (non-symmetric) ``A``.

    Parameters
    ----------
    max_iter:
        Maximum number of iterations, counted over all cycles (one matvec each). Default 100.
    tol:
        Tolerance on the relative residual ``||b - A x|| / ||b||``. Default 1e-10.
    restart:
        ``m``, the dimension of the Krylov subspace of one cycle (capped at ``len(b)``): after
        ``m`` iterations the basis is discarded and a new cycle starts from the current ``x``.
        Larger converges in fewer iterations and costs ``(m + 1) len(b)`` numbers of memory and
        ``O(m len(b))`` work per iteration. Default 20.
    warn:
        Warn when ``max_iter`` is reached first (non-finite values always warn).
    damping:
        Solve ``(A + damping I) x = b`` (see :class:`LinearSolver`). Default 0.

    Notes
    -----
    The Arnoldi process builds an orthonormal basis ``V`` of ``span{r0, A r0, ..., A^{j} r0}``
    (classical Gram-Schmidt, applied twice for orthogonality) and the Hessenberg ``H`` with
    ``A V_j = V_{j+1} H_j``; Givens rotations keep ``H`` triangular, and ``x`` minimises
    ``||b - A x||`` over ``x0 + span V_j``. It needs nothing of ``A`` but a matvec and no
    breakdown can stop it (a zero new basis vector means the solution is in the subspace), so it
    is the default for non-symmetric systems (the Jacobian of a root or fixed-point problem).
    Without restarts it would terminate in at most ``n`` iterations; restarted, it can stall
    when ``A``'s field of values contains 0 (raise ``restart``). It does not use symmetry:
    for symmetric ``A``, ``"cg"`` (positive definite) and ``"minres"`` cost less.

    The basis is preallocated (``restart + 1`` vectors, fixed shapes), so an iteration reads no
    value back and runs under :func:`torch.func.vmap`. Every iteration solves the small
    triangular system and forms ``x`` and its residual ``r = V (beta e_1 - H y)`` from the
    Arnoldi relation, without an extra matvec (a restart carries this residual on):
    ``info.residual_norm`` is that of the returned ``x`` up to round-off.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]],
    ...                  dtype=torch.float64)  # not symmetric
    >>> b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    >>> x, info = bl.linalg.get("gmres")(lambda v: A @ v, b)
    >>> info.converged, info.iterations, torch.allclose(A @ x, b)
    (True, 3, True)
    """

    symmetric = False

    def __init__(self, *, max_iter: int = 100, tol: float = 1e-10, restart: int = 20, warn: bool = True,
                 damping: float = 0.0):
        super().__init__(max_iter=max_iter, tol=tol, warn=warn, damping=damping)
        self.restart = check_positive_int(restart, "restart")

    def _options(self):
        return {**super()._options(), "restart": self.restart}

    def init(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None, prepared: dict) -> LinearState:
        state = super().init(matvec, b, x0, prepared)
        m = max(1, min(self.restart, b.shape[0]))
        V = torch.zeros(m + 1, b.shape[0], dtype=b.dtype, device=b.device)
        R = torch.zeros(m, m, dtype=b.dtype, device=b.device)
        Q = torch.eye(m + 1, dtype=b.dtype, device=b.device)
        j = torch.full((), m, dtype=torch.long, device=b.device)  # a full cycle: the first step starts one
        state.aux = {"V": V, "R": R, "Q": Q, "beta": torch.zeros((), dtype=b.dtype, device=b.device), "j": j,
                     "x_start": state.x}
        return state

    def step(self, matvec: Matvec, state: LinearState) -> tuple[LinearState, None]:
        a = state.aux
        V, R, Q, j = a["V"], a["R"], a["Q"], a["j"]
        m = R.shape[0]
        rows = torch.arange(m + 1, device=V.device)
        # a new cycle after a full one (and at the first step): the basis starts at the current residual
        fresh = j == m
        beta_new = torch.linalg.vector_norm(state.r)
        V = torch.where(fresh, torch.outer((rows == 0).to(V.dtype), state.r / safe_divisor(beta_new)), V)
        R = torch.where(fresh, torch.zeros_like(R), R)
        Q = torch.where(fresh, torch.eye(m + 1, dtype=Q.dtype, device=Q.device), Q)
        beta = torch.where(fresh, beta_new, a["beta"])
        x_start = torch.where(fresh, state.x, a["x_start"])
        j = torch.where(fresh, torch.zeros_like(j), j)
        # Arnoldi: w = A v_j, orthogonalised against v_0 .. v_j twice (classical Gram-Schmidt)
        e_j = (rows == j).to(V.dtype)
        e_next = (rows == j + 1).to(V.dtype)
        w = matvec(e_j @ V)
        h = V @ w  # the rows after j are zero
        w = w - h @ V
        h2 = V @ w
        w = w - h2 @ V
        h = h + h2
        hn = torch.linalg.vector_norm(w)
        V = V + torch.outer(e_next, w / safe_divisor(hn))
        # the rotations so far, then the one that annihilates h_{j+1, j}
        col = Q @ (h + hn * e_next)  # Q acts as the identity on rows j + 1, ...: col[j + 1] = hn
        top = torch.dot(e_j, col)
        gamma = torch.hypot(top, hn)
        c = torch.where(gamma != 0, top / safe_divisor(gamma), torch.ones_like(gamma))
        s = hn / safe_divisor(gamma)
        q_j, q_next = e_j @ Q, e_next @ Q
        Q = Q + torch.outer(e_j, (c - 1) * q_j + s * q_next) + torch.outer(e_next, (c - 1) * q_next - s * q_j)
        col = col * (1 - e_j - e_next) + gamma * e_j
        cols = torch.arange(m, device=V.device)
        R = R + torch.outer(col[:m], (cols == j).to(R.dtype))
        g = beta * Q[:, 0]  # the rotated right-hand side; |g[j + 1]| is the residual norm
        # y = R^{-1} g on the columns filled so far (1 on the diagonal elsewhere, and for an exactly singular R)
        active = cols <= j
        diag = torch.diagonal(R)
        g_act = torch.where(active, g[:m], torch.zeros_like(g[:m]))
        R_solve = R + torch.diag_embed(torch.where(active & (diag != 0), torch.zeros_like(diag), torch.ones_like(diag)))
        y = torch.linalg.solve_triangular(R_solve, g_act.unsqueeze(-1), upper=True).squeeze(-1)
        x = x_start + y @ V[:m]
        # r = b - A x = V_{j+1} (beta e_1 - H y) = V Q^T (g - R y), by the Arnoldi relation
        r = (Q.T @ (g - torch.cat([R @ y, torch.zeros_like(g[:1])]))) @ V
        aux = {"V": V, "R": R, "Q": Q, "beta": beta, "j": j + 1, "x_start": x_start}
        return LinearState(x, r, aux), None
