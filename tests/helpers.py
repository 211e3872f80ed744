"""Reference problems and tolerances shared by the tests (one table per solver)."""

from __future__ import annotations

import torch

import bilevel as bl


def rel_err(a, b) -> float:
    """Relative l2 error between two tensors or trees."""
    fa, _ = bl.tree.flatten(a)
    fb, _ = bl.tree.flatten(b)
    return float(torch.linalg.vector_norm(fa - fb) / torch.linalg.vector_norm(fb))


#: name -> builder of a strongly convex reference problem with a known hypergradient.
REFERENCE_PROBLEMS = {
    "proximal_quadratic": lambda: bl.testing.proximal_quadratic(dim=20, condition_number=20.0, seed=3),
    "ridge_regression": lambda: bl.testing.ridge_regression(seed=4),
    "general_quadratic": lambda: bl.testing.general_quadratic(seed=5),
    "logistic_regression": lambda: bl.testing.logistic_regression(seed=6),
}

#: inner solver name -> (options for a tight solve, relative hypergradient tolerance).
SOLVER_SETTINGS = {
    "gd": ({"tol": 1e-11, "max_iter": 20000}, 1e-7),
}


def tight_solver(name: str):
    """A solver configured to reach a tight stationarity tolerance on the reference problems."""
    options, _ = SOLVER_SETTINGS.get(name, ({"tol": 1e-11}, 1e-6))
    return bl.solvers.get(name, **options)
