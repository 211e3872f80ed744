"""Input validation shared by the public entry points (never ``assert``)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from . import tree as _tree
from ._functorch import in_transform


# the warnings and the error live with the statuses; imported here for the modules that still look for them
from .status import (BreakdownWarning, BudgetWarning, ConvergenceError, ConvergenceWarning,  # noqa: F401
                     DivergenceWarning, LineSearchWarning, NegativeCurvatureWarning, NonFiniteWarning)


def check_finite_tree(tree: Any, what: str, hint: str = "") -> None:
    """Raise ``ValueError`` if any tensor in ``tree`` holds NaN or infinity.

    Skipped inside ``torch.func`` transforms (values cannot be read there).
    """
    if in_transform():
        return
    lv: list = []
    paths: list = []
    _collect_tensors(tree, what, lv, paths)
    floats = [t for t in lv if t.is_floating_point() or t.is_complex()]
    if not floats:
        return
    # fast path: a sum is finite when every entry is (NaN and inf propagate); only a sum that is not (a NaN,
    # an inf, or finite entries whose sum overflowed) needs the entry-wise check below
    with torch.no_grad():
        if all(t.device.type == "cpu" for t in floats):  # a read-back per tensor costs nothing on the CPU
            if all(math.isfinite(t.sum().item()) if not t.is_complex() else bool(torch.isfinite(t.sum()))
                   for t in floats):
                return
        elif len({t.device for t in floats}) == 1:  # one read-back (one host synchronisation) for them all
            if math.isfinite(float(sum(t.sum().abs() for t in floats))):
                return
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
    return value if value.dim() == 0 else value.reshape(())


def check_positive_int(value: Any, what: str, allow_zero: bool = False) -> int:
    """Validate an iteration count given as a constructor option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"Invalid {what}: {value}; it must be {bound}.")
    return int(value)


def check_bool(value: Any, what: str) -> bool:
    """Check that an option is a bool (not a truthy number or string) and return it."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}.")
    return value


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


def check_floating(tree: Any, what: str) -> None:
    """Raise ``TypeError`` unless every tensor of ``tree`` is real floating point (gradients need it)."""
    spec = _tree.tree_spec(tree, what)
    for t, path in zip(_tree.leaves(tree, what), spec.paths):
        if not t.is_floating_point():
            where = what if path == "<tensor>" else f"{what} at {path!r}"
            raise TypeError(f"{where} has dtype {t.dtype}, but gradients need real floating point; convert it, "
                            f"e.g. with .float() or .double() (torch.tensor([1, 2]) is int64: write [1.0, 2.0]).")


def check_like(tree: Any, reference: Any, what: str, reference_name: str) -> None:
    """Raise when ``tree``'s tensors do not share the dtype and device of ``reference``'s first tensor."""
    ref = _tree.leaves(reference, reference_name)
    if not ref:
        return
    dtype, device = ref[0].dtype, ref[0].device
    for t in _tree.leaves(tree, what):
        if t.dtype != dtype:
            raise TypeError(f"{what} has dtype {t.dtype} but {reference_name} has {dtype}; pass {what} in "
                            f"{reference_name}'s dtype, e.g. {what}.to({reference_name}.dtype).")
        if t.device != device:
            raise ValueError(f"{what} is on {t.device} but {reference_name} is on {device}; move {what} there, "
                             f"e.g. {what}.to({reference_name}.device).")


def detached_objective_error(what: str) -> ValueError:
    """The error for an objective whose value carries no gradient with respect to ``phi``."""
    return ValueError(
        f"{what} returned a value that carries no gradient with respect to phi: it was detached from phi "
        f"(.detach(), .item(), .numpy(), torch.no_grad() or a new tensor built from numbers) or does not use phi, "
        f"so no solver can move phi and no hypergradient exists. Compute it from phi with torch operations (a "
        f"solver that needs no gradients can be passed as solver=<a callable>, but G itself must be torch code).")


def check_real(value: Any, name: str, *, positive: bool = False, at_least: float | None = None,
          allow_none: bool = False) -> float | None:
    """A finite real number (``> 0`` / ``>= at_least`` / ``>= 0``), or ``None`` where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {value}; it must be finite.")
    if at_least is not None:
        if v < at_least:
            raise ValueError(f"Invalid {name}: {value}; it must be >= {at_least:g}.")
    elif positive and not v > 0:
        raise ValueError(f"Invalid {name}: {value}; it must be > 0.")
    elif v < 0:
        raise ValueError(f"Invalid {name}: {value}; it must be >= 0.")
    return v
