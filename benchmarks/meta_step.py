"""A full iMAML meta-step (meta-gradient of a meta-batch + the outer Adam update): time and peak memory.

The issue's GPU target is stated for this unit: 32 tasks, K = 16 inner GD steps, 5 CG steps, Adam, on the
4-conv Omniglot net, 5-way 1-shot and 20-way 5-shot. The script times, for each setting, four paths of
:class:`applications.imaml.algorithms.MetaLearner` (``imaml_gd``, ``inner_lr`` 0.1, ``lam`` 2.0):

* ``loop``: one task at a time, exact reverse-over-reverse Hessian-vector products;
* ``vmap``: all tasks through :func:`torch.func.vmap`, exact forward-over-reverse products;
* ``loop_gn`` / ``vmap_gn``: the same with Gauss-Newton curvature (``curvature="gauss_newton"``);
* ``compiled`` (not in the default paths; ask with ``--paths``): the meta-batch through
  :meth:`bilevel.CompiledHypergradient.batched`, the tasks under :func:`torch.func.vmap` inside one
  ``torch.compile`` graph, exact reverse-over-reverse products, on CUDA as a CUDA graph
  (``mode="reduce-overhead"``), with the same per-task first-order fallback at negative curvature as the
  other exact paths (``negative_curvature="first_order"``). Its first two steps (eager, then compiling) are
  part of ``--warmup``, which is raised to 2 for it.

One meta-step is ``opt.zero_grad(); learner.meta_gradient(theta, batch); opt.step()`` with
``torch.optim.Adam(lr=1e-3)``. Per path: ``--warmup`` untimed steps, one peak-memory step
(``max_memory_allocated`` on CUDA, the tensor peak on CPU), then ``--repeats`` timed steps, alternating the
paths; reported: the minimum. CUDA: CUDA events, milliseconds. CPU: process CPU time with one thread,
reported only as ratios to ``loop`` in the same run (absolute CPU times are not to be quoted).

Usage (from the repository root)::

    .venv/bin/python benchmarks/meta_step.py                        # CPU: meta-batch 4 (~3 min)
    .venv/bin/python benchmarks/meta_step.py --device cuda          # meta-batch 32, the issue's setting
    .venv/bin/python benchmarks/meta_step.py --meta-batch 8 --settings 5w1s

Writes ``<out>/meta_step.json`` and ``<out>/meta_step.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import bilevel as bl  # noqa: E402
from _common import (CPU_TIME_NOTE, RESULTS_DIR, Stopwatch, display_path, environment,  # noqa: E402
                     peak_memory_mib, resolve_device, write_json)
from applications.imaml.algorithms import AlgorithmConfig, MetaLearner, TaskBatch  # noqa: E402
from applications.imaml.model import ConvNet, init_params  # noqa: E402

SETTINGS = {"5w1s": (5, 1, 15), "20w5s": (20, 5, 5)}  # ways, shots, query images per class
PATHS = {"loop": (False, "exact"), "vmap": (True, "exact"), "loop_gn": (False, "gauss_newton"),
         "vmap_gn": (True, "gauss_newton"), "compiled": (True, "exact")}
DEFAULT_PATHS = ["loop", "vmap", "loop_gn", "vmap_gn"]
K, CG, INNER_LR, LAM = 16, 5, 0.1, 2.0


def _batch(ways: int, shots: int, query: int, tasks: int, device: torch.device, seed: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(tasks, ways * shots, 1, 28, 28, generator=g).to(device),
                     torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1).to(device),
                     torch.randn(tasks, ways * query, 1, 28, 28, generator=g).to(device),
                     torch.arange(ways).repeat_interleave(query).repeat(tasks, 1).to(device))


def measure(setting: str, tasks: int, device: torch.device, warmup: int, repeats: int, seed: int,
            paths: list[str]) -> dict[str, Any]:
    ways, shots, query = SETTINGS[setting]
    net = ConvNet(ways).to(device)
    net.requires_grad_(False)
    batch = _batch(ways, shots, query, tasks, device, seed)
    state = {}
    for name in paths:
        vm, curvature = PATHS[name]
        theta = init_params(net, seed=0, device=device)
        learner = MetaLearner(net, AlgorithmConfig("imaml_gd", inner_steps=K, inner_lr=INNER_LR, lam=LAM,
                                                   cg_steps=CG, vmap=vm, curvature=curvature))
        opt = torch.optim.Adam(theta.values(), lr=1e-3)
        if name == "compiled":
            state[name] = _compiled_step(learner, theta, opt, batch, device)
            continue

        def step(learner=learner, theta=theta, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            learner.meta_gradient(theta, batch)
            opt.step()
        state[name] = step
    clock = "cpu" if device.type == "cpu" else "wall"  # Stopwatch: CUDA events on a GPU
    peaks, times = {}, {n: [] for n in paths}
    for name in paths:
        for _ in range(max(warmup, 2) if name == "compiled" else warmup):  # compiled: eager, then compiling
            state[name]()
        peaks[name] = peak_memory_mib(device, state[name])
    for _ in range(repeats):
        for name in paths:
            with Stopwatch(device) as sw:
                state[name]()
            times[name].append(sw.cpu_seconds if clock == "cpu" else sw.seconds)
    best = {n: min(t) for n, t in times.items()}
    rec = {"setting": setting, "ways": ways, "shots": shots, "query_per_class": query, "tasks": tasks,
           "time_s": best, "times_s": times, "peak_mib": peaks,
           "peak_mib_per_task": {n: v / tasks for n, v in peaks.items()},
           "time_over_loop": {n: best[n] / best["loop"] for n in paths} if "loop" in best else {}}
    if device.type == "cuda":
        rec["time_ms"] = {n: 1e3 * v for n, v in best.items()}
    return rec


def _compiled_step(learner: MetaLearner, theta: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                   batch: TaskBatch, device: torch.device):
    """One meta-step through ``bl.compiled_hypergradient(...).batched``: the same inner problem, solver and CG."""
    problem = learner.proximal_problem(LAM)

    def outer(phi, t, query):
        return torch.nn.functional.cross_entropy(learner.logits(phi, query[0]), query[1])

    hg = bl.compiled_hypergradient(problem, outer, solver=learner.inner_gd, linear_solver=learner.linear,
                                   negative_curvature=learner.config.negative_curvature if
                                   learner.config.negative_curvature == "first_order" else "warn",
                                   options={"mode": "reduce-overhead"} if device.type == "cuda" else None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        grad, _ = hg.batched(theta, (batch.support_x, batch.support_y), outer_data=(batch.query_x, batch.query_y))
        for k, t in theta.items():
            t.grad = grad[k]
        opt.step()
    return step


def plot(records: list[dict[str, Any]], device: torch.device, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(records), 1)
    for i, r in enumerate(records):
        names = list(r["time_s"])
        xs = [j + i * width for j in range(len(names))]
        if device.type == "cuda":
            axes[0].bar(xs, [r["time_ms"][n] for n in names], width, label=f"{r['setting']}, {r['tasks']} tasks")
        else:
            axes[0].bar(xs, [r["time_over_loop"][n] for n in names], width, label=f"{r['setting']}, {r['tasks']} tasks")
        axes[1].bar(xs, [r["peak_mib"][n] for n in names], width, label=f"{r['setting']}, {r['tasks']} tasks")
    for ax in axes:
        ax.set_xticks([j + width * (len(records) - 1) / 2 for j in range(len(records[0]["time_s"]))])
        ax.set_xticklabels(list(records[0]["time_s"]) if records else [])
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set(ylabel="ms per meta-step (CUDA events)" if device.type == "cuda" else
                "time per meta-step / loop (CPU time, 1 thread)", title="full meta-step time")
    axes[1].set(ylabel="peak MiB (" + ("max_memory_allocated" if device.type == "cuda" else "tensor peak") + ")",
                title="full meta-step peak memory")
    fig.suptitle(f"iMAML-GD meta-step: K={K}, CG {CG}, Adam, 4-conv net, {device.type}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["5w1s", "20w5s"])
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default 32 on CUDA, 4 on CPU)")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=DEFAULT_PATHS,
                   help=f"default: {' '.join(DEFAULT_PATHS)} (compiled: only when asked)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per path (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    tasks = args.meta_batch or (32 if cuda else 4)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (10 if cuda else 2)
    warnings.simplefilter("ignore", bl.ConvergenceWarning)
    start, load_before = time.perf_counter(), os.getloadavg()
    records = []
    for setting in args.settings:
        rec = measure(setting, tasks, device, warmup, repeats, args.seed, args.paths)
        records.append(rec)
        unit = ", ".join(f"{n} {v:.1f} ms" for n, v in rec["time_ms"].items()) if cuda else \
            ", ".join(f"{n} {v:.2f}" for n, v in rec["time_over_loop"].items())
        print(f"  {setting} x {tasks} tasks: time {'' if cuda else '/ loop '}{unit}; peak MiB "
              + ", ".join(f"{n} {v:.0f}" for n, v in rec["peak_mib"].items()), flush=True)
    from applications.imaml.io import git_commit

    payload = {"benchmark": "meta_step", "commit": git_commit(), "inner_steps": K, "cg_steps": CG, "inner_lr": INNER_LR, "lam": LAM,
               "outer_optimizer": "Adam(lr=1e-3)", "meta_batch": tasks, "warmup": warmup, "repeats": repeats,
               "clock": "CUDA events" if cuda else f"process CPU time, {args.threads} thread(s)",
               "memory_measure": "max_memory_allocated" if cuda else "tensor peak (torch.profiler events)",
               "environment": environment(device),
               "load_average": {"before": load_before, "after": os.getloadavg()},
               "time_note": "times from CUDA events" if cuda else CPU_TIME_NOTE, "records": records}
    os.makedirs(args.out, exist_ok=True)
    jp, pp = os.path.join(args.out, "meta_step.json"), os.path.join(args.out, "meta_step.png")
    write_json(jp, payload)
    plot(records, device, pp)
    print(f"meta_step on {device} ({time.perf_counter() - start:.0f} s); wrote {display_path(jp)} and "
          f"{display_path(pp)}")
    if not cuda:
        print(CPU_TIME_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
