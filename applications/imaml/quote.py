"""Numbers in the READMEs come from results files: collect them, render the tables, check the text.

Every accuracy the READMEs quote sits between two markers::

    <!-- results:main-job -->
    ...generated text...
    <!-- /results:main-job -->

and is generated from a JSON file in ``applications/imaml/results/`` that records the commit
of the code that measured it. Commands::

    python -m applications.imaml.quote collect-main RUN [RUN ...]   # results/main_job.json from run folders
    python -m applications.imaml.quote collect-compare OUT NAME      # results/NAME.json from a compare folder
    python -m applications.imaml.quote write [BLOCK ...]             # regenerate the blocks in place
    python -m applications.imaml.quote plot-study                    # results/study.png from results/study.json
    python -m applications.imaml.quote check                         # exit 1 if anything is stale

``tests/applications/test_imaml_compare.py`` runs both checks: a README whose numbers disagree with the
committed results fails the tests, and so do results measured on a configuration that has
since changed (:func:`stale_configs`: a new default must be measured again before it is quoted).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from .io import git_commit, save_figure

__all__ = ["RESULTS_DIR", "DOCUMENTS", "BLOCKS", "git_commit", "collect_main", "collect_compare", "render",
           "rewrite", "stale_blocks", "stale_configs", "plot_study", "main"]

ROOT = Path(__file__).resolve().parents[2]
#: Where the committed results files live.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The documents whose marked blocks are generated.
DOCUMENTS = (ROOT / "README.md", Path(__file__).resolve().parent / "README.md")
_BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def _window_means(values: list[float], window: int) -> list[float]:
    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]


def collect_main(runs: list[str | Path], out: Path | None = None) -> dict[str, Any]:
    """``results/main_job.json`` from the run folders of README's main job (one per seed)."""
    rows = []
    for run in map(Path, runs):
        summary = json.loads((run / "summary.json").read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        acc = [100.0 * r["query_accuracy"] for r in records]
        means = _window_means(acc, min(20, len(acc)))
        rows.append({
            "run": run.name, "seed": summary["config"]["seed"], "accuracy": summary["accuracy"],
            "ci95": summary["ci95"], "episodes": summary["episodes"], "steps": summary["steps"],
            "train_seconds": summary.get("train_seconds", records[-1].get("seconds")),
            "eval_seconds": summary.get("eval_seconds"), "wall_seconds": summary.get("wall_seconds"),
            "last20_query_accuracy": means[-1], "best20_query_accuracy": max(means),
            "commit": summary.get("commit"), "threads": summary.get("threads"), "config": summary["config"],
        })
    accs = [r["accuracy"] for r in rows]
    result = {"what": "README's main job, one run per seed", "config": summary["config"], "runs": rows,
              "mean_accuracy": sum(accs) / len(accs),
              "commits": sorted({str(r["commit"]) for r in rows})}
    path = out or RESULTS_DIR / "main_job.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def collect_compare(folder: str | Path, name: str) -> dict[str, Any]:
    """``results/<name>.json`` from a ``compare`` output folder (its ``compare.json``), with the commit."""
    data = json.loads((Path(folder) / "compare.json").read_text())
    data["commit"] = data.get("commit") or git_commit()
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _finish(lines: list[str], data: dict[str, Any]) -> str:
    """The block's text: ``lines``, then the results file's ``note`` if it has one."""
    if data.get("note"):
        lines.append(data["note"])
    return "\n".join(lines) + "\n"


def _main_job(data: dict[str, Any]) -> str:
    lines = ["| seed | meta-test accuracy (600 episodes) | training | evaluation | whole command | "
             "query accuracy, last 20 steps / best 20 |",
             "|---|---|---|---|---|---|"]
    for r in data["runs"]:
        wall = f"{r['wall_seconds']:.0f} s" if r.get("wall_seconds") is not None else "-"
        lines.append(f"| {r['seed']} | {r['accuracy']:.2f} ± {r['ci95']:.2f}% | {r['train_seconds']:.0f} s | "
                     f"{r['eval_seconds']:.0f} s | {wall} | {r['last20_query_accuracy']:.1f}% / "
                     f"{r['best20_query_accuracy']:.1f}% |")
    lines.append("")
    lines.append(f"Mean of the {len(data['runs'])} seeds: **{data['mean_accuracy']:.2f}%** (chance: 20%). "
                 f"Measured at commit {', '.join(data['commits'])} "
                 f"(`applications/imaml/results/main_job.json`).")
    return _finish(lines, data)


def _compare(data: dict[str, Any]) -> str:
    args = data["arguments"]
    tasks = args["tasks"]
    seconds = args.get("seconds")
    head = f"| setting | s / task | meta-test accuracy at {tasks} tasks |"
    rule = "|---|---|---|"
    if seconds:
        head += f" at {seconds:.0f} s of training (tasks seen) |"
        rule += "---|"
    lines = [head, rule]
    for name, row in data["summary"].items():
        line = f"| `{name}` | {row['seconds_per_task']:.3f} | {row['accuracy_at_tasks']:.2f} ± {row['ci95_at_tasks']:.2f}% |"
        if seconds and "accuracy_at_seconds" in row:
            line += (f" {row['accuracy_at_seconds']:.2f} ± {row['ci95_at_seconds']:.2f}% "
                     f"({row['tasks_at_seconds']:.0f}) |")
        lines.append(line)
    seeds = sorted({s for row in data["summary"].values() for s in row["seeds"]})
    lines.append("")
    lines.append(f"Mean over seeds {', '.join(map(str, seeds))} (± the mean of the seeds' 95% intervals), "
                 f"{args['episodes']} meta-test episodes with {args['query']} queries per class, the same episodes "
                 f"for every setting of a seed; {args['threads']} thread(s) per run, {args['jobs']} run(s) at once. "
                 f"Measured at commit {data.get('commit')}.")
    if data.get("margins"):
        lines.append("")
        reference = next(iter(data["margins"].values())).get("reference", "imaml")
        lines.append(f"| `{reference}` against | budget | lead (points) | sum of the 95% intervals | smallest lead of a seed | "
                     "ahead by more than the intervals |")
        lines.append("|---|---|---|---|---|---|")
        for row in data["margins"].values():
            budget = f"{tasks} tasks" if row["budget"] == "tasks" else f"{seconds:.0f} s"
            low = row.get("lead_min_over_seeds")
            lines.append(f"| `{row['against']}` | {budget} | {row['lead']:+.2f} | {row['intervals']:.2f} | "
                         f"{'-' if low is None else f'{low:+.2f}'} | {'yes' if row['ahead'] else 'no'} |")
    return _finish(lines, data)


def _study(data: dict[str, Any]) -> str:
    lines = ["| setting | change from the study's base | s / task | meta-test accuracy (mean of seeds ± mean 95% interval) "
             "| per seed |", "|---|---|---|---|---|"]
    changes = data.get("changes", {})
    for name, row in data["summary"].items():
        per_seed = ", ".join(f"{a:.1f}" for a, _ in row["per_seed_at_tasks"])
        lines.append(f"| `{name}` | {changes.get(name, '')} | {row['seconds_per_task']:.3f} | "
                     f"{row['accuracy_at_tasks']:.2f} ± {row['ci95_at_tasks']:.2f}% | {per_seed} |")
    args = data["arguments"]
    lines.append("")
    lines.append(f"{args['tasks']} meta-training tasks per run, {args['episodes']} meta-test episodes with "
                 f"{args['query']} queries per class; seeds {', '.join(map(str, args['seeds']))}; "
                 f"{args['threads']} thread(s) per run, {args['jobs']} run(s) at once. "
                 f"Measured at commit {data.get('commit')}.")
    return _finish(lines, data)


#: block name -> (results file, renderer)
BLOCKS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "main-job": ("main_job", _main_job),
    "compare": ("compare", _compare),
    "study": ("study", _study),
}


def render(name: str) -> str:
    """The generated text of block ``name`` from its results file."""
    if name not in BLOCKS:
        raise ValueError(f"unknown results block {name!r}; available: {', '.join(BLOCKS)}.")
    file, renderer = BLOCKS[name]
    data = _load(file)
    if data is None:
        raise FileNotFoundError(f"results/{file}.json is missing; run the command that writes it "
                                f"(see python -m applications.imaml.quote -h).")
    return renderer(data)


def rewrite(text: str, names: list[str] | None = None) -> str:
    """``text`` with every marked block (or those in ``names``) regenerated."""
    def one(m):
        if names and m.group("name") not in names:
            return m.group(0)
        return m.group(1) + render(m.group("name")) + m.group(4)

    return _BLOCK.sub(one, text)


def stale_blocks() -> list[str]:
    """``document:block`` for every marked block whose text differs from its results file."""
    stale = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        for m in _BLOCK.finditer(text):
            if m.group("body") != render(m.group("name")):
                stale.append(f"{doc.relative_to(ROOT)}:{m.group('name')}")
    return stale


def plot_study(data: dict[str, Any], path: Path) -> Path:
    """``study.png``: each setting's meta-test accuracy (seeds as dots, mean with its interval) and cost per task.

    The settings are drawn in the order of the results file; the base's mean (``study-base``, or
    ``imaml`` in a study of the default) is a dashed line, so that a change that helps lies to its
    right and one that hurts to its left.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["summary"])
    rows = [data["summary"][n] for n in names]
    y = list(range(len(names)))[::-1]
    fig, (acc_ax, cost_ax) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True,
                                          gridspec_kw={"width_ratios": [3, 1]})
    base_name = "study-base" if "study-base" in data["summary"] else "imaml"
    base = data["summary"].get(base_name)
    if base is not None:
        acc_ax.axvline(base["accuracy_at_tasks"], color="0.5", ls="--", lw=1)
        cost_ax.axvline(base["seconds_per_task"], color="0.5", ls="--", lw=1)
    for yi, name, row in zip(y, names, rows):
        color = "C0" if name == base_name else "C1"
        acc_ax.errorbar(row["accuracy_at_tasks"], yi, xerr=row["ci95_at_tasks"], fmt="o", color=color, capsize=3)
        acc_ax.plot([a for a, _ in row["per_seed_at_tasks"]], [yi] * len(row["per_seed_at_tasks"]), "x",
                    color="0.3", ms=5)
        cost_ax.barh(yi, row["seconds_per_task"], color=color, alpha=0.7)
    acc_ax.set_yticks(y, names)
    acc_ax.set_xlabel("meta-test accuracy (%): mean of seeds ± mean 95% interval; x: each seed")
    cost_ax.set_xlabel("training seconds per task")
    for ax in (acc_ax, cost_ax):
        ax.grid(axis="x", alpha=0.3)
    args = data["arguments"]
    return save_figure(fig, path, f"One change at a time from {base_name} (dashed): Omniglot 5-way 1-shot, "
                                  f"{args['tasks']} tasks, seeds {', '.join(map(str, args['seeds']))}")


#: Fields that a run sets for itself (its seed, the length of its schedule, how often it saves):
#: they may differ from the configuration's without the measurement being of another set-up.
_PER_RUN_FIELDS = ("seed", "meta_steps", "checkpoint_every", "eval_every", "eval_episodes")


def _config_differences(measured: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(measured) | set(current)):
        if key in _PER_RUN_FIELDS:
            continue
        a, b = measured.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} measured, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} measured, {b!r} now")
    return out


def stale_configs() -> list[str]:
    """Results measured on a configuration other than today's: ``file: setting: field: measured, now``.

    README's main job must have been measured on :func:`~applications.imaml.configs.get_config`'s
    ``omniglot-5w1s-gd-cpu`` (the meta-steps too: they are the job's budget), and every run of a
    comparison on the setting of that name in :data:`~applications.imaml.compare.SETTINGS` (up to the
    fields a run sets for itself: seed, schedule length, checkpoint interval).
    """
    from .compare import SETTINGS, setting_config
    from .configs import get_config

    stale = []
    main = _load("main_job")
    if main is not None:
        current = get_config("omniglot-5w1s-gd-cpu").to_dict()
        for run in main["runs"]:
            measured = run.get("config", main["config"])
            diffs = _config_differences(measured, current)
            if measured.get("meta_steps") != current["meta_steps"]:
                diffs.append(f"meta_steps: {measured.get('meta_steps')!r} measured, {current['meta_steps']!r} now")
            stale += [f"main_job: seed {run['seed']}: {d}" for d in diffs]
    for file in ("compare", "study"):
        data = _load(file)
        for run in (data or {}).get("runs", []):
            name = run["setting"]
            if name not in SETTINGS:
                stale.append(f"{file}: {name}: no longer a setting")
                continue
            diffs = _config_differences(run["config"], setting_config(name, run["seed"]).to_dict())
            stale += [f"{file}: {name} seed {run['seed']}: {d}" for d in diffs]
    return stale


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "collect-main":
        print(json.dumps(collect_main(rest)["mean_accuracy"]))
    elif cmd == "collect-compare":
        collect_compare(rest[0], rest[1])
    elif cmd == "write":  # write [BLOCK ...]: every block, or the ones named
        for doc in DOCUMENTS:
            doc.write_text(rewrite(doc.read_text(), rest or None))
    elif cmd == "plot-study":
        data = _load("study")
        if data is None:
            print("error: results/study.json is missing; run collect-compare OUT study first.", file=sys.stderr)
            return 2
        print(plot_study(data, RESULTS_DIR / "study.png"))
    elif cmd == "check":
        stale = stale_blocks()
        if stale:
            print("stale results blocks (run python -m applications.imaml.quote write): " + ", ".join(stale),
                  file=sys.stderr)
        configs = stale_configs()
        if configs:
            print("results measured on a configuration that has changed since (measure them again):\n  "
                  + "\n  ".join(configs), file=sys.stderr)
        if stale or configs:
            return 1
    else:
        print(f"error: unknown command {cmd!r}; use collect-main, collect-compare, write, plot-study or check.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
