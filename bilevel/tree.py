"""Arithmetic on parameter trees.

A *parameter tree* is a :class:`torch.Tensor`, or a ``dict`` / ``list`` /
``tuple`` whose leaves are tensors (nesting allowed). A :class:`torch.nn.Module`
stands for ``dict(module.named_parameters())``: it is accepted wherever a tree is,
and what is built back from it (a solution ``phi``, a gradient) is that dict.

The engine works on flat 1-D vectors: :func:`flatten` turns a tree into one
vector plus a :class:`TreeSpec`, and :func:`unflatten` turns a vector back into
the tree, as *views* of the vector (no copy). The small helpers :func:`dot`,
:func:`axpy`, :func:`norm` and :func:`zeros_like` work on trees directly, with
``torch._foreach_*`` kernels where they pay.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Union

import torch

__all__ = [
    "Tree",
    "TreeSpec",
    "flatten",
    "unflatten",
    "leaves",
    "tree_spec",
    "dot",
    "axpy",
    "norm",
    "zeros_like",
    "map",
    "describe",
    "same_structure",
]

#: A parameter tree: a tensor, or a dict / list / tuple of (nested) tensors (or a module: its named parameters).
Tree = Union[torch.Tensor, dict, list, tuple, torch.nn.Module]


class _cached:
    """A property computed once per instance and then read from its ``__dict__``.

    Like :func:`functools.cached_property`, without the lock Python 3.11's takes on every first
    access: :func:`torch.compile` cannot trace through that lock, and a compiled objective
    unflattens its vector through these sizes.
    """

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = self.fn(obj)
        obj.__dict__[self.name] = value
        return value


@dataclass(frozen=True)
class TreeSpec:
    """The structure of a parameter tree: container layout, leaf shapes and dtype.

    Attributes
    ----------
    structure:
        A nested description of the containers: ``None`` for a leaf,
        ``("dict", keys, children)``, ``("list", children)`` or
        ``("tuple", children)``.
    shapes:
        The shape of every leaf, in flattening order.
    paths:
        A readable path for every leaf (``"weight"``, ``"[0]"``, ``"layer.bias"``).
    """

    structure: Any
    shapes: tuple[torch.Size, ...]
    paths: tuple[str, ...]

    @_cached
    def numels(self) -> tuple[int, ...]:
        """The number of elements of every leaf."""
        return tuple(math.prod(s) for s in self.shapes)

    @_cached
    def size(self) -> int:
        """The total number of elements, i.e. the length of the flat vector."""
        return sum(self.numels)

    @property
    def num_leaves(self) -> int:
        """The number of tensors in the tree."""
        return len(self.shapes)

    def describe(self) -> str:
        """A short human-readable description, used in error messages."""
        if self.structure is None:
            return f"a tensor of shape {tuple(self.shapes[0])}"
        parts = ", ".join(f"{p}: {tuple(s)}" for p, s in zip(self.paths, self.shapes))
        kind = self.structure[0]
        return f"a {kind} {{{parts}}}"


def _walk(tree: Any, path: str, out_leaves: list, out_paths: list, what: str) -> Any:
    if isinstance(tree, torch.nn.Module):  # a module stands for the dict of its named parameters
        tree = dict(tree.named_parameters())
    if isinstance(tree, torch.Tensor):
        out_leaves.append(tree)
        out_paths.append(path or "<tensor>")
        return None
    if isinstance(tree, dict):
        keys = tuple(tree.keys())
        children = tuple(
            _walk(tree[k], f"{path}.{k}" if path else str(k), out_leaves, out_paths, what) for k in keys
        )
        return ("dict", keys, children)
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        children = tuple(
            _walk(v, f"{path}[{i}]", out_leaves, out_paths, what) for i, v in enumerate(tree)
        )
        return (kind, children)
    where = f" at {path!r}" if path else ""
    raise TypeError(
        f"{what} must be a tensor or a dict/list/tuple of tensors, but found "
        f"{type(tree).__name__}{where}; convert numbers and arrays with torch.as_tensor."
    )


def tree_spec(tree: Tree, what: str = "tree") -> TreeSpec:
    """Return the :class:`TreeSpec` of ``tree``.

    Examples
    --------
    >>> import torch
    >>> tree_spec({"w": torch.zeros(2, 3), "b": torch.zeros(3)}).size
    9
    """
    lv: list = []
    paths: list = []
    structure = _walk(tree, "", lv, paths, what)
    if not lv:
        raise ValueError(f"{what} holds no tensors; pass at least one tensor.")
    return TreeSpec(structure, tuple(t.shape for t in lv), tuple(paths))


def leaves(tree: Tree, what: str = "tree") -> list[torch.Tensor]:
    """The tensors of ``tree`` in flattening order.

    Examples
    --------
    >>> import torch
    >>> [t.shape for t in leaves({"a": torch.zeros(2), "b": [torch.zeros(3)]})]
    [torch.Size([2]), torch.Size([3])]
    """
    lv: list = []
    _walk(tree, "", lv, [], what)
    return lv


def _build(structure: Any, it) -> Any:
    if structure is None:
        return next(it)
    kind = structure[0]
    if kind == "dict":
        _, keys, children = structure
        return {k: _build(c, it) for k, c in zip(keys, children)}
    children = tuple(_build(c, it) for c in structure[1])
    return list(children) if kind == "list" else children


def from_leaves(spec: TreeSpec, tensors: list[torch.Tensor]) -> Tree:
    """Rebuild a tree of structure ``spec`` from its leaves (in flattening order)."""
    return _build(spec.structure, iter(tensors))


def flatten(tree: Tree, what: str = "tree") -> tuple[torch.Tensor, TreeSpec]:
    """Concatenate the leaves of ``tree`` into one 1-D vector.

    A single contiguous tensor is flattened as a view; several leaves are
    concatenated (one copy). Leaves must share dtype and device.

    Returns
    -------
    vector, spec:
        The flat vector of length ``spec.size`` and the spec that
        :func:`unflatten` needs to rebuild the tree.

    Examples
    --------
    >>> import torch
    >>> v, spec = flatten({"w": torch.ones(2, 2), "b": torch.zeros(1)})
    >>> v
    tensor([1., 1., 1., 1., 0.])
    >>> unflatten(v, spec)["w"].shape
    torch.Size([2, 2])
    """
    spec = tree_spec(tree, what)
    lv = leaves(tree, what)
    dtypes = {t.dtype for t in lv}
    devices = {t.device for t in lv}
    if len(dtypes) > 1:
        raise TypeError(
            f"{what} mixes dtypes {sorted(str(d) for d in dtypes)}; cast every tensor to one "
            f"dtype (e.g. .double()) before calling."
        )
    if len(devices) > 1:
        raise ValueError(
            f"{what} spans devices {sorted(str(d) for d in devices)}; move every tensor to one "
            f"device (e.g. .to('cuda')) before calling."
        )
    if len(lv) == 1:
        return lv[0].reshape(-1), spec
    return torch.cat([t.reshape(-1) for t in lv]), spec


def unflatten(vector: torch.Tensor, spec: TreeSpec) -> Tree:
    """Split a flat vector back into a tree shaped like ``spec``; leaves are views.

    Examples
    --------
    >>> import torch
    >>> v, spec = flatten([torch.zeros(2), torch.zeros(1, 2)])
    >>> [t.shape for t in unflatten(torch.arange(4.0), spec)]
    [torch.Size([2]), torch.Size([1, 2])]
    """
    if vector.dim() != 1 or vector.shape[0] != spec.size:
        raise ValueError(
            f"expected a 1-D vector of length {spec.size} for {spec.describe()}, "
            f"got shape {tuple(vector.shape)}."
        )
    if len(spec.shapes) == 1:  # one leaf: a view only where its shape is not already the vector's
        shape = spec.shapes[0]
        tensors = [vector if len(shape) == 1 else vector.view(shape)]
        return tensors[0] if spec.structure is None else from_leaves(spec, tensors)
    parts = torch.split(vector, list(spec.numels))
    tensors = [p.view(s) for p, s in zip(parts, spec.shapes)]
    return from_leaves(spec, tensors)


def same_structure(a: TreeSpec, b: TreeSpec) -> bool:
    """True when two specs have the same containers, keys and leaf shapes."""
    return a.structure == b.structure and a.shapes == b.shapes


def describe(tree: Tree) -> str:
    """Describe the structure of ``tree`` in words (for error messages)."""
    return tree_spec(tree).describe()


def map(fn, *trees: Tree) -> Tree:  # noqa: A001 - mirrors jax.tree.map
    """Apply ``fn`` leaf-wise to trees of the same structure.

    Examples
    --------
    >>> import torch
    >>> map(lambda a, b: a + b, {"x": torch.ones(2)}, {"x": torch.ones(2)})
    {'x': tensor([2., 2.])}
    """
    spec = tree_spec(trees[0])
    cols = [leaves(t) for t in trees]
    return from_leaves(spec, [fn(*xs) for xs in zip(*cols)])


def dot(a: Tree, b: Tree) -> torch.Tensor:
    """Inner product ``sum_i <a_i, b_i>`` over the leaves of two trees.

    Examples
    --------
    >>> import torch
    >>> dot({"x": torch.ones(3)}, {"x": torch.full((3,), 2.0)})
    tensor(6.)
    """
    la, lb = leaves(a), leaves(b)
    if len(la) == 1:
        return torch.sum(la[0] * lb[0])
    return torch.stack([torch.sum(x * y) for x, y in zip(la, lb)]).sum()


def norm(a: Tree) -> torch.Tensor:
    """Euclidean norm of all the leaves of a tree taken together.

    Examples
    --------
    >>> import torch
    >>> norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5.)
    """
    la = leaves(a)
    if len(la) == 1:
        return torch.linalg.vector_norm(la[0])
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(la)))


def axpy(alpha: float | torch.Tensor, x: Tree, y: Tree) -> Tree:
    """Return ``alpha * x + y`` leaf-wise (a new tree; inputs are not modified).

    Examples
    --------
    >>> import torch
    >>> axpy(2.0, torch.ones(2), torch.ones(2))
    tensor([3., 3.])
    """
    lx, ly = leaves(x), leaves(y)
    out = torch._foreach_add(ly, torch._foreach_mul(lx, alpha)) if not isinstance(alpha, torch.Tensor) \
        else [yy + alpha * xx for xx, yy in zip(lx, ly)]
    return from_leaves(tree_spec(y), list(out))


def zeros_like(a: Tree) -> Tree:
    """A tree of zeros with the structure, shapes, dtype and device of ``a``.

    Examples
    --------
    >>> import torch
    >>> zeros_like({"x": torch.ones(2)})
    {'x': tensor([0., 0.])}
    """
    return from_leaves(tree_spec(a), [torch.zeros_like(t) for t in leaves(a)])
