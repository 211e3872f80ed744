"""The shared iteration driver (bilevel._loop): its three ways of running give one result."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bilevel._loop import Iteration, Outcome, drive


@dataclasses.dataclass
class S:
    x: torch.Tensor
    k: torch.Tensor


class Halving(Iteration):
    """x <- x / 2 (residual |x|), with optional events at given steps: a breakdown, a NaN, growth."""

    def __init__(self, breakdown_at=None, nan_at=None, grow=False):
        self.breakdown_at, self.nan_at, self.grow = breakdown_at, nan_at, grow
        self.steps_taken = 0

    def step(self, state, k):
        self.steps_taken += 1
        x = state.x * (3.0 if self.grow else 0.5)
        if self.nan_at is not None and k == self.nan_at:
            x = x * float("nan")
        broke = None if self.breakdown_at is None else (state.k == self.breakdown_at)
        return S(x, state.k + 1), broke

    def measure(self, state):
        return state.x.abs().sum(), None

    def record(self, state):
        return {"k": int(state.k)}

    def diverging(self, residual, residual0):
        return residual > 100 * residual0


def start():
    return S(torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor(0))


CASES = {
    "max_iter": ({}, 0.0, Outcome.MAX_ITER, 8),
    "converged": ({}, 0.1, Outcome.CONVERGED, 5),  # 3 * 2^-5 < 0.1
    "breakdown": ({"breakdown_at": 3}, 0.0, Outcome.BREAKDOWN, 3),
    "nonfinite": ({"nan_at": 4}, 0.0, Outcome.NONFINITE, 5),
    "diverged": ({"grow": True}, 0.0, Outcome.DIVERGED, 5),  # 3^5 > 100
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deferred_equals_synced(case):
    options, threshold, outcome, steps = CASES[case]
    runs = {mode: drive(Halving(**options), start(), max_iter=8, threshold=threshold, mode=mode)
            for mode in ("synced", "deferred")}
    for run in runs.values():
        assert run.outcome is outcome and run.steps == steps
        assert torch.isfinite(run.state.x).all()
    a, b = runs["synced"], runs["deferred"]
    assert torch.equal(a.state.x, b.state.x) and torch.equal(a.state.k, b.state.k)
    assert a.residuals == b.residuals and a.records == b.records and len(a.records) == a.steps
    assert torch.equal(a.last.k, b.last.k)  # the discarded step of a breakdown is the same one
    assert all(math.isnan(v) for v in a.values)  # no value measured: NaN, not a made-up number


def test_masked_freezes_at_the_threshold_and_at_a_breakdown_and_flags_it():
    run = drive(Halving(), start(), max_iter=8, threshold=torch.tensor(0.1, dtype=torch.float64), mode="masked")
    assert run.outcome is Outcome.UNCHECKED and int(run.state.k) == 5  # frozen once converged
    run = drive(Halving(breakdown_at=3), start(), max_iter=8, threshold=None, mode="masked")
    assert int(run.state.k) == 3 and bool(run.flags["breakdown"])
    run = drive(Halving(), start(), max_iter=8, threshold=None, mode="masked")
    assert int(run.state.k) == 8 and run.flags == {}


def test_deferred_runs_the_budget_then_replays_only_after_an_early_stop():
    it = Halving()
    drive(it, start(), max_iter=8, threshold=0.0, mode="deferred")
    assert it.steps_taken == 8
    it = Halving(nan_at=4)
    drive(it, start(), max_iter=8, threshold=0.0, mode="deferred")
    assert it.steps_taken == 8 + 5  # the budget, then 4 steps to the last finite state and the failing one


def test_halt_stops_the_synced_loop_after_the_state_that_asks():
    class Halts(Halving):
        def halt(self, state):
            return "stop" if int(state.k) == 2 else None
    run = drive(Halts(), start(), max_iter=8, threshold=0.0, mode="synced")
    assert (run.outcome, run.halt, run.steps) == (Outcome.HALTED, "stop", 2)


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        drive(Halving(), start(), max_iter=1, threshold=0.0, mode="fast")
