"""Input validation shared by the public entry points (never ``assert``)."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from . import tree as _tree
from ._functorch import in_transform


class ConvergenceWarning(UserWarning):
    """An inner solver or a linear solver stopped before meeting its tolerance.

    The result still comes back (``converged=False`` with a ``status`` that
    says what to change); call ``result.raise_if_failed()`` to turn the
    failure into an error, or filter this warning to silence it.
    """


class BudgetWarning(ConvergenceWarning):
    """A solver used its whole budget (``max_iter``) before meeting its tolerance.

    Often intended (a fixed number of inner steps, 5 CG steps): silence these
    alone with ``warnings.simplefilter("ignore", bilevel.BudgetWarning)`` and
    still see the :class:`BreakdownWarning` s.
    """


class BreakdownWarning(ConvergenceWarning):
    """A solver stopped because something is wrong: negative curvature, divergence, NaN, a failed line search."""


class ConvergenceError(RuntimeError):
    """Raised by ``raise_if_failed()`` on a result that did not converge."""


def check_finite_tree(tree: Any, what: str, hint: str = "") -> None:
    """Raise ``ValueError`` if any tensor in ``tree`` holds NaN or infinity.

    Skipped inside ``torch.func`` transforms (values cannot be read there).
    """
    if in_transform():
        return
    lv: list = []
    paths: list = []
    _collect_tensors(tree, what, lv, paths)
    for t, p in zip(lv, paths):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            fix = hint or "check the values you pass (a diverged outer update or a bad data file)"
            raise ValueError(f"{p} contains {n_bad} non-finite value(s) (NaN or inf); {fix}.")


def _collect_tensors(obj: Any, path: str, out: list, paths: list) -> None:
    """Collect every tensor inside a loosely structured object (data may be anything)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        paths.append(path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect_tensors(v, f"{path}[{k!r}]", out, paths)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect_tensors(v, f"{path}[{i}]", out, paths)


def check_scalar(value: Any, what: str) -> torch.Tensor:
    """Check that a user function returned a real scalar tensor and return it as 0-d."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{what} must return a real scalar torch.Tensor, got {type(value).__name__}; "
            f"build it from torch operations on phi and theta so that it can be differentiated."
        )
    if value.is_complex() or not value.is_floating_point():
        raise TypeError(
            f"{what} must return a real floating-point scalar, got dtype {value.dtype}; "
            f"cast with .float() / .double() or return a real loss."
        )
    if value.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar, got a tensor of shape {tuple(value.shape)}; "
            f"reduce it with .sum() or .mean()."
        )
    return value.reshape(())


def check_positive_int(value: Any, what: str, allow_zero: bool = False) -> int:
    """Validate an iteration count given as a constructor option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"Invalid {what}: {value}; it must be {bound}.")
    return int(value)


def check_nonneg_float(value: Any, what: str, positive: bool = False) -> float:
    """Validate a tolerance or step size given as a constructor option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r}.")
    v = float(value)
    if not (v == v) or v in (float("inf"), float("-inf")):
        raise ValueError(f"Invalid {what}: {value}; it must be finite.")
    if v < 0 or (positive and v == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"Invalid {what}: {value}; it must be {bound}.")
    return v


def check_structure(spec: _tree.TreeSpec, expected: _tree.TreeSpec, what: str, expected_name: str) -> None:
    """Raise a ``ValueError`` naming both structures when two trees do not match."""
    if _tree.same_structure(spec, expected):
        return
    if spec.structure is None and expected.structure is None:
        fix = f"pass {what}.reshape{tuple(expected.shapes[0])}" if spec.size == expected.size else \
            f"pass a tensor with {expected.size} elements"
        raise ValueError(
            f"{what} has shape {tuple(spec.shapes[0])} but {expected_name}'s structure expects "
            f"{tuple(expected.shapes[0])}; {fix}."
        )
    raise ValueError(
        f"{what} is {spec.describe()} but {expected_name}'s structure expects {expected.describe()}; "
        f"pass {what} with the same keys and shapes as {expected_name}."
    )
