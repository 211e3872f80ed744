"""The registry of linear solvers: :func:`register`, :func:`available`, :func:`get`."""

from __future__ import annotations

from typing import Any, Callable

from .base import _REGISTRY, LinearSolver
from .callable import CallableLinearSolver

__all__ = ["register", "available", "get", "default_solver"]


def register(name: str):
    """Class decorator: register a :class:`LinearSolver` subclass under ``name``.

    Examples
    --------
    >>> import bilevel as bl
    >>> @bl.linalg.register("my_cg")
    ... class MyCG(bl.linalg.CG):
    ...     pass
    >>> "my_cg" in bl.linalg.available()
    True
    """
    return _REGISTRY.register(name)


def available() -> list[str]:
    """Names of the registered linear solvers.

    Examples
    --------
    >>> import bilevel as bl
    >>> {"cg", "neumann"} <= set(bl.linalg.available())
    True
    """
    return _REGISTRY.available()


def get(name: str | LinearSolver | Callable = "cg", /, **options: Any) -> LinearSolver:
    """Build a linear solver by name, or pass an instance through.

    Parameters
    ----------
    name:
        A registered name (see :func:`available`), a :class:`LinearSolver`
        instance (returned as is; ``options`` must then be empty), or a
        callable ``(matvec, b) -> x`` or ``-> (x, info)``.
    **options:
        Constructor options of that solver (``max_iter``, ``tol``, ...).

    Raises
    ------
    ValueError
        Unknown name; the message lists the available ones.
    TypeError
        Unknown option; the message lists the valid ones.

    Examples
    --------
    >>> import bilevel as bl
    >>> bl.linalg.get("cg", max_iter=5)
    CG(max_iter=5, tol=1e-10, warn=True)
    """
    if isinstance(name, LinearSolver):
        if options:
            raise TypeError(f"options {sorted(options)} cannot be applied to an existing {name!r}; "
                            f"construct it with them instead.")
        return name
    if isinstance(name, str):
        return _REGISTRY.build(name, options)
    if callable(name):
        return CallableLinearSolver(name, **options)
    raise TypeError(f"linear_solver must be a name ({', '.join(available())}), a LinearSolver or a "
                    f"callable (matvec, b) -> x, got {type(name).__name__}.")


def default_solver(symmetric: bool) -> str:
    """The name of the linear solver to use when none is given, for a symmetric or a non-symmetric ``A``.

    ``"cg"`` for a symmetric ``A`` (a Hessian: the adjoint of :func:`bilevel.argmin`), ``"gmres"``
    otherwise (the Jacobian of a root or fixed-point problem), whose iterations need nothing of
    ``A`` but a matvec and cannot break down. For a symmetric ``A`` that may be indefinite, pass
    ``"minres"`` instead (CG stops there with ``NEGATIVE_CURVATURE``). Whether a solver can take a
    non-symmetric ``A`` is its :attr:`~bilevel.linalg.LinearSolver.symmetric` attribute.

    Raises
    ------
    TypeError
        ``symmetric`` is not a bool.

    Examples
    --------
    >>> import bilevel as bl
    >>> bl.linalg.default_solver(symmetric=True), bl.linalg.default_solver(symmetric=False)
    ('cg', 'gmres')
    >>> bl.linalg.get(bl.linalg.default_solver(symmetric=False)).symmetric
    False
    """
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool (whether A is symmetric), got {symmetric!r}.")
    return "cg" if symmetric else "gmres"
