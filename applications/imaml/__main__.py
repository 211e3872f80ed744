"""Command line: ``python -m applications.imaml {train,evaluate,configs,compare} ...``.

Examples::

    python -m applications.imaml configs
    python -m applications.imaml train --config omniglot-5w1s-gd-cpu --data-dir data/omniglot --out runs/cpu
    python -m applications.imaml train --config omniglot-5w1s-gd-cpu --ways 20 --shots 5 --algorithm maml --out runs/x
    python -m applications.imaml train --config omniglot-20w5s-hf --device cuda --out runs/20w5s-hf
    python -m applications.imaml train --config omniglot-20w5s-hf --device cuda --out runs/20w5s-hf --resume
    python -m applications.imaml evaluate --out runs/cpu --episodes 600   # writes runs/cpu/eval-600.json
    torchrun --standalone --nproc_per_node 4 -m applications.imaml train --config omniglot-20w5s-hf --device cuda \
        --out runs/20w5s-hf-4gpu                                              # the meta-batch split over 4 GPUs

``train`` writes ``run.json`` (the data and cache folders and the device it
used) into the run folder, so ``evaluate`` and ``train --resume`` need only
``--out``; ``--data-dir``, ``--cache-dir`` and ``--device`` given to them win.
Ctrl-C or SIGTERM finishes the current meta-step, saves a checkpoint and exits
with status 130; ``--resume`` then continues exactly. A mistake in the
arguments, the data or the run folder ends with one line ``error: ...`` on
stderr and exit status 2.

Under ``torchrun`` (``train`` and ``evaluate``) every process runs this
command line: each meta-step's tasks and the evaluation episodes are split
over the ranks, one all-reduce per meta-step sums the meta-gradients, and rank
0 alone writes the run folder, prints and shows progress bars. ``--device
cuda`` gives each rank its own GPU (NCCL), ``--device cpu`` runs on CPUs
(gloo); ``--dist-timeout`` bounds how long a rank waits for the others. A rank
that dies ends the others with ``error: ...`` and exit status 1; the
checkpoint stays the last one written. ``--resume`` needs the same number of
processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

import bilevel as bl

from .algorithms import ALGORITHMS, CURVATURES
from .configs import CONFIGS, ExperimentConfig, get_config

DEFAULT_DATA_DIR = os.environ.get("BILEVEL_DATA", "data/omniglot")
#: torch threads unless --threads says otherwise: two where the machine has them.
DEFAULT_THREADS = min(2, os.cpu_count() or 1)
#: The file in a run folder that records where ``train`` found its data.
RUN_FILE = "run.json"

logger = logging.getLogger(__name__)


def _default_threads() -> int:
    """Torch threads when --threads is not given: two where the machine has them, shared among the node's ranks."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if bl.distributed.launched() else 1
    return max(1, min(DEFAULT_THREADS, (os.cpu_count() or 1) // max(1, per_node)))


def _workers(args: argparse.Namespace, device: str | torch.device) -> int:
    """Tasks adapted at once: ``--workers``, else the torch threads on a CPU (one per task) and 1 on a GPU."""
    if args.workers is not None:
        return args.workers
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


def build_samplers(config: ExperimentConfig, data_dir: str, *, cache_dir: str | None, download: bool,
                   device: torch.device, progress: bool):
    """Load the data set and return ``(train_sampler, test_sampler, in_channels, image_size)``."""
    from .data import EpisodeSampler, load_mini_imagenet, load_omniglot

    if config.dataset == "omniglot":
        splits = load_omniglot(data_dir, cache_dir=cache_dir, download=download, progress=progress).split(
            seed=config.seed)
        channels, size, rotations = 1, 28, True
    elif config.dataset == "mini_imagenet":
        splits = load_mini_imagenet(data_dir, cache_dir=cache_dir, progress=progress)
        channels, size, rotations = 3, 84, False
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}; use 'omniglot' or 'mini_imagenet'.")
    shape = dict(n_way=config.n_way, k_shot=config.k_shot, k_query=config.k_query, device=device)
    train = EpisodeSampler(splits.train, rotations=rotations, seed=config.seed, **shape)
    test = EpisodeSampler(splits.test, rotations=False, seed=config.seed + 10_000, **shape)
    return train, test, channels, size


# -- errors and argument types -------------------------------------------------------------------------


class _Failure(SystemExit):
    """What :func:`_fail` raises: exit status 2, with the message it printed (or, on ranks other than 0, kept)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


#: Under torchrun the ranks other than 0 keep their error lines: rank 0 prints the job's (see :func:`_agree`).
_PRINTS_ERRORS = True
#: While True (inside :func:`_agree`), :func:`_fail` prints nothing: the agreed message is printed once, after.
_DEFERRED = False


def _fail(message: str) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with status 2."""
    message = " ".join(str(message).split())
    if _PRINTS_ERRORS and not _DEFERRED:
        print(f"error: {message}", file=sys.stderr)
    raise _Failure(message)


def _agree(work: Callable[[], Any]) -> Any:
    """Run ``work`` on every rank; if it fails on any, fail on all with the first failing rank's message.

    For the steps whose outcome may differ between ranks (reading files, loading data): the ranks
    exchange their outcomes (one collective), so that none is left waiting for a rank that stopped.
    """
    global _DEFERRED
    failure = None
    result = None
    _DEFERRED = True
    try:
        result = work()
    except _Failure as e:
        failure = e.message
    finally:
        _DEFERRED = False
    outcomes = bl.distributed.all_gather_object(failure)
    for rank, message in enumerate(outcomes):
        if message is not None:
            _fail(message if rank == 0 else f"rank {rank}: {message}")
    return result


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line ``error: ...`` (status 2) that points to ``--help``."""

    def error(self, message: str) -> NoReturn:
        _fail(message if "python -m applications.imaml" in message else f"{message} (see: {self.prog} --help)")


def _integer(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``; ``what`` says what the number counts.

    Examples
    --------
    >>> _integer(1, "meta-steps")("3")
    3
    >>> _integer(1, "meta-steps")("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be an integer >= 1 (meta-steps), got 0
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} ({what}), got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} ({what}), got {value}")
        return value

    return parse


def _number(what: str, *, allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float > 0 (>= 0 with ``allow_zero``).

    Examples
    --------
    >>> _number("inner step size")("0.1")
    0.1
    """
    bound = ">= 0" if allow_zero else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bound} ({what}), got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound} ({what}), got {text}")
        return value

    return parse


def _config_name(text: str) -> str:
    """An argparse type: a name of :data:`~applications.imaml.configs.CONFIGS`.

    Examples
    --------
    >>> _config_name("omniglot-5w1s-gd-cpu")
    'omniglot-5w1s-gd-cpu'
    """
    if text not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown config {text!r}; available: {', '.join(sorted(CONFIGS))} "
                                         f"(python -m applications.imaml configs describes them)")
    return text


def _device_name(text: str) -> str:
    """An argparse type: a torch device name (``cpu``, ``cuda``, ``cuda:1``, ...).

    Examples
    --------
    >>> _device_name("cuda:1")
    'cuda:1'
    """
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:<index>") from None
    return text


def _device_problem(name: str) -> str | None:
    """Why ``name`` cannot be used on this machine, or None."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name} was asked for, but torch sees no CUDA device; use --device cpu."
        if device.index is not None and device.index >= torch.cuda.device_count():
            return (f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                    f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name} was asked for, but torch sees no MPS device; use --device cpu."
    return None


_CLI_HINTS = (
    # the data loaders' messages speak to Python callers; on the command line the same fix is a flag
    (re.compile(r"(?:call )?load_omniglot\(\.\.\., download=True\)"), "rerun with --download"),
    (re.compile(r";\s*for a deliberately partial data set pass expected_counts=None \(or your own table\)"), ""),
)


def _data_error(error: Exception, config: ExperimentConfig) -> NoReturn:
    """Report a data-loading failure with the command line's fix."""
    message = str(error).strip()
    for pattern, replacement in _CLI_HINTS:
        message = pattern.sub(replacement, message)
    if isinstance(error, FileNotFoundError):
        if config.dataset == "omniglot" and "--download" not in message:
            message += " Or rerun with --download to fetch images_background.zip and images_evaluation.zip."
        message += " If the data is elsewhere, point --data-dir (or $BILEVEL_DATA) at its folder."
    _fail(message)


# -- the run folder --------------------------------------------------------------------------------------


def _read_run_file(out: Path) -> dict[str, Any]:
    """``run.json`` of a run folder (``{}`` if there is none: runs of older versions)."""
    path = out / RUN_FILE
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text())
        if not isinstance(run, dict):
            raise ValueError(f"expected a JSON object, found {type(run).__name__}")
    except (OSError, ValueError) as e:
        _fail(f"{path} is unreadable ({e}); delete it and pass --data-dir and --cache-dir.")
    return run


def _write_run_file(out: Path, **fields: Any) -> None:
    from .io import atomic_write_text

    atomic_write_text(json.dumps(fields, indent=2) + "\n", out / RUN_FILE)


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file, not a run folder; pass a folder (it is created if missing).")


# -- the parser --------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder with images_background.zip / images_evaluation.zip (or their extracted folders); "
                        "default: the run's (run.json), else $BILEVEL_DATA or data/omniglot")
    p.add_argument("--cache-dir", default=None, help="where the preprocessed tensors go; default: the run's "
                                                     "(run.json), else $BILEVEL_CACHE or ~/.cache/bilevel")
    p.add_argument("--download", action="store_true", help="download the official archives if they are missing")
    p.add_argument("--device", type=_device_name, default=None,
                   help="cpu, cuda, cuda:1, ... (default: train cpu; evaluate and --resume: the run's)")
    p.add_argument("--threads", type=_integer(1, "CPU threads"), default=None,
                   help=f"CPU threads for torch (default {DEFAULT_THREADS}: two where the machine has them; "
                        f"measured 1.35x faster than one on the 3-block net, more mostly contend; under torchrun "
                        f"the cores are shared among the node's processes)")
    p.add_argument("--workers", type=_integer(1, "workers"), default=None,
                   help="tasks adapted at once, each on one CPU thread (default: --threads on a CPU, 1 on a GPU; "
                        "1 puts all the threads inside each operation of one task instead, which is slower on "
                        "the small networks of few-shot learning)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dist-timeout", type=_number("seconds"), default=None,
                   help=f"under torchrun: seconds a rank waits for the others before the job ends with an error "
                        f"(default ${bl.distributed.TIMEOUT_ENV}, else {bl.distributed.DEFAULT_TIMEOUT:.0f})")
    p.add_argument("--dist-backend", choices=bl.distributed.BACKENDS, default=None,
                   help="under torchrun: the communication backend (default: nccl with --device cuda, else gloo)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m applications.imaml", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("configs", help="list the named configurations")
    sub.add_parser("compare", help="train several algorithms on the same tasks and episodes and compare them "
                                   "(see `compare -h`)")

    tr = sub.add_parser("train", help="meta-train, then evaluate on meta-test episodes")
    tr.add_argument("--config", required=True, type=_config_name, help="a name from `configs`")
    tr.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, learning_curve.png, "
                                                 "summary.json, run.json")
    positive = [("--steps", "meta_steps", "meta-steps"), ("--meta-batch", "meta_batch", "tasks per meta-step"),
                ("--eval-episodes", "eval_episodes", "episodes of the final evaluation"),
                ("--checkpoint-every", "checkpoint_every", "meta-steps between checkpoints"),
                ("--shots", "k_shot", "support images per class"), ("--query", "k_query", "query images per class")]
    for flag, field, text in positive:
        tr.add_argument(flag, type=_integer(1, text), default=None, help=f"override the config's {field} ({text})")
    tr.add_argument("--ways", type=_integer(2, "classes per episode"), default=None,
                    help="override the config's n_way (classes per episode)")
    tr.add_argument("--seed", type=_integer(0, "the seed of initialisation, class split and episodes"), default=None,
                    help="override the config's seed (initialisation, class split, episode stream)")
    tr.add_argument("--algorithm", choices=ALGORITHMS, default=None,
                    help="override the config's algorithm (its other options, e.g. inner steps, stay)")
    tr.add_argument("--no-vmap", action="store_true", help="loop over the tasks of a meta-batch")
    tr.add_argument("--curvature", choices=CURVATURES, default=None,
                    help="curvature of iMAML's backward linear system (override the config's; default exact)")
    for flag, kind, text in (("--lam", _number("proximal strength"), "proximal strength"),
                             ("--inner-steps", _integer(1, "inner GD steps"), "inner GD steps"),
                             ("--inner-lr", _number("inner step size"), "inner step size"),
                             ("--cg-steps", _integer(1, "CG steps"), "CG steps of the backward"),
                             ("--damping", _number("damping", allow_zero=True), "damping of the backward system")):
        tr.add_argument(flag, type=kind, default=None, help=f"override the config's {text}")
    tr.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (same config and "
                                                          "overrides; --steps may grow)")
    _add_common(tr)

    ev = sub.add_parser("evaluate", help="evaluate a run's checkpoint; writes <out>/eval-<episodes>.json")
    ev.add_argument("--out", required=True, help="the run folder of `train`")
    ev.add_argument("--episodes", type=_integer(1, "meta-test episodes"), default=600,
                    help="meta-test episodes (default 600)")
    _add_common(ev)
    return parser


# -- commands ------------------------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace) -> ExperimentConfig:
    """The named config with the command line's overrides, checked before any data is loaded."""
    from .algorithms import AlgorithmConfig

    config = get_config(args.config)
    fields = {"steps": "meta_steps", "meta_batch": "meta_batch", "eval_episodes": "eval_episodes",
              "checkpoint_every": "checkpoint_every", "ways": "n_way", "shots": "k_shot", "query": "k_query",
              "seed": "seed"}
    changes: dict[str, Any] = {field: getattr(args, key) for key, field in fields.items()
                               if getattr(args, key) is not None}
    algo = {key: getattr(args, key) for key in ("lam", "inner_steps", "inner_lr", "cg_steps", "damping",
                                                "curvature")
            if getattr(args, key) is not None}
    if args.algorithm is not None:
        algo["name"] = args.algorithm
    if args.no_vmap:
        algo["vmap"] = False
    if algo:
        changes["algorithm"] = algo
    config = config.replace(**changes) if changes else config
    try:
        AlgorithmConfig(**config.algorithm)
    except (TypeError, ValueError) as e:
        _fail(f"config {args.config} with the overrides given: {e}")
    return config


def _devices(args: argparse.Namespace, run: dict[str, Any]) -> torch.device:
    name = args.device
    if name is None:
        name = run.get("device") or "cpu"
        if bl.distributed.launched():  # under torchrun each rank takes its own GPU: only the type carries over
            name = torch.device(name).type
        if _device_problem(name) is not None:
            logger.warning("the run used --device %s, which this machine lacks; using cpu", name)
            name = "cpu"
    problem = _device_problem(name)
    if problem:
        _fail(problem)
    return torch.device(name)


def _load(config: ExperimentConfig, args: argparse.Namespace, run: dict[str, Any], device: torch.device, *,
          progress: bool | None = None):
    """``(data_dir, cache_dir, samplers...)``: the command line's folders, else the run's, else the defaults."""
    from .data import DatasetError

    data_dir = args.data_dir or run.get("data_dir") or DEFAULT_DATA_DIR
    cache_dir = args.cache_dir if args.cache_dir is not None else run.get("cache_dir")
    try:
        samplers = build_samplers(config, data_dir, cache_dir=cache_dir, download=args.download, device=device,
                                  progress=not args.quiet if progress is None else progress)
    except (FileNotFoundError, DatasetError) as e:
        _data_error(e, config)
    except ValueError as e:  # the episode shape does not fit the data (EpisodeSampler)
        _fail(f"{e} (--ways, --shots and --query set the episode shape)")
    except OSError as e:
        _fail(f"cannot read the data ({e}); check --data-dir and --cache-dir.")
    return data_dir, cache_dir, samplers


# -- torchrun ------------------------------------------------------------------------------------------------


def _join(args: argparse.Namespace, out: Path, *, continuing: bool) -> bl.distributed.Context:
    """Join the torchrun job on --device (else, ``continuing`` a run, its device type; else cpu) with the backend
    and timeout asked for."""
    # the run folder is read here for the device only (rank 0 reads it for the rest and sends it)
    run = _read_run_file(out) if continuing and (out / RUN_FILE).is_file() else {}
    if args.device is not None and torch.device(args.device).index is not None and _world_size_in_env() > 1:
        _fail(f"--device {args.device}: under torchrun every rank takes its own GPU, cuda:LOCAL_RANK; pass --device "
              f"{torch.device(args.device).type} (and restrict the GPUs with CUDA_VISIBLE_DEVICES).")
    device = _devices(args, run)
    try:
        return bl.distributed.init(device, backend=args.dist_backend, timeout=args.dist_timeout)
    except (bl.distributed.DistributedError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # every rank: the failure may be its own
        raise SystemExit(2) from None


def _load_distributed(config: ExperimentConfig, args: argparse.Namespace, run: dict[str, Any],
                      ctx: bl.distributed.Context):
    """:func:`_load` on every rank: each node's local rank 0 first (it decodes and caches, downloads with
    --download), then the others, from its cache. A failure on any rank ends every rank with its message."""
    first = ctx.local_rank == 0
    progress = not args.quiet and ctx.is_main
    loaded = _agree(lambda: _load(config, args, run, ctx.device, progress=progress) if first else None)
    later = _agree(lambda: None if first else _load(config, args, run, ctx.device, progress=progress))
    return loaded if first else later


def _lost_rank(error: bl.distributed.DistributedError, trainer, out: Path) -> int:
    """Report a failed collective (on every rank that saw it) with what the run folder holds; exit status 1."""
    saved = trainer.saved_step
    note = (f"The checkpoint in {out} holds step {saved}: continue with --resume (the same number of processes) once "
            f"every rank can run" if saved is not None else "No checkpoint was written yet")
    if error.timed_out:
        note += f" (the timeout is --dist-timeout, or ${bl.distributed.TIMEOUT_ENV})"
    print(f"error: {' '.join(str(error).split())} {note}.", file=sys.stderr)
    return 1


def _world_size_in_env() -> int:
    try:
        return int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return 1


def _report(name: str, config: ExperimentConfig, result, **extra: Any) -> None:
    from .train import results_table

    print(results_table([(name, config, result)]))
    print(json.dumps({"accuracy": result.accuracy, "ci95": result.ci95, "episodes": result.episodes, **extra}))


def _train(args: argparse.Namespace) -> int:
    from .train import CheckpointError, Trainer, check_world_size, read_checkpoint

    config = _train_config(args)
    out = Path(args.out)
    _check_out(out)
    checkpoint = out / "checkpoint.pt"
    distributed = bl.distributed.launched()
    if distributed and config.meta_batch < _world_size_in_env():
        world = _world_size_in_env()
        _fail(f"the meta-batch has {config.meta_batch} task(s) and torchrun started {world} processes; each "
              f"process needs at least one task of every meta-step: use --meta-batch >= {world} (a multiple of "
              f"{world} keeps the ranks equally busy) or fewer processes.")
    run: dict[str, Any] = {}
    ctx = None

    def check_resume(world: int) -> dict[str, Any]:
        if not checkpoint.is_file():
            _fail(f"--resume: no checkpoint at {checkpoint}; start without --resume, or pass the --out of the run "
                  f"to continue.")
        try:  # before the data are loaded, which may take a while
            check_world_size(read_checkpoint(checkpoint, config), world, checkpoint)
        except CheckpointError as e:
            _fail(f"--resume: {e}")
        return _read_run_file(out)

    if distributed:
        ctx = _join(args, out, continuing=args.resume)
        if args.resume:  # rank 0 reads the run folder; the others need not see it
            run = bl.distributed.broadcast_object(_agree(lambda: check_resume(ctx.world_size) if ctx.is_main
                                                         else None))
        device = ctx.device
        data_dir, cache_dir, (train_s, test_s, channels, size) = _load_distributed(config, args, run, ctx)
    else:
        if args.resume:
            run = check_resume(1)
        device = _devices(args, run)
        data_dir, cache_dir, (train_s, test_s, channels, size) = _load(config, args, run, device)
    main = ctx is None or ctx.is_main
    try:
        trainer = Trainer(config, out, train_s, test_s, device=device, in_channels=channels, image_size=size,
                          progress=not args.quiet, dist=ctx, workers=_workers(args, device))
    except ValueError as e:  # the network does not fit the images (configs' network options)
        _fail(f"config {args.config}: {e}")
    if args.resume:
        try:
            trainer.resume()
        except (FileNotFoundError, CheckpointError) as e:
            _fail(f"--resume: {e}")
    elif main and checkpoint.exists():
        logger.warning("%s holds an earlier run: starting over and replacing it (pass --resume to continue it)", out)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if main:
        where = {"device": str(device)} if ctx is None else {"device": device.type, "world_size": ctx.world_size}
        _write_run_file(out, config=args.config, data_dir=_absolute(data_dir), cache_dir=_absolute(cache_dir),
                        **where)
    try:
        trainer.train()
    except KeyboardInterrupt:
        if trainer.saved_step is None:
            note = "no checkpoint was written yet; start again without --resume"
        elif trainer.saved_step == trainer.step:
            note = f"checkpoint of step {trainer.step} saved in {out}; continue with --resume"
        else:
            note = f"the checkpoint in {out} holds step {trainer.saved_step}; continue with --resume"
        if main:
            print(f"\ninterrupted: {note}", file=sys.stderr)
        return 130
    except bl.distributed.DistributedError as e:
        return _lost_rank(e, trainer, out)
    seconds = trainer.history[-1]["seconds"] if trainer.history else 0.0
    if main:
        print(f"trained {trainer.step} meta-steps ({seconds:.0f} s of training); curve: "
              f"{out / 'learning_curve.png'}")
    try:
        result = trainer.final_evaluation()
    except KeyboardInterrupt:
        if main:
            print(f"\ninterrupted during the final evaluation; the trained checkpoint is in {out}: evaluate it with "
                  f"python -m applications.imaml evaluate --out {out}", file=sys.stderr)
        return 130
    except bl.distributed.DistributedError as e:
        return _lost_rank(e, trainer, out)
    if main:
        _report(args.config, config, result, step=trainer.step)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .train import CheckpointError, Trainer, read_checkpoint

    out = Path(args.out)
    _check_out(out)
    checkpoint = out / "checkpoint.pt"

    def check() -> tuple[dict[str, Any], dict[str, Any]]:
        if not checkpoint.is_file():
            _fail(f"no checkpoint at {checkpoint}; train first (python -m applications.imaml train --out {out} ...), "
                  f"or pass the --out of a trained run.")
        try:
            saved = read_checkpoint(checkpoint)["config"]
        except CheckpointError as e:
            _fail(str(e))
        return saved, _read_run_file(out)

    ctx = None
    if bl.distributed.launched():
        ctx = _join(args, out, continuing=True)
        saved, run = bl.distributed.broadcast_object(_agree(lambda: check() if ctx.is_main else None))
        config = ExperimentConfig(**saved)
        device = ctx.device
        _, _, (train_s, test_s, channels, size) = _load_distributed(config, args, run, ctx)
    else:
        saved, run = check()
        config = ExperimentConfig(**saved)
        device = _devices(args, run)
        _, _, (train_s, test_s, channels, size) = _load(config, args, run, device)
    trainer = Trainer(config, out, train_s, test_s, device=device, in_channels=channels, image_size=size,
                      progress=not args.quiet, dist=ctx, workers=_workers(args, device))
    try:
        trainer.resume(training=False)
    except (FileNotFoundError, CheckpointError) as e:
        _fail(str(e))
    filename = f"eval-{args.episodes}.json"
    result = trainer.final_evaluation(args.episodes, filename=filename)
    if trainer.is_main:
        _report(out.name, config, result, step=trainer.step, file=str(out / filename))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``configs``, ``train``, ``evaluate``) on ``argv``; returns the exit status.

    A mistake (arguments, data, run folder, checkpoint) prints one line
    ``error: ...`` on stderr and raises ``SystemExit(2)``; an interruption
    returns 130. Under torchrun, rank 0 prints the mistakes and results; a
    failed collective (a rank died, or hung past ``--dist-timeout``) prints
    ``error: ...`` on each rank that saw it and returns 1.
    """
    global _PRINTS_ERRORS
    argv = sys.argv[1:] if argv is None else list(argv)
    distributed = bl.distributed.launched()
    rank = os.environ.get("RANK", "0") if distributed else "0"
    _PRINTS_ERRORS = rank == "0"
    if argv[:1] == ["compare"]:  # the side-by-side has its own options (python -m applications.imaml compare -h)
        if distributed:
            _fail("compare runs in one process: start it with python -m applications.imaml compare ..., not "
                  "torchrun.")
        from .compare import main as compare_main

        return compare_main(argv[1:])
    args = _parser().parse_args(argv)
    if rank == "0":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:  # the other ranks only warn, and say who they are
        logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s rank {rank}: %(name)s: %(message)s")
    if args.command == "configs":
        for name in sorted(CONFIGS):
            c = CONFIGS[name]
            if rank == "0":
                print(f"{name:<26} {c.n_way:>2}-way {c.k_shot}-shot  {c.algorithm['name']:<9} "
                      f"meta_batch={c.meta_batch} steps={c.meta_steps}")
        return 0
    torch.set_num_threads(args.threads if args.threads is not None else _default_threads())
    try:
        status = _train(args) if args.command == "train" else _evaluate(args)
    except KeyboardInterrupt:
        if rank == "0":
            print("\ninterrupted", file=sys.stderr)
        return 130
    except bl.distributed.DistributedError as e:  # a collective outside the training loop (loading, evaluating)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if distributed and status == 0:
        bl.distributed.shutdown()
    return status


def main_and_exit(argv: list[str] | None = None) -> NoReturn:
    """:func:`main`, then end the process with its status.

    Under torchrun the process ends with :func:`os._exit` once its output is flushed (every file
    the run writes is closed by then): torch.distributed's gloo threads may release their last
    tensors while the interpreter shuts down, which aborts the process (SIGABRT) after the work is
    done and would report a finished run, or an error's status, as a crash.
    """
    try:
        status = main(argv)
    except SystemExit as e:  # a mistake (status 2), or --help
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if bl.distributed.launched():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main_and_exit()
