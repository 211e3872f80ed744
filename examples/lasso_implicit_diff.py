"""The lasso's regularisation strength tuned by its hypergradient: a non-smooth inner problem.

The construction of JAXopt's ``examples/implicit_diff/lasso_implicit_diff.py`` (the validation loss
of a lasso, differentiated with respect to the log of its l1 strength through the solution), written
with ``bilevel``. JAXopt's script loads scikit-learn's diabetes data; this one draws a regression
problem with a sparse truth, so that it runs without scikit-learn.

It prints the hypergradient at theta = log(lambda) = 1 and at -3 three ways: through the fixed
point of the proximal-gradient map (``bl.CompositeProblem``, exact on the active set), from the
closed form on the active set, and treating ``|w|`` as if it were smooth (``bl.InnerProblem``), which
is wrong wherever coordinates are exactly zero.

    python examples/lasso_implicit_diff.py
"""

from __future__ import annotations

import warnings

import torch

import bilevel as bl

torch.set_default_dtype(torch.float64)


def data(seed: int = 0, n: int = 100, d: int = 20):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(d)
    w_true[:5] = torch.tensor([3.0, -2.0, 1.5, -1.0, 0.5])
    X = torch.randn(2 * n, d, generator=g)
    y = X @ w_true + torch.randn(2 * n, generator=g)
    return (X[:n], y[:n]), (X[n:], y[n:])


def main() -> None:
    (X, y), (X_val, y_val) = data()
    n, d = X.shape

    def least_squares(w, theta, batch):
        Xb, yb = batch
        return 0.5 * ((Xb @ w - yb) ** 2).sum() / n

    def validation_loss(w):
        return 0.5 * ((X_val @ w - y_val) ** 2).mean()

    lasso = bl.CompositeProblem(least_squares, bl.prox.L1(lambda theta: theta.exp()))
    smooth = bl.InnerProblem(lambda w, theta, batch: least_squares(w, theta, batch) + theta.exp() * w.abs().sum())
    print(f"{'theta':>6} {'non-zero':>9} {'composite':>12} {'closed form':>12} {'as if smooth':>13}")
    for value in (1.0, -3.0):
        theta = torch.tensor(value, requires_grad=True)
        w = bl.root(lasso, theta, (X, y), solver=bl.roots.get("fista", tol=1e-12, max_iter=20000),
                    phi0=torch.zeros(d))
        validation_loss(w).backward()
        wd = w.detach()
        support = wd != 0
        if support.any():  # on the support: X_S^T (X_S w_S - y) / n + lam sign(w_S) = 0
            A = X[:, support].T @ X[:, support] / n
            dw = -torch.linalg.solve(A, torch.sign(wd[support]))
            lam = torch.tensor(value).exp()
            exact = float((X_val.T @ (X_val @ wd - y_val) / len(y_val))[support] @ dw * lam)
        else:
            exact = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bl.ConvergenceWarning)
            naive, _ = bl.hypergradient(smooth, lambda w_, t: validation_loss(w_), theta.detach(), wd, (X, y))
        print(f"{value:6.1f} {int(support.sum()):9d} {theta.grad.item():12.6f} {exact:12.6f} {naive.item():13.6f}")


if __name__ == "__main__":
    main()
