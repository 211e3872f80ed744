"""The one iteration driver of :mod:`bilevel`: inner solvers and linear solvers both run on it.

A method gives the driver an :class:`Iteration`: how to take one step from a state, and how to
measure a state (a residual norm, and for inner solvers the objective's value). The driver owns
everything else: ``max_iter``, the tolerance test, the non-finite check (the last finite state is
returned), breakdowns (a step the method flags is discarded), divergence, the history, and how
the steps are executed. There are three ways, and a method's step never asks which one runs it:

``"synced"``
    Step by step, reading the measurements back after every step, so that the loop stops as soon
    as it can. Needed when a step itself reads values (a line search).
``"deferred"``
    Exactly ``max_iter`` steps with the measurements kept on the device and read back once, at
    the end (on a GPU: one host synchronisation instead of one per step). The read-back is
    analysed with the synced loop's rules, so the result is the synced loop's: the same state,
    outcome, step count and history. Should the run have stopped earlier (a breakdown, a non-finite
    value, a divergence, an exactly solved problem), the steps are replayed from the start up to
    that point: extra work only in those rare cases, none in the common one.
``"masked"``
    Inside a :mod:`torch.func` transform (e.g. :func:`torch.func.vmap` over tasks), where nothing
    can be read back: exactly ``max_iter`` steps, a solve that reached the threshold or broke down
    frozen with :func:`torch.where` from then on. The outcome is unknown there (``UNCHECKED``).

Each family names the outcome in its own vocabulary (:class:`bilevel.SolverStatus`,
:class:`bilevel.LinearSolveStatus`) and builds its own result from a :class:`Run`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import torch

__all__ = ["Outcome", "Iteration", "Run", "drive"]


class Outcome(enum.Enum):
    """Why the driver stopped, before a family names it in its own status vocabulary."""

    CONVERGED = "converged"  # the residual reached the threshold
    MAX_ITER = "max_iter"  # max_iter steps taken
    NONFINITE = "nonfinite"  # a measurement was NaN or inf: the last finite state is kept
    BREAKDOWN = "breakdown"  # the method flagged its last step: the step is discarded
    HALTED = "halted"  # the state asked to stop (e.g. a failed line search); see Run.halt
    DIVERGED = "diverged"  # the method's divergence test fired
    UNCHECKED = "unchecked"  # masked: nothing read back


class Iteration:
    """A method bound to its problem, as the driver sees it. Subclasses implement :meth:`step` and :meth:`measure`."""

    def step(self, state: Any, k: int) -> tuple[Any, torch.Tensor | None]:
        """One step from ``state`` (the ``k``-th): ``(next state, breakdown)``.

        ``breakdown`` is a 0-d bool tensor (True: discard this step and stop) or None. A step that
        may run deferred or masked must not read values back (no ``float()``, ``bool()``, ``.item()``),
        and must be a function of its state (the same state gives the same step): a deferred run
        that stopped early replays its steps.
        """
        raise NotImplementedError

    def measure(self, state: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(residual norm, value or None)`` of a state, as 0-d tensors."""
        raise NotImplementedError

    def measure_many(self, states: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`measure` of several states at once, as 1-D tensors (deferred runs measure in batches).

        Override it with one fused operation where that is cheaper (the inner solvers: one
        ``torch._foreach_norm`` over the gradients instead of a norm per step), and :meth:`batch`
        to say how many states may wait to be measured.
        """
        pairs = [self.measure(s) for s in states]
        values = [v for _, v in pairs]
        return (torch.stack([r for r, _ in pairs]),
                None if values[0] is None else torch.stack(values))

    def batch(self, state: Any) -> int:
        """How many states a deferred run keeps before measuring them together (default 1: each at once)."""
        return 1

    def halt(self, state: Any) -> Any:
        """A reason carried by the state to stop after it (synced only), or None."""
        return None

    def record(self, state: Any) -> dict:
        """Per-step facts for the history, from the state a step produced."""
        return {}

    def diverging(self, residual: float, residual0: float) -> bool:
        """Tested after every step: whether to stop now as diverged (default: never)."""
        return False

    def diverged(self, residuals: list[float], values: list[float]) -> bool:
        """Tested once, when a run ends at ``max_iter``: whether it diverged (default: no)."""
        return False


@dataclasses.dataclass
class Run:
    """What :func:`drive` returns.

    ``state`` is the state to report (finite, never a discarded step); ``last`` the last state
    computed, kept or discarded (the discarded step of a breakdown); ``steps`` the steps taken
    (a discarded step not counted); ``residuals`` / ``values`` one float per finite iterate
    (empty when masked); ``records`` one dict per step taken; ``halt`` what :meth:`Iteration.halt`
    said; ``flags`` (masked only) ``{"breakdown": bool tensor}``.
    """

    state: Any
    last: Any
    steps: int
    outcome: Outcome
    residuals: list[float] = dataclasses.field(default_factory=list)
    values: list[float] = dataclasses.field(default_factory=list)
    records: list[dict] = dataclasses.field(default_factory=list)
    halt: Any = None
    flags: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def drive(it: Iteration, state: Any, *, max_iter: int, threshold: float | torch.Tensor | None,
          mode: str = "synced") -> Run:
    """Run ``it`` from ``state`` for at most ``max_iter`` steps; stop when the residual is ``<= threshold``.

    ``threshold`` is a float for ``"synced"`` and ``"deferred"``; for ``"masked"`` a tensor, a float, or
    None (no convergence test: a plain loop unless the method can break down).
    """
    if mode == "synced":
        return _synced(it, state, max_iter, float(threshold))
    if mode == "deferred":
        return _deferred(it, state, max_iter, float(threshold))
    if mode == "masked":
        return _masked(it, state, max_iter, threshold)
    raise ValueError(f"unknown mode {mode!r}; use 'synced', 'deferred' or 'masked'.")


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def _synced(it: Iteration, state: Any, max_iter: int, threshold: float) -> Run:
    residuals: list[float] = []
    values: list[float] = []
    records: list[dict] = []
    good = last = state
    k = 0
    while True:
        res, val = it.measure(state)
        res = res.item()
        val = None if val is None else val.item()
        if not _finite(res, val):
            return Run(good, state, k, Outcome.NONFINITE, residuals, values, records)
        residuals.append(res)
        values.append(math.nan if val is None else val)
        good = state
        if res <= threshold:
            return Run(state, last, k, Outcome.CONVERGED, residuals, values, records)
        halt = it.halt(state)
        if halt is not None:
            return Run(state, last, k, Outcome.HALTED, residuals, values, records, halt=halt)
        if k > 0 and it.diverging(res, residuals[0]):
            return Run(state, last, k, Outcome.DIVERGED, residuals, values, records)
        if k >= max_iter:
            outcome = Outcome.DIVERGED if it.diverged(residuals, values) else Outcome.MAX_ITER
            return Run(state, last, k, outcome, residuals, values, records)
        new, broke = it.step(state, k)
        last = new
        if broke is not None and bool(broke):
            return Run(state, new, k, Outcome.BREAKDOWN, residuals, values, records)
        records.append(it.record(new))
        state = new
        k += 1


def _deferred(it: Iteration, state: Any, max_iter: int, threshold: float) -> Run:
    start = state
    res_t, val_t, records = [], [], []
    breaks = []  # a step flagged here is not frozen out: the analysis stops before it, and the state is replayed
    batch = it.batch(state)
    pending: list[Any] = []  # states waiting to be measured together
    for k in range(max_iter + 1):
        pending.append(state)
        if len(pending) >= batch or k == max_iter:
            res, val = it.measure_many(pending)
            pending = []
            res_t.append(res)
            if val is not None:
                val_t.append(val)
        if k == max_iter:
            break
        new, broke = it.step(state, k)
        if broke is not None:
            breaks.append(broke)
        records.append(it.record(new))
        state = new
    res = torch.cat(res_t)
    vals = torch.cat(val_t) if val_t else None
    dtype = res.dtype if vals is None else torch.promote_types(res.dtype, vals.dtype)  # exact: no rounding
    parts = [res.to(dtype)] + ([vals.to(dtype)] if val_t else []) + ([torch.stack(breaks).to(dtype)] if breaks else [])
    table = torch.cat(parts).tolist()  # the read-back, once
    n = res.numel()
    res_l = table[:n]
    val_l = table[n:2 * n] if val_t else None
    brk_l = [bool(v) for v in table[-len(breaks):]] if breaks else None
    residuals: list[float] = []
    values: list[float] = []
    outcome, k = Outcome.MAX_ITER, max_iter
    for j, res in enumerate(res_l):
        val = None if val_l is None else val_l[j]
        if not _finite(res, val):
            outcome, k = Outcome.NONFINITE, j
            break
        residuals.append(res)
        values.append(math.nan if val is None else val)
        if res <= threshold:
            outcome, k = Outcome.CONVERGED, j
            break
        if j > 0 and it.diverging(res, residuals[0]):
            outcome, k = Outcome.DIVERGED, j
            break
        if j < max_iter and brk_l is not None and brk_l[j]:
            outcome, k = Outcome.BREAKDOWN, j
            break
    if outcome is Outcome.MAX_ITER:
        if it.diverged(residuals, values):
            outcome = Outcome.DIVERGED
        return Run(state, state, k, outcome, residuals, values, records)
    # stopped early: replay up to the state to report (the last finite one for a non-finite stop), and
    # the step after it where that step is the method's evidence (the discarded step of a breakdown)
    keep = k - 1 if outcome is Outcome.NONFINITE else k
    good = _replay(it, start, 0, keep)
    last = _replay(it, good, keep, 1) if outcome in (Outcome.NONFINITE, Outcome.BREAKDOWN) else good
    return Run(good, last, k, outcome, residuals, values, records[:k])


def _replay(it: Iteration, state: Any, k0: int, steps: int) -> Any:
    for k in range(k0, k0 + max(steps, 0)):
        state, _ = it.step(state, k)
    return state


def _masked(it: Iteration, state: Any, max_iter: int, threshold: float | torch.Tensor | None) -> Run:
    done = None if threshold is None else it.measure(state)[0] <= threshold
    broke_any = None
    for k in range(max_iter):
        new, broke = it.step(state, k)
        if broke is not None:
            if done is None:
                done = torch.zeros_like(broke)
            broke_any = (~done & broke) if broke_any is None else broke_any | (~done & broke)
            done = done | broke
        state = new if done is None else _freeze(done, state, new)
        if threshold is not None:
            done = done | (it.measure(state)[0] <= threshold)
    flags = {} if broke_any is None else {"breakdown": broke_any}
    return Run(state, state, max_iter, Outcome.UNCHECKED, flags=flags)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _freeze(mask: torch.Tensor, keep: Any, new: Any) -> Any:
    """``new`` with every tensor replaced by ``keep``'s where ``mask`` holds (a dataclass state)."""
    names = _FIELDS.get(type(new))
    if names is None:
        names = _FIELDS[type(new)] = tuple(f.name for f in dataclasses.fields(new))
    changes = {}
    for name in names:
        a, b = getattr(keep, name), getattr(new, name)
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor):
            changes[name] = torch.where(mask, a, b)
        elif isinstance(b, dict) and isinstance(a, dict):
            changes[name] = {key: torch.where(mask, a[key], v) if isinstance(v, torch.Tensor)
                               and isinstance(a.get(key), torch.Tensor) else v for key, v in b.items()}
    return dataclasses.replace(new, **changes)
