"""Meta-gradient time and memory per task: the vmap path vs the loop path of iMAML-GD, against the meta-batch size.

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
are compared (relative difference) as a sanity check. Both curvatures are measured: ``exact`` (above) and
``gauss_newton`` (``curvature="gauss_newton"``: Gauss-Newton products on both paths). Memory: the peak of one
call of each path, ``max_memory_allocated`` on CUDA and the tensor peak (:func:`_common.tensor_peak_mib`) on
CPU, divided by the batch size and compared with one gradient of one task's support loss and of its query loss
(5-way 1-shot: 5 support and 25 query images, so the query gradient is the larger one).

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
from _common import (CPU_TIME_NOTE, RESULTS_DIR, display_path, environment, resolve_device,  # noqa: E402
                     peak_memory_mib, write_json)
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


def _one_gradient_peaks(net, theta, device, seed) -> dict[str, float]:
    """Peak of one gradient of one task's support loss and of its query loss (the per-task references)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in (("support_grad_mib", WAYS * SHOTS), ("query_grad_mib", WAYS * QUERY)):
        x = torch.randn(n, 1, 28, 28, generator=g).to(device)
        y = torch.arange(WAYS).repeat_interleave(n // WAYS).to(device)
        params = {k: v.detach().requires_grad_(True) for k, v in theta.items()}

        def one():
            torch.autograd.grad(torch.nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)), y),
                                list(params.values()))
        one()
        out[name] = peak_memory_mib(device, one)
    return out


def plot(records: list[dict[str, Any]], payload: dict[str, Any], device: torch.device, pp: str) -> None:
    """Two panels against the meta-batch size: time per task (relative to the loop at B=1), and vmap / loop."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    bs = [r["batch_size"] for r in records]
    for n, col, mk, lab in (("vmap", "C0", "o", "vmap, exact"), ("loop", "C3", "s", "loop, exact"),
                            ("vmap_gn", "C0", "D", "vmap, Gauss-Newton"), ("loop_gn", "C3", "^", "loop, Gauss-Newton")):
        ls = "--" if n.endswith("_gn") else "-"
        if f"{n}_per_task_over_loop_b1" in records[0]:
            a1.plot(bs, [r[f"{n}_per_task_over_loop_b1"] for r in records], marker=mk, ls=ls, color=col, label=lab)
        if "peak_per_task_over_query_grad" in records[0]:
            a3.plot(bs, [r["peak_per_task_over_query_grad"][n] for r in records], marker=mk, ls=ls, color=col,
                    label=lab)
    a1.set(xscale="log", xlabel="meta-batch size", ylabel="time per task / loop time per task at B=1",
           title=f"iMAML-GD meta-gradient time per task\n{payload['clock']}")
    a2.plot(bs, [r["vmap_over_loop"] for r in records], "o-", color="C2", label="exact")
    if "vmap_gn_over_loop_gn" in records[0]:
        a2.plot(bs, [r["vmap_gn_over_loop_gn"] for r in records], "D--", color="C4", label="Gauss-Newton")
    a2.axhline(1.0, color="k", ls=":")
    a2.set(xscale="log", xlabel="meta-batch size", ylabel="time(vmap) / time(loop)", title="vmap / loop")
    a3.axhline(1.0, color="k", ls=":", label="one query gradient")
    a3.set(xscale="log", xlabel="meta-batch size", ylabel="peak per task / one query-loss gradient's peak",
           title="peak memory per task (" + ("max_memory_allocated" if device.type == "cuda" else "tensor peak") + ")")
    for ax in (a1, a2, a3):
        ax.set_xticks(bs)
        ax.set_xticklabels([str(b) for b in bs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
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
    paths = {"vmap": (True, "exact"), "loop": (False, "exact"), "vmap_gn": (True, "gauss_newton"),
             "loop_gn": (False, "gauss_newton")}
    learners = {name: MetaLearner(net, AlgorithmConfig("imaml_gd", inner_steps=K, inner_lr=0.1, lam=2.0,
                                                       cg_steps=CG, vmap=vm, curvature=cur))
                for name, (vm, cur) in paths.items()}
    ref_mem = _one_gradient_peaks(net, theta, device, args.seed)
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

        for name in paths:
            for _ in range(args.warmup):
                call(name)
            grads[name] = torch.cat([t.grad.reshape(-1) for t in theta.values()]).clone()
            peaks[name] = peak_memory_mib(device, lambda: call(name))
        times: dict[str, list[float]] = {n: [] for n in paths}
        walls: dict[str, list[float]] = {n: [] for n in paths}
        for _ in range(repeats):
            for name in paths:
                t, w = _clock(device, lambda: call(name))
                times[name].append(t)
                walls[name].append(w)

        def rel(a: str, c: str) -> float:
            return float(torch.linalg.vector_norm(grads[a] - grads[c]) / torch.linalg.vector_norm(grads[c]))

        rec: dict[str, Any] = {
            "batch_size": b,
            "vmap_s_per_task": min(times["vmap"]) / b, "loop_s_per_task": min(times["loop"]) / b,
            "vmap_gn_s_per_task": min(times["vmap_gn"]) / b, "loop_gn_s_per_task": min(times["loop_gn"]) / b,
            "times_s": times, "wall_times_s": walls,
            "grad_rel_diff_vmap_vs_loop": rel("vmap", "loop"),
            "grad_rel_diff_vmap_vs_loop_gn": rel("vmap_gn", "loop_gn"),
            "grad_rel_diff_gn_vs_exact_loop": rel("loop_gn", "loop"),
            "loop_negative_curvature_tasks": stats["loop"]["negative_curvature"],
            "vmap_negative_curvature_tasks": stats["vmap"]["negative_curvature"],
            "peak_mib": peaks, "peak_mib_per_task": {n: v / b for n, v in peaks.items()},
            "peak_per_task_over_support_grad": {n: v / b / ref_mem["support_grad_mib"] for n, v in peaks.items()},
            "peak_per_task_over_query_grad": {n: v / b / ref_mem["query_grad_mib"] for n, v in peaks.items()},
        }
        rec["vmap_over_loop"] = rec["vmap_s_per_task"] / rec["loop_s_per_task"]
        rec["vmap_gn_over_loop_gn"] = rec["vmap_gn_s_per_task"] / rec["loop_gn_s_per_task"]
        rec["loop_gn_over_loop"] = rec["loop_gn_s_per_task"] / rec["loop_s_per_task"]
        records.append(rec)
        print(f"  B={b:3d}: vmap/loop = {rec['vmap_over_loop']:.2f} exact, {rec['vmap_gn_over_loop_gn']:.2f} "
              f"Gauss-Newton; per-task peak / query grad: "
              + ", ".join(f"{n} {v:.2f}" for n, v in rec["peak_per_task_over_query_grad"].items())
              + f" (gradient rel. diff vmap vs loop {rec['grad_rel_diff_vmap_vs_loop']:.1e} exact, "
              f"{rec['grad_rel_diff_vmap_vs_loop_gn']:.1e} GN; negative-curvature tasks: loop "
              f"{rec['loop_negative_curvature_tasks']}, vmap {rec['vmap_negative_curvature_tasks']})", flush=True)
    ref = records[0]["loop_s_per_task"]
    for r in records:
        for n in ("vmap", "loop", "vmap_gn", "loop_gn"):
            r[f"{n}_per_task_over_loop_b1"] = r[f"{n}_s_per_task"] / ref
    payload = {
        "benchmark": "vmap_throughput",
        "problem": {"model": "ConvNet(5) from applications/imaml/model.py", "ways": WAYS, "shots": SHOTS,
                    "query_per_class": QUERY, "inner_steps": K, "cg_steps": CG, "inner_lr": 0.1, "lam": 2.0},
        "repeats": repeats, "warmup": args.warmup, "quick": args.quick,
        "clock": "CUDA events" if device.type == "cuda" else f"process CPU time, {args.threads} thread(s)",
        "time_statistic": "minimum over alternating repeats, divided by the batch size",
        "environment": environment(device), "load_average": {"before": load_before, "after": os.getloadavg()},
        "time_note": CPU_TIME_NOTE if device.type == "cpu" else "times from CUDA events",
        "one_gradient_peak_mib": ref_mem,
        "memory_measure": "max_memory_allocated" if device.type == "cuda" else "tensor peak (torch.profiler events)",
        "records": records,
    }
    os.makedirs(args.out, exist_ok=True)
    jp, pp = os.path.join(args.out, "vmap_throughput.json"), os.path.join(args.out, "vmap_throughput.png")
    write_json(jp, payload)

    plot(records, payload, device, pp)
    print(f"\nvmap_throughput on {device} ({time.perf_counter() - start:.0f} s), {payload['clock']}")
    print(f"one gradient peak: support {ref_mem['support_grad_mib']:.1f} MiB, query {ref_mem['query_grad_mib']:.1f} MiB")
    print(f"{'B':>3s} {'vmap/loop':>9s} {'vmap/task':>9s} {'loop/task':>9s} {'vmapGN/task':>11s} {'loopGN/task':>11s}"
          f"  (time per task, relative to loop at B=1)")
    for r in records:
        print(f"{r['batch_size']:3d} {r['vmap_over_loop']:9.2f} {r['vmap_per_task_over_loop_b1']:9.2f} "
              f"{r['loop_per_task_over_loop_b1']:9.2f} {r['vmap_gn_per_task_over_loop_b1']:11.2f} "
              f"{r['loop_gn_per_task_over_loop_b1']:11.2f}")
    if device.type == "cpu":
        print(CPU_TIME_NOTE)
    print(f"wrote {display_path(jp)} and {display_path(pp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
