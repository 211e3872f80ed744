"""Solve the paper's appendix F.1 bilevel problem and print its hypergradient next to the exact one.

    python examples/quickstart.py

Inner problem (one task of proximal linear regression, x in R^50, lam = 5,
condition number 50):   G(phi, theta) = 1/2 phi^T A phi + b^T phi + lam/2 ||phi - theta||^2
Outer objective:         F(theta) = f(phi*(theta)), a test-set quadratic loss.
"""

from __future__ import annotations

import warnings

import torch

import bilevel as bl


def relative_error(g: torch.Tensor, exact: torch.Tensor) -> float:
    return float((g - exact).norm() / exact.norm())


def main() -> None:
    torch.set_default_dtype(torch.float64)
    ref = bl.testing.proximal_quadratic(dim=50, lam=5.0, condition_number=50.0, seed=0)
    exact = ref.hypergradient()
    inner = bl.solvers.get("gd", tol=1e-10, max_iter=20000)  # Armijo line search

    # 1. implicit differentiation: argmin is a differentiable op of theta
    theta = ref.theta.clone().requires_grad_(True)
    phi, result = bl.argmin(ref.problem, theta, ref.data, solver=inner,
                            linear_solver=bl.linalg.get("cg", max_iter=500, tol=1e-14), full_output=True)
    ref.outer(phi, theta).backward()
    print(f"inner solve: {result.status.name} after {result.iterations} GD iterations, "
          f"||grad_phi G|| = {result.grad_norm:.2e}")
    print("first five entries of dF/dtheta")
    print(f"  exact    : {exact[:5].numpy().round(6)}")
    print(f"  implicit : {theta.grad[:5].numpy().round(6)}")
    print()

    # 2. accuracy against the exact meta-gradient: truncated CG and the unrolled baselines
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.ConvergenceWarning)  # truncated solves stop early on purpose
        for k in (2, 5, 20):
            g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, result.phi, ref.data,
                                       linear_solver=bl.linalg.get("cg", max_iter=k))
            rows.append((f"iMAML, CG {k} steps", relative_error(g, exact), f"{info.hvps} HVPs"))
    g, info = bl.hypergradient(ref.problem, ref.outer, ref.theta, result.phi, ref.data,
                               linear_solver=bl.linalg.get("cg", max_iter=500, tol=1e-14))
    rows.append(("iMAML, CG to tol 1e-14", relative_error(g, exact), f"{info.hvps} HVPs"))
    for steps in (10, 100):
        for name, fn in (("MAML", bl.unrolled.maml), ("first-order MAML", bl.unrolled.first_order_maml)):
            th = ref.theta.clone().requires_grad_(True)
            ref.outer(fn(ref.problem, th, ref.data, step_size=1.0 / 250.0, num_steps=steps), th).backward()
            rows.append((f"{name}, {steps} GD steps", relative_error(th.grad, exact), ""))

    print(f"{'method':<32} {'relative error':>15}  cost")
    for name, err, cost in rows:
        print(f"{name:<32} {err:>15.3e}  {cost}")


if __name__ == "__main__":
    main()
