"""Shared pieces of the data loaders: errors, progress bars, argument checks and the tensor cache.

:class:`DatasetError` and :class:`FewShotSplits` are used by both data sets; the
cache helpers write preprocessed tensors atomically with a fingerprint of their
source (:func:`default_cache_dir` names the directory) and read them back only
when the fingerprint still matches, ignoring unreadable files with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..io import atomic_save as _atomic_torch_save

__all__ = ["DatasetError", "default_cache_dir", "FewShotSplits"]

logger = logging.getLogger(__package__)  # "applications.imaml.data", the logger of the former module

_CACHE_FORMAT = 1


class DatasetError(RuntimeError):
    """A data file exists but its content is not what the loader expects.

    Raised for a corrupt or truncated archive, an image that cannot be decoded,
    or counts (alphabets, characters, classes, images) that differ from the
    expected ones. The message names the file, what was wrong and what to do.
    """


def default_cache_dir() -> Path:
    """The directory for preprocessed data: ``$BILEVEL_CACHE`` or ``~/.cache/bilevel``.

    Returns
    -------
    pathlib.Path
        The directory (not created here).

    Examples
    --------
    >>> isinstance(default_cache_dir(), Path)
    True
    """
    return Path(os.environ.get("BILEVEL_CACHE") or "~/.cache/bilevel").expanduser()


# --------------------------------------------------------------------------- helpers


class _NoProgress:
    """Stand-in for a tqdm bar when progress is off or tqdm is not installed."""

    def __init__(self, iterable: Iterable | None = None, **_: Any) -> None:
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:  # noqa: D102 - tqdm's signature
        pass

    def close(self) -> None:  # noqa: D102
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _progress(iterable: Iterable | None = None, *, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm progress bar (stderr), or a silent stand-in when disabled or unavailable."""
    if not enabled:
        return _NoProgress(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency (the "apps" extra)
        return _NoProgress(iterable)
    return tqdm(iterable, **kwargs)


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_cache(obj: dict, path: Path) -> bool:
    """Write a cache file atomically; on an OS error, log a warning and go on uncached."""
    try:
        _atomic_torch_save(obj, path)
    except OSError as exc:
        logger.warning(
            "could not write the cache file %s (%s); the data is used without a cache and will be "
            "preprocessed again next time. Pass a writable cache_dir or set BILEVEL_CACHE.", path, exc)
        return False
    logger.info("wrote cache file %s", path)
    return True


def _read_cache(path: Path, fingerprint: str, *, mmap: bool = False) -> dict | None:
    """The cached dict at ``path`` if it exists, is readable and matches ``fingerprint``."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch.load raises many types for a truncated or foreign file
        logger.warning("ignoring the unreadable cache file %s (%s: %s); rebuilding it",
                       path, type(exc).__name__, exc)
        return None
    if not isinstance(obj, dict) or obj.get("format") != _CACHE_FORMAT:
        logger.warning("ignoring the cache file %s (unknown format); rebuilding it", path)
        return None
    if obj.get("fingerprint") != fingerprint:
        logger.info("the source of %s changed since it was written; preprocessing again", path)
        return None
    return obj



# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class FewShotSplits:
    """Meta-training, validation and meta-test class pools.

    Attributes
    ----------
    train, val, test : torch.Tensor
        ``uint8`` class pools of shape ``(C_split, n, ch, H, W)``. A split with
        no classes has ``C_split = 0``.
    class_names : dict[str, tuple[str, ...]]
        For each split name, the name of each class in pool order (Omniglot:
        ``"Alphabet/characterNN"``; mini-ImageNet: the WordNet id).
    class_indices : dict[str, torch.Tensor] or None
        Omniglot: for each split, the ``int64`` indices of its characters in
        :attr:`OmniglotData.images` (save them with results to document the
        split). ``None`` for datasets that come split (mini-ImageNet).
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    class_names: dict[str, tuple[str, ...]]
    class_indices: dict[str, torch.Tensor] | None = None

    def __getitem__(self, split: str) -> torch.Tensor:
        """The class pool of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in ("train", "val", "test"):
            raise KeyError(f"unknown split {split!r}; use 'train', 'val' or 'test'.")
        return getattr(self, split)
