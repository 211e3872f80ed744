"""Time of the implicit backward pass with the two Hessian-vector-product modes.

``bilevel.linalg.Linearization`` offers two exact HVP modes:

``reverse``
    reverse-over-reverse: ``grad_phi G`` is built once with ``create_graph=True``
    and each product is one more backward through that graph (reused by all
    products and by the mixed term).
``forward``
    forward-over-reverse with ``torch.func``: ``jvp`` of ``grad``; every
    product re-runs the forward and backward passes with dual numbers.

This script times one full implicit backward, i.e. the whole call
``bl.implicit_vjp(problem, theta, phi, data, cotangent,
linear_solver=bl.linalg.get("cg", max_iter=5, warn=False), hvp=mode)``
(setup + 5 HVPs + the mixed term), on two inner problems
``bl.ProximalProblem(cross_entropy, lam=2.0)``:

* ``mlp``: 64-256-256-10 ReLU MLP, 100 random points, 10 classes;
* ``convnet``: 4 x [conv 3x3, 64 filters -> batch norm (batch statistics, no
  running stats) -> ReLU -> max-pool 2x2] -> linear, on 1x28x28 inputs,
  20-way 5-shot (100 images).

``phi`` comes from a few fixed-step GD iterations from ``theta`` (not timed;
step 0.1 for the MLP, 0.01 for the conv net, whose batch-normalised loss is
too curved for 0.1), far enough for CG to meet positive curvature and so to
perform all 5 products (checked: the script warns otherwise).
Each mode is warmed up, then the two modes are timed alternately (so that
drifting machine load hits both alike); the medians and their ratio
forward / reverse are reported. Both modes must return the same ``vjp`` (checked).
On the host both the wall clock and the process CPU time are recorded; with
``--threads 1`` the CPU time is the robust figure on a shared machine (other
processes' load does not inflate it) and is the one plotted.

Usage (from the repository root)::

    .venv/bin/python benchmarks/hvp_modes.py                # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/hvp_modes.py --quick
    .venv/bin/python benchmarks/hvp_modes.py --threads 1    # writes hvp_modes_threads1.*

Writes ``<out>/hvp_modes.json`` and ``<out>/hvp_modes.png`` (with
``--threads N``: ``hvp_modes_threadsN.*``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch

import bilevel as bl
from _common import (CPU_TIME_NOTE, RESULTS_DIR, Stopwatch, Task, convnet_task, display_path, environment, mlp_task,
                     resolve_device, robust_clock, write_json)

MODES = ("reverse", "forward")
CG_ITERS = 5
#: Per network: builder and the (untimed) inner solve that produces phi.
NETS = {
    "mlp": {"build": mlp_task, "step_size": 0.1, "steps": 50, "quick_steps": 20,
            "label": "MLP 64-256-256-10, batch 100"},
    "convnet": {"build": convnet_task, "step_size": 0.01, "steps": 30, "quick_steps": 20,
                "label": "4-block conv net, 20-way 5-shot 1x28x28"},
}


def prepare(name: str, device: torch.device, quick: bool, seed: int) -> tuple[Task, dict, dict]:
    """Build the task, run the inner solve, and return ``(task, phi, cotangent)``."""
    spec = NETS[name]
    task = spec["build"](device, seed=seed)
    steps = spec["quick_steps"] if quick else spec["steps"]
    solver = bl.solvers.get("gd", step_size=spec["step_size"], max_iter=steps, tol=0.0)
    phi = bl.solve(task.problem, task.theta, task.data, solver=solver).phi
    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    grads = torch.autograd.grad(task.outer(leaves), list(leaves.values()))
    return task, phi, dict(zip(leaves, grads))


def bench_net(name: str, device: torch.device, *, repeats: int, warmup: int, quick: bool,
              seed: int) -> dict[str, Any]:
    """Time ``implicit_vjp`` in both modes on one network; return the record."""
    task, phi, cotangent = prepare(name, device, quick, seed)
    linear_solver = bl.linalg.get("cg", max_iter=CG_ITERS, warn=False)
    outputs: dict[str, Any] = {}

    def call(mode: str) -> None:
        outputs[mode] = bl.implicit_vjp(task.problem, task.theta, phi, task.data, cotangent,
                                        linear_solver=linear_solver, hvp=mode)

    for mode in MODES:
        for _ in range(warmup):
            call(mode)
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            with Stopwatch(device) as sw:
                call(mode)
            wall[mode].append(sw.seconds)
            cpu[mode].append(sw.cpu_seconds)

    (vjp_r, info_r), (vjp_f, info_f) = outputs["reverse"], outputs["forward"]
    flat_r = torch.cat([v.reshape(-1) for v in vjp_r.values()])
    flat_f = torch.cat([v.reshape(-1) for v in vjp_f.values()])
    rel_diff = float(torch.linalg.vector_norm(flat_r - flat_f) / torch.linalg.vector_norm(flat_r))
    median = {m: statistics.median(wall[m]) for m in MODES}
    cpu_median = {m: statistics.median(cpu[m]) for m in MODES}
    clock = robust_clock(device)
    chosen = wall if clock == "wall" else cpu
    paired = [f / r for f, r in zip(chosen["forward"], chosen["reverse"])]
    return {
        "net": name,
        "label": NETS[name]["label"],
        "num_params": task.num_params,
        "hvps": {"reverse": info_r.hvps, "forward": info_f.hvps},
        "cg_status": {"reverse": info_r.status.name, "forward": info_f.status.name},
        "vjp_relative_difference": rel_diff,
        "median_s": median,
        "times_s": wall,
        "ratio_forward_over_reverse": median["forward"] / median["reverse"],
        "cpu_median_s": cpu_median if device.type != "cuda" else None,
        "cpu_times_s": cpu if device.type != "cuda" else None,
        "ratio_forward_over_reverse_cpu_time": (cpu_median["forward"] / cpu_median["reverse"]
                                                if device.type != "cuda" else None),
        "clock": clock,
        "ratio": median["forward"] / median["reverse"] if clock == "wall" else
        cpu_median["forward"] / cpu_median["reverse"],
        "paired_ratios": paired,
        "paired_ratio_median": statistics.median(paired),
    }


def plot(records: list[dict[str, Any]], device: torch.device, path: str, threads: int) -> None:
    """Bar chart per network: median time of each mode (relative to reverse on CPU, ms on CUDA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = device.type != "cuda"
    clock = records[0]["clock"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.36
    for i, mode in enumerate(MODES):
        xs = [j + (i - 0.5) * width for j in range(len(records))]
        if relative:
            heights = [r["ratio"] if mode == "forward" else 1.0 for r in records]
        else:
            heights = [1e3 * r["median_s"][mode] for r in records]
        bars = ax.bar(xs, heights, width, color=f"C{i}", label=mode)
        ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], label_type="center", fontsize=9, color="white",
                     fontweight="bold")
        if relative and mode == "forward":  # the ratio of every alternating pair of repeats
            for x, r in zip(xs, records):
                ax.scatter([x] * len(r["paired_ratios"]), r["paired_ratios"], s=10, color="k", zorder=3,
                           label="per-pair ratio" if r is records[0] else None)
    ax.set_xticks(range(len(records)), [f"{r['net']}\n({r['num_params'] / 1e3:.0f}k params)" for r in records])
    clock_name = {"cpu": "process CPU time", "wall": "wall time"}[clock]
    ax.set_ylabel(f"median {clock_name} / reverse's" if relative else "median time (ms, CUDA events)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    title = "implicit_vjp (setup + 5 HVPs + mixed term), CG 5"
    ax.set_title(f"{title}\n{device.type}, {threads} thread(s), {clock_name}" if relative else f"{title}\n{device}",
                 fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', ...")
    parser.add_argument("--out", default=RESULTS_DIR, help="output folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shorter inner solve")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per mode (default 7, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per mode (default 2, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) first (default: torch's default); names the output files")
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=list(NETS), help="networks to time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    warnings.simplefilter("ignore", bl.ConvergenceWarning)  # 5 CG steps and a few GD steps, by design
    # torch's forward AD scripts its JVP decompositions on first use and warns that torch.jit.script is
    # deprecated; that is torch's business, not this benchmark's.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)

    start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    records = []
    for name in args.nets:
        rec = bench_net(name, device, repeats=repeats, warmup=warmup, quick=args.quick, seed=args.seed)
        records.append(rec)
        print(f"  {name:8s} forward/reverse = {rec['ratio']:.2f}", flush=True)
    threads = torch.get_num_threads()
    payload = {
        "benchmark": "hvp_modes",
        "call": (f"bl.implicit_vjp(..., linear_solver=bl.linalg.get('cg', max_iter={CG_ITERS}, warn=False), "
                 f"hvp=mode)"),
        "default_hvp_mode": bl.linalg.DEFAULT_HVP_MODE,
        "quick": args.quick,
        "repeats": repeats,
        "warmup": warmup,
        "environment": environment(device),
        "load_average": {"before": load_before, "after": os.getloadavg() if load_before else None},
        "time_note": CPU_TIME_NOTE if device.type == "cpu" else "times from CUDA events",
        "records": records,
    }
    stem = "hvp_modes" if args.threads is None else f"hvp_modes_threads{args.threads}"
    json_path, png_path = os.path.join(args.out, stem + ".json"), os.path.join(args.out, stem + ".png")
    write_json(json_path, payload)
    plot(records, device, png_path, threads)

    print(f"\nhvp_modes on {device}, {threads} thread(s) ({time.perf_counter() - start:.0f} s): whole implicit_vjp "
          f"call, median of {repeats} after {warmup} warm-up call(s) per mode")
    clock = records[0]["clock"]
    print("fwd/rev: ratio of the median times (wall clock; CPU: process CPU time, meaningful single-threaded); "
          f"paired: median of the ratios of alternating pairs of calls ({clock} clock)")
    print(f"{'net':8s} {'params':>7s} {'HVPs r/f':>8s} {'fwd/rev wall':>12s} {'fwd/rev CPU':>11s} {'paired':>7s}  "
          f"per-pair ratios (vjp rel. diff)")
    for r in records:
        pr = " ".join(f"{x:.2f}" for x in r["paired_ratios"])
        hv = f"{r['hvps']['reverse']}/{r['hvps']['forward']}"
        cpu_ratio = r["ratio_forward_over_reverse_cpu_time"]
        cpu_txt = "-" if cpu_ratio is None else f"{cpu_ratio:.2f}"
        print(f"{r['net']:8s} {r['num_params']:7d} {hv:>8s} {r['ratio_forward_over_reverse']:12.2f} {cpu_txt:>11s} "
              f"{r['paired_ratio_median']:7.2f}  {pr} ({r['vjp_relative_difference']:.1e})")
        if device.type == "cuda":
            ms = {m: 1e3 * r["median_s"][m] for m in MODES}
            print(f"{'':8s} reverse {ms['reverse']:.2f} ms, forward {ms['forward']:.2f} ms")
        if min(r["hvps"].values()) < CG_ITERS or set(r["cg_status"].values()) - {"MAX_ITER", "CONVERGED"}:
            print(f"  warning: on {r['net']} CG did {r['hvps']} HVPs and stopped with {r['cg_status']}; the inner "
                  f"Hessian is not positive definite along CG's directions at this phi (solve the inner problem "
                  f"longer).")
    if device.type == "cpu":
        print(CPU_TIME_NOTE)
    print(f"library default: DEFAULT_HVP_MODE = {bl.linalg.DEFAULT_HVP_MODE!r}")
    print(f"wrote {display_path(json_path)} and {display_path(png_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
