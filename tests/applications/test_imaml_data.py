"""applications.imaml.data: Omniglot / mini-ImageNet loaders, caches, splits and episode sampling.

Everything runs on small generated data (PNG zips and folders, pickles, CSVs in
tmp_path) except ``test_real_omniglot``, which uses the real Omniglot archives
when present (``$BILEVEL_OMNIGLOT`` or ``<repo>/../shared/data/omniglot``).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from applications.imaml import data as D
from applications.imaml.data import (DatasetError, EpisodeSampler, FewShotSplits, OmniglotData,
                                     load_mini_imagenet, load_omniglot)

# --------------------------------------------------------------------------- generated Omniglot

# set -> alphabet -> number of characters. Global ids run in this order, so "Zeta" (ids 1, 2)
# precedes "Alpha" (ids 3, 4): character-id order differs from alphabetical order.
SMALL_LAYOUT = {
    "images_background": {"Zeta": 2, "Alpha": 2},
    "images_evaluation": {"Beta": 3},
}
SMALL_DRAWINGS = 4
SMALL_COUNTS = {"images_background": (2, 4, SMALL_DRAWINGS), "images_evaluation": (1, 3, SMALL_DRAWINGS)}
SMALL_NAMES = ["Zeta/character01", "Zeta/character02", "Alpha/character01", "Alpha/character02",
               "Beta/character01", "Beta/character02", "Beta/character03"]


def _bits(char_id: int, drawer: int, salt: int = 0) -> np.ndarray:
    """A 105x105 boolean image (True = white paper) with a unique code in its first row."""
    rng = np.random.default_rng([char_id, drawer, salt])
    img = rng.random((105, 105)) < 0.8
    code = char_id * 100 + drawer
    img[0, :16] = [(code >> i) & 1 == 1 for i in range(16)]
    return img


def _png(bits: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(bits).save(buf, format="PNG")  # a bool array gives a mode "1" image
    return buf.getvalue()


def _omniglot_files(salt: int = 0):
    """Yield (set name, relative path inside the set, char id, drawer, png bytes)."""
    char_id = 0
    for set_name, alphabets in SMALL_LAYOUT.items():
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                char_id += 1
                # drawers written in reverse to check that the loader sorts them
                for drawer in range(SMALL_DRAWINGS, 0, -1):
                    rel = f"{alphabet}/character{c:02d}/{char_id:04d}_{drawer:02d}.png"
                    yield set_name, rel, char_id, drawer, _png(_bits(char_id, drawer, salt))


def make_omniglot(root: Path, layout: str = "zip", salt: int = 0, junk: bool = False) -> Path:
    """Write a small Omniglot in the official layout (zips or extracted folders) under root."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "zip":
        zips = {s: zipfile.ZipFile(root / f"{s}.zip", "w") for s in SMALL_LAYOUT}
        for s, zf in zips.items():
            zf.writestr(f"{s}/", b"")
            if junk:
                zf.writestr(f"__MACOSX/{s}/._x.png", b"junk")
                zf.writestr(f"{s}/.DS_Store", b"junk")
        for set_name, rel, *_, png in _omniglot_files(salt):
            zips[set_name].writestr(f"{set_name}/{rel}", png)
        for zf in zips.values():
            zf.close()
    else:
        for set_name, rel, *_, png in _omniglot_files(salt):
            p = root / set_name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(png)
    return root


def expected_images(salt: int = 0) -> torch.Tensor:
    """What load_omniglot(image_size=105) must return: inverted, character-id and drawer order."""
    out = np.zeros((7, SMALL_DRAWINGS, 1, 105, 105), dtype=np.uint8)
    for _, _, char_id, drawer, _ in _omniglot_files(salt):
        out[char_id - 1, drawer - 1, 0] = np.where(_bits(char_id, drawer, salt), 0, 255)
    return torch.from_numpy(out)


def load_small(data_dir: Path, cache_dir: Path, **kw) -> OmniglotData:
    kw.setdefault("image_size", 105)
    return load_omniglot(data_dir, cache_dir=cache_dir, progress=False, expected_counts=SMALL_COUNTS, **kw)


def forbid_decoding(monkeypatch) -> None:
    """Make any image decode fail: proves that a load comes from the cache."""
    def fail(*args, **kwargs):
        raise AssertionError("PIL.Image.open was called: the cache was not used")
    monkeypatch.setattr(Image, "open", fail)


# --------------------------------------------------------------------------- Omniglot loading


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_load_omniglot_layouts_give_the_images_in_character_id_order(tmp_path, layout):
    root = make_omniglot(tmp_path / "omniglot", layout, junk=True)
    data = load_small(root, tmp_path / "cache")
    assert data.images.dtype == torch.uint8 and data.images.shape == (7, SMALL_DRAWINGS, 1, 105, 105)
    assert torch.equal(data.images, expected_images())  # inverted: 255 = ink
    assert list(data.character_names) == SMALL_NAMES
    assert data.alphabet_names == ("Zeta", "Alpha", "Beta")
    assert data.alphabet_ids.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert data.num_background == 4 and data.num_characters == 7 and data.image_size == 105


def test_zip_and_folder_layouts_agree_after_resizing(tmp_path):
    a = load_small(make_omniglot(tmp_path / "z", "zip"), tmp_path / "c1", image_size=28)
    b = load_small(make_omniglot(tmp_path / "f", "folder"), tmp_path / "c2", image_size=28)
    assert a.images.shape == (7, SMALL_DRAWINGS, 1, 28, 28)
    assert torch.equal(a.images, b.images)
    # LANCZOS on 8-bit grey gives intermediate levels; "nearest" gives binary images
    assert len(torch.unique(a.images)) > 2
    n = load_small(tmp_path / "z", tmp_path / "c1", image_size=28, resample="nearest")
    assert set(torch.unique(n.images).tolist()) <= {0, 255}
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == ["omniglot_28x28.pt", "omniglot_28x28_nearest.pt"]


def test_extracted_folder_inside_folder_and_torchvision_layout(tmp_path):
    make_omniglot(tmp_path / "nested" / "images_background", "folder")  # .../images_background/images_background/...
    make_omniglot(tmp_path / "tmp_eval", "folder")
    (tmp_path / "tmp_eval" / "images_evaluation").rename(tmp_path / "nested" / "images_evaluation")
    assert torch.equal(load_small(tmp_path / "nested", tmp_path / "c").images, expected_images())
    make_omniglot(tmp_path / "tv" / "omniglot-py", "zip")
    assert torch.equal(load_small(tmp_path / "tv", tmp_path / "c2").images, expected_images())


def test_cache_is_written_atomically_and_reused_without_decoding(tmp_path, monkeypatch):
    root = make_omniglot(tmp_path / "o")
    cache = tmp_path / "cache"
    first = load_small(root, cache, image_size=28)
    assert [p.name for p in cache.iterdir()] == ["omniglot_28x28.pt"]  # no temporary file left behind
    forbid_decoding(monkeypatch)
    second = load_small(root, cache, image_size=28)
    assert torch.equal(first.images, second.images)
    assert first.character_names == second.character_names


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "envcache"))
    assert D.default_cache_dir() == tmp_path / "envcache"
    load_omniglot(make_omniglot(tmp_path / "o"), image_size=14, progress=False, expected_counts=SMALL_COUNTS)
    assert (tmp_path / "envcache" / "omniglot_14x14.pt").is_file()
    monkeypatch.delenv("BILEVEL_CACHE")
    assert D.default_cache_dir() == Path("~/.cache/bilevel").expanduser()


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_changed_source_is_preprocessed_again(tmp_path, layout, monkeypatch):
    root = make_omniglot(tmp_path / "o", layout, salt=0)
    load_small(root, tmp_path / "cache")
    if layout == "zip":
        for s in SMALL_LAYOUT:
            (root / f"{s}.zip").unlink()
    make_omniglot(root, layout, salt=1)  # same names, new pixels
    calls = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    data = load_small(root, tmp_path / "cache")
    assert len(calls) == 7 * SMALL_DRAWINGS
    assert torch.equal(data.images, expected_images(salt=1))


def test_failed_cache_write_leaves_no_file_and_keeps_the_old_cache(tmp_path, monkeypatch, caplog):
    root = make_omniglot(tmp_path / "o")
    cache = tmp_path / "cache"

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with caplog.at_level(logging.WARNING, logger="applications.imaml.data"):
        data = load_small(root, cache)
    assert torch.equal(data.images, expected_images())  # the data still comes back
    assert "could not write the cache file" in caplog.text
    assert list(cache.iterdir()) == []  # neither a partial cache nor a temporary file
    monkeypatch.undo()

    load_small(root, cache)
    good = (cache / "omniglot_105x105.pt").read_bytes()
    for s in SMALL_LAYOUT:
        (root / f"{s}.zip").unlink()
    make_omniglot(root, salt=1)
    monkeypatch.setattr(torch, "save", broken_save)
    load_small(root, cache)
    assert (cache / "omniglot_105x105.pt").read_bytes() == good  # the old cache is intact
    assert [p.name for p in cache.iterdir()] == ["omniglot_105x105.pt"]


def test_unreadable_cache_file_is_rebuilt(tmp_path, caplog):
    root = make_omniglot(tmp_path / "o")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "omniglot_105x105.pt").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="applications.imaml.data"):
        data = load_small(root, cache)
    assert "unreadable cache file" in caplog.text
    assert torch.equal(data.images, expected_images())
    assert torch.equal(torch.load(cache / "omniglot_105x105.pt", weights_only=True)["images"], data.images)


# --------------------------------------------------------------------------- Omniglot errors


def test_missing_files_name_the_directory_the_files_and_the_url(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot(tmp_path, progress=False)
    msg = str(info.value)
    assert str(tmp_path) in msg
    for needle in ("images_background.zip", "images_evaluation.zip", "images_background/",
                   "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
                   "download=True"):
        assert needle in msg

    make_omniglot(tmp_path / "half")
    (tmp_path / "half" / "images_evaluation.zip").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing images_evaluation\.zip \(or the extracted"):
        load_omniglot(tmp_path / "half", progress=False)


def test_network_failure_gives_file_not_found_with_instructions(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"Put the official archives .* \(The download of "
                                                r"https://github\.com/.*images_background\.zip failed"):
        load_omniglot(tmp_path / "new", download=True, progress=False)
    assert list((tmp_path / "new").iterdir()) == []  # no partial download left


class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes, length: int | None = None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload) if length is None else length)}


def test_download_fetches_the_missing_archives_atomically(tmp_path, monkeypatch, caplog):
    src = make_omniglot(tmp_path / "src")
    payload = {s: (src / f"{s}.zip").read_bytes() for s in SMALL_LAYOUT}
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        return _FakeResponse(payload[url.rsplit("/", 1)[1][:-4]])

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    dest = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger="applications.imaml.data"):
        data = load_small(dest, tmp_path / "cache", download=True)
    assert urls == [D.OMNIGLOT_URL.format(name=s) for s in D.OMNIGLOT_SETS]
    assert sorted(p.name for p in dest.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert "not the official" in caplog.text  # generated archives: md5 differs, content checked by counts
    assert torch.equal(data.images, expected_images())
    assert D.download_omniglot(dest, progress=False) == []  # nothing missing any more


def test_truncated_download_is_discarded(tmp_path, monkeypatch):
    src = make_omniglot(tmp_path / "src")
    payload = (src / "images_background.zip").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: _FakeResponse(payload[:1000], length=len(payload)))
    with pytest.raises(FileNotFoundError, match=r"closed after 1000 of \d+ bytes"):
        D.download_omniglot(tmp_path / "dst", progress=False)
    assert list((tmp_path / "dst").iterdir()) == []


def test_corrupt_zip_gives_a_clear_error(tmp_path):
    root = make_omniglot(tmp_path / "o")
    good = (root / "images_background.zip").read_bytes()
    (root / "images_background.zip").write_bytes(b"this is not a zip file")
    with pytest.raises(DatasetError, match=r"images_background\.zip' is not a valid zip archive .*delete "
                                           r"the archive .* download it again from https://"):
        load_small(root, tmp_path / "cache")
    (root / "images_background.zip").write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(DatasetError, match=r"images_background\.zip' is not a valid zip archive"):
        load_small(root, tmp_path / "cache")


def test_damaged_entry_and_undecodable_png_give_clear_errors(tmp_path):
    root = make_omniglot(tmp_path / "o")
    path = root / "images_evaluation.zip"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("images_evaluation/Beta/character02/0006_03.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 40] ^= 0xFF  # flip a byte inside the stored PNG: bad CRC
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"cannot read 'images_evaluation/Beta/character02/0006_03\.png' "
                                           r"in '.*images_evaluation\.zip' \(Bad CRC-32"):
        load_small(root, tmp_path / "cache")

    make_omniglot(tmp_path / "f", "folder")
    (tmp_path / "f" / "images_background" / "Alpha" / "character01" / "0003_02.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot decode the image .*0003_02\.png.*delete the folder"):
        load_small(tmp_path / "f", tmp_path / "cache2")


def test_wrong_counts_name_the_file_and_what_differs(tmp_path):
    root = make_omniglot(tmp_path / "o")
    with pytest.raises(DatasetError, match=r"images_background\.zip: expected 30 alphabets in images_background, "
                                           r"found 2; expected 964 characters in images_background, found 4"):
        load_omniglot(root, cache_dir=tmp_path / "cache", progress=False)  # the official table
    wrong = dict(SMALL_COUNTS, images_evaluation=(1, 3, 20))
    with pytest.raises(DatasetError, match=r"expected 20 drawings per character in images_evaluation, found 4 "
                                           r"in Beta/character01 \(and 2 more characters\)"):
        load_omniglot(root, cache_dir=tmp_path / "cache", progress=False, expected_counts=wrong)
    # expected_counts=None skips the table (a partial data set) ...
    assert load_omniglot(root, cache_dir=tmp_path / "cache", progress=False, image_size=105,
                         expected_counts=None).num_characters == 7
    # ... and the check also guards a cache written without it
    with pytest.raises(DatasetError, match="expected 964 characters in images_background, found 4"):
        load_omniglot(root, cache_dir=tmp_path / "cache", progress=False, image_size=105)


def test_unequal_drawings_and_bad_paths_are_refused(tmp_path):
    make_omniglot(tmp_path / "f", "folder")
    (tmp_path / "f" / "images_evaluation" / "Beta" / "character02" / "0006_01.png").unlink()
    with pytest.raises(DatasetError, match=r"different numbers of drawings \(Beta/character02: 3, .*: 4\)"):
        load_omniglot(tmp_path / "f", cache_dir=tmp_path / "c", progress=False, expected_counts=None)
    root = make_omniglot(tmp_path / "z")
    with zipfile.ZipFile(root / "images_background.zip", "a") as zf:
        zf.writestr("images_background/Alpha/stray.png", _png(_bits(1, 1)))
    with pytest.raises(DatasetError, match=r"unexpected image path 'images_background/Alpha/stray\.png'"):
        load_small(root, tmp_path / "c")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown resample 'cubic'; available: lanczos, bilinear, nearest"):
        load_omniglot(tmp_path, resample="cubic")
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        load_omniglot(tmp_path, image_size=0)


# --------------------------------------------------------------------------- split


def _fake_omniglot(c: int = 50, n: int = 20, s: int = 8) -> OmniglotData:
    images = torch.arange(c, dtype=torch.uint8).view(c, 1, 1, 1, 1).expand(c, n, 1, s, s).clone()
    return OmniglotData(images, tuple(f"A{i // 10}/character{i % 10 + 1:02d}" for i in range(c)),
                        tuple(f"A{i}" for i in range(c // 10)), torch.arange(c) // 10, c // 2)


def test_split_is_fixed_by_the_seed_disjoint_and_complete():
    data = _fake_omniglot()
    a = data.split(train_characters=30, seed=0)
    b = data.split(train_characters=30, seed=0)
    c = data.split(train_characters=30, seed=1)
    for k in ("train", "val", "test"):
        assert torch.equal(a.class_indices[k], b.class_indices[k])
    assert not torch.equal(a.class_indices["train"], c.class_indices["train"])
    assert a.train.shape == (30, 20, 1, 8, 8) and a.val.shape[0] == 0 and a.test.shape[0] == 20
    idx = torch.cat([a.class_indices[k] for k in ("train", "val", "test")])
    assert sorted(idx.tolist()) == list(range(50))  # disjoint and complete
    assert torch.equal(a.train[:, 0, 0, 0, 0].long(), a.class_indices["train"])  # the pools hold those classes
    assert a.class_names["test"] == tuple(data.character_names[i] for i in a.class_indices["test"].tolist())
    assert torch.equal(a["test"], a.test)
    # a validation slice is carved from the training characters; the test set does not move
    v = data.split(train_characters=30, val_characters=5, seed=0)
    assert v.train.shape[0] == 25 and v.val.shape[0] == 5
    assert torch.equal(v.class_indices["test"], a.class_indices["test"])
    assert sorted(torch.cat([v.class_indices["train"], v.class_indices["val"]]).tolist()) == \
        a.class_indices["train"].tolist()
    # the permutation comes from NumPy's frozen RandomState stream
    assert sorted(np.random.RandomState(0).permutation(50)[30:].tolist()) == a.class_indices["test"].tolist()


def test_split_sizes_are_validated():
    data = _fake_omniglot()
    with pytest.raises(ValueError, match="train_characters=1200 is larger than the 50 characters loaded"):
        data.split()
    with pytest.raises(ValueError, match="val_characters=30 must be smaller than train_characters=30"):
        data.split(train_characters=30, val_characters=30)


# --------------------------------------------------------------------------- episodes


def _coded_pool(c: int = 12, n: int = 8, s: int = 6, ch: int = 1, seed: int = 0) -> torch.Tensor:
    """uint8 pool (c, n, ch, s, s); image (i, j) carries its identity in the pixel codes."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (c, n, ch, s, s), generator=g, dtype=torch.uint8)
    pool[:, :, 0, 0, 0] = torch.arange(c, dtype=torch.uint8).view(c, 1)
    pool[:, :, 0, 0, 1] = torch.arange(n, dtype=torch.uint8).view(1, n)
    return pool


def _identify(img: torch.Tensor, turns: int) -> tuple[int, int]:
    """(class, image) codes of an episode image after undoing its rotation."""
    up = torch.rot90(img, -turns, dims=(-2, -1))
    return int(round(float(up[0, 0, 0]) * 255)), int(round(float(up[0, 0, 1]) * 255))


@pytest.mark.parametrize("rotations", [False, True])
def test_episode_shapes_labels_and_disjoint_support_query(rotations):
    pool = _coded_pool()
    n, k, q, b = 5, 2, 3, 6
    sampler = EpisodeSampler(pool, n_way=n, k_shot=k, k_query=q, rotations=rotations, seed=1)
    ep = sampler.sample(b)
    assert ep.support_x.shape == (b, n * k, 1, 6, 6) and ep.query_x.shape == (b, n * q, 1, 6, 6)
    assert ep.support_x.dtype == ep.query_x.dtype == torch.float32  # even under the float64 default
    assert ep.support_y.dtype == torch.int64 and ep.support_y.shape == (b, n * k)
    assert ep.query_y.shape == (b, n * q) and ep.classes.shape == ep.rotations.shape == (b, n)
    assert 0.0 <= float(ep.support_x.min()) and float(ep.support_x.max()) <= 1.0
    for i in range(b):
        assert torch.equal(ep.support_y[i], torch.arange(n).repeat_interleave(k))
        assert torch.bincount(ep.support_y[i], minlength=n).tolist() == [k] * n
        assert torch.bincount(ep.query_y[i], minlength=n).tolist() == [q] * n
        virtual = set(zip(ep.classes[i].tolist(), ep.rotations[i].tolist()))
        assert len(virtual) == n  # distinct classes within an episode
        seen = []
        for x, y in ((ep.support_x[i], ep.support_y[i]), (ep.query_x[i], ep.query_y[i])):
            for img, label in zip(x, y.tolist()):
                r = int(ep.rotations[i, label])
                cls, j = _identify(img, r)
                assert cls == int(ep.classes[i, label])  # every image of a label comes from its class
                seen.append((cls, j, r))
        # support and query images are distinct draws: no image of a class twice in an episode
        assert len(set(seen)) == len(seen) == n * (k + q)
    if not rotations:
        assert int(ep.rotations.abs().sum()) == 0


def test_rotation_protocol():
    pool = _coded_pool(c=6, n=8)
    plain = EpisodeSampler(pool, n_way=3, k_shot=1, k_query=1)
    rot = EpisodeSampler(pool, n_way=3, k_shot=2, k_query=1, rotations=True, seed=2)
    assert plain.num_classes == 6 and rot.num_classes == 24  # 4x the classes with rotations
    ep = rot.sample(200)
    assert set(ep.rotations.unique().tolist()) == {0, 1, 2, 3}
    for b in range(20):
        for label in range(3):
            c, r = int(ep.classes[b, label]), int(ep.rotations[b, label])
            for img in ep.support_x[b, label * 2:(label + 1) * 2]:
                _, j = _identify(img, r)
                expected = torch.rot90(pool[c, j], r, dims=(-2, -1)).float() / 255
                assert torch.equal(img, expected)  # a rotated class is torch.rot90 of the original
    # two rotations of one character may meet in an episode, as different classes
    both = [(ep.classes[b].unique().numel() < 3) for b in range(200)]
    assert any(both)
    with pytest.raises(ValueError, match=r"rotations=True needs square images, got 6x5"):
        EpisodeSampler(torch.zeros(4, 3, 1, 6, 5, dtype=torch.uint8), n_way=2, k_shot=1, k_query=1, rotations=True)


def test_labels_are_permuted_and_classes_uniform():
    sampler = EpisodeSampler(_coded_pool(c=6), n_way=3, k_shot=1, k_query=0, seed=5)
    ep = sampler.sample(3000)
    assert ep.query_x.shape == (3000, 0, 1, 6, 6)
    labels_of_class0 = {int((ep.classes[b] == 0).nonzero()) for b in range(3000) if (ep.classes[b] == 0).any()}
    assert labels_of_class0 == {0, 1, 2}
    freq = torch.bincount(ep.classes.reshape(-1), minlength=6).double() / (3000 * 3)
    assert torch.allclose(freq, torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.02)
    # the small-pool path (argsort) and the sparse path (rejection) both give distinct classes
    big = EpisodeSampler(_coded_pool(c=200, n=30), n_way=10, k_shot=4, k_query=4, seed=0).sample(500)
    assert all(big.classes[b].unique().numel() == 10 for b in range(500))


def test_state_dict_resume_gives_identical_episodes():
    pool = _coded_pool()
    a = EpisodeSampler(pool, n_way=4, k_shot=1, k_query=2, rotations=True, seed=3)
    a.sample(4)
    a.sample(4)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # through a checkpoint file, as --resume does
    uninterrupted = [a.sample(4) for _ in range(3)]
    b = EpisodeSampler(pool, n_way=4, k_shot=1, k_query=2, rotations=True, seed=99)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    resumed = [b.sample(4) for _ in range(3)]
    for u, r in zip(uninterrupted, resumed):
        for x, y in zip(u, r):
            assert torch.equal(x, y)
    c = EpisodeSampler(pool, n_way=5, k_shot=1, k_query=2, rotations=True)
    with pytest.raises(ValueError, match=r"n_way=4 \(this sampler: 5\)"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="no 'generator'"):
        c.load_state_dict({})


def test_same_seed_same_episodes_regardless_of_default_dtype():
    pool = _coded_pool(c=6)
    ep64 = EpisodeSampler(pool, n_way=5, k_shot=2, k_query=2, seed=4).sample(3)  # float64 default (conftest)
    torch.set_default_dtype(torch.float32)
    ep32 = EpisodeSampler(pool, n_way=5, k_shot=2, k_query=2, seed=4).sample(3)
    for x, y in zip(ep64, ep32):
        assert torch.equal(x, y)


def test_sampler_validation_names_both_numbers():
    pool = _coded_pool(c=6, n=8)
    with pytest.raises(ValueError, match=r"n_way=7 is larger than the 6 classes in the pool"):
        EpisodeSampler(pool, n_way=7, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match=r"n_way=25 is larger than the 24 classes in the pool \(with rotations\)"):
        EpisodeSampler(pool, n_way=25, k_shot=1, k_query=1, rotations=True)
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 5 \+ 4 = 9 is larger than the 8 images per class"):
        EpisodeSampler(pool, n_way=2, k_shot=5, k_query=4)
    with pytest.raises(ValueError, match=r"got shape \(6, 8, 6, 6\)"):
        EpisodeSampler(pool[:, :, 0], n_way=2, k_shot=1, k_query=1)
    with pytest.raises(TypeError, match="n_way must be an int"):
        EpisodeSampler(pool, n_way=2.0, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="k_shot must be >= 1"):
        EpisodeSampler(pool, n_way=2, k_shot=0, k_query=1)
    with pytest.raises(TypeError, match="uint8 .* or floating point"):
        EpisodeSampler(pool.int(), n_way=2, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        EpisodeSampler(pool, n_way=2, k_shot=1, k_query=1).sample(0)


def test_float_pool_is_used_as_is():
    pool = torch.rand(5, 4, 3, 4, 4, dtype=torch.float64)
    ep = EpisodeSampler(pool, n_way=2, k_shot=1, k_query=1, seed=0).sample(2)
    assert ep.support_x.dtype == torch.float32
    for b in range(2):
        for label in range(2):
            c = int(ep.classes[b, label])
            assert any(torch.allclose(ep.support_x[b, label], pool[c, j].float()) for j in range(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_episodes_equal_cpu_episodes():
    pool = _coded_pool()
    cpu = EpisodeSampler(pool, n_way=4, k_shot=2, k_query=2, rotations=True, seed=7).sample(8)
    gpu = EpisodeSampler(pool, n_way=4, k_shot=2, k_query=2, rotations=True, seed=7, device="cuda").sample(8)
    assert gpu.support_x.is_cuda and gpu.query_y.is_cuda
    for x, y in zip(cpu, gpu):
        assert torch.equal(x, y.cpu())


def test_sampler_on_loaded_omniglot_split(tmp_path):
    data = load_small(make_omniglot(tmp_path / "o"), tmp_path / "cache", image_size=28)
    s = data.split(train_characters=5, val_characters=1, seed=0)
    train = EpisodeSampler(s.train, n_way=3, k_shot=1, k_query=3, rotations=True)
    ep = train.sample(2)
    assert train.num_classes == 16
    assert ep.support_x.shape == (2, 3, 1, 28, 28) and ep.query_x.shape == (2, 9, 1, 28, 28)
    test = EpisodeSampler(s.test, n_way=2, k_shot=2, k_query=2)
    assert test.num_classes == 2 and test.sample(1).support_x.shape == (1, 4, 1, 28, 28)


# --------------------------------------------------------------------------- mini-ImageNet

MINI_COUNTS = {"train": (4, 6), "val": (2, 6), "test": (3, 6)}


def _mini_images(split: str, size: int) -> dict[str, np.ndarray]:
    """label -> (6, size, size, 3) uint8 images with their identity in pixel (0, 0)."""
    offset = {"train": 0, "val": 10, "test": 20}[split]
    out = {}
    for c in range(MINI_COUNTS[split][0]):
        rng = np.random.default_rng([offset, c])
        imgs = rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8)
        imgs[:, 0, 0, 0] = offset + c
        imgs[:, 0, 0, 1] = np.arange(6)
        out[f"n{offset + c:08d}"] = imgs
    return out


def make_mini_pickle(root: Path, splits=("train", "val", "test"), size: int = 8, protocol: int = 4) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        imgs = _mini_images(split, size)
        labels = list(imgs)[::-1]  # class_dict order differs from sorted label order
        flat = np.concatenate([imgs[k] for k in labels])
        perm = np.random.default_rng(1).permutation(len(flat))  # images of a class interleaved
        data = np.empty_like(flat)
        data[perm] = flat
        class_dict = {k: [int(perm[i * 6 + j]) for j in range(6)] for i, k in enumerate(labels)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=protocol)


def make_mini_csv(root: Path, splits=("train", "val", "test"), size: int = 8, by_label: bool = False) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split in splits:
        lines = ["filename,label"]
        for label, imgs in _mini_images(split, size).items():
            for j, img in enumerate(imgs):
                name = f"{label}{j:08d}.png"  # PNG: lossless, so the test can compare pixels
                folder = root / "images" / (label if by_label else "")
                folder.mkdir(exist_ok=True)
                Image.fromarray(img).save(folder / name)
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def _check_mini(splits: FewShotSplits, size: int = 8) -> None:
    for split in ("train", "val", "test"):
        imgs = _mini_images(split, size)
        pool = splits[split]
        assert pool.dtype == torch.uint8 and pool.shape == (MINI_COUNTS[split][0], 6, 3, size, size)
        assert splits.class_names[split] == tuple(sorted(imgs))
        for c, label in enumerate(sorted(imgs)):
            assert torch.equal(pool[c], torch.from_numpy(imgs[label]).permute(0, 3, 1, 2))
    assert splits.class_indices is None


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_mini_imagenet_pickle_format(tmp_path, protocol, monkeypatch):
    make_mini_pickle(tmp_path / "mini", protocol=protocol)
    kw = dict(image_size=8, cache_dir=tmp_path / "cache", progress=False, expected_counts=MINI_COUNTS)
    _check_mini(load_mini_imagenet(tmp_path / "mini", **kw))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "mini_imagenet_test_8x8.pt", "mini_imagenet_train_8x8.pt", "mini_imagenet_val_8x8.pt"]
    def no_unpickling(self):
        raise AssertionError("the pickle was read: the cache was not used")

    monkeypatch.setattr(D._NumpyUnpickler, "load", no_unpickling)
    _check_mini(load_mini_imagenet(tmp_path / "mini", **kw))  # from the memory-mapped cache


def test_mini_imagenet_csv_format(tmp_path, monkeypatch):
    make_mini_csv(tmp_path / "mini")
    kw = dict(image_size=8, cache_dir=tmp_path / "cache", progress=False, expected_counts=MINI_COUNTS)
    _check_mini(load_mini_imagenet(tmp_path / "mini", **kw))
    forbid_decoding(monkeypatch)
    cached = load_mini_imagenet(tmp_path / "mini", **kw)
    _check_mini(cached)
    monkeypatch.undo()
    # images resized where they differ from image_size; a sampler runs on the pools
    small = load_mini_imagenet(tmp_path / "mini", **dict(kw, image_size=5, mmap=False))
    assert small.train.shape == (4, 6, 3, 5, 5)
    ep = EpisodeSampler(small.train, n_way=3, k_shot=1, k_query=2).sample(2)
    assert ep.support_x.shape == (2, 3, 3, 5, 5) and ep.query_x.shape == (2, 6, 3, 5, 5)


def test_mini_imagenet_mixed_formats_and_label_folders(tmp_path):
    make_mini_pickle(tmp_path / "mini", splits=("train",))
    make_mini_csv(tmp_path / "mini", splits=("val", "test"), by_label=True)
    _check_mini(load_mini_imagenet(tmp_path / "mini", image_size=8, cache_dir=tmp_path / "cache",
                                   progress=False, expected_counts=MINI_COUNTS))


def test_mini_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mini-ImageNet split\(s\) train, val, test not found in .*"
                                                r"mini-imagenet-cache-<split>\.pkl.*<split>\.csv.*cannot be "
                                                r"downloaded automatically"):
        load_mini_imagenet(tmp_path)
    make_mini_pickle(tmp_path / "m")
    with pytest.raises(DatasetError, match=r"mini-imagenet-cache-train\.pkl: expected 64 classes in the train "
                                           r"split, found 4; expected 600 images per class .* found 6"):
        load_mini_imagenet(tmp_path / "m", image_size=8, cache_dir=tmp_path / "c", progress=False)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    (tmp_path / "m" / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps({"image_data": Evil()}))
    with pytest.raises(DatasetError, match=r"refusing to unpickle posix\.getcwd|refusing to unpickle"):
        load_mini_imagenet(tmp_path / "m", image_size=8, cache_dir=tmp_path / "c", progress=False,
                           expected_counts=None)
    (tmp_path / "m" / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps({"images": np.zeros(3)}))
    with pytest.raises(DatasetError, match=r"expected a dict with keys 'image_data' and 'class_dict', found \['images'\]"):
        load_mini_imagenet(tmp_path / "m", image_size=8, cache_dir=tmp_path / "c", progress=False,
                           expected_counts=None)

    make_mini_csv(tmp_path / "csv")
    first = sorted((tmp_path / "csv" / "images").iterdir())[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 image\(s\) listed in .*\.csv' are missing .*{re.escape(first.name)}"):
        load_mini_imagenet(tmp_path / "csv", image_size=8, cache_dir=tmp_path / "c", progress=False,
                           expected_counts=None)
    (tmp_path / "csv" / "train.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(DatasetError, match="expected the columns filename,label; found file,class"):
        load_mini_imagenet(tmp_path / "csv", image_size=8, cache_dir=tmp_path / "c", progress=False)


# --------------------------------------------------------------------------- the real Omniglot

REAL_OMNIGLOT = Path(os.environ.get("BILEVEL_OMNIGLOT")
                     or Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot")


@pytest.fixture(scope="module")
def real_omniglot(tmp_path_factory):
    """The real Omniglot, preprocessed once for this module into a temporary cache (~10-60 s)."""
    if D._find_omniglot_source(REAL_OMNIGLOT, "images_background") is None:
        pytest.skip(f"real Omniglot not found at {REAL_OMNIGLOT} (set BILEVEL_OMNIGLOT to its directory)")
    cache = tmp_path_factory.mktemp("omniglot_cache")
    return load_omniglot(REAL_OMNIGLOT, cache_dir=cache, progress=False), cache


def test_real_omniglot(real_omniglot, monkeypatch):
    data, cache = real_omniglot
    assert data.images.shape == (1623, 20, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.num_characters == 1623 and data.num_background == 964 and len(data.alphabet_names) == 50
    # character-id order: 0709_*.png is the first character of Alphabet_of_the_Magi
    assert data.character_names[708] == "Alphabet_of_the_Magi/character01"
    assert float(data.images.float().mean()) < 40  # inverted: mostly 0 background, ink is bright
    split = data.split(seed=0)
    assert split.train.shape[0] == 1200 and split.test.shape[0] == 423 and split.val.shape[0] == 0
    assert not set(split.class_indices["train"].tolist()) & set(split.class_indices["test"].tolist())
    ep = EpisodeSampler(split.train, n_way=20, k_shot=5, k_query=5, rotations=True).sample(32)
    assert ep.support_x.shape == (32, 100, 1, 28, 28) and ep.query_x.shape == (32, 100, 1, 28, 28)
    assert EpisodeSampler(split.train, n_way=20, k_shot=5, k_query=5, rotations=True).num_classes == 4800
    # a second load comes from the cache: no PNG is decoded
    forbid_decoding(monkeypatch)
    again = load_omniglot(REAL_OMNIGLOT, cache_dir=cache, progress=False)
    assert torch.equal(again.images, data.images)
