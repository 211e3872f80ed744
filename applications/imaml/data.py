"""Few-shot image data: Omniglot and mini-ImageNet class pools, and N-way K-shot episodes.

The data side of the MAML line of work, built so that an episode costs an index
into an in-memory tensor, never a PNG decode:

1. :func:`load_omniglot` reads the two official Omniglot archives (zip files or
   their extracted folders), checks their content by counts, decodes and resizes
   every image once and caches the result as one ``uint8`` tensor file.
   :meth:`OmniglotData.split` makes the standard seeded 1200 / 423 character split.
2. :func:`load_mini_imagenet` reads mini-ImageNet in either of its two usual
   formats (CSV + images, or the pickled caches) into per-split ``uint8`` pools,
   cached per split and memory-mapped on load.
3. :class:`EpisodeSampler` draws batches of N-way K-shot episodes (support and
   query sets) from a class pool, with optional rotation classes, on any device,
   from its own seeded generator whose state can be saved and restored.

Data conventions
----------------
A *class pool* is a ``uint8`` tensor of shape ``(C, n, ch, H, W)``: ``C``
classes, ``n`` images per class. Samplers turn it into ``float32`` in
``[0, 1]``.

* **Omniglot is stored inverted**: 255 (1.0) is ink, 0 is background, as in the
  MAML reference code (which computes ``1 - image``). Zero background makes
  rotations, zero padding and sparsity behave naturally.
* **Omniglot resize filter**: each 1-bit 105x105 PNG is converted to 8-bit grey
  and resized with Pillow's LANCZOS filter (antialiased, grey levels at stroke
  edges). Note that the MAML-era preprocessing scripts call
  ``resize((28, 28), resample=LANCZOS)`` on the 1-bit image, for which Pillow
  silently uses NEAREST; ``resample="nearest"`` reproduces those binary images.
* **Omniglot order**: characters are ordered by the global character id in the
  file names (``IIII_DD.png``: 0001-0964 background, 0965-1623 evaluation),
  drawings by drawer ``DD``.
* **Split** (:meth:`OmniglotData.split`): a seeded permutation of the 1623
  characters from ``numpy.random.RandomState(seed)`` (seed 0 by default), whose
  stream NumPy keeps frozen across versions, so a seed names the same split
  everywhere. The first 1200 characters are for meta-training (a validation
  slice, if asked for, is carved from them), the other 423 for meta-test.
* **Rotations** (:class:`EpisodeSampler` ``rotations=True``): every class also
  appears rotated by 90, 180 and 270 degrees as three further classes (1200 x 4
  = 4800 meta-training classes). Rotation is applied at sampling time with
  :func:`torch.rot90`, not stored. The standard protocol uses rotations for
  meta-training only.

Caches
------
Preprocessed tensors are written to ``cache_dir`` (default:
:func:`default_cache_dir`, i.e. ``$BILEVEL_CACHE`` or ``~/.cache/bilevel``)
atomically (a temporary file in the same directory, then :func:`os.replace`),
together with a fingerprint of the source files; a changed source is
preprocessed again. An unreadable cache file is ignored (with a warning) and
rebuilt; an unwritable cache directory only costs the preprocessing next time.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import numbers
import os
import pickle
import re
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import torch

from .io import atomic_save as _atomic_torch_save

__all__ = [
    "DatasetError",
    "default_cache_dir",
    "OMNIGLOT_URL",
    "OMNIGLOT_SETS",
    "OMNIGLOT_COUNTS",
    "OmniglotData",
    "FewShotSplits",
    "load_omniglot",
    "download_omniglot",
    "MINI_IMAGENET_SPLITS",
    "MINI_IMAGENET_COUNTS",
    "load_mini_imagenet",
    "Episode",
    "EpisodeSampler",
]

logger = logging.getLogger(__name__)

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
"""Download URL of an official Omniglot archive; ``{name}`` is one of :data:`OMNIGLOT_SETS`."""

OMNIGLOT_SETS = ("images_background", "images_evaluation")
"""The two Omniglot sets, in character-id order."""

OMNIGLOT_COUNTS: Mapping[str, tuple[int, int, int]] = {
    "images_background": (30, 964, 20),
    "images_evaluation": (20, 659, 20),
}
"""Expected ``(alphabets, characters, drawings per character)`` of each Omniglot set."""

# md5 of the official archives as served by OMNIGLOT_URL; only checked on download,
# because rebuilt copies with identical PNGs (e.g. ../shared/data/omniglot) differ.
_OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}

MINI_IMAGENET_SPLITS = ("train", "val", "test")
"""The three mini-ImageNet splits (classes are disjoint between them)."""

MINI_IMAGENET_COUNTS: Mapping[str, tuple[int, int]] = {
    "train": (64, 600),
    "val": (16, 600),
    "test": (20, 600),
}
"""Expected ``(classes, images per class)`` of each mini-ImageNet split (Ravi & Larochelle)."""

_CACHE_FORMAT = 1
_RESAMPLE_NAMES = ("lanczos", "bilinear", "nearest")
_OMNIGLOT_FILE = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)


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


# --------------------------------------------------------------------------- Omniglot


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


@dataclass(frozen=True)
class OmniglotData:
    """All Omniglot characters, preprocessed (see :func:`load_omniglot`).

    Attributes
    ----------
    images : torch.Tensor
        ``uint8`` tensor of shape ``(num_characters, drawings, 1, S, S)`` in
        character-id order; 255 is ink, 0 is background (inverted PNGs).
    character_names : tuple[str, ...]
        ``"Alphabet/characterNN"`` for each character.
    alphabet_names : tuple[str, ...]
        The alphabets, in order of their first character.
    alphabet_ids : torch.Tensor
        ``int64`` tensor ``(num_characters,)``: each character's index into
        :attr:`alphabet_names`.
    num_background : int
        The first ``num_background`` characters come from ``images_background``,
        the rest from ``images_evaluation``.
    resample : str
        The resize filter used (``"lanczos"``, ``"bilinear"`` or ``"nearest"``).
    """

    images: torch.Tensor
    character_names: tuple[str, ...]
    alphabet_names: tuple[str, ...]
    alphabet_ids: torch.Tensor
    num_background: int
    resample: str = "lanczos"

    @property
    def num_characters(self) -> int:
        """Number of characters (1623 for the full data)."""
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        """Side ``S`` of the square images."""
        return int(self.images.shape[-1])

    def split(self, *, train_characters: int = 1200, val_characters: int = 0,
              seed: int = 0) -> FewShotSplits:
        """The standard seeded character split of the MAML line of work.

        A permutation of all characters drawn from
        ``numpy.random.RandomState(seed)`` (a stream NumPy keeps frozen across
        versions): its first ``train_characters`` characters are for
        meta-training, the rest for meta-test. The last ``val_characters`` of
        the meta-training characters are held out as a validation split, so the
        meta-test characters do not depend on ``val_characters``. Each pool
        keeps character-id order.

        Parameters
        ----------
        train_characters : int, default 1200
            Characters for meta-training plus validation.
        val_characters : int, default 0
            How many of those to hold out for validation (e.g. 100).
        seed : int, default 0
            Seed of the permutation; the same seed always gives the same split.

        Returns
        -------
        FewShotSplits
            ``train`` (``train_characters - val_characters`` characters),
            ``val`` and ``test`` (``num_characters - train_characters``) pools,
            with names and indices. Rotations are not stored: ask
            :class:`EpisodeSampler` for them (``rotations=True`` for
            meta-training in the standard protocol).

        Raises
        ------
        ValueError
            If the sizes do not fit in the number of characters.

        Examples
        --------
        >>> data = OmniglotData(torch.zeros(10, 20, 1, 28, 28, dtype=torch.uint8),
        ...                     tuple(f"A/character{i:02d}" for i in range(1, 11)), ("A",),
        ...                     torch.zeros(10, dtype=torch.int64), 10)
        >>> s = data.split(train_characters=8, val_characters=2, seed=0)
        >>> s.train.shape[0], s.val.shape[0], s.test.shape[0]
        (6, 2, 2)
        """
        c = self.num_characters
        train_characters = _check_int(train_characters, "train_characters", minimum=1)
        val_characters = _check_int(val_characters, "val_characters", minimum=0)
        seed = _check_int(seed, "seed", minimum=0)
        if train_characters > c:
            raise ValueError(
                f"train_characters={train_characters} is larger than the {c} characters loaded; "
                f"pass train_characters <= {c}.")
        if val_characters >= train_characters:
            raise ValueError(
                f"val_characters={val_characters} must be smaller than train_characters="
                f"{train_characters}: validation characters are carved from the training ones.")
        perm = torch.from_numpy(np.random.RandomState(seed).permutation(c).astype(np.int64))
        n_fit = train_characters - val_characters
        idx = {
            "train": perm[:n_fit].sort().values,
            "val": perm[n_fit:train_characters].sort().values,
            "test": perm[train_characters:].sort().values,
        }
        return FewShotSplits(
            train=self.images[idx["train"]],
            val=self.images[idx["val"]],
            test=self.images[idx["test"]],
            class_names={k: tuple(self.character_names[i] for i in v.tolist()) for k, v in idx.items()},
            class_indices=idx,
        )


@dataclass(frozen=True)
class _OmniglotSource:
    set_name: str
    path: Path
    kind: str  # "zip" or "folder"


@dataclass
class _Character:
    set_index: int
    alphabet: str
    name: str
    files: list  # (sort key, zip entry name or Path)
    char_id: int | None = None


def _omniglot_url(set_name: str) -> str:
    return OMNIGLOT_URL.format(name=set_name)


def _find_omniglot_source(data_dir: Path, set_name: str) -> _OmniglotSource | None:
    """The archive or extracted folder of ``set_name`` under ``data_dir`` (zip preferred)."""
    for base in (data_dir, data_dir / "omniglot-py"):  # the second is torchvision's layout
        z = base / f"{set_name}.zip"
        if z.is_file():
            return _OmniglotSource(set_name, z, "zip")
        d = base / set_name
        if d.is_dir():
            if (d / set_name).is_dir():  # a zip extracted into a folder of its own name
                d = d / set_name
            return _OmniglotSource(set_name, d, "folder")
    return None


def _missing_message(data_dir: Path, missing: list[str]) -> str:
    files = " and ".join(f"{s}.zip" for s in missing)
    folders = " and ".join(f"{s}/" for s in missing)
    urls = " and ".join(_omniglot_url(s) for s in missing)
    return (
        f"Omniglot not found in {str(data_dir)!r}: missing {files} (or the extracted folder(s) "
        f"{folders}). Put the official archives images_background.zip and images_evaluation.zip "
        f"(or their extracted folders) in {str(data_dir)!r}: download {urls}, or call "
        f"load_omniglot(..., download=True) on a machine with network access."
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _corrupt_hint(source: _OmniglotSource) -> str:
    what = "archive" if source.kind == "zip" else "folder"
    return (f"delete the {what} {str(source.path)!r} and download it again from "
            f"{_omniglot_url(source.set_name)} (or load_omniglot(..., download=True) after deleting it)")


def _download(url: str, dest: Path, *, progress: bool, timeout: float) -> str:
    """Download ``url`` to ``dest`` atomically (temporary file + ``os.replace``); return its md5."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
            total = int(length) if length and str(length).isdigit() else None
            got = 0
            bar = _progress(enabled=progress, total=total, desc=dest.name, unit="B",
                            unit_scale=True, unit_divisor=1024)
            try:
                while block := resp.read(1 << 16):
                    f.write(block)
                    md5.update(block)
                    got += len(block)
                    bar.update(len(block))
            finally:
                bar.close()
            f.flush()
            os.fsync(f.fileno())
        if total is not None and got != total:
            raise OSError(f"the connection closed after {got} of {total} bytes")
        if not zipfile.is_zipfile(tmp):
            raise OSError("the downloaded file is not a zip archive")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return md5.hexdigest()


def download_omniglot(data_dir: str | os.PathLike, *, progress: bool = True,
                      timeout: float = 60.0) -> list[Path]:
    """Download the official Omniglot archives that ``data_dir`` lacks.

    Each archive goes to a temporary file in ``data_dir`` and is moved into place
    (:func:`os.replace`) only once complete. Sets already present (as a zip or
    an extracted folder) are not downloaded again.

    Parameters
    ----------
    data_dir : str or os.PathLike
        Where ``images_background.zip`` and ``images_evaluation.zip`` go
        (created if needed).
    progress : bool, default True
        Show a tqdm progress bar per file.
    timeout : float, default 60.0
        Socket timeout in seconds.

    Returns
    -------
    list[pathlib.Path]
        The archives downloaded (empty if nothing was missing).

    Raises
    ------
    FileNotFoundError
        If a download fails (no network, HTTP error, truncated file); the
        message says where to put which files by hand.

    Examples
    --------
    >>> download_omniglot("data/omniglot")  # doctest: +SKIP
    [PosixPath('data/omniglot/images_background.zip'), PosixPath('data/omniglot/images_evaluation.zip')]
    """
    data_dir = Path(data_dir).expanduser()
    missing = [s for s in OMNIGLOT_SETS if _find_omniglot_source(data_dir, s) is None]
    done = []
    for set_name in missing:
        url, dest = _omniglot_url(set_name), data_dir / f"{set_name}.zip"
        logger.info("downloading %s to %s", url, dest)
        try:
            md5 = _download(url, dest, progress=progress, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            still = [s for s in missing if not (data_dir / f"{s}.zip").is_file()]
            raise FileNotFoundError(
                f"{_missing_message(data_dir, still)} (The download of {url} failed: {exc}.)") from exc
        if md5 != _OMNIGLOT_MD5[set_name]:
            logger.warning("%s has md5 %s, not the official %s; its content is verified by counts "
                           "when it is loaded", dest, md5, _OMNIGLOT_MD5[set_name])
        done.append(dest)
    return done


def _scan_omniglot(source: _OmniglotSource, set_index: int) -> tuple[list[_Character], list[tuple]]:
    """The characters of one set and a listing for the fingerprint (folders only)."""
    groups: dict[tuple[str, str], list] = {}
    listing: list[tuple] = []

    def add(parts: list[str], ref: Any, shown: str) -> None:
        if parts and parts[0] == source.set_name:
            parts = parts[1:]
        if len(parts) != 3:
            raise DatasetError(
                f"{str(source.path)!r}: unexpected image path {shown!r}; expected "
                f"{source.set_name}/<alphabet>/<character>/<id>_<drawer>.png as in the official "
                f"archive. {_sentence(_corrupt_hint(source))}.")
        groups.setdefault((parts[0], parts[1]), []).append((parts[2], ref))

    def skipped(parts: list[str]) -> bool:
        return any(p.startswith(".") or p == "__MACOSX" for p in parts) or not parts[-1].lower().endswith(".png")

    if source.kind == "zip":
        try:
            with zipfile.ZipFile(source.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DatasetError(
                f"{str(source.path)!r} is not a valid zip archive ({exc}); "
                f"{_corrupt_hint(source)}.") from exc
        for info in infos:
            if info.is_dir():
                continue
            parts = [p for p in info.filename.split("/") if p]
            if parts and not skipped(parts):
                add(parts, info.filename, info.filename)
    else:
        root = source.path
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            rel = Path(dirpath).relative_to(root).parts
            for fn in sorted(filenames):
                parts = [*rel, fn]
                if skipped(parts):
                    continue
                p = Path(dirpath) / fn
                st = p.stat()
                listing.append(("/".join(parts), st.st_size, st.st_mtime_ns))
                add(parts, p, "/".join(parts))

    chars = []
    for (alphabet, name), files in groups.items():
        matches = [_OMNIGLOT_FILE.match(fn) for fn, _ in files]
        ids = {int(m.group(1)) for m in matches if m}
        char_id = ids.pop() if len(ids) == 1 and all(matches) else None
        keyed = sorted(((int(m.group(2)) if m else 10**9, fn), ref) for m, (fn, ref) in zip(matches, files))
        chars.append(_Character(set_index, alphabet, name, keyed, char_id))
    return chars, listing


def _check_omniglot_counts(set_name: str, where: str, n_alphabets: int, n_characters: int,
                           drawings: list[tuple[str, int]], expected: Mapping | None) -> None:
    """Raise DatasetError if a set's counts differ from ``expected[set_name]``."""
    if n_characters == 0:
        raise DatasetError(f"{where}: no PNG images found in {set_name}; the archive or folder is empty "
                           f"or has an unexpected layout.")
    problems = []
    exp = None if expected is None else expected.get(set_name)
    if exp is not None:
        e_alph, e_char, e_draw = exp
        if n_alphabets != e_alph:
            problems.append(f"expected {e_alph} alphabets in {set_name}, found {n_alphabets}")
        if n_characters != e_char:
            problems.append(f"expected {e_char} characters in {set_name}, found {n_characters}")
        bad = [(c, k) for c, k in drawings if k != e_draw]
        if bad:
            problems.append(f"expected {e_draw} drawings per character in {set_name}, found "
                            f"{bad[0][1]} in {bad[0][0]}" + (f" (and {len(bad) - 1} more characters)"
                                                              if len(bad) > 1 else ""))
    if problems:
        raise DatasetError(
            f"{where}: {'; '.join(problems)}. The data is incomplete or corrupt: {_corrupt_hint_text(set_name)}; "
            f"for a deliberately partial data set pass expected_counts=None (or your own table).")


def _corrupt_hint_text(set_name: str) -> str:
    return (f"delete it and download {set_name}.zip again from {_omniglot_url(set_name)} "
            f"(or load_omniglot(..., download=True) after deleting it)")


def _decode_omniglot_png(data: bytes, size: int, resample: str, what: str, hint: str) -> np.ndarray:
    """One Omniglot PNG as an inverted (ink = 255) ``uint8`` array of shape ``(size, size)``."""
    from PIL import Image

    filters = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST}
    try:
        with Image.open(io.BytesIO(data)) as im:
            if resample == "nearest":
                im = im.resize((size, size), filters["nearest"]) if im.size != (size, size) else im
                im = im.convert("L")
            else:
                im = im.convert("L")
                if im.size != (size, size):
                    im = im.resize((size, size), filters[resample])
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot decode the image {what} ({exc}); {hint}.") from exc
    return 255 - arr


def load_omniglot(data_dir: str | os.PathLike, *, image_size: int = 28,
                  cache_dir: str | os.PathLike | None = None, download: bool = False,
                  progress: bool = True, resample: str = "lanczos",
                  expected_counts: Mapping[str, tuple[int, int, int]] | None = OMNIGLOT_COUNTS,
                  ) -> OmniglotData:
    """Load all Omniglot characters as one preprocessed ``uint8`` tensor, cached on disk.

    Reads ``images_background`` and ``images_evaluation`` from ``data_dir``,
    each as the official zip archive (read directly, no extraction) or as its
    extracted folder (``data_dir/omniglot-py/`` is searched too, torchvision's
    layout). The content is verified by counts, not checksums, so rebuilt
    archives with the original PNGs work. The first call decodes and resizes
    every PNG (about 32k images: tens of seconds) and writes
    ``<cache_dir>/omniglot_<S>x<S>.pt``; later calls load that file (well under
    a second) as long as the source is unchanged (fingerprint: sha256 of each
    zip, or path, size and mtime of every PNG of a folder).

    Parameters
    ----------
    data_dir : str or os.PathLike
        Directory holding ``images_background.zip`` and ``images_evaluation.zip``
        (or the folders ``images_background/`` and ``images_evaluation/``).
    image_size : int, default 28
        Side ``S`` of the resized square images (105 keeps the originals).
    cache_dir : str or os.PathLike, optional
        Where the preprocessed tensor file goes; default :func:`default_cache_dir`.
    download : bool, default False
        Download missing archives from :data:`OMNIGLOT_URL` into ``data_dir``.
    progress : bool, default True
        Show tqdm progress bars for downloading and preprocessing.
    resample : {"lanczos", "bilinear", "nearest"}, default "lanczos"
        Resize filter. ``"lanczos"`` and ``"bilinear"`` resize the 8-bit grey
        image (antialiased); ``"nearest"`` resizes the 1-bit image, which gives
        the binary images of the MAML-era preprocessing scripts. Other filters
        than LANCZOS are cached as ``omniglot_<S>x<S>_<resample>.pt``.
    expected_counts : mapping or None, default OMNIGLOT_COUNTS
        ``{set name: (alphabets, characters, drawings per character)}`` to
        verify; ``None`` skips the check (for custom or partial data). Every
        character must have the same number of drawings in any case.

    Returns
    -------
    OmniglotData
        ``images`` of shape ``(1623, 20, 1, S, S)`` (``uint8``, 255 = ink) in
        character-id order, with character and alphabet names.

    Raises
    ------
    FileNotFoundError
        If a set is missing and ``download`` is False or the download fails;
        the message names the directory, the files and the URLs.
    DatasetError
        If an archive is not a valid zip, an image cannot be decoded, or the
        counts differ from ``expected_counts``; the message names the file.

    Examples
    --------
    >>> data = load_omniglot("../shared/data/omniglot")  # doctest: +SKIP
    >>> data.images.shape  # doctest: +SKIP
    torch.Size([1623, 20, 1, 28, 28])
    >>> splits = data.split(seed=0)  # doctest: +SKIP
    >>> splits.train.shape[0], splits.test.shape[0]  # doctest: +SKIP
    (1200, 423)
    >>> sampler = EpisodeSampler(splits.train, n_way=20, k_shot=5, k_query=5,
    ...                          rotations=True)  # doctest: +SKIP
    """
    data_dir = Path(data_dir).expanduser()
    image_size = _check_int(image_size, "image_size", minimum=1)
    if resample not in _RESAMPLE_NAMES:
        raise ValueError(f"unknown resample {resample!r}; available: {', '.join(_RESAMPLE_NAMES)}.")
    if expected_counts is not None and not isinstance(expected_counts, Mapping):
        raise TypeError(f"expected_counts must be a mapping like OMNIGLOT_COUNTS or None, "
                        f"got {type(expected_counts).__name__}.")

    sources = {s: _find_omniglot_source(data_dir, s) for s in OMNIGLOT_SETS}
    missing = [s for s, src in sources.items() if src is None]
    if missing:
        if not download:
            raise FileNotFoundError(_missing_message(data_dir, missing))
        download_omniglot(data_dir, progress=progress)
        sources = {s: _find_omniglot_source(data_dir, s) for s in OMNIGLOT_SETS}
        missing = [s for s, src in sources.items() if src is None]
        if missing:  # pragma: no cover - download_omniglot raises first
            raise FileNotFoundError(_missing_message(data_dir, missing))

    t0 = time.perf_counter()
    h = hashlib.sha256(f"omniglot|v{_CACHE_FORMAT}|{image_size}|{resample}".encode())
    scans: dict[str, tuple[list[_Character], list]] = {}
    for i, (set_name, src) in enumerate(sources.items()):
        h.update(f"|{set_name}|{src.kind}|".encode())
        if src.kind == "zip":
            h.update(_sha256_file(src.path).encode())
        else:
            scans[set_name] = _scan_omniglot(src, i)
            h.update(repr(scans[set_name][1]).encode())
    fingerprint = h.hexdigest()

    suffix = "" if resample == "lanczos" else f"_{resample}"
    cache_path = _resolve_cache_dir(cache_dir) / f"omniglot_{image_size}x{image_size}{suffix}.pt"
    cached = _read_cache(cache_path, fingerprint)
    if cached is not None:
        try:
            data = _omniglot_from_cache(cached, resample)
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("ignoring the malformed cache file %s (%s); rebuilding it", cache_path, exc)
        else:
            for set_name, (n_alph, n_char) in cached["set_counts"].items():
                _check_omniglot_counts(set_name, str(sources[set_name].path), n_alph, n_char,
                                       [("every character", data.images.shape[1])], expected_counts)
            logger.info("loaded Omniglot %dx%d from the cache %s in %.2f s", image_size, image_size,
                        cache_path, time.perf_counter() - t0)
            return data

    # ---- preprocess: scan, verify counts, decode every PNG once
    characters: list[_Character] = []
    set_counts = {}
    for i, (set_name, src) in enumerate(sources.items()):
        chars = scans[set_name][0] if set_name in scans else _scan_omniglot(src, i)[0]
        _check_omniglot_counts(
            set_name, str(src.path), len({c.alphabet for c in chars}), len(chars),
            [(f"{c.alphabet}/{c.name}", len(c.files)) for c in chars], expected_counts)
        set_counts[set_name] = (len({c.alphabet for c in chars}), len(chars))
        characters.extend(chars)
    drawings = {len(c.files) for c in characters}
    if len(drawings) != 1:
        lo = min(characters, key=lambda c: len(c.files))
        hi = max(characters, key=lambda c: len(c.files))
        raise DatasetError(
            f"Omniglot characters in {str(data_dir)!r} have different numbers of drawings "
            f"({lo.alphabet}/{lo.name}: {len(lo.files)}, {hi.alphabet}/{hi.name}: {len(hi.files)}); "
            f"every character needs the same number. Restore the missing files or remove the extra ones.")
    n_draw = drawings.pop()

    if all(c.char_id is not None for c in characters):
        ids = [c.char_id for c in characters]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"Omniglot in {str(data_dir)!r}: two character folders use the same "
                               f"character id in their file names; restore the official archives.")
        characters.sort(key=lambda c: (c.set_index, c.char_id))
    else:
        logger.info("file names are not all <id>_<drawer>.png; ordering characters by folder name")
        characters.sort(key=lambda c: (c.set_index, c.alphabet, c.name))

    images = np.empty((len(characters), n_draw, 1, image_size, image_size), dtype=np.uint8)
    bar = _progress(enabled=progress, total=len(characters) * n_draw,
                    desc=f"Omniglot -> {image_size}x{image_size}", unit="img")
    try:
        zips = {s: zipfile.ZipFile(src.path) for s, src in sources.items() if src.kind == "zip"}
    except (zipfile.BadZipFile, OSError) as exc:  # pragma: no cover - scanned just before
        raise DatasetError(f"cannot open an Omniglot archive in {str(data_dir)!r} ({exc}).") from exc
    try:
        for ci, ch in enumerate(characters):
            src = sources[OMNIGLOT_SETS[ch.set_index]]
            for di, (_, ref) in enumerate(ch.files):
                if src.kind == "zip":
                    what = f"{ref!r} in {str(src.path)!r}"
                    try:
                        raw = zips[src.set_name].read(ref)
                    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                        raise DatasetError(f"cannot read {what} ({exc}); {_corrupt_hint(src)}.") from exc
                else:
                    what = repr(str(ref))
                    raw = Path(ref).read_bytes()
                images[ci, di, 0] = _decode_omniglot_png(raw, image_size, resample, what, _corrupt_hint(src))
                bar.update(1)
    finally:
        bar.close()
        for zf in zips.values():
            zf.close()

    alphabet_names: list[str] = []
    alphabet_index: dict[tuple[int, str], int] = {}
    for ch in characters:
        key = (ch.set_index, ch.alphabet)
        if key not in alphabet_index:
            alphabet_index[key] = len(alphabet_names)
            alphabet_names.append(ch.alphabet)
    obj = {
        "format": _CACHE_FORMAT,
        "fingerprint": fingerprint,
        "images": torch.from_numpy(images),
        "character_names": [f"{c.alphabet}/{c.name}" for c in characters],
        "alphabet_names": alphabet_names,
        "alphabet_ids": torch.tensor([alphabet_index[(c.set_index, c.alphabet)] for c in characters],
                                     dtype=torch.int64),
        "num_background": sum(1 for c in characters if c.set_index == 0),
        "set_counts": {k: list(v) for k, v in set_counts.items()},
    }
    logger.info("preprocessed %d Omniglot characters (%d images) in %.1f s", len(characters),
                len(characters) * n_draw, time.perf_counter() - t0)
    _write_cache(obj, cache_path)
    return _omniglot_from_cache(obj, resample)


def _omniglot_from_cache(obj: dict, resample: str) -> OmniglotData:
    images = obj["images"]
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 5:
        raise ValueError("images is not a uint8 tensor of 5 dimensions")
    names = tuple(obj["character_names"])
    if len(names) != images.shape[0]:
        raise ValueError("character_names does not match images")
    return OmniglotData(images=images, character_names=names,
                        alphabet_names=tuple(obj["alphabet_names"]),
                        alphabet_ids=obj["alphabet_ids"], num_background=int(obj["num_background"]),
                        resample=resample)


# --------------------------------------------------------------------------- mini-ImageNet


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only (a pickle can otherwise run code)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"), ("builtins", "bytearray"),
        ("_codecs", "encode"),  # how pickle protocols 0-2 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: a mini-ImageNet cache holds only NumPy arrays, "
            f"lists and dicts")


def _mini_missing_message(data_dir: Path, missing: list[str]) -> str:
    want = ", ".join(missing)
    return (
        f"mini-ImageNet split(s) {want} not found in {str(data_dir)!r}. Provide, for each split, either "
        + " or ".join([
            f"the pickled cache mini-imagenet-cache-<split>.pkl (a dict with 'image_data', a uint8 array "
            f"(N, 84, 84, 3), and 'class_dict', {{label: [indices]}})",
            f"<split>.csv (columns filename,label) with the images in {str(data_dir / 'images')!r}",
        ])
        + ", as in Ravi & Larochelle's split (64/16/20 classes of 600 images). mini-ImageNet cannot be "
        "downloaded automatically: its images are ImageNet's and come under ImageNet's terms of access."
    )


def _decode_rgb(data: bytes, size: int, what: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot decode the image {what} ({exc}); replace the file.") from exc
    return arr.transpose(2, 0, 1).copy()  # PIL's buffer is read-only


def _check_class_counts(where: str, split: str, counts: dict[str, int],
                        expected: Mapping | None) -> int:
    """Verify the number of classes and images per class; return the images per class."""
    if not counts:
        raise DatasetError(f"{where}: the {split} split has no images.")
    exp = None if expected is None else expected.get(split)
    problems = []
    if exp is not None:
        e_cls, e_img = exp
        if len(counts) != e_cls:
            problems.append(f"expected {e_cls} classes in the {split} split, found {len(counts)}")
        bad = [(k, v) for k, v in counts.items() if v != e_img]
        if bad:
            problems.append(f"expected {e_img} images per class in the {split} split, found {bad[0][1]} "
                            f"for class {bad[0][0]}" + (f" (and {len(bad) - 1} more classes)" if len(bad) > 1 else ""))
    if problems:
        raise DatasetError(f"{where}: {'; '.join(problems)}. The file is incomplete or not the standard "
                           f"split; restore it, or pass expected_counts=None for custom data.")
    sizes = set(counts.values())
    if len(sizes) != 1:
        lo, hi = min(counts, key=counts.get), max(counts, key=counts.get)
        raise DatasetError(f"{where}: classes of the {split} split have different numbers of images "
                           f"({lo}: {counts[lo]}, {hi}: {counts[hi]}); every class needs the same number.")
    return sizes.pop()


def _mini_from_pickle(path: Path, split: str, size: int, progress: bool,
                      expected: Mapping | None) -> tuple[torch.Tensor, list[str]]:
    try:
        with open(path, "rb") as f:
            obj = _NumpyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as exc:
        raise DatasetError(f"{str(path)!r} is not a readable mini-ImageNet pickle ({exc}); "
                           f"replace it with a good copy.") from exc
    if not isinstance(obj, dict) or "image_data" not in obj or "class_dict" not in obj:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DatasetError(f"{str(path)!r}: expected a dict with keys 'image_data' and 'class_dict', "
                           f"found {found}.")
    data, class_dict = obj["image_data"], obj["class_dict"]
    if not isinstance(data, np.ndarray) or data.ndim != 4 or data.shape[-1] != 3 or data.dtype != np.uint8:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{str(path)!r}: 'image_data' must be a uint8 array (N, H, W, 3), found {desc}.")
    if not isinstance(class_dict, dict):
        raise DatasetError(f"{str(path)!r}: 'class_dict' must be a dict {{label: [indices]}}, "
                           f"found {type(class_dict).__name__}.")
    labels = sorted(class_dict, key=str)
    index = {str(k): np.asarray(class_dict[k], dtype=np.int64).reshape(-1) for k in labels}
    per_class = _check_class_counts(str(path), split, {k: len(v) for k, v in index.items()}, expected)
    for k, v in index.items():
        if v.size and (v.min() < 0 or v.max() >= len(data)):
            raise DatasetError(f"{str(path)!r}: class {k} indexes images outside 0..{len(data) - 1}.")
    out = torch.empty((len(index), per_class, 3, size, size), dtype=torch.uint8)
    resize = data.shape[1:3] != (size, size)
    bar = _progress(enabled=progress and resize, total=len(index) * per_class,
                    desc=f"mini-ImageNet {split} -> {size}x{size}", unit="img")
    try:
        for c, (k, v) in enumerate(index.items()):
            block = data[v]
            if not resize:
                out[c] = torch.from_numpy(np.ascontiguousarray(block.transpose(0, 3, 1, 2)))
                continue
            from PIL import Image
            for j, img in enumerate(block):
                out[c, j] = torch.from_numpy(np.asarray(
                    Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS)).transpose(2, 0, 1).copy())
                bar.update(1)
    finally:
        bar.close()
    return out, [str(k) for k in index]


def _mini_csv_rows(path: Path) -> dict[str, list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "filename" not in fields or "label" not in fields:
                raise DatasetError(f"{str(path)!r}: expected the columns filename,label; found "
                                   f"{','.join(fields) or 'no header'}.")
            groups: dict[str, list[str]] = {}
            for row in reader:
                groups.setdefault(row["label"], []).append(row["filename"])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{str(path)!r} is not a readable CSV file ({exc}).") from exc
    return {k: groups[k] for k in sorted(groups)}


def _mini_image_path(data_dir: Path, label: str, filename: str) -> Path | None:
    for p in (data_dir / "images" / filename, data_dir / "images" / label / filename):
        if p.is_file():
            return p
    return None


def _mini_csv_files(data_dir: Path, csv_path: Path) -> dict[str, list[Path]]:
    groups = _mini_csv_rows(csv_path)
    files: dict[str, list[Path]] = {}
    missing = []
    for label, names in groups.items():
        files[label] = []
        for fn in names:
            p = _mini_image_path(data_dir, label, fn)
            if p is None:
                missing.append(fn)
            else:
                files[label].append(p)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {str(csv_path)!r} are missing from "
            f"{str(data_dir / 'images')!r} (e.g. {missing[0]!r}); put the mini-ImageNet images there "
            f"(flat, or in one folder per label).")
    return files


def _mini_from_csv(files: dict[str, list[Path]], csv_path: Path, split: str, size: int,
                   progress: bool, expected: Mapping | None) -> tuple[torch.Tensor, list[str]]:
    per_class = _check_class_counts(str(csv_path), split, {k: len(v) for k, v in files.items()}, expected)
    out = torch.empty((len(files), per_class, 3, size, size), dtype=torch.uint8)
    bar = _progress(enabled=progress, total=len(files) * per_class,
                    desc=f"mini-ImageNet {split} -> {size}x{size}", unit="img")
    try:
        for c, paths in enumerate(files.values()):
            for j, p in enumerate(paths):
                out[c, j] = torch.from_numpy(_decode_rgb(p.read_bytes(), size, repr(str(p))))
                bar.update(1)
    finally:
        bar.close()
    return out, list(files)


def load_mini_imagenet(data_dir: str | os.PathLike, *, image_size: int = 84,
                       cache_dir: str | os.PathLike | None = None, mmap: bool = True,
                       progress: bool = True,
                       expected_counts: Mapping[str, tuple[int, int]] | None = MINI_IMAGENET_COUNTS,
                       ) -> FewShotSplits:
    """Load mini-ImageNet's train / val / test class pools, cached per split.

    Two formats are read, per split, from ``data_dir`` (the pickle is used
    where both exist):

    * **pickled caches** ``mini-imagenet-cache-{train,val,test}.pkl``: a dict
      with ``"image_data"``, a ``uint8`` array ``(N, 84, 84, 3)``, and
      ``"class_dict"``, ``{label: [indices into image_data]}``. Only NumPy
      arrays and plain containers are unpickled (anything else is refused).
    * **CSV + images** ``{train,val,test}.csv`` with the columns
      ``filename,label`` (Ravi & Larochelle's split files) and the images in
      ``data_dir/images/`` (flat, or one folder per label), resized to
      ``image_size`` with LANCZOS where they differ.

    Classes are ordered by label; images within a class by file order. Each
    split is cached as ``<cache_dir>/mini_imagenet_<split>_<S>x<S>.pt``
    (fingerprint: size and mtime of the pickle, or the CSV's sha256 and each
    image's size and mtime) and loaded memory-mapped, so only the pages an
    episode touches are read. Memory of the ``uint8`` pools at 84x84: train
    64 x 600 x 3 x 84 x 84 bytes = 0.81 GB, val 0.20 GB, test 0.25 GB (the
    first, uncached load of a pickle needs about twice a split's size).

    The real mini-ImageNet is not available on the machines this package is
    developed on: this loader is tested on small generated data in both
    formats only.

    Parameters
    ----------
    data_dir : str or os.PathLike
        The mini-ImageNet directory.
    image_size : int, default 84
        Side of the square images.
    cache_dir : str or os.PathLike, optional
        Where the per-split tensor files go; default :func:`default_cache_dir`.
    mmap : bool, default True
        Memory-map cached pools instead of reading them into memory.
    progress : bool, default True
        Show tqdm progress bars while decoding images.
    expected_counts : mapping or None, default MINI_IMAGENET_COUNTS
        ``{split: (classes, images per class)}`` to verify; ``None`` skips the
        check. All classes of a split must have the same number of images.

    Returns
    -------
    FewShotSplits
        ``uint8`` pools of shape ``(C, n, 3, S, S)`` per split and the class
        labels (WordNet ids); ``class_indices`` is None.

    Raises
    ------
    FileNotFoundError
        If a split has neither format, or images listed in a CSV are missing.
    DatasetError
        If a file is corrupt or its counts differ from ``expected_counts``.

    Examples
    --------
    >>> splits = load_mini_imagenet("data/mini-imagenet")  # doctest: +SKIP
    >>> splits.train.shape  # doctest: +SKIP
    torch.Size([64, 600, 3, 84, 84])
    """
    data_dir = Path(data_dir).expanduser()
    image_size = _check_int(image_size, "image_size", minimum=1)
    if expected_counts is not None and not isinstance(expected_counts, Mapping):
        raise TypeError(f"expected_counts must be a mapping like MINI_IMAGENET_COUNTS or None, "
                        f"got {type(expected_counts).__name__}.")
    sources: dict[str, tuple[str, Path]] = {}
    for split in MINI_IMAGENET_SPLITS:
        pkl, csv_path = data_dir / f"mini-imagenet-cache-{split}.pkl", data_dir / f"{split}.csv"
        if pkl.is_file():
            sources[split] = ("pickle", pkl)
        elif csv_path.is_file():
            sources[split] = ("csv", csv_path)
    missing = [s for s in MINI_IMAGENET_SPLITS if s not in sources]
    if missing:
        raise FileNotFoundError(_mini_missing_message(data_dir, missing))

    cache_root = _resolve_cache_dir(cache_dir)
    pools: dict[str, torch.Tensor] = {}
    names: dict[str, tuple[str, ...]] = {}
    for split, (kind, path) in sources.items():
        t0 = time.perf_counter()
        h = hashlib.sha256(f"mini-imagenet|v{_CACHE_FORMAT}|{split}|{image_size}|{kind}|".encode())
        files = None
        st = path.stat()
        if kind == "pickle":
            h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            h.update(_sha256_file(path).encode())
            files = _mini_csv_files(data_dir, path)
            for label, paths in files.items():
                for p in paths:
                    s = p.stat()
                    h.update(f"{label}|{p.name}|{s.st_size}|{s.st_mtime_ns}\n".encode())
        fingerprint = h.hexdigest()
        cache_path = cache_root / f"mini_imagenet_{split}_{image_size}x{image_size}.pt"
        cached = _read_cache(cache_path, fingerprint, mmap=mmap)
        if cached is not None and isinstance(cached.get("images"), torch.Tensor):
            pool, labels = cached["images"], list(cached["class_names"])
            _check_class_counts(str(path), split, {k: int(pool.shape[1]) for k in labels}, expected_counts)
            logger.info("loaded mini-ImageNet %s from the cache %s in %.2f s", split, cache_path,
                        time.perf_counter() - t0)
        else:
            if kind == "pickle":
                pool, labels = _mini_from_pickle(path, split, image_size, progress, expected_counts)
            else:
                pool, labels = _mini_from_csv(files, path, split, image_size, progress, expected_counts)
            logger.info("preprocessed mini-ImageNet %s (%d classes) in %.1f s", split, len(labels),
                        time.perf_counter() - t0)
            _write_cache({"format": _CACHE_FORMAT, "fingerprint": fingerprint, "images": pool,
                          "class_names": labels}, cache_path)
        pools[split], names[split] = pool, tuple(labels)
    return FewShotSplits(train=pools["train"], val=pools["val"], test=pools["test"], class_names=names)


# --------------------------------------------------------------------------- episodes


class Episode(NamedTuple):
    """A batch of N-way K-shot episodes (all tensors batch-first).

    Attributes
    ----------
    support_x : torch.Tensor
        ``float32`` ``(B, N*K, ch, H, W)`` in ``[0, 1]``, grouped by label:
        positions ``l*K .. l*K+K-1`` hold label ``l``.
    support_y : torch.Tensor
        ``int64`` ``(B, N*K)``, labels ``0..N-1``.
    query_x : torch.Tensor
        ``float32`` ``(B, N*Q, ch, H, W)``, grouped by label like the support.
    query_y : torch.Tensor
        ``int64`` ``(B, N*Q)``.
    classes : torch.Tensor
        ``int64`` ``(B, N)`` on the CPU: the pool class behind each label.
    rotations : torch.Tensor
        ``int64`` ``(B, N)`` on the CPU: quarter turns (``torch.rot90``'s ``k``)
        applied to each label's images; all zero without rotations.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    rotations: torch.Tensor

    def to(self, device: str | torch.device) -> Episode:
        """The episode with its images and labels on ``device``."""
        return self._replace(support_x=self.support_x.to(device), support_y=self.support_y.to(device),
                             query_x=self.query_x.to(device), query_y=self.query_y.to(device))


def _distinct(rows: int, high: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(rows, k)`` int64: each row ``k`` distinct values from ``0..high-1``, uniformly, in random order."""
    if k == 0:
        return torch.empty((rows, 0), dtype=torch.int64)
    if k * k <= high:
        # i.i.d. draws, redrawing the rows with a repeat: exact, and cheap when repeats are rare
        # (probability about k^2 / (2 high) <= 1/2 per row).
        out = torch.randint(high, (rows, k), generator=generator)
        while True:
            s = out.sort(dim=1).values
            bad = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().squeeze(1)
            if bad.numel() == 0:
                return out
            out[bad] = torch.randint(high, (bad.numel(), k), generator=generator)
    # float32 pinned: the stream must not depend on torch's default dtype
    return torch.rand(rows, high, generator=generator, dtype=torch.float32).argsort(dim=1)[:, :k]


class EpisodeSampler:
    """Batches of N-way K-shot episodes from a class pool, on any device.

    Each episode draws ``n_way`` distinct classes, gives them the labels
    ``0..n_way-1`` in random order, and draws ``k_shot + k_query`` distinct
    images of each class: the first ``k_shot`` form the support set, the others
    the query set (so support and query never share an image). With
    ``rotations=True`` the pool has ``4 C`` classes: class ``r*C + c`` is pool
    class ``c`` rotated by ``r`` quarter turns (:func:`torch.rot90` over the
    last two dimensions), applied at sampling time. Two rotations of one
    character may then appear in one episode as different classes.

    The pool is moved to ``device`` once; an episode is an index into it (no
    decoding). Random numbers come from the sampler's own CPU
    :class:`torch.Generator`, so episodes do not depend on the device or on
    other code's use of the global RNG, and :meth:`state_dict` /
    :meth:`load_state_dict` resume the exact stream.

    Parameters
    ----------
    images : torch.Tensor
        Class pool ``(C, n, ch, H, W)``: ``uint8`` (divided by 255) or floating
        (used as is, converted to ``float32``).
    n_way : int
        Classes per episode ``N``.
    k_shot : int
        Support images per class ``K``.
    k_query : int
        Query images per class ``Q`` (may be 0).
    rotations : bool, default False
        Add the 90/180/270 degree rotations of every class as extra classes
        (needs ``H == W``). The standard protocol uses them for meta-training
        only.
    seed : int, default 0
        Seed of the sampler's generator.
    device : str or torch.device, default "cpu"
        Where the pool and the episodes live.

    Raises
    ------
    ValueError
        If ``n_way`` exceeds the number of classes, ``k_shot + k_query`` the
        images per class, or the pool has the wrong shape.

    Examples
    --------
    >>> pool = torch.randint(0, 256, (10, 20, 1, 28, 28), dtype=torch.uint8)
    >>> sampler = EpisodeSampler(pool, n_way=5, k_shot=1, k_query=15, rotations=True, seed=0)
    >>> sampler.num_classes
    40
    >>> ep = sampler.sample(4)
    >>> ep.support_x.shape, ep.query_x.shape, ep.support_x.dtype
    (torch.Size([4, 5, 1, 28, 28]), torch.Size([4, 75, 1, 28, 28]), torch.float32)
    >>> ep.support_y[0].tolist()
    [0, 1, 2, 3, 4]
    """

    def __init__(self, images: torch.Tensor, *, n_way: int, k_shot: int, k_query: int,
                 rotations: bool = False, seed: int = 0, device: str | torch.device = "cpu") -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (C, n, ch, H, W), got {type(images).__name__}.")
        if images.ndim != 5:
            raise ValueError(f"images must have shape (classes, images per class, channels, height, width), "
                             f"got shape {tuple(images.shape)}; add a channel dimension with "
                             f"images.unsqueeze(2) for grey images.")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 (0..255) or floating point, got {images.dtype}.")
        self.n_way = _check_int(n_way, "n_way", minimum=1)
        self.k_shot = _check_int(k_shot, "k_shot", minimum=1)
        self.k_query = _check_int(k_query, "k_query", minimum=0)
        self.seed = _check_int(seed, "seed", minimum=0)
        self.rotations = bool(rotations)
        c, n, ch, h, w = images.shape
        if self.rotations and h != w:
            raise ValueError(f"rotations=True needs square images, got {h}x{w}; "
                             f"resize them or pass rotations=False.")
        self.num_base_classes = int(c)
        self.num_classes = int(c) * (4 if self.rotations else 1)
        if self.n_way > self.num_classes:
            raise ValueError(
                f"n_way={self.n_way} is larger than the {self.num_classes} classes in the pool"
                + (" (with rotations)" if self.rotations else "")
                + f"; use n_way <= {self.num_classes} or a larger pool.")
        if self.k_shot + self.k_query > n:
            raise ValueError(
                f"k_shot + k_query = {self.k_shot} + {self.k_query} = {self.k_shot + self.k_query} is larger "
                f"than the {n} images per class; support and query images are distinct, so use "
                f"k_shot + k_query <= {n}.")
        self.images_per_class = int(n)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self._flat = self.images.reshape(c * n, ch * h * w)
        self._image_shape = (int(ch), int(h), int(w))
        self._generator = torch.Generator().manual_seed(self.seed)
        self._labels_support = torch.arange(self.n_way, device=self.device).repeat_interleave(self.k_shot)
        self._labels_query = torch.arange(self.n_way, device=self.device).repeat_interleave(self.k_query)

    def __repr__(self) -> str:
        return (f"EpisodeSampler(classes={self.num_classes}, images_per_class={self.images_per_class}, "
                f"n_way={self.n_way}, k_shot={self.k_shot}, k_query={self.k_query}, "
                f"rotations={self.rotations}, seed={self.seed}, device={str(self.device)!r})")

    def sample(self, batch_size: int) -> Episode:
        """Draw ``batch_size`` independent episodes.

        Parameters
        ----------
        batch_size : int
            Episodes in the batch ``B`` (the meta-batch size).

        Returns
        -------
        Episode
            Support and query images and labels on :attr:`device`.
        """
        b = _check_int(batch_size, "batch_size", minimum=1)
        n, k, q = self.n_way, self.k_shot, self.k_query
        kq = k + q
        g = self._generator
        virtual = _distinct(b, self.num_classes, n, g)                           # (B, N)
        base = virtual % self.num_base_classes
        turns = virtual // self.num_base_classes
        pick = _distinct(b * n, self.images_per_class, kq, g).view(b, n, kq)      # (B, N, K+Q)
        flat_idx = (base.unsqueeze(-1) * self.images_per_class + pick).reshape(-1)
        x = self._flat.index_select(0, flat_idx.to(self.device)).view(b * n, kq, *self._image_shape)
        if self.rotations:
            flat_turns = turns.reshape(-1)
            for r in (1, 2, 3):
                where = (flat_turns == r).nonzero().squeeze(1)  # on the CPU: no device sync
                if where.numel():
                    where = where.to(self.device)
                    x.index_copy_(0, where, torch.rot90(x.index_select(0, where), r, dims=(-2, -1)))
        x = x.view(b, n, kq, *self._image_shape)
        support = self._to_float(x[:, :, :k]).reshape(b, n * k, *self._image_shape)
        query = self._to_float(x[:, :, k:]).reshape(b, n * q, *self._image_shape)
        return Episode(
            support_x=support,
            support_y=self._labels_support.repeat(b, 1),
            query_x=query,
            query_y=self._labels_query.repeat(b, 1),
            classes=base,
            rotations=turns,
        )

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        return x.to(torch.float32, copy=True)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's RNG state and configuration, for checkpoints.

        Returns
        -------
        dict
            ``generator`` (a ``uint8`` tensor) and the configuration; it
            round-trips through ``torch.save`` / ``torch.load(weights_only=True)``.
        """
        return {
            "generator": self._generator.get_state(),
            "seed": self.seed,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "k_query": self.k_query,
            "rotations": self.rotations,
            "num_classes": self.num_classes,
            "images_per_class": self.images_per_class,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next episodes are those an uninterrupted run would draw.

        Raises
        ------
        ValueError
            If ``state`` comes from a sampler with another configuration (which
            would not resume the same episode stream).
        """
        if not isinstance(state, Mapping) or "generator" not in state:
            raise ValueError("state must be a dict from EpisodeSampler.state_dict() (it has no 'generator').")
        mine = self.state_dict()
        diff = [f"{key}={state[key]!r} (this sampler: {mine[key]!r})"
                for key in ("n_way", "k_shot", "k_query", "rotations", "num_classes", "images_per_class")
                if key in state and state[key] != mine[key]]
        if diff:
            raise ValueError("the state comes from an EpisodeSampler with " + ", ".join(diff)
                             + "; build the sampler with the same pool and settings to resume.")
        gen_state = state["generator"]
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8:
            raise ValueError("state['generator'] must be the uint8 tensor from torch.Generator.get_state().")
        self._generator.set_state(gen_state.clone().cpu())
        self.seed = int(state.get("seed", self.seed))
