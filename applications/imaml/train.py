"""Meta-training and evaluation loops: progress bar, logs, plots, atomic checkpoints, exact resume.

Under ``torchrun`` (a :class:`bilevel.distributed.Context` passed as ``dist``) the same loops run on
every rank: each meta-step draws the whole meta-batch from the train sampler (seeded alike on every
rank), each rank computes the meta-gradient of its contiguous share of the tasks, and one all-reduce
sums them; evaluation episodes are split the same way and their accuracies gathered. Rank 0 alone
writes the run folder and shows progress bars; checkpoints hold every rank's random state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import bilevel as bl

from .algorithms import AlgorithmConfig, MetaLearner, TaskBatch
from .configs import PAPER_TABLE2, ExperimentConfig
from .io import atomic_save, atomic_write_text, git_commit
from .model import ConvNet, init_params

__all__ = ["Trainer", "evaluate", "confidence_interval", "atomic_save", "EvalResult", "CheckpointError",
           "CheckpointMismatchError", "read_checkpoint", "check_world_size"]

logger = logging.getLogger(__name__)
#: When this module was imported: ``summary.json``'s ``wall_seconds`` count from here (data loading included).
_STARTED = time.perf_counter()


#: Formats of :meth:`Trainer.state_dict` that :func:`read_checkpoint` reads (1 lacks the CUDA and
#: meta-test sampler states; 3 is written under torchrun: the world size and every rank's random state).
CHECKPOINT_FORMATS = (1, 2, 3)
_CHECKPOINT_KEYS = ("format", "config", "step", "theta", "optimizer", "train_sampler", "torch_rng", "history")
#: Fields of :class:`~applications.imaml.configs.ExperimentConfig` a resumed run may change: they leave the
#: trajectory of the parameters and of every random stream as it is (how long, how often to save, how many
#: final evaluation episodes).
RESUMABLE_CHANGES = ("meta_steps", "checkpoint_every", "eval_episodes")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: truncated, not a checkpoint, or from another run.

    The message names the file, what is wrong with it and what to do.
    """


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint was written by another configuration (or data) than the trainer resuming it."""


def read_checkpoint(path: str | os.PathLike, config: ExperimentConfig | None = None) -> dict[str, Any]:
    """Load and check a checkpoint written by :meth:`Trainer.save` (tensors on the CPU).

    Parameters
    ----------
    path:
        The ``checkpoint.pt`` of a run folder.
    config:
        If given, the configuration that must have written it.

    Returns
    -------
    dict
        The :meth:`Trainer.state_dict` that was saved; its ``config`` builds an
        :class:`~applications.imaml.configs.ExperimentConfig`.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    CheckpointError
        If the file is truncated, garbage or not a checkpoint of this application
        (the message says to delete it or train again).
    CheckpointMismatchError
        If ``config`` is given and differs from the checkpoint's in more than
        :data:`RESUMABLE_CHANGES` (the message lists the differences).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
    >>> _ = path.write_bytes(b"half a file")
    >>> read_checkpoint(path)
    Traceback (most recent call last):
    ...
    applications.imaml.train.CheckpointError: the checkpoint ... is unreadable (...); it is truncated or not a checkpoint: ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}.")
    fix = "delete it and train again (or restore it from a copy)"
    try:
        # weights_only: tensors and plain containers only, so a foreign file cannot run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file means a bad file
        detail = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]  # torch's messages run long
        raise CheckpointError(f"the checkpoint {path} is unreadable ({type(e).__name__}: {detail}); it is "
                              f"truncated or not a checkpoint: {fix}.") from e
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this application (it lacks {', '.join(missing)}); "
                              f"{fix}.")
    if state["format"] not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{path} has checkpoint format {state['format']!r}, this version reads "
                              f"{', '.join(map(str, CHECKPOINT_FORMATS))}; use the version that wrote it or {fix}.")
    try:
        saved = ExperimentConfig(**state["config"]).to_dict()  # fills in fields added since it was written
    except TypeError as e:
        raise CheckpointError(f"{path} holds a configuration this version does not know ({e}); use the version "
                              f"that wrote it or {fix}.") from e
    diff = [] if config is None else _config_diff(
        {k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES},
        {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES})
    if diff:
        raise CheckpointMismatchError(
            f"the checkpoint {path} was written by a different configuration ({'; '.join(diff)}); use another "
            f"--out folder, or the same config and overrides as that run.")
    return state


def check_world_size(state: dict[str, Any], world_size: int, path: str | os.PathLike) -> None:
    """Refuse to continue a checkpoint's training on another number of processes.

    Parameters
    ----------
    state:
        A checkpoint (:func:`read_checkpoint`); single-process checkpoints
        (formats 1 and 2) count as written by one process.
    world_size:
        The processes of the run that wants to resume it (1 without torchrun).
    path:
        The checkpoint's file, for the message.

    Raises
    ------
    CheckpointMismatchError
        If the numbers differ: every rank's random stream is in the checkpoint,
        and there is no exact way to hand them to another number of ranks.

    Examples
    --------
    >>> check_world_size({"format": 3, "world_size": 2}, 2, "run/checkpoint.pt")
    >>> check_world_size({"format": 2}, 2, "run/checkpoint.pt")
    Traceback (most recent call last):
    ...
    applications.imaml.train.CheckpointMismatchError: the checkpoint run/checkpoint.pt was written by a run on 1 process, this run has 2; ...
    """
    saved = int(state.get("world_size", 1))
    if saved == world_size:
        return
    launch = ("python -m applications.imaml train ... (without torchrun)" if saved == 1 else
              f"torchrun with {saved} processes in all (--nnodes x --nproc_per_node = {saved})")
    raise CheckpointMismatchError(
        f"the checkpoint {path} was written by a run on {saved} process{'es' if saved > 1 else ''}, this run has "
        f"{world_size}; every rank's random state is in it, so resume with the same number: {launch}. To go on with "
        f"another number of processes, start a new run in another --out folder.")


def _config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: checkpoint A, now B"`` for every entry (nested dicts by dotted keys) that differs."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% normal confidence interval, in percent."""
    acc = accuracies.double() * 100.0
    n = acc.numel()
    if n < 2:
        return float(acc.mean()), float("nan")
    return float(acc.mean()), float(1.96 * acc.std(unbiased=True) / math.sqrt(n))


@dataclass
class EvalResult:
    """Meta-test accuracy over ``episodes`` episodes: mean and 95% interval half-width (percent)."""

    accuracy: float
    ci95: float
    episodes: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.accuracy:.2f} +- {self.ci95:.2f}% over {self.episodes} episodes"


def evaluate(learner: MetaLearner, theta: dict[str, torch.Tensor], sampler, episodes: int, *,
             log_lam: dict[str, torch.Tensor] | None = None, batch_size: int = 20,
             progress: bool = True, dist: bl.distributed.Context | None = None) -> EvalResult:
    """Adapt to ``episodes`` meta-test episodes and measure query accuracy (no meta-gradients).

    With ``dist`` (a :class:`bilevel.distributed.Context` of several ranks) every rank draws the same
    batches of episodes, adapts to its contiguous share of each batch
    (:func:`bilevel.distributed.shard_range`), and one all-reduce gathers the per-episode accuracies
    in episode order: the result is the single-process one over the same episodes.
    """
    from tqdm.auto import tqdm

    if dist is not None and dist.enabled:
        return _evaluate_distributed(learner, theta, sampler, episodes, log_lam=log_lam, batch_size=batch_size,
                                     progress=progress and dist.is_main, dist=dist)
    start = time.perf_counter()
    accs = []
    bar = tqdm(total=episodes, desc="evaluate", unit="ep", disable=not progress, leave=False)
    remaining = episodes
    while remaining > 0:
        ep = sampler.sample(min(batch_size, remaining))
        accs += learner.map(lambda i: _episode_accuracy(learner, theta, ep, i, log_lam), ep.support_x.shape[0])
        bar.update(ep.support_x.shape[0])
        remaining -= ep.support_x.shape[0]
    bar.close()
    mean, ci = confidence_interval(torch.stack(accs))
    return EvalResult(mean, ci, len(accs), time.perf_counter() - start)


def _episode_accuracy(learner: MetaLearner, theta: dict[str, torch.Tensor], ep, i: int,
                      log_lam: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Query accuracy of episode ``i`` of ``ep`` after adapting to its support set (a 0-d float tensor)."""
    phi = learner.adapt(theta, ep.support_x[i], ep.support_y[i], log_lam)
    with torch.no_grad():
        pred = learner.logits(phi, ep.query_x[i]).argmax(-1)
    return (pred == ep.query_y[i]).float().mean()


def _evaluate_distributed(learner, theta, sampler, episodes, *, log_lam, batch_size, progress, dist) -> EvalResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    accs = torch.zeros(episodes, dtype=torch.float64, device=dist.device)
    bar = tqdm(total=episodes, desc="evaluate", unit="ep", disable=not progress, leave=False)
    done = 0
    while done < episodes:
        ep = sampler.sample(min(batch_size, episodes - done))
        n = ep.support_x.shape[0]
        mine = bl.distributed.shard_range(n)
        for i, acc in zip(mine, learner.map(lambda j: _episode_accuracy(learner, theta, ep, mine[j], log_lam),
                                            len(mine))):
            accs[done + i] = acc  # the float32 value, exactly
        done += n
        bar.update(n)
    bar.close()
    bl.distributed.all_reduce(accs)  # each episode is nonzero on one rank only: the sum gathers them, exactly
    mean, ci = confidence_interval(accs.float().cpu())
    return EvalResult(mean, ci, episodes, time.perf_counter() - start)


class Trainer:
    """Meta-trains one configuration, with checkpoints every ``checkpoint_every`` steps and on Ctrl-C.

    Parameters
    ----------
    config:
        The experiment.
    out_dir:
        Where ``checkpoint.pt``, ``metrics.jsonl``, ``learning_curve.png`` and ``summary.json`` go.
    train_sampler, test_sampler:
        Episode samplers (``sample(batch) -> episode``, ``state_dict()``, ``load_state_dict()``).
    device:
        Where the network runs.
    in_channels, image_size:
        Input shape of the network.
    dist:
        The :class:`bilevel.distributed.Context` of a ``torchrun`` job (``None``, or a context
        without a process group: one process, as before). Every rank builds the trainer with the
        same configuration and samplers (seeded alike); rank 0's initial parameters are broadcast;
        each rank's global torch random stream is seeded with
        :func:`bilevel.distributed.rank_seed` (for rank-specific randomness such as dropout; the
        tasks and episodes come from the samplers' own generators, the same on every rank). Only
        rank 0 writes files and shows progress bars. :meth:`train`, :meth:`save`,
        :meth:`resume`, :func:`evaluate` and :meth:`final_evaluation` are then collective: every
        rank calls them at the same point.
    workers:
        Tasks adapted at once on CPU threads (:class:`applications.imaml.algorithms.MetaLearner`'s
        ``workers``; default 1). The command line gives its ``--threads`` on a CPU.

    Raises
    ------
    ValueError
        If the meta-batch has fewer tasks than ``dist`` has ranks (each rank needs one).
    """

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, train_sampler, test_sampler, *,
                 device: str | torch.device = "cpu", in_channels: int = 1, image_size: int = 28,
                 progress: bool = True, dist: bl.distributed.Context | None = None, workers: int = 1):
        self.dist = dist if dist is not None and dist.enabled else None
        self.is_main = self.dist is None or self.dist.is_main
        if self.dist is not None and config.meta_batch < self.dist.world_size:
            raise ValueError(f"the meta-batch has {config.meta_batch} task(s) for {self.dist.world_size} ranks; each "
                             f"rank needs at least one: use a meta-batch >= {self.dist.world_size} or fewer ranks.")
        self.config = config
        self.out_dir = Path(out_dir)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.train_sampler = train_sampler
        self.test_sampler = test_sampler
        self.device = torch.device(device)
        self.progress = progress and self.is_main
        net = dict(config.network)
        scheme = net.pop("init", "he")
        self.model = ConvNet(config.n_way, in_channels=in_channels, image_size=image_size, **net).to(self.device)
        self.learner = MetaLearner(self.model, AlgorithmConfig(**config.algorithm), workers=workers)
        self.theta = init_params(self.model, seed=config.seed, device=self.device, scheme=scheme)
        self.log_lam = None
        if self.learner.config.learn_lam:
            lam = float(self.learner.config.lam)
            self.log_lam = {k: torch.full_like(v, math.log(lam)).detach().requires_grad_(True)
                            for k, v in self.theta.items()}
        params = list(self.theta.values()) + (list(self.log_lam.values()) if self.log_lam else [])
        self.optimizer = torch.optim.Adam(params, lr=config.outer_lr)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        if self.dist is not None:
            bl.distributed.broadcast(self._parameters())  # one flat buffer: every rank starts from rank 0's
            torch.manual_seed(bl.distributed.rank_seed(config.seed))

    def _parameters(self) -> list[torch.Tensor]:
        """The tensors Adam updates: theta's, then log_lam's when lam is learned."""
        return list(self.theta.values()) + (list(self.log_lam.values()) if self.log_lam else [])

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    # -- checkpoints -------------------------------------------------------------------------------
    #: Step of the checkpoint on disk as far as this trainer knows (set by :meth:`save` and :meth:`resume`).
    saved_step: int | None = None
    _stop_signal: int | None = None
    #: Under torchrun: whether the last meta-step's all-reduce carried a stop request from any rank.
    _stop_agreed: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs.

        Parameters, Adam's state, both episode samplers' states, torch's CPU
        random state and, when CUDA has been initialised in this process,
        every CUDA device's random state (a process that never initialised
        CUDA drew no CUDA random numbers, and asking for them would initialise
        CUDA, and take GPU memory, in a CPU run), the step and the history of
        logged records.

        Under torchrun (collective: every rank calls it) the format is 3 and it also
        holds ``world_size`` and ``rank_rng``, every rank's CPU random state and that of
        its CUDA device (gathered to every rank); ``torch_rng`` is rank 0's. A check
        that every rank holds the same parameters comes with the gathering.
        """
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        state = {
            "format": 2,
            "config": self.config.to_dict(),
            "step": self.step,
            "theta": {k: v.detach().cpu() for k, v in self.theta.items()},
            "log_lam": None if self.log_lam is None else {k: v.detach().cpu() for k, v in self.log_lam.items()},
            "optimizer": self.optimizer.state_dict(),
            "train_sampler": self.train_sampler.state_dict(),
            "test_sampler": self.test_sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "history": self.history,
        }
        if self.dist is not None:
            state.update(format=3, world_size=self.dist.world_size, cuda_rng=None, rank_rng=self._gather_rng())
        return state

    def _gather_rng(self) -> list[dict[str, Any]]:
        """Every rank's random states, in rank order; fails if the ranks' parameters differ."""
        on_cuda = self.device.type == "cuda" and torch.cuda.is_initialized()
        with torch.no_grad():
            checksum = float(sum(p.double().sum() for p in self._parameters()))
        mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if on_cuda else None,
                "checksum": checksum}
        everyone = bl.distributed.all_gather_object(mine)
        sums = [r.pop("checksum") for r in everyone]
        if len(set(sums)) > 1:
            raise bl.distributed.DistributedError(
                f"the ranks' parameters differ at step {self.step} (sums {sums}): the ranks did not apply the same "
                f"updates; make every rank run the same code and data, and resume from the last checkpoint.")
        return everyone

    def save(self) -> None:
        """Write the checkpoint atomically (readers see the old file or the complete new one).

        Under torchrun every rank calls it (the random states are gathered) and rank 0 writes.
        """
        state = self.state_dict()
        if self.is_main:
            atomic_save(state, self.checkpoint_path)
        if self.dist is not None:  # no rank moves on (or exits after a signal) before the file is complete
            bl.distributed.barrier()
        self.saved_step = self.step

    def resume(self, *, training: bool = True) -> None:
        """Continue exactly where the checkpoint in ``out_dir`` stopped (same RNG streams).

        Parameters
        ----------
        training:
            ``True``: restore all that continued training needs (parameters,
            Adam's state, the samplers' and torch's random streams, step,
            history) and rewrite ``metrics.jsonl`` to the checkpoint's records:
            a run killed (``kill -9``, power loss) after its last checkpoint had
            logged later steps, which the resumed run logs again. ``False``
            (evaluation): parameters, step and history only; nothing in the run
            folder is written, so a training still running there is unharmed.

        Under torchrun (collective) rank 0 reads the checkpoint and sends it to the
        other ranks (which need not see the run folder), and each rank takes back its
        own random state.

        Raises
        ------
        FileNotFoundError
            If ``out_dir`` holds no checkpoint.
        CheckpointError
            If the checkpoint is truncated or not a checkpoint.
        CheckpointMismatchError
            If it was written by another configuration, or with other data, or
            (``training``) by a run on another number of processes.
        """
        path = self.checkpoint_path
        state = self._read_state(training)
        if training:
            check_world_size(state, 1 if self.dist is None else self.dist.world_size, path)
        try:
            theta = {k: state["theta"][k] for k in self.theta}
            log_lam = None if self.log_lam is None else {k: state["log_lam"][k] for k in self.log_lam}
            with torch.no_grad():
                for k, v in self.theta.items():
                    v.copy_(theta[k].to(self.device))
                if self.log_lam is not None:
                    for k, v in self.log_lam.items():
                        v.copy_(log_lam[k].to(self.device))
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointMismatchError(f"the parameters in {path} do not fit this network ({e}); use another "
                                          f"--out folder.") from e
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.saved_step = self.step
        if training:
            try:
                self.train_sampler.load_state_dict(state["train_sampler"])
                if state.get("test_sampler") is not None:
                    self.test_sampler.load_state_dict(state["test_sampler"])
            except ValueError as e:
                raise CheckpointMismatchError(f"the episode stream in {path} does not fit this data ({e}); resume "
                                              f"with the data the run was trained on (--data-dir).") from e
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("rank_rng") is not None:  # written under torchrun: this rank's own streams
                mine = state["rank_rng"][0 if self.dist is None else self.dist.rank]
                torch.set_rng_state(mine["cpu"])
                if mine.get("cuda") is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(mine["cuda"], self.device)
            else:
                torch.set_rng_state(state["torch_rng"])
                self._restore_cuda_rng(state.get("cuda_rng"))
            if self.is_main:
                self._rewrite_metrics()
        logger.info("resumed from %s at step %d", path, self.step)

    def _read_state(self, training: bool) -> dict[str, Any]:
        """The checkpoint's state (read by rank 0 and sent to every rank under torchrun)."""
        path = self.checkpoint_path

        def read() -> dict[str, Any]:
            if not path.exists():
                fix = "start without --resume" if training else "train first (python -m applications.imaml train ...)"
                raise FileNotFoundError(f"no checkpoint at {path}; {fix}.")
            return read_checkpoint(path, self.config)

        if self.dist is None:
            return read()
        outcome: tuple[str, Any] | None = None
        if self.is_main:
            try:
                outcome = ("state", read())
            except (FileNotFoundError, CheckpointError) as e:
                outcome = ("error", e)
        kind, value = bl.distributed.broadcast_object(outcome)
        if kind == "error":
            raise value
        return value

    def _restore_cuda_rng(self, states: list[torch.Tensor] | None) -> None:
        if states is None:
            return
        if not torch.cuda.is_available():
            logger.warning("the checkpoint holds the random states of %d CUDA devices, but torch sees none: "
                           "continuing without them", len(states))
            return
        count = torch.cuda.device_count()
        if len(states) != count:
            logger.warning("the checkpoint holds the random states of %d CUDA devices, this machine has %d: "
                           "restoring the first %d", len(states), count, min(count, len(states)))
        for i, s in enumerate(states[:count]):
            torch.cuda.set_rng_state(s, i)

    def _rewrite_metrics(self) -> None:
        """Make ``metrics.jsonl`` hold the checkpoint's records, each step once (atomically).

        The checkpoint's history is the record of every step up to its own, so
        lines logged after it (by a run that died before its next checkpoint)
        and a line torn by the kill go; the resumed run logs those steps again.
        """
        path = self.out_dir / "metrics.jsonl"
        old = path.read_text(errors="replace").count("\n") if path.exists() else 0
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.history), path)
        if old != len(self.history):
            logger.info("%s: kept the %d records up to step %d of the checkpoint (it had %d lines)", path,
                        len(self.history), self.step, old)

    # -- training ----------------------------------------------------------------------------------
    def meta_step(self) -> dict[str, float]:
        """One outer step: sample a meta-batch, accumulate its meta-gradient, update with Adam.

        Under torchrun every rank draws the whole meta-batch, computes the meta-gradient of its
        share, and one all-reduce (:func:`bilevel.distributed.all_reduce`: the gradients, the
        ranks' statistics and their stop requests in one flat buffer) sums the shares, each
        weighted by its number of tasks over the meta-batch's: the mean over all tasks, as one
        process computes it, to float rounding. The record then has ``comm_seconds``, this
        rank's time in that all-reduce (waiting for the slowest rank included).
        """
        ep = self.train_sampler.sample(self.config.meta_batch)
        extra: dict[str, float] = {}
        if self.dist is not None:
            ep = bl.distributed.shard(ep)
        batch = TaskBatch(ep.support_x, ep.support_y, ep.query_x, ep.query_y)
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.learner.meta_gradient(self.theta, batch, self.log_lam)
        if self.dist is not None:
            stats, extra = self._reduce(stats, len(batch))
        grad_norm = math.sqrt(sum(float(v.grad.pow(2).sum()) for v in self.theta.values() if v.grad is not None))
        lr = self.config.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, **stats, "meta_grad_norm": grad_norm, "lr": lr, **extra}

    def _reduce(self, stats: dict[str, float], tasks: int) -> tuple[dict[str, float], dict[str, float]]:
        """Sum the ranks' meta-gradient shares and combine their statistics, in one all-reduce."""
        world, rank = self.dist.world_size, self.dist.rank
        weight = tasks / self.config.meta_batch
        params = self._parameters()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        torch._foreach_mul_(grads, weight)  # this rank's mean -> its share of the meta-batch's mean
        keys = sorted(stats)
        # one row per rank, zero elsewhere: the sum hands every rank every rank's row
        rows = torch.zeros(world, len(keys) + 2, dtype=grads[0].dtype, device=grads[0].device)
        rows[rank] = torch.tensor([float(stats[k]) for k in keys] + [weight, float(self._stop_signal is not None)],
                                  dtype=rows.dtype)
        start = time.perf_counter()
        bl.distributed.all_reduce(grads + [rows])
        table = rows.double().cpu()  # waits for the collective on a GPU too
        comm = time.perf_counter() - start
        for p, g in zip(params, grads):
            p.grad = g
        weights = table[:, len(keys)]
        out: dict[str, float] = {}
        for j, key in enumerate(keys):
            column = table[:, j]
            if key.endswith("_max"):
                out[key] = float(column.max())
            elif key == "negative_curvature":
                out[key] = int(round(float(column.sum())))
            else:  # means over tasks
                out[key] = float((column * weights).sum())
        self._stop_agreed = bool(table[:, -1].any())  # some rank was signalled: all stop after this step
        return out, {"comm_seconds": comm}

    def train(self, steps: int | None = None, *, on_step: Callable[[dict], None] | None = None) -> None:
        """Run until ``steps`` (default: the config's ``meta_steps``), checkpointing every ``checkpoint_every``.

        Ctrl-C (SIGINT) and SIGTERM never cut a meta-step in two: the signal
        handler only takes note, the current meta-step finishes and is logged,
        a checkpoint of that consistent state (parameters, Adam, samplers and
        random streams all after the same step) is written, and
        :class:`KeyboardInterrupt` is raised; :meth:`resume` then continues as
        if nothing had happened. A second signal during the same step stops at
        once without saving: the checkpoint on disk stays the last consistent
        one (:attr:`saved_step`). A :class:`KeyboardInterrupt` raised by
        ``on_step`` (called after each logged step) saves like a signal.

        Under torchrun a signal to any rank travels with the next meta-step's
        all-reduce, so every rank stops after the same step and they save
        together (``torchrun`` passes Ctrl-C on to every rank, a scheduler may
        signal one). ``on_step`` runs on every rank; a :class:`KeyboardInterrupt`
        from it must come on every rank at the same step. A rank that dies
        makes the others fail with :class:`bilevel.distributed.DistributedError`
        at their next collective, without saving: the checkpoint on disk stays
        the last one written.
        """
        from tqdm.auto import tqdm

        total = self.config.meta_steps if steps is None else steps
        self._stop_signal = None
        self._stop_agreed = False
        bar = tqdm(total=total, initial=self.step, desc=self.config.algorithm["name"], unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        metrics = (self.out_dir / "metrics.jsonl").open("a") if self.is_main else None
        previous = self._catch_signals()
        consistent = True  # False while a meta-step is half done: then the state must not be saved
        try:
            # training seconds accumulate over resumed sessions (the clock excludes evaluations at the end)
            start = time.perf_counter() - (self.history[-1].get("seconds", 0.0) if self.history else 0.0)
            while self.step < total:
                consistent = False
                record = self.meta_step()
                record["seconds"] = time.perf_counter() - start
                if self.config.eval_every and self.step % self.config.eval_every == 0:
                    res = evaluate(self.learner, self.theta, self.test_sampler, min(100, self.config.eval_episodes),
                                   log_lam=self.log_lam, progress=False, dist=self.dist)
                    record["val_accuracy"] = res.accuracy
                self.history.append(record)
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                consistent = True
                bar.set_postfix(loss=f"{record['query_loss']:.3f}", acc=f"{100 * record['query_accuracy']:.1f}%")
                bar.update(1)
                if on_step is not None:
                    on_step(record)
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
                if self._stop_after_step():
                    raise KeyboardInterrupt
            self.save()
            if self._stop_requested():  # the signal came during the final save: report it all the same
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if consistent:
                if self.saved_step != self.step:
                    self.save()
                if self.is_main:
                        logger.warning("interrupted at step %d; checkpoint written to %s (continue with --resume)",
                                   self.step, self.checkpoint_path)
            else:
                logger.warning("stopped during meta-step %d without saving it; %s", self.step + 1,
                               f"{self.checkpoint_path} holds step {self.saved_step} (continue with --resume)"
                               if self.saved_step is not None else "no checkpoint was written yet")
            raise
        finally:
            self._restore_signals(previous)
            if metrics is not None:
                metrics.close()
        bar.close()
        self.plot()

    def _stop_after_step(self) -> bool:
        """Whether to stop after the step just done: a signal here, or under torchrun on any rank before its
        all-reduce (a signal that came later travels with the next step's, so that all ranks stop together)."""
        return self._stop_signal is not None if self.dist is None else self._stop_agreed

    def _stop_requested(self) -> bool:
        """Whether a signal asked to stop (under torchrun: any rank's, agreed by an all-reduce)."""
        if self.dist is None:
            return self._stop_signal is not None
        flag = torch.tensor([float(self._stop_signal is not None)], device=self.device)
        return bool(bl.distributed.all_reduce(flag, op="max").item())

    def _catch_signals(self) -> dict[int, Any]:
        """Route SIGINT and SIGTERM to :meth:`_on_signal`; return the handlers they had."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # only the main thread may set handlers; the default ones stay
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first signal sets a flag that the loop reads after the step; the second stops at once."""
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum
        if not self.is_main:  # rank 0 speaks for the job; the request reaches it with the next all-reduce
            return
        name = signal.Signals(signum).name
        note = (f"\n{name}: finishing meta-step {self.step + 1}, then saving a checkpoint "
                f"({name} again stops at once, without saving that step)\n")
        try:  # os.write, not logging or print: a handler may run while the stream's buffer is busy
            os.write(2, note.encode())
        except OSError:
            pass

    def plot(self) -> Path | None:
        """Save ``learning_curve.png`` (query loss and accuracy against meta-steps, smoothed; rank 0 only)."""
        if not self.history or not self.is_main:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        window = max(1, len(steps) // 50)

        def smooth(values):
            t = torch.tensor(values, dtype=torch.float64)
            kernel = torch.ones(window, dtype=torch.float64) / window
            return torch.nn.functional.conv1d(t.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1).tolist()

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, key, label in ((axes[0], "query_loss", "query loss"), (axes[1], "query_accuracy", "query accuracy")):
            values = [r[key] * (100 if key == "query_accuracy" else 1) for r in self.history]
            ax.plot(steps, values, color="0.8", lw=0.8, label="per step")
            ax.plot(steps[window - 1:], smooth(values), lw=1.8, label=f"mean of {window}")
            ax.set_xlabel("meta-step")
            ax.set_ylabel(label + (" (%)" if key == "query_accuracy" else ""))
            ax.grid(alpha=0.3)
        val = [(r["step"], r["val_accuracy"]) for r in self.history if "val_accuracy" in r]
        if val:
            axes[1].plot(*zip(*val), "o-", label="meta-test (100 episodes)")
        axes[1].legend(loc="lower right")
        c = self.config
        fig.suptitle(f"{c.algorithm['name']} on {c.dataset}, {c.n_way}-way {c.k_shot}-shot")
        fig.tight_layout()
        path = self.out_dir / "learning_curve.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def final_evaluation(self, episodes: int | None = None, *, filename: str = "summary.json") -> EvalResult:
        """Evaluate on meta-test episodes, write ``out_dir / filename`` (a JSON summary) and return the result.

        Under torchrun the episodes are split over the ranks (:func:`evaluate`) and rank 0 writes the file.
        """
        res = evaluate(self.learner, self.theta, self.test_sampler, episodes or self.config.eval_episodes,
                       log_lam=self.log_lam, progress=self.progress, dist=self.dist)
        if not self.is_main:
            return res
        c = self.config
        paper = PAPER_TABLE2.get((c.algorithm["name"], c.n_way, c.k_shot)) if c.dataset == "omniglot" else None
        summary = {"config": c.to_dict(), "steps": self.step, "accuracy": res.accuracy, "ci95": res.ci95,
                   "episodes": res.episodes, "paper": paper,
                   "train_seconds": self.history[-1].get("seconds") if self.history else 0.0,
                   "eval_seconds": res.seconds, "wall_seconds": time.perf_counter() - _STARTED,
                   "threads": torch.get_num_threads(), "device": str(self.device),
                   "commit": git_commit()}
        if self.dist is not None:
            summary["world_size"] = self.dist.world_size
        atomic_write_text(json.dumps(summary, indent=2), self.out_dir / filename)
        return res


def results_table(rows: list[tuple[str, ExperimentConfig, EvalResult]]) -> str:
    """A plain-text table of measured accuracies beside the paper's Table 2."""
    lines = [f"{'run':<28} {'setting':<16} {'measured':>18} {'paper (Table 2)':>18}"]
    for name, c, res in rows:
        paper = PAPER_TABLE2.get((c.algorithm["name"], c.n_way, c.k_shot)) if c.dataset == "omniglot" else None
        paper_s = f"{paper[0]:.2f} +- {paper[1]:.2f}%" if paper else "-"
        lines.append(f"{name:<28} {f'{c.n_way}-way {c.k_shot}-shot':<16} "
                     f"{f'{res.accuracy:.2f} +- {res.ci95:.2f}%':>18} {paper_s:>18}")
    return "\n".join(lines)
