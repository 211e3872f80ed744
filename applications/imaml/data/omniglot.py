"""Omniglot: the official archives, their download, scanning, decoding and the cached character tensor.

:func:`load_omniglot` reads ``images_background`` and ``images_evaluation``
(zip files or extracted folders), verifies them by counts, decodes and resizes
every PNG once and caches the result; :func:`download_omniglot` fetches missing
archives atomically; :meth:`OmniglotData.split` makes the standard seeded
character split into :class:`~applications.imaml.data.FewShotSplits`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .cache import (_CACHE_FORMAT, DatasetError, FewShotSplits, _check_int, _progress, _read_cache,
                    _resolve_cache_dir, _sha256_file, _write_cache)

__all__ = ["OMNIGLOT_URL", "OMNIGLOT_SETS", "OMNIGLOT_COUNTS", "OmniglotData", "load_omniglot",
           "download_omniglot"]

logger = logging.getLogger(__package__)  # "applications.imaml.data", the logger of the former module

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

_RESAMPLE_NAMES = ("lanczos", "bilinear", "nearest")
_OMNIGLOT_FILE = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)


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
