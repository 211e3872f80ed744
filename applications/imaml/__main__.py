"""Command line: ``python -m applications.imaml {train,evaluate,configs} ...``.

Examples::

    python -m applications.imaml configs
    python -m applications.imaml train --config omniglot-5w1s-gd-cpu --data-dir data/omniglot --out runs/cpu
    python -m applications.imaml train --config omniglot-20w5s-hf --device cuda --out runs/20w5s-hf
    python -m applications.imaml train ... --resume          # continue exactly after Ctrl-C or a crash
    python -m applications.imaml evaluate --out runs/cpu --episodes 600
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from .configs import CONFIGS, ExperimentConfig, get_config

DEFAULT_DATA_DIR = os.environ.get("BILEVEL_DATA", "data/omniglot")


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


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device; use --device cpu.")
    return device


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="folder with images_background.zip / images_evaluation.zip (or their extracted folders); "
                        "default $BILEVEL_DATA or data/omniglot")
    p.add_argument("--cache-dir", default=None, help="where the preprocessed tensors go (default $BILEVEL_CACHE "
                                                     "or ~/.cache/bilevel)")
    p.add_argument("--download", action="store_true", help="download the official archives if they are missing")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the network is small, more threads mostly contend)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``configs``, ``train``, ``evaluate``) on ``argv``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m applications.imaml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("configs", help="list the named configurations")

    tr = sub.add_parser("train", help="meta-train, then evaluate on meta-test episodes")
    tr.add_argument("--config", required=True, help="a name from `configs`")
    tr.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, learning_curve.png, "
                                                 "summary.json")
    tr.add_argument("--steps", type=int, default=None, help="override the config's meta_steps")
    tr.add_argument("--meta-batch", type=int, default=None, help="override the config's meta_batch")
    tr.add_argument("--eval-episodes", type=int, default=None, help="override the config's eval_episodes")
    tr.add_argument("--no-vmap", action="store_true", help="loop over the tasks of a meta-batch")
    tr.add_argument("--curvature", choices=("exact", "gauss_newton"), default=None,
                    help="curvature of iMAML's backward linear system (override the config's; default exact)")
    for flag, kind, text in (("--lam", float, "proximal strength"), ("--inner-steps", int, "inner GD steps"),
                             ("--inner-lr", float, "inner step size"), ("--cg-steps", int, "CG steps of the backward"),
                             ("--damping", float, "damping of the backward linear system")):
        tr.add_argument(flag, type=kind, default=None, help=f"override the config's {text}")
    tr.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    _add_common(tr)

    ev = sub.add_parser("evaluate", help="evaluate a run's checkpoint")
    ev.add_argument("--out", required=True, help="the run folder of `train`")
    ev.add_argument("--episodes", type=int, default=600)
    _add_common(ev)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "configs":
        for name in sorted(CONFIGS):
            c = CONFIGS[name]
            print(f"{name:<26} {c.n_way:>2}-way {c.k_shot}-shot  {c.algorithm['name']:<9} "
                  f"meta_batch={c.meta_batch} steps={c.meta_steps}")
        return 0

    from .train import Trainer, results_table

    torch.set_num_threads(max(1, args.threads))
    device = _device(args.device)
    if args.command == "train":
        config = get_config(args.config)
        changes = {}
        if args.steps is not None:
            changes["meta_steps"] = args.steps
        if args.meta_batch is not None:
            changes["meta_batch"] = args.meta_batch
        if args.eval_episodes is not None:
            changes["eval_episodes"] = args.eval_episodes
        algo = {key: getattr(args, key) for key in ("lam", "inner_steps", "inner_lr", "cg_steps", "damping",
                                                    "curvature")
                if getattr(args, key) is not None}
        if args.no_vmap:
            algo["vmap"] = False
        if algo:
            changes["algorithm"] = algo
        config = config.replace(**changes) if changes else config
        name = args.config
    else:
        ckpt = Path(args.out) / "checkpoint.pt"
        if not ckpt.exists():
            raise SystemExit(f"no checkpoint at {ckpt}; train first (python -m applications.imaml train ...).")
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)["config"]
        config = ExperimentConfig(**saved)
        name = Path(args.out).name

    train_s, test_s, channels, size = build_samplers(config, args.data_dir, cache_dir=args.cache_dir,
                                                    download=args.download, device=device, progress=not args.quiet)
    trainer = Trainer(config, args.out, train_s, test_s, device=device, in_channels=channels, image_size=size,
                      progress=not args.quiet)
    if args.command == "train":
        if args.resume:
            trainer.resume()
        elif trainer.checkpoint_path.exists():
            logging.getLogger(__name__).warning(
                "%s holds an earlier run: starting over and replacing it (pass --resume to continue it)", args.out)
            (Path(args.out) / "metrics.jsonl").unlink(missing_ok=True)
        try:
            trainer.train()
        except KeyboardInterrupt:
            print(f"\ninterrupted: checkpoint saved in {args.out}; continue with --resume", file=sys.stderr)
            return 130
        seconds = trainer.history[-1]["seconds"] if trainer.history else 0.0
        print(f"trained {trainer.step} meta-steps ({seconds:.0f} s in this session); curve: "
              f"{Path(args.out) / 'learning_curve.png'}")
        result = trainer.final_evaluation()
    else:
        trainer.resume()
        result = trainer.final_evaluation(args.episodes)
    print(results_table([(name, config, result)]))
    print(json.dumps({"accuracy": result.accuracy, "ci95": result.ci95, "episodes": result.episodes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
