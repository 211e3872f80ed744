"""Whether code runs inside a ``torch.func`` transform (``vmap``, ``grad``, ...).

Inside one, tensors cannot be read back to Python (``.item()``, ``bool(t)``)
and ``torch.autograd.grad`` on fresh leaves is refused, so the library
switches to ``torch.func`` derivatives and skips value checks there.
"""

from __future__ import annotations

import threading

import torch

class _State(threading.local):
    functional = False


_STATE = _State()


@torch._dynamo.assume_constant_result
def functional_mode() -> bool:
    """True while :func:`bilevel.compiled_hypergradient` runs its body (this thread only).

    The library then behaves as inside a ``torch.func`` transform: fixed budgets, ``torch.func``
    derivatives, nothing read back. Read once when ``torch.compile`` traces the body.
    """
    return _STATE.functional


class functional:
    """Context manager: :func:`functional_mode` is true inside it, on this thread."""

    def __enter__(self) -> "functional":
        self._before = _STATE.functional
        _STATE.functional = True
        return self

    def __exit__(self, *exc) -> bool:
        _STATE.functional = self._before
        return False


def in_transform() -> bool:
    """True inside a ``torch.func`` transform such as :func:`torch.func.vmap`, or in :func:`functional_mode`."""
    if functional_mode():
        return True
    try:
        return torch._C._functorch.maybe_current_level() is not None
    except AttributeError:  # pragma: no cover - a torch without functorch's C API
        return False


#: torch's messages for code that its function transforms and forward-mode AD cannot run, with our advice.
_TRANSFORM_FAULTS = (
    ("ZeroTensors are immutable",
     "forward-mode differentiation (hvp='forward', or any solve inside torch.func.vmap) failed inside the "
     "objective: some torch functions (F.mse_loss among them) write into the zero tangent of an input that does "
     "not depend on phi. Write that term with elementwise operations, e.g. ((pred - target) ** 2).mean() for "
     "F.mse_loss, or use hvp='reverse' outside vmap (a loop over tasks)"),
    ("must override the setup_context",
     "the objective calls a custom torch.autograd.Function without a setup_context staticmethod, which "
     "torch.func transforms (vmap over tasks, hvp='forward', 'gauss_newton') cannot run. Use hvp='reverse' "
     "outside vmap (a loop over tasks), or give the Function a setup_context "
     "(https://pytorch.org/docs/stable/notes/extending.func.html)"),
    ("escaped from inside a function being vmapped",
     "a tensor of the vmapped function reached the solve from outside its arguments: bl.argmin runs each task "
     "of a vmap in turn, so per-task tensors must come in through argmin's own arguments (theta, data, phi0; "
     "data as a tensor or a dict / list / tuple of tensors), not captured by the objective's closure. Pass them "
     "as data, e.g. bl.ProximalProblem(lambda phi, d: loss(phi, d)) with data=(X, y)"),
)


class explain_transform_errors:
    """Context manager: re-raise torch's transform errors (see ``_TRANSFORM_FAULTS``) with what to do instead."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self) -> "explain_transform_errors":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is not None and issubclass(kind, RuntimeError) and not getattr(error, "_bilevel_explained", False):
            text = str(error)
            for needle, advice in _TRANSFORM_FAULTS:
                if needle in text:
                    new = RuntimeError(f"{self.where}: {advice}. (torch said: {text.splitlines()[0]})")
                    new._bilevel_explained = True
                    raise new from error
        return False
