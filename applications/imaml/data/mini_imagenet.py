"""mini-ImageNet: the pickled caches or CSV split files with images, read into per-split class pools.

:func:`load_mini_imagenet` reads each split in either format (pickles through
:class:`_NumpyUnpickler`, which only admits NumPy arrays and plain containers),
verifies the class and image counts, and caches each split as a ``uint8``
tensor file that is memory-mapped on later loads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .cache import (_CACHE_FORMAT, DatasetError, FewShotSplits, _check_int, _progress, _read_cache,
                    _resolve_cache_dir, _sha256_file, _write_cache)

__all__ = ["MINI_IMAGENET_SPLITS", "MINI_IMAGENET_COUNTS", "load_mini_imagenet"]

logger = logging.getLogger(__package__)  # "applications.imaml.data", the logger of the former module

MINI_IMAGENET_SPLITS = ("train", "val", "test")
"""The three mini-ImageNet splits (classes are disjoint between them)."""

MINI_IMAGENET_COUNTS: Mapping[str, tuple[int, int]] = {
    "train": (64, 600),
    "val": (16, 600),
    "test": (20, 600),
}
"""Expected ``(classes, images per class)`` of each mini-ImageNet split (Ravi & Larochelle)."""


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
