"""Peak memory of ``bl.argmin`` + ``.backward()`` against the inner solver's iteration count.

The implicit gradient differentiates the optimality condition at the final
``phi`` only, so the memory of the forward solve plus the backward pass should
not depend on how many steps the inner solver took. For contrast, MAML-style
unrolled differentiation (:func:`bilevel.unrolled.maml`) keeps the graph of
every step, so its memory grows linearly with the number of steps.

Problem: a 64-256-256-10 ReLU MLP, cross-entropy on 100 random points,
``bl.ProximalProblem(loss, lam=2.0)`` with ``theta`` the dict of the MLP's
parameters; inner solver GD with a fixed step and ``tol=0`` (exactly
``max_iter`` steps); backward CG with 5 iterations; outer loss the
cross-entropy of the adapted MLP on another 100 random points.

Measurement: every configuration runs in a fresh Python process (this script
re-invoked with ``--worker``), so that no allocator state or high-water mark
carries over.

* CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read after imports and
  setup (the baseline) and again after one ``argmin`` + ``backward`` (the
  peak); the result is peak minus baseline, in MiB. Setup ends with a warm-up
  run of the same method (1 inner step, same network, a 4-point batch), so
  that one-off costs (lazy imports, code pages, kernel buffers of the first
  double backward) fall in the baseline and not in the measurement.
* CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()``, minus the memory allocated at the
  baseline. Times use CUDA events.

Times are the best (minimum) of ``--repeats`` further calls in the same
process, since other load on the machine only ever adds time (the medians are
stored too). On CPU the workers run single-threaded unless ``--threads`` says
otherwise, and the time is the process CPU time, which other processes on a
shared machine do not inflate (with several threads: the wall clock). On CPU
only ratios (to the implicit run with the fewest steps) are reported.

Usage (from the repository root)::

    .venv/bin/python benchmarks/memory_argmin.py            # full: ~1.5 min on 2 CPU cores
    .venv/bin/python benchmarks/memory_argmin.py --quick    # fewer configurations
    .venv/bin/python benchmarks/memory_argmin.py --device cuda

Writes ``<out>/memory_argmin.json`` and ``<out>/memory_argmin.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import torch

import bilevel as bl
from _common import (CPU_TIME_NOTE, RESULTS_DIR, Task, current_rss_mib, display_path, environment, maxrss_mib,
                     mlp_task, resolve_device, robust_clock, time_calls, write_json)

#: Fixed inner step size (GD on G = CE + lam/2 ||phi - theta||^2 with lam = 2 is stable well above it).
STEP_SIZE = 0.1
#: CG iterations of the implicit backward pass (iMAML's setting).
CG_ITERS = 5
#: Configurations: method -> inner steps.
FULL = {"implicit": [10, 100, 1000], "unrolled": [10, 50, 100]}
QUICK = {"implicit": [10, 1000], "unrolled": [10, 50]}
RESULT_TAG = "RESULT "
#: Batch of the warm-up run that precedes the baseline.
WARMUP_BATCH = 4




def _make_run(task: Task, method: str, steps: int, device: torch.device) -> Callable[[], dict[str, Any]]:
    """``run()``: one ``argmin`` (or unrolled adaptation) + outer ``backward`` from zeroed grads."""
    solver = bl.solvers.get("gd", step_size=STEP_SIZE, max_iter=steps, tol=0.0)
    linear_solver = bl.linalg.get("cg", max_iter=CG_ITERS, warn=False)
    params = list(task.theta.values())

    def run() -> dict[str, Any]:
        for p in params:
            p.grad = None
        if method == "implicit":
            phi, result = bl.argmin(task.problem, task.theta, task.data, solver=solver,
                                    linear_solver=linear_solver, full_output=True)
            iterations = result.iterations
        elif method == "unrolled":
            phi = bl.unrolled.maml(task.problem, task.theta, task.data, step_size=STEP_SIZE, num_steps=steps)
            iterations = steps
        else:
            raise ValueError(f"unknown method {method!r}; use 'implicit' or 'unrolled'.")
        task.outer(phi).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"inner_iterations": iterations}

    return run


def worker(method: str, steps: int, device: torch.device, repeats: int, seed: int) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process and return its record."""
    warnings.simplefilter("ignore", bl.ConvergenceWarning)  # fixed budgets do not converge, by design
    # Setup ends with one warm-up run of the same method (1 inner step) on the same network
    # with a 4-point batch: lazy imports (torch imports sympy on the first autograd.grad with
    # grad_outputs, ~35 MiB), code pages and kernel buffers of the first double backward then
    # belong to the baseline, while the data memory of the measured run does not.
    _make_run(mlp_task(device, seed=seed + 1, batch=WARMUP_BATCH), method, 1, device)()
    task = mlp_task(device, seed=seed)
    run = _make_run(task, method, steps, device)
    params = list(task.theta.values())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    base_rss, base_current = maxrss_mib(), current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)

    out = run()

    record: dict[str, Any] = {
        "method": method,
        "steps": steps,
        "inner_iterations": out["inner_iterations"],
        "host_peak_mib": maxrss_mib() - base_rss,
        "host_baseline_mib": base_rss,
        # ru_maxrss at the baseline minus the RSS then: memory a run may use without raising the peak.
        "host_baseline_slack_mib": None if base_current is None else base_rss - base_current,
        "grad_norm": float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params]))),
    }
    if device.type == "cuda":
        record["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2 ** 20
    record["peak_mib"] = record["cuda_peak_mib"] if device.type == "cuda" else record["host_peak_mib"]
    times = time_calls(run, device, repeats)
    clock = robust_clock(device)
    record.update(clock=clock, threads=torch.get_num_threads(), time_s=min(times[clock]),
                  time_median_s=statistics.median(times[clock]), wall_times_s=times["wall"],
                  cpu_times_s=times["cpu"] if device.type != "cuda" else None)
    return record


def measure(method: str, steps: int, device: torch.device, repeats: int, seed: int,
            threads: int | None = None) -> dict[str, Any]:
    """Run :func:`worker` for one configuration in a fresh interpreter and parse its record."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(steps), "--device", str(device),
           "--repeats", str(repeats), "--seed", str(seed)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method}/{steps} failed (exit {proc.returncode}):\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        raise RuntimeError(f"worker {method}/{steps} printed no result:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def _series(records: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return sorted((r for r in records if r["method"] == method), key=lambda r: r["steps"])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios that the benchmark is about: memory growth of each method, times relative to the cheapest run."""
    implicit, unrolled = _series(records, "implicit"), _series(records, "unrolled")
    ref_time = implicit[0]["time_s"]
    for r in records:
        r["time_ratio"] = r["time_s"] / ref_time
    summary: dict[str, Any] = {"time_reference": f"implicit, {implicit[0]['steps']} steps"}
    for name, series in (("implicit", implicit), ("unrolled", unrolled)):
        lo, hi = series[0], series[-1]
        summary[name] = {
            "steps": [lo["steps"], hi["steps"]],
            "peak_mib": [lo["peak_mib"], hi["peak_mib"]],
            "peak_ratio": hi["peak_mib"] / max(lo["peak_mib"], 1e-9),
            "mib_per_step": (hi["peak_mib"] - lo["peak_mib"]) / (hi["steps"] - lo["steps"]),
        }
    return summary


def plot(records: list[dict[str, Any]], device: torch.device, path: str, clock: str) -> None:
    """Two panels against the inner steps (log x): peak memory, and time relative to the reference run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"implicit": ("C0", "o", "implicit (bl.argmin, CG 5)"), "unrolled": ("C3", "s", "unrolled (MAML)")}
    for method, (color, marker, label) in styles.items():
        series = _series(records, method)
        steps = [r["steps"] for r in series]
        ax_mem.plot(steps, [r["peak_mib"] for r in series], color=color, marker=marker, label=label)
        ax_time.plot(steps, [r["time_ratio"] for r in series], color=color, marker=marker, label=label)
        for r in series:
            ax_mem.annotate(f"{r['peak_mib']:.1f}", (r["steps"], r["peak_mib"]), textcoords="offset points",
                            xytext=(0, 6) if method == "unrolled" else (0, -12), ha="center", fontsize=8,
                            color=color)
    what = "max_memory_allocated" if device.type == "cuda" else "ru_maxrss - baseline"
    ax_mem.set(xscale="log", xlabel="inner steps", ylabel=f"peak memory (MiB, {what})",
               title=f"argmin + backward peak memory ({device.type})")
    top = max(r["peak_mib"] for r in records)
    ax_mem.set_ylim(-0.06 * top, 1.15 * top)
    ax_time.set(xscale="log", yscale="log", xlabel="inner steps", ylabel="time / time(implicit, fewest steps)",
                title=f"time of argmin + backward (ratio)\n{clock}")
    for ax, loc in ((ax_mem, "center right"), (ax_time, "upper left")):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc=loc)
    fig.suptitle("MLP 64-256-256-10, batch 100, GD inner solver (fixed step, tol=0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', ...")
    parser.add_argument("--out", default=RESULTS_DIR, help="output folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration "
                                                                  "(default 5, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) in every worker (default: 1 on CPU, so that times can be "
                             "process CPU times; torch's default on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is None and device.type != "cuda":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)

    if args.worker:
        method, steps = args.worker
        print(RESULT_TAG + json.dumps(worker(method, int(steps), device, repeats, args.seed)), flush=True)
        return 0

    configs = QUICK if args.quick else FULL
    start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    records = []
    for method, steps_list in configs.items():
        for steps in steps_list:
            rec = measure(method, steps, device, repeats, args.seed, args.threads)
            records.append(rec)
            print(f"  {method:9s} {steps:5d} steps: peak {rec['peak_mib']:8.2f} MiB", flush=True)
    summary = summarize(records)
    payload = {
        "benchmark": "memory_argmin",
        "problem": {"model": "MLP 64-256-256-10 (ReLU)", "batch": 100, "loss": "cross-entropy", "lam": 2.0,
                    "inner_solver": f"gd(step_size={STEP_SIZE}, tol=0)", "linear_solver": f"cg(max_iter={CG_ITERS})",
                    "unrolled": f"bl.unrolled.maml(step_size={STEP_SIZE})"},
        "memory_measure": ("torch.cuda.max_memory_allocated - memory_allocated at baseline" if device.type == "cuda"
                           else "ru_maxrss after the run - ru_maxrss after imports and setup (incl. a 1-step "
                                "warm-up run on a 4-point batch), fresh process per configuration"),
        "quick": args.quick,
        "repeats": repeats,
        "time_statistic": "minimum over repeats (medians in time_median_s)",
        "clock": {"cpu": "process CPU time (single-threaded)", "wall": "wall clock"}[robust_clock(device)]
        if device.type != "cuda" else "CUDA events",
        "environment": environment(device),
        "load_average": {"before": load_before, "after": os.getloadavg() if load_before else None},
        "time_note": CPU_TIME_NOTE if device.type == "cpu" else "times from CUDA events",
        "summary": summary,
        "records": records,
    }
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "memory_argmin.json"), os.path.join(args.out, "memory_argmin.png")
    write_json(json_path, payload)
    plot(records, device, png_path, payload["clock"])

    print(f"\nmemory_argmin on {device} ({time.perf_counter() - start:.0f} s); peak = "
          f"{payload['memory_measure']}")
    print(f"{'method':9s} {'steps':>5s} {'peak MiB':>9s} {'time ratio':>10s}")
    for r in records:
        print(f"{r['method']:9s} {r['steps']:5d} {r['peak_mib']:9.2f} {r['time_ratio']:10.2f}")
    imp, unr = summary["implicit"], summary["unrolled"]
    print(f"implicit: peak({imp['steps'][1]} steps) / peak({imp['steps'][0]} steps) = {imp['peak_ratio']:.2f} "
          f"({imp['mib_per_step'] * 1000:+.2f} MiB per 1000 steps)")
    print(f"unrolled: peak({unr['steps'][1]} steps) / peak({unr['steps'][0]} steps) = {unr['peak_ratio']:.2f} "
          f"({unr['mib_per_step']:+.2f} MiB per step)")
    print(f"time ratios: best of {repeats} call(s), {payload['clock']}, {torch.get_num_threads()} thread(s), "
          f"relative to {summary['time_reference']}.")
    if device.type == "cpu":
        print(CPU_TIME_NOTE)
    print(f"wrote {display_path(json_path)} and {display_path(png_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
