"""Time per meta-step of README's main job (``omniglot-5w1s-gd-cpu``), this checkout against another.

The main job's meta-step: 4 tasks of 5-way 1-shot (5 support and 25 query images), 10 inner
gradient steps on the paper's 4-block network, the implicit meta-gradient with 5 CG steps on the
Gauss-Newton matrix (its Jacobian built once per task), Adam. The script runs that step as the
command line does (``MetaLearner`` with ``workers`` = the torch threads where the code has that
option, two threads), on generated episodes of the same shapes (the time of a step does not
depend on the pixels: Gauss-Newton curvature never meets negative curvature). Each source tree
runs in its own process, the trees alternate, ``--rounds`` times; reported: the median seconds
per meta-step of each, and their ratio (a ratio from one run: absolute CPU times are not to be
quoted).

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/main_job_speed.py --before /tmp/before    # -> results/main_job_speed.{json,png}

The run of the command itself (README's 500 meta-steps on real Omniglot, training time over
steps) is in ``applications/imaml/results/main_job.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for path in (_HERE, _ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from _common import RESULTS_DIR, display_path, environment, write_json  # noqa: E402

#: What one process runs: ``steps`` meta-steps after ``warmup``, printing one JSON line.
WORKER = r"""
import inspect, json, subprocess, sys, time
import torch
from applications.imaml.algorithms import AlgorithmConfig, MetaLearner, TaskBatch
from applications.imaml.configs import get_config
from applications.imaml.model import ConvNet, init_params
steps, warmup, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
cfg = get_config("omniglot-5w1s-gd-cpu")
net_options = {k: v for k, v in cfg.network.items() if k != "init"}
net = ConvNet(cfg.n_way, **net_options)
net.requires_grad_(False)
theta = init_params(net, seed=0)
options = {"workers": threads} if "workers" in inspect.signature(MetaLearner).parameters else {}
learner = MetaLearner(net, AlgorithmConfig(**cfg.algorithm), **options)
opt = torch.optim.Adam(theta.values(), lr=cfg.outer_lr)
g = torch.Generator().manual_seed(0)
B, W, S, Q = cfg.meta_batch, cfg.n_way, cfg.k_shot, cfg.k_query
def batch():
    return TaskBatch(torch.rand(B, W * S, 1, 28, 28, generator=g), torch.arange(W).repeat_interleave(S).repeat(B, 1),
                     torch.rand(B, W * Q, 1, 28, 28, generator=g), torch.arange(W).repeat_interleave(Q).repeat(B, 1))
def step():
    opt.zero_grad(set_to_none=True)
    learner.meta_gradient(theta, batch())
    opt.step()
for _ in range(warmup):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
seconds = (time.perf_counter() - start) / steps
commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"seconds_per_step": seconds, "workers": options.get("workers", 1), "commit": commit}))
"""


def run_tree(tree: str, steps: int, warmup: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(steps), str(warmup), str(threads)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the meta-steps of {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="another checkout of the repository (e.g. a git worktree)")
    p.add_argument("--steps", type=int, default=15, help="timed meta-steps per process (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed meta-steps first (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds (default 5; the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, as the command line's default (2)")
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args()
    trees = {"before": os.path.abspath(args.before), "after": _ROOT}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run_tree(tree, args.steps, args.warmup, args.threads))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]['seconds_per_step']:.3f} s per meta-step",
                  flush=True)
    medians = {name: statistics.median(x["seconds_per_step"] for x in rs) for name, rs in runs.items()}
    ratio = medians["before"] / medians["after"]
    payload = {
        "benchmark": "main_job_speed", "config": "omniglot-5w1s-gd-cpu",
        "what": "seconds per meta-step (4 tasks, 10 inner steps, 5 CG steps on the Gauss-Newton Jacobian, Adam) "
                "on generated episodes; each tree in its own process, alternated",
        "commits": {name: rs[0]["commit"] for name, rs in runs.items()},
        "workers": {name: rs[0]["workers"] for name, rs in runs.items()},
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "seconds_per_step": {name: [x["seconds_per_step"] for x in rs] for name, rs in runs.items()},
        "median_seconds_per_step": medians, "speedup_before_over_after": ratio, "target_speedup": 1.5,
        "environment": environment(torch.device("cpu")),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "main_job_speed.json")
    write_json(path, payload)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    labels = [f"{name}\n{payload['commits'][name]} (workers={payload['workers'][name]})" for name in trees]
    ax.bar(labels, [medians[n] for n in trees], color=["#999999", "#1f77b4"])
    for i, name in enumerate(trees):
        ax.plot([i] * args.rounds, payload["seconds_per_step"][name], "k.", ms=4)
    ax.set_ylabel("s per meta-step (median)")
    ax.set_title(f"README's main job: {ratio:.2f}x fewer seconds per meta-step")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "main_job_speed.png"), dpi=120)
    print(f"before / after: {ratio:.2f}x (target {payload['target_speedup']}); wrote {display_path(path)}")


if __name__ == "__main__":
    main()
