"""The library's overhead over a hand-written loop doing the same work (first part of the speed study).

Fixed-step gradient descent, 100 steps on an L2-regularised logistic regression (200 x 20), one
thread: ``bl.solve`` with ``bl.solvers.get("gd", step_size=0.5, max_iter=100, tol=0)`` against a loop
that takes the same steps with ``torch.autograd.grad``. Both give the same point (checked). The two
are timed alternately in one process, ``--repeats`` rounds of ``--calls`` calls each, and the ratio
of the medians is reported (a ratio from one run: absolute CPU times are not to be quoted).

    .venv/bin/python benchmarks/overhead.py            # writes results/overhead.{json,png}

The peers' examples and the compiled path of the speed study are not in this file yet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for path in (_HERE, _ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import bilevel as bl  # noqa: E402
from _common import RESULTS_DIR, display_path, environment, write_json  # noqa: E402


def logistic_problem(seed: int = 0, n: int = 200, d: int = 20):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = (torch.rand(n, generator=g) > 0.5).float()

    def G(w, lam, data):
        Xd, yd = data
        return F.binary_cross_entropy_with_logits(Xd @ w, yd) + lam * (w * w).sum()
    return G, torch.tensor(0.1), (X, y), d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calls", type=int, default=20, help="calls per timed round")
    p.add_argument("--repeats", type=int, default=7, help="alternated rounds (the median is reported)")
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args()
    torch.set_num_threads(1)
    G, lam, data, d = logistic_problem()
    problem = bl.InnerProblem(G)
    solver = bl.solvers.get("gd", step_size=0.5, max_iter=args.steps, tol=0.0)

    def library():
        return bl.solve(problem, lam, data, solver=solver, phi0=torch.zeros(d)).phi

    def hand_written():
        w = torch.zeros(d)
        for _ in range(args.steps):
            w = w.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(G(w, lam, data), w)
            w = w - 0.5 * grad
        return w.detach()

    difference = float((library() - hand_written()).abs().max())
    if difference > 1e-6:
        raise SystemExit(f"the two loops disagree by {difference:.2e}: the comparison is not of the same work")
    times = {"bilevel": [], "hand_written": []}
    for _ in range(args.repeats):
        for name, fn in (("bilevel", library), ("hand_written", hand_written)):
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[name].append((time.perf_counter() - start) / args.calls)
    ratio = statistics.median(times["bilevel"]) / statistics.median(times["hand_written"])
    from applications.imaml.io import git_commit

    payload = {
        "benchmark": "overhead", "commit": git_commit(), "case": "fixed-step gd",
        "problem": f"L2-regularised logistic regression, 200 x {d}, {args.steps} steps of 0.5, one thread",
        "repeats": args.repeats, "calls": args.calls, "max_difference": difference,
        "times_s": times, "ratio_of_medians": ratio, "target_ratio": 1.1,
        "environment": environment(torch.device("cpu")),
    }
    path = os.path.join(args.out, "overhead.json")
    write_json(path, payload)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    medians = [statistics.median(times[k]) * 1e3 for k in ("hand_written", "bilevel")]
    ax.bar(["hand-written loop", "bl.solve (gd)"], medians, color=["#999999", "#1f77b4"])
    ax.set_ylabel("ms per solve (median)")
    ax.set_title(f"fixed-step gd, {args.steps} steps: {ratio:.2f}x the hand-written loop")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "overhead.png"), dpi=120)
    print(f"bilevel / hand-written: {ratio:.2f} (target {payload['target_ratio']}); wrote {display_path(path)}")


if __name__ == "__main__":
    main()
