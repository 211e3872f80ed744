"""Meta-steps per second against the number of ranks, and the all-reduce's share of a step (torchrun, gloo / NCCL).

Each configuration is a real ``torchrun --standalone --nproc_per_node W`` job of this script's worker: every
rank builds :class:`applications.imaml.train.Trainer` with ``dist`` (so a step is exactly what
``torchrun ... -m applications.imaml train`` runs: the whole meta-batch drawn on every rank, each rank's
share of the tasks, one :func:`bilevel.distributed.all_reduce` of the gradients and statistics, Adam) on a
generated Omniglot-shaped pool (random ``uint8`` 1x28x28 images: the cost of a step does not depend on the
pixels), runs ``--warmup`` untimed meta-steps, then ``--steps`` timed ones. Per step and rank: the wall time
of the step (``time.perf_counter``; ``torch.cuda.synchronize`` around it on CUDA) and of the all-reduce in it
(the record's ``comm_seconds``: packing, the collective and waiting for the slowest rank). After the steps,
each rank times ``--collectives`` bare all-reduces of a buffer of the step's size behind a barrier: the
transfer alone, without the wait for stragglers.

The configurations run **alternating** (1 rank, 2 ranks, 1 rank with all threads, then again), ``--repeats``
times; reported: per configuration the median meta-steps per second of rank 0, the ratio of the medians
W ranks / 1 rank, the median of the ratios within a repeat, and the communication share (all-reduce time /
step time, the maximum over the ranks). On the CPU every rank runs ``--threads`` torch threads (default 1: 2
ranks on a 2-core machine use both cores), and ``1 rank x N threads`` (``--reference-threads``, default
the core count) is the fair single-process reference for the same cores.

Usage (from the repository root)::

    .venv/bin/python benchmarks/distributed.py                 # CPU, gloo: 1 and 2 ranks (~3 min on 2 cores)
    .venv/bin/python benchmarks/distributed.py --quick         # 1 repeat, 4 timed steps
    .venv/bin/python benchmarks/distributed.py --device cuda --ranks 1 2 4 8 --meta-batch 32   # NCCL, a GPU per rank

Writes ``<out>/distributed.json`` and ``<out>/distributed.png`` (``--tag`` adds a suffix to both names).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import bilevel as bl  # noqa: E402
from _common import RESULTS_DIR, display_path, environment, write_json  # noqa: E402

DEFAULT_CONFIG = "omniglot-5w1s-gd-cpu"  # the main CPU job's configuration (README's command)


# -- the worker: one rank of one configuration ------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    from applications.imaml.configs import get_config
    from applications.imaml.data import EpisodeSampler
    from applications.imaml.train import Trainer

    warnings.simplefilter("ignore", bl.ConvergenceWarning)
    torch.set_num_threads(args.threads)
    ctx = bl.distributed.init(args.device, timeout=args.dist_timeout)
    config = get_config(args.config).replace(meta_batch=args.meta_batch, meta_steps=args.warmup + args.steps,
                                             eval_every=0, checkpoint_every=10 ** 9)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (64, 20, 1, 28, 28), dtype=torch.uint8, generator=g)
    shape = dict(n_way=config.n_way, k_shot=config.k_shot, k_query=config.k_query, device=ctx.device)
    train = EpisodeSampler(pool[:48], seed=config.seed, **shape)
    test = EpisodeSampler(pool[48:], seed=config.seed + 1, **shape)
    cuda = ctx.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(ctx.device)

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, train, test, device=ctx.device, progress=False, dist=ctx)
        steps, comms = [], []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            record = trainer.meta_step()
            sync()
            if i >= args.warmup:
                steps.append(time.perf_counter() - t0)
                comms.append(record.get("comm_seconds", 0.0))
        size = sum(p.numel() for p in trainer._parameters()) + ctx.world_size * 16  # gradients + statistics rows
    buffer = torch.zeros(size, device=ctx.device)
    bare = []
    for _ in range(args.collectives):
        bl.distributed.barrier()
        sync()
        t0 = time.perf_counter()
        bl.distributed.all_reduce(buffer)
        sync()
        bare.append(time.perf_counter() - t0)
    mine = {"rank": ctx.rank, "step_seconds": steps, "comm_seconds": comms, "bare_allreduce_seconds": bare,
            "threads": torch.get_num_threads(), "device": str(ctx.device), "buffer_elements": size}
    everyone = bl.distributed.all_gather_object(mine)
    if ctx.is_main:
        with open(args.result, "w") as f:
            json.dump({"world_size": ctx.world_size, "backend": ctx.backend, "ranks": everyone}, f)
    bl.distributed.shutdown()
    # gloo's threads may release their last tensors while the interpreter shuts down and abort the process
    # (SIGABRT) after the work is done: end here, the result written (as the application's command line does)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- the driver ----------------------------------------------------------------------------------------------


def run_configuration(args: argparse.Namespace, ranks: int, threads: int) -> dict[str, Any]:
    """One torchrun job; returns rank 0's file plus the derived figures."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               os.path.abspath(__file__), "--worker", "--result", result, "--device", args.device,
               "--config", args.config, "--meta-batch", str(args.meta_batch), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--threads", str(threads), "--collectives", str(args.collectives),
               "--dist-timeout", str(args.dist_timeout)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
        t0, load_before = time.perf_counter(), os.getloadavg()[0]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"the {ranks}-rank job failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        with open(result) as f:
            out = json.load(f)
    rank0 = out["ranks"][0]
    shares = [sum(r["comm_seconds"]) / sum(r["step_seconds"]) for r in out["ranks"]]
    # the 1-minute load average around the job: above the job's own process count, other work shared the cores
    out.update(threads_per_rank=threads, job_wall_seconds=time.perf_counter() - t0,
               load_average_1min={"before": load_before, "after": os.getloadavg()[0]},
               steps_per_second=len(rank0["step_seconds"]) / sum(rank0["step_seconds"]),
               comm_share_per_rank=shares, comm_share=max(shares),
               bare_allreduce_ms=1e3 * statistics.median(x for r in out["ranks"] for x in r["bare_allreduce_seconds"]))
    return out


def plot(payload: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    rank_keys = [k for k in summary if k.startswith("ranks_")]
    ranks = [summary[k]["ranks"] for k in rank_keys]
    for run in payload["runs"]:
        if run["label"].startswith("ranks_"):
            a1.plot(run["world_size"], run["steps_per_second"], "o", color="C0", alpha=0.35, ms=5)
    a1.plot(ranks, [summary[k]["median_steps_per_second"] for k in rank_keys], "o-", color="C0",
            label=f"{payload['threads_per_rank']} thread(s) per rank, median")
    base = summary[rank_keys[0]]["median_steps_per_second"] / ranks[0]
    a1.plot(ranks, [base * r for r in ranks], ":", color="k", label="linear scaling")
    if "reference" in summary:
        ref = summary["reference"]
        a1.axhline(ref["median_steps_per_second"], color="C3", ls="--",
                   label=f"1 rank x {ref['threads']} threads, median")
    a1.set(xlabel="ranks (processes)", ylabel="meta-steps per second", xticks=ranks,
           title=f"meta-steps per second ({payload['device']}, meta-batch {payload['meta_batch']})")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    labels = [f"{summary[k]['ranks']} rank(s)" for k in rank_keys]
    waiting = [100 * summary[k]["median_comm_share"] for k in rank_keys]
    bare = [100 * summary[k]["median_bare_allreduce_share"] for k in rank_keys]
    xs = range(len(labels))
    a2.bar([x - 0.2 for x in xs], waiting, width=0.4, color="C1", label="the step's all-reduce, waiting included")
    a2.bar([x + 0.2 for x in xs], bare, width=0.4, color="C2", label="a bare all-reduce of the same buffer")
    for x, w, b in zip(xs, waiting, bare):
        a2.annotate(f"{w:.2f}%", (x - 0.2, w), ha="center", va="bottom", fontsize=8)
        a2.annotate(f"{b:.2f}%", (x + 0.2, b), ha="center", va="bottom", fontsize=8)
    a2.set_xticks(list(xs))
    a2.set_xticklabels(labels)
    a2.set(ylabel="share of a meta-step (%)", ylim=(0, max(1.0, 1.3 * max(waiting + bare))),
           title="communication share (median; max over the ranks)")
    a2.grid(alpha=0.3, axis="y")
    a2.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{payload['config']} on torchrun ({payload['backend']}), {payload['steps']} timed steps, "
                 f"{payload['repeats']} repeat(s), commit {payload['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run (default 1 2)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"a named config (default {DEFAULT_CONFIG})")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per step (default: the config's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed meta-steps per job (default 8, 4 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="rounds over the configurations (default 3, 1 quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--reference-threads", type=int, default=None,
                   help="also run 1 rank with this many threads (CPU; default the core count, 0: no reference)")
    p.add_argument("--collectives", type=int, default=20, help="bare all-reduces timed per rank")
    p.add_argument("--dist-timeout", type=float, default=300.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="suffix of the result files (distributed<tag>.json)")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the PNG next to an existing result file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.splitext(args.plot_only)[0] + ".png")
        return 0
    from applications.imaml.configs import get_config
    from applications.imaml.io import git_commit

    args.meta_batch = args.meta_batch or get_config(args.config).meta_batch
    args.steps = args.steps or (4 if args.quick else 8)
    if args.worker:
        worker(args)
        return 0
    if max(args.ranks) > args.meta_batch:
        raise SystemExit(f"--ranks {max(args.ranks)} exceeds --meta-batch {args.meta_batch}: each rank needs a task.")
    repeats = args.repeats or (1 if args.quick else 3)
    device = torch.device(args.device)
    reference = args.reference_threads if args.reference_threads is not None else (
        0 if device.type == "cuda" else (os.cpu_count() or 1))
    configurations = [(f"ranks_{w}", w, args.threads) for w in args.ranks]
    if reference and reference != args.threads:
        configurations.append(("reference", 1, reference))
    start, load_before = time.perf_counter(), os.getloadavg()
    runs = []
    for repeat in range(repeats):
        for label, ranks, threads in configurations:
            run = run_configuration(args, ranks, threads)
            run.update(label=label, repeat=repeat)
            runs.append(run)
            print(f"repeat {repeat + 1}/{repeats}  {label:<10} {ranks} rank(s) x {threads} thread(s): "
                  f"{run['steps_per_second']:.3f} meta-steps/s, all-reduce {100 * run['comm_share']:.2f}% of a "
                  f"step (bare {run['bare_allreduce_ms']:.2f} ms); load {run['load_average_1min']['before']:.1f} -> "
                  f"{run['load_average_1min']['after']:.1f}", flush=True)
    summary: dict[str, Any] = {}
    for label, ranks, threads in configurations:
        mine = [r for r in runs if r["label"] == label]
        summary[label] = {"ranks": ranks, "threads": threads,
                          "median_steps_per_second": statistics.median(r["steps_per_second"] for r in mine),
                          "median_comm_share": statistics.median(r["comm_share"] for r in mine),
                          "median_bare_allreduce_ms": statistics.median(r["bare_allreduce_ms"] for r in mine),
                          "median_bare_allreduce_share": statistics.median(
                              r["bare_allreduce_ms"] * r["steps_per_second"] / 1e3 for r in mine)}
    one = f"ranks_{args.ranks[0]}"
    ratios = {}
    for label in summary:
        if label == one:
            continue
        pairs = [b["steps_per_second"] / a["steps_per_second"] for a, b in
                 zip([r for r in runs if r["label"] == one], [r for r in runs if r["label"] == label])]
        ratios[f"{label}_over_{one}"] = {
            "ratio_of_medians": summary[label]["median_steps_per_second"] / summary[one]["median_steps_per_second"],
            "median_of_per_repeat_ratios": statistics.median(pairs), "per_repeat": pairs}
    payload = {
        "benchmark": "distributed", "commit": git_commit(), "device": device.type,
        "backend": runs[0]["backend"], "config": args.config, "meta_batch": args.meta_batch,
        "warmup": args.warmup, "steps": args.steps, "repeats": repeats, "threads_per_rank": args.threads,
        "collectives": args.collectives,
        "clock": "wall clock of rank 0 per meta-step (time.perf_counter; cuda.synchronize around it on CUDA)",
        "comm_share": "sum over the timed steps of the all-reduce's time (packing, collective, waiting for the "
                      "slowest rank) / sum of the step times, per rank; the maximum over the ranks",
        "environment": environment(device), "load_average": {"before": load_before, "after": os.getloadavg()},
        "wall_seconds": time.perf_counter() - start, "summary": summary, "ratios": ratios, "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"distributed{args.tag}.json")
    write_json(path, payload)
    plot(payload, os.path.splitext(path)[0] + ".png")
    for name, r in ratios.items():
        print(f"{name}: {r['ratio_of_medians']:.3f} (ratio of medians), {r['median_of_per_repeat_ratios']:.3f} "
              f"(median of per-repeat ratios)")
    print(f"wrote {display_path(path)} and {display_path(os.path.splitext(path)[0] + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
