"""What the implicit backward does when the inner Hessian is indefinite, measured.

Early in meta-training ``phi`` after a few inner steps is far from a minimiser
of ``G = CE + lam/2 ||phi - theta||^2``, and ``d2G/dphi2`` can have negative
eigenvalues. A CG that ignores this divides by a tiny or negative curvature
and returns a huge meta-gradient. :class:`bilevel.linalg.CG` stops at the first
direction with ``p^T A p <= 0`` (a :class:`bilevel.NegativeCurvatureWarning`) and returns its last iterate (truncation);
damping (``(H + d I) v = g``) is the other remedy. This script compares, per
number of inner steps K, the meta-gradient norm of

* ``plain``: CG without the curvature test (what a textbook CG does),
* ``truncate``: bilevel's CG (the default of the application),
* ``damping``: bilevel's CG with ``damping=1``,

over random-data tasks and, where the data is present, real Omniglot tasks.

    python -m applications.imaml.curvature_study --out runs/curvature [--data-dir ../shared/data/omniglot]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import bilevel as bl

from .algorithms import AlgorithmConfig, MetaLearner
from .model import ConvNet, init_params


def plain_cg(max_iter: int):
    """A textbook CG with no curvature test, as a user callable linear solver."""

    def solve(matvec, b):
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = r @ r
        for _ in range(max_iter):
            Ap = matvec(p)
            alpha = rs / (p @ Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = r @ r
            p = r + (rs_new / rs) * p
            rs = rs_new
        return x

    return solve


def meta_gradient_norm(learner: MetaLearner, theta, xs, ys, xq, yq, linear_solver) -> tuple[float, bool]:
    """``||dL_query/dtheta||`` for one task with the given linear solver, and whether CG met negative curvature."""
    problem = learner.proximal_problem(float(learner.config.lam))
    phi = bl.solve(problem, {k: v.detach() for k, v in theta.items()}, (xs, ys), solver=learner.inner_gd).phi
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bl.ConvergenceWarning)
        g, info = bl.hypergradient(problem, lambda p, t: F.cross_entropy(learner.logits(p, xq), yq),
                                   theta, phi, (xs, ys), linear_solver=linear_solver)
    negative = info.status is bl.LinearSolveStatus.NEGATIVE_CURVATURE or any(
        isinstance(w.message, bl.NegativeCurvatureWarning) for w in caught)
    return float(bl.tree.norm(g)), negative


def random_tasks(n_tasks: int, n_way: int, k_shot: int, k_query: int, seed: int):
    """``n_tasks`` seeded tasks of uniform-noise 28x28 images: ``(xs, ys, xq, yq)`` each (no data needed)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_tasks):
        yield (torch.rand(n_way * k_shot, 1, 28, 28, generator=g), torch.arange(n_way).repeat_interleave(k_shot),
               torch.rand(n_way * k_query, 1, 28, 28, generator=g), torch.arange(n_way).repeat_interleave(k_query))


def omniglot_tasks(data_dir: str, n_tasks: int, n_way: int, k_shot: int, k_query: int, seed: int):
    """``n_tasks`` seeded Omniglot meta-training tasks from ``data_dir``: ``(xs, ys, xq, yq)`` each."""
    from .data import EpisodeSampler, load_omniglot

    splits = load_omniglot(data_dir, progress=False).split(seed=0)
    ep = EpisodeSampler(splits.train, n_way=n_way, k_shot=k_shot, k_query=k_query, rotations=True,
                        seed=seed).sample(n_tasks)
    for i in range(n_tasks):
        yield ep.support_x[i], ep.support_y[i], ep.query_x[i], ep.query_y[i]


def run(out: Path, data_dir: str | None, *, n_tasks: int = 8, steps=(1, 2, 5, 16), n_way: int = 20,
        k_shot: int = 5, k_query: int = 5, cg_steps: int = 5) -> dict:
    """Run the study (see the module docstring) and write its JSON and plot under ``out``; returns the results."""
    torch.manual_seed(0)
    net = ConvNet(n_way)
    theta = init_params(net, seed=0)
    sources = {"random": lambda: random_tasks(n_tasks, n_way, k_shot, k_query, seed=1)}
    if data_dir and (Path(data_dir) / "images_background.zip").exists():
        sources["omniglot"] = lambda: omniglot_tasks(data_dir, n_tasks, n_way, k_shot, k_query, seed=1)
    solvers = {"plain": plain_cg(cg_steps), "truncate": bl.linalg.get("cg", max_iter=cg_steps, tol=0.0),
               "damping": bl.linalg.get("cg", max_iter=cg_steps, tol=0.0, damping=1.0)}
    results: dict = {"setting": {"n_way": n_way, "k_shot": k_shot, "k_query": k_query, "cg_steps": cg_steps,
                                 "lam": 2.0, "inner_lr": 0.1, "tasks": n_tasks, "theta": "fresh initialisation"},
                     "rows": []}
    for source, tasks in sources.items():
        for K in steps:
            learner = MetaLearner(net, AlgorithmConfig("imaml_gd", inner_steps=K, lam=2.0, inner_lr=0.1))
            norms = {name: [] for name in solvers}
            negative = 0
            for xs, ys, xq, yq in tasks():
                for name, solver in solvers.items():
                    n, neg = meta_gradient_norm(learner, theta, xs, ys, xq, yq, solver)
                    norms[name].append(n)
                    negative += int(neg and name == "truncate")
            row = {"data": source, "K": K, "negative_curvature_tasks": negative, "tasks": n_tasks}
            for name, values in norms.items():
                t = torch.tensor(values)
                row[name] = {"median": float(t.median()), "max": float(t.max())}
            results["rows"].append(row)
            print(f"{source:<9} K={K:<3} negative curvature in {negative}/{n_tasks} tasks | median ||g||: "
                  + "  ".join(f"{name} {row[name]['median']:.3g} (max {row[name]['max']:.3g})" for name in solvers))
    out.mkdir(parents=True, exist_ok=True)
    (out / "curvature_study.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> int:
    """The command line (``python -m applications.imaml.curvature_study``); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/curvature")
    parser.add_argument("--data-dir", default=None, help="real Omniglot, if present")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run(Path(args.out), args.data_dir, n_tasks=args.tasks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
