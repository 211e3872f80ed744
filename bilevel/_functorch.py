"""Whether code runs inside a ``torch.func`` transform (``vmap``, ``grad``, ...).

Inside one, tensors cannot be read back to Python (``.item()``, ``bool(t)``)
and ``torch.autograd.grad`` on fresh leaves is refused, so the library
switches to ``torch.func`` derivatives and skips value checks there.
"""

from __future__ import annotations

import torch


def in_transform() -> bool:
    """True inside a ``torch.func`` transform such as :func:`torch.func.vmap`."""
    try:
        return torch._C._functorch.maybe_current_level() is not None
    except AttributeError:  # pragma: no cover - a torch without functorch's C API
        return False
