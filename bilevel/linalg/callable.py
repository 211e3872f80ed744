"""Wrap a user's function ``(matvec, b) -> x`` as a linear solver."""

from __future__ import annotations

from typing import Callable

import torch

from .base import LinearSolveInfo, LinearSolver, LinearSolveStatus, Matvec


class CallableLinearSolver(LinearSolver):
    """A user's linear solver ``fn(matvec, b) -> x`` (or ``-> (x, info)``).

    The residual of the returned ``x`` is measured with one extra matvec, and
    ``converged`` is judged against ``tol`` like every other solver.
    """

    name = "callable"
    symmetric = False  # a user's solver is trusted with any A (a dense solve handles any)

    def __init__(self, fn: Callable, *, tol: float = 1e-10, warn: bool = True):
        super().__init__(max_iter=1, tol=tol, warn=warn)
        self.fn = fn

    def _solve(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None):
        out = self.fn(matvec, b)
        x = out[0] if isinstance(out, tuple) else out
        if not isinstance(x, torch.Tensor) or x.shape != b.shape:
            raise ValueError(f"the linear solver callable must return a tensor shaped like b {tuple(b.shape)}, "
                             f"got {getattr(x, 'shape', type(x).__name__)}.")
        r = torch.linalg.vector_norm(b - matvec(x)).item()
        bn = torch.linalg.vector_norm(b).item()
        rel = r / bn if bn > 0 else r
        finite = bool(torch.isfinite(x).all())
        status = (LinearSolveStatus.NONFINITE if not finite else
                  LinearSolveStatus.CONVERGED if rel <= self.tol else LinearSolveStatus.MAX_ITER)
        its = out[1].iterations if isinstance(out, tuple) and hasattr(out[1], "iterations") else 0
        return x, LinearSolveInfo(its, r, rel, status.success, status, matvecs=1)

    def _options(self):
        return {"fn": getattr(self.fn, "__name__", self.fn), "tol": self.tol}
