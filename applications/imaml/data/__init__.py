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

Modules
-------
* :mod:`.cache`: :class:`DatasetError`, :class:`FewShotSplits`,
  :func:`default_cache_dir` and the shared helpers (progress bars, argument
  checks, fingerprinted cache files).
* :mod:`.omniglot`: :data:`OMNIGLOT_URL`, :data:`OMNIGLOT_SETS`,
  :data:`OMNIGLOT_COUNTS`, :class:`OmniglotData`, :func:`load_omniglot`,
  :func:`download_omniglot`.
* :mod:`.mini_imagenet`: :data:`MINI_IMAGENET_SPLITS`,
  :data:`MINI_IMAGENET_COUNTS`, :func:`load_mini_imagenet`.
* :mod:`.episodes`: :class:`Episode`, :class:`EpisodeSampler`.

Every public name is re-exported here: import from ``applications.imaml.data``.
All modules log to the logger ``applications.imaml.data``.
"""

from __future__ import annotations

from .cache import DatasetError, FewShotSplits, default_cache_dir
from .episodes import Episode, EpisodeSampler
from .mini_imagenet import (MINI_IMAGENET_COUNTS, MINI_IMAGENET_SPLITS, _NumpyUnpickler,  # noqa: F401
                            load_mini_imagenet)
from .omniglot import (OMNIGLOT_COUNTS, OMNIGLOT_SETS, OMNIGLOT_URL, OmniglotData,  # noqa: F401
                       _find_omniglot_source, download_omniglot, load_omniglot)

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
