"""Shared fixtures: float64 by default, a seeded generator, and per-solver tolerances."""

from __future__ import annotations

import pytest
import torch


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


