"""Meta-batch data parallelism on :mod:`torch.distributed`.

The outer problems of one outer step (the tasks of a meta-batch, the folds of a
cross-validation, the seeds of a sweep) are independent until their
hypergradients are averaged. This module spreads them over processes started
by ``torchrun`` and brings the hypergradients back together, with PyTorch's own
engine: :mod:`torch.distributed`, NCCL between GPUs and gloo between CPUs.

A loop on ``W`` processes ("ranks") looks like this::

    import bilevel as bl

    ctx = bl.distributed.init("cuda")                  # or "cpu"; from torchrun's environment
    bl.distributed.broadcast(theta)                    # every rank starts from rank 0's theta
    for step in range(steps):
        batch = sample_tasks(B, generator)             # the same B tasks on every rank ...
        mine = bl.distributed.shard(batch)             # ... of which this rank keeps a contiguous share
        grads = sum_of_task_hypergradients(theta, mine)  # sum over this rank's tasks
        bl.distributed.all_reduce(grads)               # one collective: the sum over all B tasks
        update(theta, [g / B for g in grads])          # the same update on every rank

* :func:`init` reads ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), picks the backend from the
  device (NCCL for CUDA, gloo for the CPU), gives each rank its GPU
  (``cuda:LOCAL_RANK``) and sets a timeout on every collective. Run without
  ``torchrun``, it returns a one-process :class:`Context` and every function
  here is the identity, so one script runs both ways.
* :func:`shard_range` and :func:`shard`: which items of a batch this rank keeps
  (contiguous blocks, sizes differing by at most one).
* :func:`all_reduce` and :func:`broadcast`: a tree of tensors (a tensor, or a
  dict / list / tuple of them: gradients, parameters) in one collective per
  dtype and device, through one flat buffer, not one collective per tensor.
* :func:`broadcast_object`, :func:`all_gather_object`, :func:`barrier`: the
  same for picklable Python objects (random states, error messages) and for
  waiting.
* :func:`rank_seed`: a seed for this rank's own random numbers (dropout,
  evaluation episodes), different on every rank, reproducible for a fixed
  world size.

What is invariant and what is not
---------------------------------
A result does not depend on the number of ranks when (1) the random numbers
that decide the work (which tasks, in which order) come from a generator seeded
the same on every rank, each rank drawing the whole batch and keeping its
shard, and (2) the per-item hypergradients are summed and divided by the whole
batch size. The sum is then the single-process sum in another association
order: equal to float rounding (about 1e-7 relative in float32), not bit for
bit. Random numbers drawn from a :func:`rank_seed` stream differ between ranks
and between world sizes by design: a run is reproducible for a fixed world
size only.

Failures
--------
A collective that cannot complete raises :class:`DistributedError` instead of
hanging: a rank that died is noticed at once (its connections close), a rank
that hangs after the process group's timeout (:func:`init`'s ``timeout``,
default :data:`DEFAULT_TIMEOUT` seconds, or ``$BILEVEL_DIST_TIMEOUT``). gloo
raises in the waiting rank; NCCL's watchdog aborts the process (PyTorch's
default ``TORCH_NCCL_ASYNC_ERROR_HANDLING``), which ``torchrun`` reports.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import tree as _tree

__all__ = [
    "DistributedError",
    "Context",
    "launched",
    "init",
    "shutdown",
    "shard_range",
    "shard",
    "all_reduce",
    "broadcast",
    "broadcast_object",
    "all_gather_object",
    "barrier",
    "rank_seed",
    "BACKENDS",
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
]

logger = logging.getLogger(__name__)

#: Backends :func:`init` accepts (``None`` chooses: NCCL for a CUDA device, gloo otherwise).
BACKENDS = ("gloo", "nccl")
#: Seconds a collective waits for the other ranks before it fails (unless :func:`init` is told otherwise).
DEFAULT_TIMEOUT = 600.0
#: The environment variable that sets the timeout when :func:`init` is given none.
TIMEOUT_ENV = "BILEVEL_DIST_TIMEOUT"
#: The variables ``torchrun`` sets for every process it starts.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_OPS = ("sum", "mean", "max", "min")


class DistributedError(RuntimeError):
    """A collective, or the process group itself, failed; the message says why and what to do.

    Attributes
    ----------
    timed_out : bool
        ``True`` when a rank did not take part within the process group's
        timeout (it hangs, or is much slower than the others); ``False`` when a
        rank stopped (its connections closed) or the launch is wrong.
    """

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out

    def __reduce__(self):  # keep ``timed_out`` through pickling (object collectives, multiprocessing)
        return (_rebuild_error, (str(self), self.timed_out))


def _rebuild_error(message: str, timed_out: bool) -> DistributedError:
    return DistributedError(message, timed_out=timed_out)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: returned by :func:`init`.

    Attributes
    ----------
    rank : int
        This process's index, ``0 .. world_size - 1`` (``0`` without ``torchrun``).
    world_size : int
        The number of processes of the job (``1`` without ``torchrun``).
    local_rank : int
        The index of this process on its machine (its GPU: ``cuda:local_rank``).
    backend : str or None
        ``"gloo"`` or ``"nccl"``; ``None`` when no process group is used.
    device : torch.device
        The device this rank computes on.
    timeout : float
        Seconds a collective waits for the other ranks before it fails.

    Examples
    --------
    >>> ctx = Context(rank=1, world_size=4, local_rank=1, backend="gloo", device=torch.device("cpu"), timeout=60.0)
    >>> ctx.enabled, ctx.is_main
    (True, False)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    timeout: float = DEFAULT_TIMEOUT

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use (the process was started by ``torchrun``)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the rank that writes files and prints."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment holds ``WORLD_SIZE`` and ``RANK``).

    Examples
    --------
    >>> import os
    >>> launched() == ("WORLD_SIZE" in os.environ and "RANK" in os.environ)
    True
    """
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    if text is None:
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        raise DistributedError(f"the environment lacks {', '.join(missing)}, which torchrun sets for every process; "
                               f"launch with torchrun (torchrun --standalone --nproc_per_node N ...), or set all of "
                               f"{', '.join(_TORCHRUN_ENV)} yourself.")
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"${name}={text!r} is not an integer; torchrun sets it, so launch with torchrun "
                               f"or set it to the process's number.") from None


def _resolve_timeout(timeout: float | None) -> float:
    source = "timeout"
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT
        source = f"${TIMEOUT_ENV}"
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"{source}={text!r} is not a number of seconds; set it to e.g. 600.") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise ValueError(f"{source} must be a finite number of seconds > 0, got {timeout!r}.")
    return float(timeout)


def _current() -> Context | None:
    """The context of the initialised default process group (:func:`init`'s, or one made without it), or None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _CONTEXT is not None:
        return _CONTEXT
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=backend, device=device)


_CONTEXT: Context | None = None


def init(device: str | torch.device = "cpu", *, backend: str | None = None,
         timeout: float | None = None) -> Context:
    """Join the job ``torchrun`` started (or, without ``torchrun``, describe a one-process job).

    Parameters
    ----------
    device : str or torch.device, default "cpu"
        Where this rank computes. ``"cuda"`` becomes ``cuda:LOCAL_RANK``: one
        GPU per process, as ``torchrun --nproc_per_node`` (at most the node's
        GPU count) starts them.
    backend : {"gloo", "nccl"} or None
        ``None`` chooses NCCL for a CUDA device and gloo otherwise.
    timeout : float or None
        Seconds a collective waits for every rank before it raises
        :class:`DistributedError`; ``None`` reads ``$BILEVEL_DIST_TIMEOUT``,
        else :data:`DEFAULT_TIMEOUT`.

    Returns
    -------
    Context
        Rank, world size, local rank, backend, device and timeout. Without
        ``torchrun`` (see :func:`launched`): rank 0 of 1, ``backend=None``, no
        process group, and the collectives of this module are the identity.

    Raises
    ------
    DistributedError
        If torchrun's environment is incomplete, a GPU is asked for that the
        node lacks (more processes per node than GPUs), NCCL without CUDA, an
        explicit ``cuda:i`` under several ranks, or the rendezvous fails.
    ValueError
        If ``backend`` is unknown or ``timeout`` is not a positive number.

    Notes
    -----
    Calling :func:`init` again in the same process returns the same context
    (and checks that it asks for the same thing). :func:`shutdown` ends the
    process group.

    Examples
    --------
    Without ``torchrun`` there is no process group:

    >>> import os
    >>> ctx = init("cpu") if not launched() else None
    >>> ctx is None or (ctx.rank, ctx.world_size, ctx.enabled)
    (0, 1, False)
    """
    global _CONTEXT
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))} "
                         f"(or None: NCCL for CUDA, gloo otherwise).")
    seconds = _resolve_timeout(timeout)
    device = torch.device(device)
    if not launched():
        if backend == "nccl" and not torch.cuda.is_available():
            raise DistributedError("backend 'nccl' needs CUDA, and torch sees no CUDA device; use backend 'gloo' "
                                   "(or None) on CPUs.")
        return Context(device=device, timeout=seconds)
    dist = torch.distributed
    if not dist.is_available():
        raise DistributedError("this build of torch has no torch.distributed; install a build with it (the "
                               "official wheels have it) to run under torchrun.")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            _env_int(name)  # raises, naming what is missing
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"torchrun's environment is inconsistent (RANK={rank}, WORLD_SIZE={world}, "
                               f"LOCAL_RANK={local}); launch with torchrun.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {str(device)!r} was asked for, but torch sees no CUDA device on rank "
                                   f"{rank}; use the CPU (backend gloo) or a machine with GPUs.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index != local and world > 1:
            raise DistributedError(f"device {str(device)!r} on rank {rank} of {world}: under torchrun every rank "
                                   f"takes its own GPU, cuda:LOCAL_RANK; pass 'cuda' without an index (restrict the "
                                   f"GPUs with CUDA_VISIBLE_DEVICES).")
        index = local if device.index is None else device.index
        if index >= count:
            raise DistributedError(f"rank {rank} (local rank {local}) needs cuda:{index}, but this node has {count} "
                                   f"GPU(s); start at most {count} processes per node (torchrun --nproc_per_node "
                                   f"{count}).")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    chosen = backend or ("nccl" if device.type == "cuda" else "gloo")
    if chosen == "nccl" and device.type != "cuda":
        raise DistributedError(f"backend 'nccl' communicates between GPUs only, and this rank computes on "
                               f"{str(device)!r}; use backend 'gloo' (or None) on CPUs, or a CUDA device.")
    if chosen == "nccl" and not dist.is_nccl_available():
        raise DistributedError("backend 'nccl' is not available in this build of torch; use a CUDA build of torch, "
                               "or backend 'gloo'.")
    wanted = Context(rank=rank, world_size=world, local_rank=local, backend=chosen, device=device, timeout=seconds)
    if dist.is_initialized():
        if _CONTEXT is not None and _CONTEXT != wanted:
            raise DistributedError(f"the process group is already initialised as {_CONTEXT}, and init() was asked "
                                   f"for {wanted}; call shutdown() first.")
        _CONTEXT = _CONTEXT or wanted
        return _CONTEXT
    try:
        dist.init_process_group(backend=chosen, timeout=datetime.timedelta(seconds=seconds))
    except Exception as e:  # noqa: BLE001 - any failure of the rendezvous is reported the same way
        raise DistributedError(
            f"rank {rank} of {world} could not join the process group ({_first_line(e)}); check that every node "
            f"runs the same torchrun command with the same --rdzv_endpoint (or MASTER_ADDR:MASTER_PORT) and that "
            f"the port is reachable, then launch again.", timed_out=_is_timeout(e)) from e
    _CONTEXT = wanted
    logger.info("rank %d of %d joined the process group (backend %s, device %s, timeout %.0f s)", rank, world,
                chosen, device, seconds)
    return wanted


def shutdown() -> None:
    """End the process group :func:`init` started, if any (each rank calls it once, at the end).

    The ranks first wait for each other (a barrier), so that none closes its
    connections while another still receives from it; if that wait fails (a
    rank is gone already), the group is ended all the same.

    Notes
    -----
    gloo's worker threads may release the last tensors of a collective after
    the call has returned; if the interpreter is shutting down by then, the
    process aborts (SIGABRT) although its work is done (a PyTorch behaviour,
    seen here in about one run in ten on a busy machine). A program whose exit
    status matters (a job under ``torchrun``, whose failure it reports) can end
    with :func:`os._exit` after flushing its output, as the few-shot
    application's command line does.

    Examples
    --------
    >>> shutdown()  # without a process group: nothing to do
    """
    global _CONTEXT
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        try:
            barrier()
        except DistributedError as e:
            logger.warning("shutdown: the ranks could not meet before ending the process group (%s)", e)
        dist.destroy_process_group()
    _CONTEXT = None


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        ctx = _current()
        world_size = 1 if ctx is None else ctx.world_size
        if rank is None:
            rank = 0 if ctx is None else ctx.rank
    elif rank is None:
        raise TypeError("pass rank together with world_size (or neither: this process's).")
    for name, value, low in (("rank", rank, 0), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size {world_size}; ranks run from 0 to {world_size - 1}.")
    return rank, world_size


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The indices of the batch items that ``rank`` keeps, out of ``range(n)``: a contiguous block.

    The first ``n % world_size`` ranks keep ``n // world_size + 1`` items, the
    others ``n // world_size``; the blocks follow each other in rank order and
    cover every item once. A rank beyond ``n`` gets an empty range.

    Parameters
    ----------
    n : int
        The batch size.
    rank, world_size : int or None
        Default: this process's (rank 0 of 1 without a process group).

    Examples
    --------
    >>> [shard_range(10, r, 3) for r in range(3)]
    [range(0, 4), range(4, 7), range(7, 10)]
    >>> shard_range(5)  # one process keeps everything
    range(0, 5)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the batch size), got {n!r}.")
    rank, world = _rank_world(rank, world_size)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _map(tree: Any, fn, path: str = "") -> Any:
    """``fn`` on every tensor of a tensor / dict / list / tuple (named tuples kept) tree."""
    if isinstance(tree, torch.Tensor):
        return fn(tree, path or "<tensor>")
    if isinstance(tree, dict):
        return {k: _map(v, fn, f"{path}.{k}" if path else str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_map(v, fn, f"{path}[{i}]") for i, v in enumerate(tree)]
        if isinstance(tree, list):
            return items
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    where = f" at {path!r}" if path else ""
    raise TypeError(f"expected a tensor or a dict/list/tuple of tensors, found {type(tree).__name__}{where}.")


def shard(batch: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """This rank's share of a batch: every tensor of ``batch`` sliced along dim 0 by :func:`shard_range`.

    Parameters
    ----------
    batch : tensor, or dict / list / tuple (named tuples too) of tensors
        Tensors whose first dimension is the batch, all of the same length.
    rank, world_size : int or None
        Default: this process's.

    Returns
    -------
    The same structure, with views of the kept rows.

    Raises
    ------
    ValueError
        If the tensors disagree on the batch size, or one has no dimension.

    Examples
    --------
    >>> batch = {"x": torch.arange(10).view(5, 2), "y": torch.arange(5)}
    >>> shard(batch, rank=1, world_size=2)
    {'x': tensor([[6, 7],
            [8, 9]]), 'y': tensor([3, 4])}
    """
    sizes: dict[str, int] = {}

    def size(t: torch.Tensor, path: str) -> torch.Tensor:
        if t.dim() == 0:
            raise ValueError(f"{path} is a 0-d tensor; every tensor of a batch needs a leading batch dimension.")
        sizes[path] = t.shape[0]
        return t

    _map(batch, size)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the tensors of the batch disagree on its size (dim 0): "
                         f"{', '.join(f'{p}: {n}' for p, n in sizes.items())}; shard tensors of one batch.")
    n = next(iter(sizes.values()), 0)
    part = shard_range(n, rank, world_size)
    return _map(batch, lambda t, _: t[part.start:part.stop])


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text or isinstance(error, TimeoutError)


_LOST_PEER = ("closed by peer", "connection reset", "connection refused", "broken pipe", "connection closed",
              "socket closed", "end of file", "eof")


def _is_lost_peer(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, ConnectionError) or any(pattern in text for pattern in _LOST_PEER)


def _collective(what: str, fn):
    """Run a collective; turn torch's failure into a :class:`DistributedError` that says what to do."""
    try:
        return fn()
    except DistributedError:
        raise
    except (RuntimeError, TimeoutError, ConnectionError) as e:
        ctx = _current() or Context()
        timed_out = _is_timeout(e)
        if timed_out:
            cause = (f"a rank did not take part within the process group's timeout of {ctx.timeout:g} s (it hangs, "
                     f"or is far slower than the others)")
            advice = (f"If the ranks are only slow (a first data decoding, a long evaluation on one rank), raise the "
                      f"timeout (init(timeout=...) or ${TIMEOUT_ENV}).")
        elif _is_lost_peer(e):
            cause = "another rank stopped (it crashed or was killed) or cannot be reached"
            advice = "If every rank is still running, check the network between the nodes."
        else:
            cause = "the collective failed"
            advice = ("If no rank stopped, the ranks may have passed different trees (every rank must pass the same "
                      "structure, shapes and dtypes, in the same order of collectives).")
        raise DistributedError(
            f"{what} failed on rank {ctx.rank} of {ctx.world_size}: {cause} ({ctx.backend}: {_first_line(e)}). The "
            f"job cannot continue: find the first error in the other ranks' output, fix it and start again (from "
            f"the last checkpoint, if the program writes them). {advice}", timed_out=timed_out) from e


def _buckets(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _check_leaves(tensors: list[torch.Tensor], ctx: Context, what: str) -> None:
    for t in tensors:
        if ctx.backend == "nccl" and t.device.type != "cuda":
            raise ValueError(f"{what}: NCCL reduces CUDA tensors only, and a {tuple(t.shape)} tensor is on "
                             f"{t.device}; move it to {ctx.device} first.")
        if ctx.backend == "gloo" and t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{what}: gloo cannot communicate tensors on {t.device}; move them to the CPU first.")


def _flat_collective(tensors: list[torch.Tensor], run) -> None:
    """One collective per (dtype, device) bucket: pack into one flat buffer, ``run(buffer)``, unpack in place."""
    for indices in _buckets(tensors).values():
        group = [tensors[i] for i in indices]
        if len(group) == 1 and group[0].is_contiguous():
            run(group[0])  # in place, no copy
            continue
        flat = torch.cat([t.reshape(-1) for t in group])
        run(flat)
        parts = flat.split([t.numel() for t in group])
        torch._foreach_copy_(group, [p.view_as(t) for p, t in zip(parts, group)])


def all_reduce(tree: Any, op: str = "sum") -> Any:
    """Reduce a tree of tensors over all ranks, in place: one collective per dtype and device.

    The tensors of each (dtype, device) group are packed into one flat buffer,
    reduced with one ``torch.distributed.all_reduce`` and copied back, so a
    step's gradients cost one collective, not one per tensor. Every rank must
    pass a tree of the same structure, shapes and dtypes.

    Parameters
    ----------
    tree : tensor, or dict / list / tuple of tensors
        Gradients, statistics, ...; overwritten with the result on every rank.
    op : {"sum", "mean", "max", "min"}
        ``"mean"`` is the sum divided by the world size.

    Returns
    -------
    The same ``tree`` (its tensors now hold the reduction).

    Raises
    ------
    DistributedError
        If another rank stopped, or did not take part within the timeout.
    ValueError
        If ``op`` is unknown, or a tensor is on a device the backend cannot
        reach (NCCL: CUDA tensors only).
    TypeError
        If ``tree`` holds something other than tensors (``None`` gradients:
        pass zeros, every rank must send the same structure).

    Examples
    --------
    Without a process group (one process) the reduction is the identity:

    >>> grads = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    >>> all_reduce(grads)["w"]
    tensor([[1., 1.],
            [1., 1.]])
    """
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; use one of {', '.join(map(repr, _OPS))}.")
    tensors = _tree.leaves(tree, "the tree to all-reduce")
    if op == "mean" and not all(t.is_floating_point() or t.is_complex() for t in tensors):
        raise TypeError("op='mean' divides by the world size and needs floating tensors; cast the integer ones (or "
                        "use op='sum').")
    ctx = _current()
    if ctx is None or ctx.world_size == 1:
        return tree
    _check_leaves(tensors, ctx, "all_reduce")
    dist = torch.distributed
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                 "min": dist.ReduceOp.MIN}[op]

    def run(buffer: torch.Tensor) -> None:
        _collective("all_reduce", lambda: dist.all_reduce(buffer, op=reduce_op))
        if op == "mean":
            buffer.div_(ctx.world_size)

    with torch.no_grad():
        _flat_collective(tensors, run)
    return tree


def broadcast(tree: Any, src: int = 0) -> Any:
    """Give every rank the values of rank ``src`` for a tree of tensors, in place: one collective per dtype and device.

    Typically the initial parameters, so that all ranks start from the same
    point whatever their local random state.

    Parameters
    ----------
    tree : tensor, or dict / list / tuple of tensors
        The same structure, shapes and dtypes on every rank.
    src : int, default 0
        The rank whose values everyone receives.

    Returns
    -------
    The same ``tree``.

    Examples
    --------
    >>> theta = {"w": torch.ones(3)}
    >>> broadcast(theta)["w"]  # one process: nothing to receive
    tensor([1., 1., 1.])
    """
    tensors = _tree.leaves(tree, "the tree to broadcast")
    ctx = _current()
    world = 1 if ctx is None else ctx.world_size
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < world:
        raise ValueError(f"src must be a rank from 0 to {world - 1}, got {src!r}.")
    if ctx is None or world == 1:
        return tree
    _check_leaves(tensors, ctx, "broadcast")
    dist = torch.distributed
    with torch.no_grad():
        _flat_collective(tensors, lambda buffer: _collective("broadcast", lambda: dist.broadcast(buffer, src=src)))
    return tree


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The picklable ``obj`` of rank ``src``, on every rank (the others' ``obj`` is ignored).

    Examples
    --------
    >>> broadcast_object({"step": 3})
    {'step': 3}
    """
    ctx = _current()
    if ctx is None or ctx.world_size == 1:
        return obj
    box = [obj if ctx.rank == src else None]
    _collective("broadcast_object", lambda: torch.distributed.broadcast_object_list(box, src=src))
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, as a list in rank order, on every rank.

    Examples
    --------
    >>> all_gather_object("mine")  # one process
    ['mine']
    """
    ctx = _current()
    if ctx is None or ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    try:
        pickle.dumps(obj)
    except Exception as e:  # noqa: BLE001 - name the object instead of failing inside torch
        raise TypeError(f"all_gather_object needs a picklable object, got {type(obj).__name__} ({e}).") from e
    _collective("all_gather_object", lambda: torch.distributed.all_gather_object(out, obj))
    return out


def barrier() -> None:
    """Wait until every rank gets here (or fail with :class:`DistributedError` after the timeout).

    Examples
    --------
    >>> barrier()  # one process: returns at once
    """
    ctx = _current()
    if ctx is None or ctx.world_size == 1:
        return
    kwargs = {"device_ids": [ctx.device.index]} if ctx.backend == "nccl" else {}
    _collective("barrier", lambda: torch.distributed.barrier(**kwargs))


def rank_seed(seed: int, rank: int | None = None) -> int:
    """A seed for one rank's own random numbers: different on every rank, the same on every run.

    Derived from ``(seed, rank)`` with :class:`numpy.random.SeedSequence`, so
    that the streams of neighbouring seeds and ranks do not overlap in any
    structured way. Use it for what may differ between ranks (dropout, data
    augmentation, per-rank evaluation episodes); a run that uses it is
    reproducible for a fixed world size, not across world sizes. What must not
    depend on the world size (which tasks a step draws) takes a generator
    seeded the same on every rank instead.

    Parameters
    ----------
    seed : int
        The run's seed (>= 0).
    rank : int or None
        Default: this process's rank (0 without a process group).

    Returns
    -------
    int
        A seed in ``[0, 2**63)`` for :func:`torch.manual_seed` or a
        :class:`torch.Generator`.

    Examples
    --------
    >>> rank_seed(0, rank=0) == rank_seed(0, rank=0) != rank_seed(0, rank=1)
    True
    >>> g = torch.Generator().manual_seed(rank_seed(7, rank=3))
    """
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
    if rank is None:
        ctx = _current()
        rank = 0 if ctx is None else ctx.rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}.")
    state = np.random.SeedSequence([seed, rank]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
