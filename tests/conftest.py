"""Shared fixtures: float64 by default, a seeded generator, and per-solver tolerances."""

from __future__ import annotations

import pytest
import torch

# The test problems are small: one thread avoids OpenMP oversubscription on a shared 2-core machine,
# which made small convolutions 50x slower when another process was busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, so every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(1234)




@pytest.fixture
def float32_default():
    """float32 as the default dtype, as the few-shot application runs (like on a GPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def compiled_or_skip():
    """``run(fn)``: call fn; skip the test, saying why, where this machine cannot compile at all (torch.compile's
    CPU backend needs a C++ toolchain), which the library reports with a CompileWarning before running eagerly."""
    import warnings

    import bilevel as bl

    def run(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", bl.CompileWarning)
            out = fn()
        failed = [w for w in caught if issubclass(w.category, bl.CompileWarning)]
        if failed:
            pytest.skip(f"torch.compile cannot compile on this machine: {failed[0].message}")
        return out
    return run
