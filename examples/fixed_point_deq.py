"""A deep-equilibrium layer ``z = tanh(W z + U x)`` differentiated at its fixed point.

The setting of TorchOpt's fixed-point tutorial (an implicit layer whose output is the fixed point
of a contraction, differentiated by the implicit function theorem), written with ``bilevel``:
:class:`bilevel.FixedPointProblem` for the layer, Anderson acceleration for the forward pass, GMRES
on vector-Jacobian products for the backward. It prints the gradient of a loss on ``z`` with
respect to ``x`` three ways: implicit, back-propagation through 300 unrolled iterations, and
central finite differences, with their largest differences.

    python examples/fixed_point_deq.py
"""

from __future__ import annotations

import torch

import bilevel as bl

torch.set_default_dtype(torch.float64)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n, m = 40, 10
    W = torch.randn(n, n, generator=g)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)  # ||W||_2 = 0.9: tanh(W z + U x) is a contraction in z
    U = torch.randn(n, m, generator=g) / m ** 0.5
    target = torch.randn(n, generator=g)
    layer = bl.FixedPointProblem(lambda z, x, data: torch.tanh(W @ z + U @ x), name="deq")

    def loss_of(z):
        return ((z - target) ** 2).sum()

    x0 = torch.randn(m, generator=g)
    x = x0.clone().requires_grad_(True)
    z, result = bl.root(layer, x, solver=bl.roots.get("anderson", tol=1e-13), phi0=torch.zeros(n), full_output=True)
    loss_of(z).backward()
    implicit = x.grad

    xu = x0.clone().requires_grad_(True)
    zu = torch.zeros(n)
    for _ in range(300):
        zu = torch.tanh(W @ zu + U @ xu)
    loss_of(zu).backward()

    def f(x_):
        return loss_of(bl.solve_root(layer, x_, solver=bl.roots.get("anderson", tol=1e-14), phi0=torch.zeros(n)).phi)
    eps = 1e-6
    fd = torch.stack([(f(x0 + eps * e) - f(x0 - eps * e)) / (2 * eps) for e in torch.eye(m)])

    print(f"forward: {result.status.name} after {result.iterations} Anderson iterations, ||F|| = "
          f"{result.residual_norm:.1e}")
    print(f"implicit gradient[:4]   : {[round(v, 8) for v in implicit[:4].tolist()]}")
    print(f"unrolled (300 steps)[:4]: {[round(v, 8) for v in xu.grad[:4].tolist()]}")
    print(f"max |implicit - unrolled|       = {(implicit - xu.grad).abs().max().item():.1e}")
    print(f"max |implicit - finite diff.|   = {(implicit - fd).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
