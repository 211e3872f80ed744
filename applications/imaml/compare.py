"""A fair side-by-side of meta-learning algorithms: same tasks budget, same seeds, same meta-test episodes.

``python -m applications.imaml compare --data-dir DIR --out runs/compare`` trains every
setting of :data:`SETTINGS` (or those named with ``--settings``) for each seed, on the same
budget of meta-training tasks (``--tasks``, default 1200) and, with ``--seconds``, at least
that much training time too. Along the way it evaluates each model on the same fixed
meta-test episodes (``--curve-episodes``, default 100, at ``--curve-points`` points), and at
the budget on ``--episodes`` (default 600) episodes, again the same for every setting of a
seed. Evaluation time is kept off the training clock. It writes

* ``runs/<setting>-s<seed>.json``: one run's curve, final accuracies and per-step diagnostics
  (a finished run is not repeated when the command is run again with the same ``--out``; the
  file is named by setting and seed only, so use a new ``--out`` when changing a budget);
* ``compare.json``: every run plus the mean over seeds of each setting;
* ``compare.png``: meta-test accuracy against tasks seen and against training time.

Settings: ``imaml`` is bilevel's default (the configuration of README's main job),
``imaml-exact`` the same with exact Hessian products (negative curvature falls back to the
first-order direction), ``imaml-hf`` Hessian-free Newton inside. ``maml-peers`` and
``fomaml-peers`` are MAML and first-order MAML written the way higher's
``examples/maml-omniglot.py`` sets them up (3-block net without padding, PyTorch's
initialisation, 5 SGD steps of 0.1, 32 tasks per step of a constant Adam 1e-3, 15 queries per class),
run by ``bilevel.unrolled``; ``reptile`` is Reptile (Nichol et al., 2018) on the same network.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .configs import PEER_NETWORK, ExperimentConfig, get_config
from .io import atomic_write_text, git_commit, save_figure

__all__ = ["SETTINGS", "STUDY", "STUDY_BASE", "STUDY_CHANGES", "DEFAULT_SETTINGS", "setting_config", "load_splits", "run_one",
           "run_all", "summarise", "margins", "plot", "main"]

#: name -> (base configuration, changes): the algorithms and settings the comparison can train.
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "imaml": ("omniglot-5w1s-gd-cpu", {}),
    "imaml-exact": ("omniglot-5w1s-gd-cpu", {"algorithm": {"curvature": "exact"}}),
    "imaml-hf": ("omniglot-5w1s-gd-cpu", {"algorithm": {"name": "imaml_hf"}}),
    "maml-peers": ("omniglot-5w1s-gd-cpu", {"algorithm": {"name": "maml", "inner_steps": 5, "inner_lr": 0.1},
                                            "meta_batch": 32, "k_query": 15, "outer_lr": 1e-3,
                                            "lr_schedule": "constant", "network": dict(PEER_NETWORK)}),
    "fomaml-peers": ("omniglot-5w1s-gd-cpu", {"algorithm": {"name": "fomaml", "inner_steps": 5, "inner_lr": 0.1},
                                              "meta_batch": 32, "k_query": 15, "outer_lr": 1e-3,
                                              "lr_schedule": "constant", "network": dict(PEER_NETWORK)}),
    "reptile": ("omniglot-5w1s-gd-cpu", {"algorithm": {"name": "reptile", "inner_steps": 5, "inner_lr": 0.1},
                                         "meta_batch": 8, "outer_lr": 1e-3, "lr_schedule": "constant",
                                         "network": dict(PEER_NETWORK)}),
}
#: The configuration the study changes one thing at a time: the default before the study (the peers' 3-block net).
STUDY_BASE = "omniglot-5w1s-3block-cpu"
#: One change at a time from the study's base (``study-base``): what each study setting changes, in words.
STUDY_CHANGES: dict[str, str] = {
    "study-base": "none (the study's base: the default before the study, with the peers' 3-block network)",
    "study-exact": "exact Hessian products; negative curvature falls back to first order per task",
    "study-exact-truncate": "exact Hessian products; CG's last iterate kept at negative curvature",
    "study-exact-damped": "exact Hessian products, backward system damped by 1 (H + lam I + I)",
    "study-k5": "5 inner steps instead of 10",
    "study-k20": "20 inner steps instead of 10",
    "study-lam1": "lam = 1 instead of 0.5",
    "study-lam2": "lam = 2 (the paper's) instead of 0.5",
    "study-cg1": "1 CG step instead of 5",
    "study-mb8": "8 tasks per meta-step instead of 4 (half as many steps; the earlier default)",
    "study-mb16": "16 tasks per meta-step instead of 4 (a quarter as many steps)",
    "study-lr1e-3": "Adam 1e-3 instead of 3e-3 (the earlier default), still cosine-decayed",
    "study-constant-lr": "constant Adam learning rate (3e-3) instead of the cosine decay",
    "study-q15": "15 query images per class instead of 5 (as the peers' scripts)",
    "study-paper-net": "the paper's 4-block padded network with He initialisation",
    "study-paper-net-torch-init": "the paper's 4-block padded network with PyTorch's initialisation "
                                  "(today's default)",
}
#: The study's settings: its base with one change each (see :data:`STUDY_CHANGES`).
STUDY: dict[str, dict[str, Any]] = {
    "study-base": {},
    "study-exact": {"algorithm": {"curvature": "exact"}},
    "study-exact-truncate": {"algorithm": {"curvature": "exact", "negative_curvature": "truncate"}},
    "study-exact-damped": {"algorithm": {"curvature": "exact", "damping": 1.0, "negative_curvature": "truncate"}},
    "study-k5": {"algorithm": {"inner_steps": 5}},
    "study-k20": {"algorithm": {"inner_steps": 20}},
    "study-lam1": {"algorithm": {"lam": 1.0}},
    "study-lam2": {"algorithm": {"lam": 2.0}},
    "study-cg1": {"algorithm": {"cg_steps": 1}},
    "study-mb8": {"meta_batch": 8},
    "study-mb16": {"meta_batch": 16},
    "study-lr1e-3": {"outer_lr": 1e-3},
    "study-constant-lr": {"lr_schedule": "constant"},
    "study-q15": {"k_query": 15},
    "study-paper-net": {"network": {"blocks": 4, "padding": 1, "hidden": 64, "init": "he"}},
    "study-paper-net-torch-init": {"network": {"blocks": 4, "padding": 1, "hidden": 64, "init": "torch"}},
}
SETTINGS.update({name: (STUDY_BASE, changes) for name, changes in STUDY.items()})
#: The settings a plain ``compare`` trains.
DEFAULT_SETTINGS = ("imaml", "maml-peers", "fomaml-peers")


def setting_config(name: str, seed: int) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of setting ``name`` with ``seed``; unknown names list the available ones."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; available: {', '.join(SETTINGS)}.")
    base, changes = SETTINGS[name]
    return get_config(base).replace(**changes, seed=seed, eval_every=0)


def load_splits(data_dir: str, cache_dir: str | None, seed: int):
    """Omniglot's seeded meta-train / meta-test split (the cached tensors after the first call)."""
    from .data import load_omniglot

    return load_omniglot(data_dir, cache_dir=cache_dir, progress=False).split(seed=seed)


def _eval_sampler(splits, config: ExperimentConfig, query: int, device: torch.device):
    from .data import EpisodeSampler

    # a fresh sampler with a fixed seed per evaluation: every evaluation of a seed sees the same episodes
    return EpisodeSampler(splits.test, rotations=False, seed=config.seed + 20_000, n_way=config.n_way,
                          k_shot=config.k_shot, k_query=query, device=device)


def run_one(name: str, seed: int, *, data_dir: str, cache_dir: str | None, out_dir: str, tasks: int,
            seconds: float, episodes: int, curve_episodes: int, curve_points: int, query: int, threads: int,
            horizon_tasks: float | None = None, tag: str = "", device: str = "cpu") -> dict[str, Any]:
    """Train setting ``name`` with ``seed`` and evaluate it along the way; returns (and writes) its record.

    Training stops once ``tasks`` tasks were seen and ``seconds`` seconds were spent (either may be 0).
    The curve has ``curve_points + 1`` evaluations spread over the tasks budget (or over the seconds
    budget when ``tasks`` is 0). A decaying learning-rate schedule spans ``horizon_tasks`` tasks
    (default: the tasks budget), so it ends where the run does.
    """
    from .data import EpisodeSampler
    from .train import Trainer, evaluate

    torch.set_num_threads(max(1, threads))
    path = Path(out_dir) / "runs" / f"{name}{tag}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    config = setting_config(name, seed)
    horizon = max(1, math.ceil((horizon_tasks or tasks) / config.meta_batch))
    config = config.replace(meta_steps=horizon, checkpoint_every=10 ** 9)
    dev = torch.device(device)
    splits = load_splits(data_dir, cache_dir, config.seed)
    train_sampler = EpisodeSampler(splits.train, rotations=True, seed=config.seed, n_way=config.n_way,
                                   k_shot=config.k_shot, k_query=config.k_query, device=dev)
    trainer = Trainer(config, Path(out_dir) / "work" / f"{name}{tag}-s{seed}", train_sampler,
                      _eval_sampler(splits, config, query, dev), device=dev, progress=False)
    by_tasks = tasks > 0
    marks = sorted({(tasks if by_tasks else seconds) * i / max(1, curve_points) for i in range(curve_points + 1)})
    curve, finals, steps = [], {}, []
    seen, clock = 0, 0.0

    def measure(n_episodes):
        res = evaluate(trainer.learner, trainer.theta, _eval_sampler(splits, config, query, dev), n_episodes,
                       progress=False)
        return {"tasks": seen, "seconds": clock, "accuracy": res.accuracy, "ci95": res.ci95,
                "episodes": res.episodes}

    next_mark = 0
    while True:
        while next_mark < len(marks) and (seen if by_tasks else clock) >= marks[next_mark]:
            curve.append(measure(curve_episodes))
            next_mark += 1
        if by_tasks and seen >= tasks and "tasks" not in finals:
            finals["tasks"] = measure(episodes)
        if seconds and clock >= seconds and "seconds" not in finals:
            finals["seconds"] = measure(episodes)
        if seen >= tasks and clock >= seconds:
            break
        start = time.perf_counter()
        record = trainer.meta_step()
        clock += time.perf_counter() - start
        seen += config.meta_batch
        steps.append({k: v for k, v in record.items() if isinstance(v, (int, float))})
    if not by_tasks and curve and curve[-1]["seconds"] < clock:
        curve.append(finals["seconds"])
    out = {"setting": name, "seed": seed, "config": config.to_dict(), "tasks_budget": tasks,
           "seconds_budget": seconds, "seconds_per_task": clock / max(seen, 1), "tasks_seen": seen,
           "training_seconds": clock, "curve": curve, "final": finals, "steps": steps,
           "negative_curvature_tasks": sum(int(s.get("negative_curvature", 0)) for s in steps),
           "threads": threads, "device": device}
    atomic_write_text(json.dumps(out), path)
    return out


def _schedule_decays(name: str) -> bool:
    return setting_config(name, 0).lr_schedule != "constant"


def run_all(jobs: list[tuple[str, int]], common: dict[str, Any], seconds: float, workers: int) -> list[dict]:
    """Every ``(setting, seed)``: the tasks budget first; then, for ``seconds``, the equal-wall-time runs.

    A constant learning rate is the same run either way, so it trains until both budgets are met. A
    decaying schedule must end where its run ends: those settings train a second time for ``seconds``,
    with the schedule spanning the tasks that their first run's speed fits into that time.
    """
    def submit_all(pool, items):
        if pool is None:
            return [run_one(n, s, **kw) for n, s, kw in items]
        return [f.result() for f in [pool.submit(run_one, n, s, **kw) for n, s, kw in items]]

    # spawned, not forked: a child forked after the parent's OpenMP pool started may hang in it
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1 else None)
    try:
        first = submit_all(pool, [(n, s, {**common, "seconds": 0.0 if _schedule_decays(n) else seconds})
                                  for n, s in jobs])
        if not seconds:
            return first
        second_items = [(run["setting"], run["seed"], {**common, "tasks": 0, "seconds": seconds, "tag": "-time",
                                                        "horizon_tasks": seconds / run["seconds_per_task"]})
                        for run in first if _schedule_decays(run["setting"])]
        for run, timed in zip([r for r in first if _schedule_decays(r["setting"])], submit_all(pool, second_items)):
            run["final"]["seconds"] = timed["final"]["seconds"]
            run["time_curve"] = timed["curve"]
            run["seconds_run"] = {k: timed[k] for k in ("tasks_seen", "training_seconds", "seconds_per_task")}
        return first
    finally:
        if pool is not None:
            pool.shutdown()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: mean over seeds of the final accuracies (with the mean of the seeds' 95% intervals)."""
    table: dict[str, Any] = {}
    for run in runs:
        row = table.setdefault(run["setting"], {"seeds": [], "tasks": [], "seconds": [], "seconds_per_task": []})
        row["seeds"].append(run["seed"])
        row["seconds_per_task"].append(run["seconds_per_task"])
        for key in ("tasks", "seconds"):
            if key in run["final"]:
                row[key].append(run["final"][key])
    out = {}
    for name, row in table.items():
        entry = {"seeds": row["seeds"], "seconds_per_task": sum(row["seconds_per_task"]) / len(row["seeds"])}
        for key in ("tasks", "seconds"):
            if row[key]:
                accs = [r["accuracy"] for r in row[key]]
                entry[f"accuracy_at_{key}"] = sum(accs) / len(accs)
                entry[f"ci95_at_{key}"] = sum(r["ci95"] for r in row[key]) / len(accs)
                entry[f"per_seed_at_{key}"] = [(r["accuracy"], r["ci95"]) for r in row[key]]
                entry[f"tasks_at_{key}"] = sum(r["tasks"] for r in row[key]) / len(accs)
        out[name] = entry
    return out


def margins(summary: dict[str, Any], reference: str = "imaml",
            others: tuple[str, ...] = ("maml-peers", "fomaml-peers")) -> dict[str, Any]:
    """How far ``reference`` is ahead of each of ``others`` (in points), at each budget both have.

    ``ahead`` is true when the lead exceeds the sum of the two settings' (mean) 95% intervals,
    that is, when the intervals do not overlap. The spread over seeds is reported beside it:
    ``lead_min_over_seeds`` is the smallest per-seed lead (the settings are paired by seed).
    """
    out: dict[str, Any] = {}
    if reference not in summary:
        return out
    ref = summary[reference]
    for name in others:
        if name not in summary:
            continue
        row = summary[name]
        for key in ("tasks", "seconds"):
            if f"accuracy_at_{key}" not in ref or f"accuracy_at_{key}" not in row:
                continue
            lead = ref[f"accuracy_at_{key}"] - row[f"accuracy_at_{key}"]
            width = ref[f"ci95_at_{key}"] + row[f"ci95_at_{key}"]
            paired = {s: a for s, (a, _) in zip(row["seeds"], row[f"per_seed_at_{key}"])}
            per_seed = [a - paired[s] for s, (a, _) in zip(ref["seeds"], ref[f"per_seed_at_{key}"]) if s in paired]
            out[f"{name}@{key}"] = {"reference": reference, "against": name, "budget": key, "lead": lead,
                                    "intervals": width,
                                    "ahead": lead > width, "lead_min_over_seeds": min(per_seed, default=None)}
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """``compare.png``: meta-test accuracy (curve episodes) against tasks seen and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["setting"] for r in runs))
    for i, name in enumerate(names):
        color = f"C{i}"
        for j, run in enumerate(r for r in runs if r["setting"] == name):
            label = name if j == 0 else None
            for ax, key in ((axes[0], "tasks"), (axes[1], "seconds")):
                points = run.get("time_curve", run["curve"]) if key == "seconds" else run["curve"]
                final = run["final"].get(key)
                if final is not None and points and final[key] > points[-1][key]:
                    points = [*points, final]  # the final evaluation of that budget ends the curve
                ax.plot([p[key] for p in points], [p["accuracy"] for p in points], "o-", ms=3,
                        color=color, alpha=0.8, label=label)
    lowest = min((p["accuracy"] for r in runs for p in r["curve"]), default=20.0)
    for ax, label in ((axes[0], "meta-training tasks seen"), (axes[1], "training time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("meta-test accuracy (%)")
        ax.set_ylim(max(0.0, lowest - 5.0), None)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    threads = runs[0].get("threads", 1) if runs else 1
    return save_figure(fig, path, f"Omniglot 5-way 1-shot, same tasks and meta-test episodes per seed "
                                  f"({len({r['seed'] for r in runs})} seeds, {threads} thread(s) per run; chance 20%)")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    """``python -m applications.imaml compare ...``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m applications.imaml compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("BILEVEL_DATA", "data/omniglot"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", required=True, help="folder for runs/, compare.json and compare.png")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tasks", type=_positive(int), default=1200, help="meta-training tasks per run (default 1200)")
    p.add_argument("--seconds", type=_positive(float), default=None,
                   help="also train at least this many seconds, and evaluate there (equal wall time)")
    p.add_argument("--episodes", type=_positive(int), default=600, help="final meta-test episodes (default 600)")
    p.add_argument("--curve-episodes", type=_positive(int), default=100)
    p.add_argument("--curve-points", type=_positive(int), default=6)
    p.add_argument("--query", type=_positive(int), default=15, help="query images per class at meta-test")
    p.add_argument("--reference", default="imaml", choices=list(SETTINGS),
                   help="the setting whose lead over maml-peers and fomaml-peers is reported (default imaml)")
    p.add_argument("--jobs", type=_positive(int), default=1, help="runs at once (one process each)")
    p.add_argument("--threads", type=_positive(int), default=1, help="torch threads per run")
    args = p.parse_args(argv)
    from .data import DatasetError

    try:
        load_splits(args.data_dir, args.cache_dir, args.seeds[0])  # fail early, and build the cache once
    except (DatasetError, OSError) as e:  # a missing archive is a FileNotFoundError
        message = " ".join(str(e).split()).replace("call load_omniglot(..., download=True)",
                                                    "run `python -m applications.imaml train --download`")
        print(f"error: {message}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in args.seeds for name in args.settings]
    common = dict(data_dir=args.data_dir, cache_dir=args.cache_dir, out_dir=str(out), tasks=args.tasks,
                  episodes=args.episodes, curve_episodes=args.curve_episodes,
                  curve_points=args.curve_points, query=args.query, threads=args.threads)
    for name, seed in jobs:
        print(f"queued {name} (seed {seed})", file=sys.stderr, flush=True)
    runs = run_all(jobs, common, args.seconds or 0.0, args.jobs)
    summary = summarise(runs)
    leads = margins(summary, reference=args.reference)
    atomic_write_text(json.dumps({"arguments": {k: v for k, v in vars(args).items()}, "summary": summary,
                                  "margins": leads,
                                  "commit": git_commit(),
                                  "changes": {name: STUDY_CHANGES.get(name, "") for name in args.settings},
                                  "runs": [{k: v for k, v in r.items() if k != "steps"} for r in runs]},
                                 indent=1), out / "compare.json")
    plot(runs, out / "compare.png")
    print(f"{'setting':<14} {'s/task':>7} {'at ' + str(args.tasks) + ' tasks':>18}"
          + (f" {'at ' + str(int(args.seconds)) + ' s':>18}" if args.seconds else ""))
    for name, row in summary.items():
        line = f"{name:<14} {row['seconds_per_task']:>7.3f} {row['accuracy_at_tasks']:>10.2f} +- {row['ci95_at_tasks']:.2f}%"
        if args.seconds and "accuracy_at_seconds" in row:
            line += f" {row['accuracy_at_seconds']:>10.2f} +- {row['ci95_at_seconds']:.2f}%"
        print(line)
    for row in leads.values():
        print(f"{row['reference']} vs {row['against']} at the {row['budget']} budget: {row['lead']:+.2f} points "
              f"(intervals {row['intervals']:.2f}; {'ahead' if row['ahead'] else 'NOT ahead'} by more than them)")
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
