"""Meta-gradient time per task: the vmap path vs the loop path of iMAML-GD, against the meta-batch size.

:class:`applications.imaml.algorithms.MetaLearner` with ``AlgorithmConfig("imaml_gd", inner_steps=16,
cg_steps=5, vmap=True)`` (all tasks through :func:`torch.func.vmap`, forward-over-reverse HVPs) and the same
with ``vmap=False`` (a Python loop over tasks, reverse-over-reverse HVPs, first-order fallback at negative
curvature). Problem: the 4-conv Omniglot net (``ConvNet(5)``), 5-way 1-shot (5 random support images per
task) with 5 random query images per class (25), random-init parameters; meta-batch sizes
``--batch-sizes`` (default 1 2 4 8).

Both paths run in the same process, one thread: per batch size, ``--warmup`` untimed calls of each (the first
vmap call pays for tracing / decompositions), then ``--repeats`` timed calls **alternating** the two paths;
the figure is the minimum (process CPU time on CPU, CUDA events on CUDA) divided by the batch size. The
ratio reported is time(vmap) / time(loop) per batch size (< 1: vmap is faster). The two paths' meta-gradients
are compared (relative difference) as a sanity check. On CUDA the peak ``max_memory_allocated`` of each path
is stored too.

Usage (from the repository root)::

    .venv/bin/python benchmarks/vmap_throughput.py            # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/vmap_throughput.py --quick    # batch sizes 1 2, 1 repeat
    .venv/bin/python benchmarks/vmap_throughput.py --device cuda --batch-sizes 1 8 32

Writes ``<out>/vmap_throughput.json`` and ``<out>/vmap_throughput.png``.
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
from _common import CPU_TIME_NOTE, RESULTS_DIR, display_path, environment, resolve_device, write_json  # noqa: E402
from applications.imaml.algorithms import AlgorithmConfig, MetaLearner, TaskBatch  # noqa: E402
from applications.imaml.model import ConvNet, init_params  # noqa: E402

WAYS, SHOTS, QUERY, K, CG = 5, 1, 5, 16, 5


def _clock(device: torch.device, fn) -> tuple[float, float]:
    """(seconds by the robust clock, wall seconds) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize(device)
        return e0.elapsed_time(e1) / 1e3, time.perf_counter() - t0
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def plot(records: list[dict[str, Any]], payload: dict[str, Any], device: torch.device, pp: str) -> None:
    """Two panels against the meta-batch size: time per task (relative to the loop at B=1), and vmap / loop."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    bs = [r["batch_size"] for r in records]
    a1.plot(bs, [r["vmap_per_task_over_loop_b1"] for r in records], "o-", color="C0", label="vmap path")
    a1.plot(bs, [r["loop_per_task_over_loop_b1"] for r in records], "s-", color="C3", label="loop path")
    a1.set(xscale="log", xlabel="meta-batch size", ylabel="time per task / loop time per task at B=1",
           title=f"iMAML-GD meta-gradient time per task\n{payload['clock']}")
    a2.plot(bs, [r["vmap_over_loop"] for r in records], "o-", color="C2")
    a2.axhline(1.0, color="k", ls=":")
    a2.set(xscale="log", xlabel="meta-batch size", ylabel="time(vmap) / time(loop)", title="vmap / loop")
    for ax in (a1, a2):
        ax.set_xticks(bs)
        ax.set_xticklabels([str(b) for b in bs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    a1.legend()
    fig.suptitle(f"4-conv net, {WAYS}-way {SHOTS}-shot, K={K}, CG {CG}, {device.type}", fontsize=10)
    fig.tight_layout()
    fig.savefig(pp, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per path (default 3, 1 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-only", metavar="JSON", help="redraw the PNG next to an existing vmap_throughput.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.plot_only:
        import json
        with open(args.plot_only) as f:
            saved = json.load(f)
        plot(saved["records"], saved, torch.device(saved["environment"]["device"]),
             os.path.splitext(args.plot_only)[0] + ".png")
        return 0
    torch.set_num_threads(args.threads)
    sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 2, 4, 8])
    repeats = args.repeats or (1 if args.quick else 3)
    warnings.simplefilter("ignore", bl.ConvergenceWarning)

    net = ConvNet(WAYS).to(device)
    net.requires_grad_(False)
    theta = init_params(net, seed=0, device=device)
    learners = {name: MetaLearner(net, AlgorithmConfig("imaml_gd", inner_steps=K, inner_lr=0.1, lam=2.0,
                                                       cg_steps=CG, vmap=(name == "vmap")))
                for name in ("vmap", "loop")}
    start, load_before = time.perf_counter(), os.getloadavg()
    records = []
    for b in sizes:
        g = torch.Generator().manual_seed(args.seed + b)
        batch = TaskBatch(torch.randn(b, WAYS * SHOTS, 1, 28, 28, generator=g).to(device),
                          torch.arange(WAYS).repeat_interleave(SHOTS).repeat(b, 1).to(device),
                          torch.randn(b, WAYS * QUERY, 1, 28, 28, generator=g).to(device),
                          torch.arange(WAYS).repeat_interleave(QUERY).repeat(b, 1).to(device))
        grads, stats, peaks = {}, {}, {}

        def call(name: str) -> None:
            for t in theta.values():
                t.grad = None
            stats[name] = learners[name].meta_gradient(theta, batch)

        for name in ("vmap", "loop"):
            for _ in range(args.warmup):
                call(name)
            grads[name] = torch.cat([t.grad.reshape(-1) for t in theta.values()]).clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                call(name)
                peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        times: dict[str, list[float]] = {"vmap": [], "loop": []}
        walls: dict[str, list[float]] = {"vmap": [], "loop": []}
        for _ in range(repeats):
            for name in ("vmap", "loop"):
                t, w = _clock(device, lambda: call(name))
                times[name].append(t)
                walls[name].append(w)
        rel = float(torch.linalg.vector_norm(grads["vmap"] - grads["loop"])
                    / torch.linalg.vector_norm(grads["loop"]))
        rec: dict[str, Any] = {
            "batch_size": b,
            "vmap_s_per_task": min(times["vmap"]) / b, "loop_s_per_task": min(times["loop"]) / b,
            "times_s": times, "wall_times_s": walls,
            "grad_rel_diff_vmap_vs_loop": rel,
            "loop_negative_curvature_tasks": stats["loop"]["negative_curvature"],
        }
        rec["vmap_over_loop"] = rec["vmap_s_per_task"] / rec["loop_s_per_task"]
        if peaks:
            rec["cuda_peak_mib"] = peaks
        records.append(rec)
        print(f"  B={b:3d}: vmap/loop = {rec['vmap_over_loop']:.2f}  (gradient rel. diff {rel:.1e}, "
              f"loop negative-curvature tasks {rec['loop_negative_curvature_tasks']})", flush=True)
    ref = records[0]["loop_s_per_task"]
    for r in records:
        r["vmap_per_task_over_loop_b1"] = r["vmap_s_per_task"] / ref
        r["loop_per_task_over_loop_b1"] = r["loop_s_per_task"] / ref
    payload = {
        "benchmark": "vmap_throughput",
        "problem": {"model": "ConvNet(5) from applications/imaml/model.py", "ways": WAYS, "shots": SHOTS,
                    "query_per_class": QUERY, "inner_steps": K, "cg_steps": CG, "inner_lr": 0.1, "lam": 2.0},
        "repeats": repeats, "warmup": args.warmup, "quick": args.quick,
        "clock": "CUDA events" if device.type == "cuda" else f"process CPU time, {args.threads} thread(s)",
        "time_statistic": "minimum over alternating repeats, divided by the batch size",
        "environment": environment(device), "load_average": {"before": load_before, "after": os.getloadavg()},
        "time_note": CPU_TIME_NOTE if device.type == "cpu" else "times from CUDA events",
        "records": records,
    }
    os.makedirs(args.out, exist_ok=True)
    jp, pp = os.path.join(args.out, "vmap_throughput.json"), os.path.join(args.out, "vmap_throughput.png")
    write_json(jp, payload)

    plot(records, payload, device, pp)
    print(f"\nvmap_throughput on {device} ({time.perf_counter() - start:.0f} s), {payload['clock']}")
    print(f"{'B':>3s} {'vmap/loop':>9s} {'vmap/task':>9s} {'loop/task':>9s}  (per task, relative to loop at B=1)")
    for r in records:
        print(f"{r['batch_size']:3d} {r['vmap_over_loop']:9.2f} {r['vmap_per_task_over_loop_b1']:9.2f} "
              f"{r['loop_per_task_over_loop_b1']:9.2f}")
    if device.type == "cpu":
        print(CPU_TIME_NOTE)
    print(f"wrote {display_path(jp)} and {display_path(pp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
