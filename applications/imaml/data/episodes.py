"""N-way K-shot episodes: the :class:`Episode` batch and the seeded :class:`EpisodeSampler`.

The sampler moves a ``uint8`` class pool to its device once and turns each
batch of episodes into index arithmetic on it (distinct classes, distinct
support and query images, optional rotation classes applied with
:func:`torch.rot90`), drawing from its own CPU generator whose state can be
saved and restored.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch

from .cache import _check_int

__all__ = ["Episode", "EpisodeSampler"]


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
