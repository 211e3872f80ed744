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
    "agd": ({"tol": 1e-11, "max_iter": 5000}, 1e-7),
    "newton_cg": ({"tol": 1e-11, "max_iter": 50}, 1e-7),
    # L-BFGS-B's line search needs G to decrease measurably: in float64 it stalls at ||grad G|| ~ 1e-8..1e-7
    # on these problems (a full memory helps), so its tolerance cannot be as tight as the others'.
    "scipy_lbfgs": ({"tol": 1e-7, "memory": 30, "max_iter": 2000}, 1e-6),
    "scipy": ({"method": "BFGS", "tol": 1e-8, "max_iter": 2000}, 1e-7),
    # cvxpy needs a problem-specific build=... (see tests/bilevel/test_scipy_cvxpy_solvers.py), so the generic
    # contract tests cannot construct it; these are the conic-solver settings that file uses.
    "cvxpy": ({"tol": 1e-8, "solver_options": {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}},
              1e-6),
}


#: solvers whose line search accepts a step by comparing values of G (SciPy's), so that they cannot certify
#: ||grad G|| below the round-off floor of those values (see `value_noise_floor`).
VALUE_LINE_SEARCH = {"scipy", "scipy_lbfgs"}


def value_noise_floor(ref) -> float:
    """The smallest ``||grad G||`` that a line search comparing values of ``G`` can reach on ``ref``.

    Near ``phi*`` a step gains ``G - G* ~ ||grad G||^2 / (2 L)``; once that is below the round-off of
    ``G``'s value, ``eps (|G*| + 1)``, sufficient-decrease tests are noise and SciPy stops with "precision
    loss". So ``||grad G|| >= sqrt(2 L eps (|G*| + 1))`` is all such a solver can promise; where it stops
    below, that is the luck of the rounding (measured over 40 seeds of each reference problem: BFGS and
    L-BFGS-B, run with no tolerance, stalled at 0.0002x to 1.1x this floor).
    """
    flat, spec = bl.tree.flatten(ref.solution())

    def G(p):
        return ref.problem(bl.tree.unflatten(p, spec), ref.theta, ref.data)

    value = float(G(flat))
    L = float(torch.linalg.eigvalsh(torch.func.hessian(G)(flat)).max())
    eps = torch.finfo(flat.dtype).eps
    return (2.0 * L * eps * (abs(value) + 1.0)) ** 0.5


def attainable_tol(name: str, ref, tol: float) -> float:
    """``tol``, raised to twice the value-noise floor of ``ref`` for solvers in `VALUE_LINE_SEARCH`."""
    return max(tol, 2.0 * value_noise_floor(ref)) if name in VALUE_LINE_SEARCH else tol


def tight_solver(name: str, ref=None):
    """A solver configured to reach a tight stationarity tolerance on the reference problems.

    With ``ref``, the tolerance of a value-comparing line search is raised to what floating point allows
    on that problem (`attainable_tol`): asking SciPy for less makes the test depend on rounding.
    """
    options, _ = SOLVER_SETTINGS.get(name, ({"tol": 1e-11}, 1e-6))
    options = dict(options)
    if ref is not None and "tol" in options:
        options["tol"] = attainable_tol(name, ref, options["tol"])
    return bl.solvers.get(name, **options)


class WrongGradient(torch.autograd.Function):
    """x -> sum(x^2) with the gradient's sign flipped: no descent direction exists."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x ** 2).sum()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -2 * x * g


def class_pool(n_classes=12, per_class=6, seed=0) -> torch.Tensor:
    """Generated 'characters': each class a random stroke pattern, its drawings noisy copies (uint8)."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(n_classes, 1, 1, 28, 28, generator=g) > 0.7).float()
    noise = (torch.rand(n_classes, per_class, 1, 28, 28, generator=g) > 0.9).float()
    return ((protos + noise).clamp(0, 1) * 255).to(torch.uint8)
