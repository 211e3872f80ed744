"""Tune per-feature ridge strengths on scikit-learn's diabetes data, with cvxpy as the inner solver.

    python examples/cvxpy_hyperparameters.py

Inner problem (ridge regression on the training split, written once as a
cvxpy program and solved by CLARABEL):

    w*(theta) = argmin_w  1/(2n) ||X w - y||^2 + 1/2 sum_j exp(theta_j) w_j^2

Outer problem: the validation loss F(theta) = 1/(2m) ||X_val w*(theta) - y_val||^2,
minimised over theta = log of the ten per-feature strengths by Adam. cvxpy only
finds w*; the hypergradient dF/dtheta comes from the implicit function theorem
through `bl.argmin(...)` and `.backward()`, using the same G written in torch.

Needs scikit-learn and cvxpy (`pip install bilevel[cvxpy] scikit-learn`).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import bilevel as bl
from bilevel.solvers.cvxpy_solver import CvxpySolver


def ridge_objective(w: torch.Tensor, theta: torch.Tensor, data: dict) -> torch.Tensor:
    """G(w, theta) in torch: what the implicit backward differentiates."""
    r = data["X"] @ w - data["y"]
    return 0.5 * (r @ r) / data["X"].shape[0] + 0.5 * (torch.exp(theta) * w * w).sum()


def make_builder(X: np.ndarray, y: np.ndarray):
    """The same G as a cvxpy program, compiled once; each solve only updates a Parameter (DPP)."""
    w = cp.Variable(X.shape[1])
    scale = cp.Parameter(X.shape[1], nonneg=True)  # sqrt(exp(theta))
    objective = cp.sum_squares(X @ w - y) / (2 * X.shape[0]) + 0.5 * cp.sum_squares(cp.multiply(scale, w))
    problem = cp.Problem(cp.Minimize(objective))

    def build(theta: np.ndarray, data: dict):
        scale.value = np.exp(0.5 * theta)
        return problem, w

    return build


def main(steps: int = 40, lr: float = 0.3) -> None:
    torch.set_default_dtype(torch.float64)
    X, y = load_diabetes(return_X_y=True)
    X_tr, X_val, y_tr, y_val = train_test_split(X, y, test_size=0.4, random_state=0)
    x_scaler = StandardScaler().fit(X_tr)
    y_mean, y_std = y_tr.mean(), y_tr.std()
    X_tr, X_val = x_scaler.transform(X_tr), x_scaler.transform(X_val)
    y_tr, y_val = (y_tr - y_mean) / y_std, (y_val - y_mean) / y_std

    data = {"X": torch.as_tensor(X_tr), "y": torch.as_tensor(y_tr)}
    Xv, yv = torch.as_tensor(X_val), torch.as_tensor(y_val)

    def validation_loss(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        r = Xv @ w - yv
        return 0.5 * (r @ r) / Xv.shape[0]

    problem = bl.InnerProblem(ridge_objective, name="ridge")
    solver = CvxpySolver(build=make_builder(X_tr, y_tr), solver="CLARABEL", tol=1e-8,
                         solver_options={"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12})
    linear_solver = bl.linalg.get("cg", max_iter=100, tol=1e-12)

    theta = torch.zeros(X_tr.shape[1], requires_grad=True)  # every strength starts at exp(0) = 1
    optimizer = torch.optim.Adam([theta], lr=lr)
    phi0 = torch.zeros(X_tr.shape[1])
    first = None
    print(f"diabetes: {X_tr.shape[0]} training and {X_val.shape[0]} validation rows, {X_tr.shape[1]} features")
    for step in range(steps + 1):
        optimizer.zero_grad()
        w, result = bl.argmin(problem, theta, data, solver=solver, linear_solver=linear_solver, phi0=phi0,
                              full_output=True)
        loss = validation_loss(w, theta)
        first = float(loss.detach()) if first is None else first
        if step == steps:
            break
        loss.backward()
        if step % 5 == 0:
            lam = torch.exp(theta.detach())
            print(f"step {step:3d}  validation loss {float(loss.detach()):.5f}  ||grad_w G|| {result.grad_norm:.1e}  "
                  f"||dF/dtheta|| {float(theta.grad.norm()):.2e}  strengths in [{float(lam.min()):.2g}, "
                  f"{float(lam.max()):.2g}]")
        optimizer.step()
    print(f"validation loss before: {first:.5f}")
    print(f"validation loss after:  {float(loss.detach()):.5f}")
    print("learned strengths exp(theta):", np.array2string(torch.exp(theta.detach()).numpy(), precision=3))


if __name__ == "__main__":
    main()
