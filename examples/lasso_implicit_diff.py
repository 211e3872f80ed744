"""The lasso's regularisation strength tuned by its hypergradient: a non-smooth inner problem.

A port of JAXopt's ``examples/implicit_diff/lasso_implicit_diff.py`` to ``bilevel``, on the same
data: scikit-learn's diabetes set with unit-norm rows, split 67/33 with ``random_state=0``; the inner
problem ``min_w 1/(2n) ||X w - y||^2 + exp(theta) ||w||_1``, the outer loss the validation mean
squared error.

It prints the hypergradient at theta = 1 (JAXopt's starting point; the exact value is 155.66)
and at theta = -2 three ways: through the fixed point of the proximal-gradient map
(``bl.CompositeProblem``, exact on the active set), from the closed form on the active set, and
treating ``|w|`` as if it were smooth (``bl.InnerProblem``), which is wrong wherever coordinates
are exactly zero.

    python examples/lasso_implicit_diff.py
"""

from __future__ import annotations

import warnings

import torch

import bilevel as bl

torch.set_default_dtype(torch.float64)


def data():
    from sklearn import datasets, model_selection, preprocessing

    X, y = datasets.load_diabetes(return_X_y=True)
    X = preprocessing.normalize(X)
    X_tr, X_val, y_tr, y_val = model_selection.train_test_split(X, y, test_size=0.33, random_state=0)
    return (torch.tensor(X_tr), torch.tensor(y_tr)), (torch.tensor(X_val), torch.tensor(y_val))


def main() -> None:
    (X, y), (X_val, y_val) = data()
    n, d = X.shape

    def least_squares(w, theta, batch):
        Xb, yb = batch
        return 0.5 * ((Xb @ w - yb) ** 2).mean()

    def validation_loss(w):
        return ((X_val @ w - y_val) ** 2).mean()

    lasso = bl.CompositeProblem(least_squares, bl.prox.L1(lambda theta: theta.exp()))
    smooth = bl.InnerProblem(lambda w, theta, batch: least_squares(w, theta, batch) + theta.exp() * w.abs().sum())
    print(f"{'theta':>6} {'non-zero':>9} {'composite':>12} {'closed form':>12} {'as if smooth':>13}")
    for value in (1.0, -2.0):
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
            exact = float((2 * X_val.T @ (X_val @ wd - y_val) / len(y_val))[support] @ dw * lam)
        else:
            exact = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bl.ConvergenceWarning)
            naive, _ = bl.hypergradient(smooth, lambda w_, t: validation_loss(w_), theta.detach(), wd, (X, y))
        print(f"{value:6.1f} {int(support.sum()):9d} {theta.grad.item():12.6f} {exact:12.6f} {naive.item():13.6f}")


if __name__ == "__main__":
    main()
