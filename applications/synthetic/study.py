r"""The paper's appendix F.1 meta-gradient accuracy study (its Figure 2a), in two regimes.

Each task is a linear regression in ``x in R^50``: training loss
``L(phi) = 1/(2n) ||X phi - y||^2``, test loss ``f(phi) = 1/(2 n_test) ||X_t phi - y_t||^2``
and iMAML's inner problem ``G = L(phi) + lam/2 ||phi - theta||^2`` with
``lam = 5``. The inputs are scaled so that the inner Hessian ``A + lam I``
(``A = X^T X / n``) has condition number 50, which gives the exact
meta-gradient ``lam (A + lam I)^{-1} grad f(phi*)`` in closed form.

Two regimes:

``few_shot`` (regime i)
    ``n = 4`` training points: ``A`` has rank 4, so ``A + lam I`` has five
    distinct eigenvalues and CG solves the system exactly in five steps.
``many_shot`` (regime ii)
    ``n = 100`` training points: fifty distinct eigenvalues; five CG steps
    leave an error floor.

The inputs are drawn with anisotropic covariance (standard deviations
log-spaced over a factor ``sqrt(spread)``) because with isotropic inputs and
``n = 100`` the sample covariance is too well conditioned (about 34) for
``cond(A + lam I) = 50`` to be reachable by scaling.

For every number ``K`` of inner gradient-descent steps (step
``2 / (mu + beta)``, from ``phi_0 = theta``) the study computes:

* MAML: differentiate through the ``K`` steps on ``G`` (``bl.unrolled.maml``);
* first-order MAML (``bl.unrolled.first_order_maml``);
* iMAML at ``phi_K`` with 2 and 5 CG steps, and with CG to tolerance
  (``bl.hypergradient``);
* iMAML in the adaptive mode (``bl.hypergradient(..., target_error=...)``),
  which continues the same gradient descent from ``phi_K`` as far as its
  certificate requires, with its a-posteriori certificate.

Errors are ``||g - g*|| / ||g*||``.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

import bilevel as bl

__all__ = ["Task", "make_task", "k_grid", "run_regime", "run_study", "plot_study", "save_study", "REGIMES", "METHODS"]

#: regime name -> number of training points per task.
REGIMES = {"few_shot": 4, "many_shot": 100}

#: curve name -> legend label.
METHODS = {
    "maml": "MAML (unrolled GD)",
    "fomaml": "first-order MAML",
    "imaml_cg2": "iMAML, 2 CG steps",
    "imaml_cg5": "iMAML, 5 CG steps",
    "imaml_cg_tol": "iMAML, CG to tolerance",
    "imaml_adaptive": "iMAML, adaptive (true error)",
}


@dataclass
class Task:
    """One linear-regression task with its exact meta-gradient.

    Attributes
    ----------
    problem:
        The :class:`bilevel.ProximalProblem` ``G``.
    theta:
        The meta-parameters at which the meta-gradient is taken.
    data:
        ``{"X": (n, dim), "y": (n,)}``, the training set.
    outer:
        ``outer(phi, theta)``: the test loss.
    exact:
        ``dF/dtheta`` in closed form.
    mu, beta:
        Smallest and largest eigenvalue of ``A + lam I`` (``kappa = beta / mu``).
    outer_smoothness:
        Largest eigenvalue of the test loss's Hessian (``L`` of Lemma 3).
    distinct_eigenvalues:
        Number of distinct eigenvalues of ``A + lam I`` (to 1e-8, relative).
    lam, n_train:
        As built.
    """

    problem: bl.ProximalProblem
    theta: torch.Tensor
    data: dict
    outer: Callable[[Any, Any], torch.Tensor]
    exact: torch.Tensor
    mu: float
    beta: float
    outer_smoothness: float
    distinct_eigenvalues: int
    lam: float
    n_train: int

    @property
    def kappa(self) -> float:
        return self.beta / self.mu

    @property
    def step_size(self) -> float:
        """``2 / (mu + beta)``: the fixed gradient-descent step with the best contraction, ``(kappa-1)/(kappa+1)``."""
        return 2.0 / (self.mu + self.beta)


def make_task(n_train: int, *, dim: int = 50, lam: float = 5.0, condition_number: float = 50.0, n_test: int = 100,
              spread: float = 1e3, noise: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float64,
              device: str | torch.device = "cpu") -> Task:
    """Build one task of the study (see the module docstring).

    Parameters
    ----------
    n_train:
        Training points (4: regime i; 100: regime ii).
    dim:
        Input dimension (50 in the paper).
    lam:
        Proximal strength (5.0 in the paper).
    condition_number:
        ``cond(A + lam I)`` (50 in the paper); needs ``cond(A) > condition_number``
        when ``n_train >= dim``.
    n_test:
        Test points of the outer loss.
    spread:
        Ratio of the largest to the smallest input variance.
    noise:
        Label noise standard deviation.
    seed:
        Seeds everything (a private generator; the global RNG is untouched).
    """
    if n_train < 1 or dim < 2:
        raise ValueError(f"need n_train >= 1 and dim >= 2, got n_train={n_train}, dim={dim}.")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=f64))
    std = torch.logspace(0.0, 0.5 * math.log10(spread), dim, dtype=f64)

    def draw(m: int) -> torch.Tensor:
        return (torch.randn(m, dim, generator=g, dtype=f64) * std) @ q.T

    X, Xt = draw(n_train), draw(n_test)
    eig_a = torch.linalg.eigvalsh(X.T @ X / n_train)
    a_min = float(eig_a[0]) if n_train >= dim else 0.0
    a_max = float(eig_a[-1])
    if not a_max > condition_number * a_min:
        raise ValueError(f"cond(A) = {a_max / a_min:.3g} <= condition_number={condition_number}: adding lam I only "
                         f"lowers the condition number, so it cannot be reached; raise spread.")
    scale = math.sqrt((condition_number - 1.0) * lam / (a_max - condition_number * a_min))
    X, Xt = scale * X, scale * Xt
    w = torch.randn(dim, generator=g, dtype=f64)
    y = X @ w + noise * torch.randn(n_train, generator=g, dtype=f64)
    yt = Xt @ w + noise * torch.randn(n_test, generator=g, dtype=f64)
    theta = torch.randn(dim, generator=g, dtype=f64)

    hess = X.T @ X / n_train + lam * torch.eye(dim, dtype=f64)
    eig = torch.linalg.eigvalsh(hess)
    phi_star = torch.linalg.solve(hess, lam * theta + X.T @ y / n_train)
    grad_f = Xt.T @ (Xt @ phi_star - yt) / n_test
    exact = lam * torch.linalg.solve(hess, grad_f)
    outer_l = float(torch.linalg.eigvalsh(Xt.T @ Xt / n_test)[-1])
    distinct = 1 + int((torch.diff(eig) > 1e-8 * eig[-1]).sum())

    X, y, Xt, yt, theta, exact = (t.to(dtype=dtype, device=device) for t in (X, y, Xt, yt, theta, exact))

    def loss(phi: torch.Tensor, d: dict) -> torch.Tensor:
        r = d["X"] @ phi - d["y"]
        return 0.5 * (r @ r) / d["X"].shape[0]

    def outer(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        r = Xt @ phi - yt
        return 0.5 * (r @ r) / n_test

    problem = bl.ProximalProblem(loss, lam, name=f"linreg_n{n_train}")
    return Task(problem, theta, {"X": X, "y": y}, outer, exact, float(eig[0]), float(eig[-1]), outer_l, distinct,
                lam, n_train)


def k_grid(k_max: int = 1000, points: int = 16) -> list[int]:
    """Log-spaced distinct integers from 1 to ``k_max``.

    Examples
    --------
    >>> k_grid(100, 5)
    [1, 3, 10, 32, 100]
    """
    ks = sorted({int(round(10 ** (i * math.log10(k_max) / (points - 1)))) for i in range(points)})
    return [k for k in ks if 1 <= k <= k_max]


def _grad_through(fn: Callable[[torch.Tensor], torch.Tensor], task: Task) -> torch.Tensor:
    theta = task.theta.clone().requires_grad_(True)
    phi = fn(theta)
    (g,) = torch.autograd.grad(task.outer(phi, theta), theta)
    return g


def run_regime(task: Task, ks: Sequence[int], *, target_error: float = 1e-6, cg_tol: float = 1e-13) -> dict:
    """Every method's meta-gradient error at every ``K`` for one task.

    Returns
    -------
    dict
        ``K``, ``errors`` (relative, per method), ``absolute_errors``, the
        adaptive mode's ``certificate`` / iterations, and a summary
        (``floors``, ``maml_beats_cg5_at``).
    """
    exact_norm = float(task.exact.norm())
    step = task.step_size
    problem, data = task.problem, task.data
    constants = bl.bounds.Constants(mu=task.lam, L=task.outer_smoothness, rho=0.0, beta=task.beta)
    # mu = lam is a rigorous lower bound here: the training loss is convex (A >= 0).
    adaptive_solver = bl.solvers.get("gd", step_size=step, max_iter=200_000)
    linear = {
        "imaml_cg2": bl.linalg.get("cg", max_iter=2, tol=cg_tol, warn=False),
        "imaml_cg5": bl.linalg.get("cg", max_iter=5, tol=cg_tol, warn=False),
        "imaml_cg_tol": bl.linalg.get("cg", max_iter=1000, tol=cg_tol, warn=False),
    }
    if list(ks) != sorted(set(ks)) or ks[0] < 1:
        raise ValueError(f"ks must be increasing positive integers, got {list(ks)}.")
    abs_err: dict[str, list[float]] = {m: [] for m in METHODS}
    cert, inner_its, cg_its, met = [], [], [], []

    def err(g: torch.Tensor) -> float:
        return float((g - task.exact).norm())

    phi_k, k_done = task.theta, 0
    for k in ks:
        # the same gradient-descent path for every method: continue phi_K from the previous K
        phi_k = bl.unrolled.gd_steps(problem, task.theta, data, phi_k, step_size=step, num_steps=k - k_done,
                                     create_graph=False)
        k_done = k
        abs_err["maml"].append(err(_grad_through(
            lambda th: bl.unrolled.maml(problem, th, data, step_size=step, num_steps=k), task)))
        abs_err["fomaml"].append(err(_grad_through(
            lambda th: bl.unrolled.first_order_maml(problem, th, data, step_size=step, num_steps=k), task)))
        for name, ls in linear.items():
            g, _ = bl.hypergradient(problem, task.outer, task.theta, phi_k, data, linear_solver=ls)
            abs_err[name].append(err(g))
        g, info = bl.hypergradient(problem, task.outer, task.theta, phi_k, data, constants=constants,
                                   target_error=target_error, solver=adaptive_solver)
        abs_err["imaml_adaptive"].append(err(g))
        cert.append(info.certificate.bound)
        inner_its.append(info.adaptive.inner_iterations)
        cg_its.append(info.adaptive.cg_iterations)
        met.append(bool(info.adaptive.met))

    rel = {m: [e / exact_norm for e in v] for m, v in abs_err.items()}
    floors = {m: rel[m][-1] for m in ("imaml_cg2", "imaml_cg5", "imaml_cg_tol", "fomaml", "maml")}
    beats = [k for k, e in zip(ks, rel["maml"]) if e < floors["imaml_cg5"]]
    return {
        "n_train": task.n_train,
        "condition_number": task.kappa,
        "distinct_eigenvalues": task.distinct_eigenvalues,
        "mu": task.mu,
        "beta": task.beta,
        "lam": task.lam,
        "outer_smoothness": task.outer_smoothness,
        "step_size": step,
        "exact_norm": exact_norm,
        "K": list(ks),
        "errors": rel,
        "absolute_errors": abs_err,
        "adaptive": {
            "target_error": target_error,
            "target_relative": target_error / exact_norm,
            "certificate": cert,
            "certificate_relative": [c / exact_norm for c in cert],
            "inner_iterations": inner_its,
            "cg_iterations": cg_its,
            "met": met,
        },
        "floors_at_largest_K": floors,
        "maml_beats_cg5_at": beats[0] if beats else None,
    }


def run_study(*, ks: Sequence[int] | None = None, quick: bool = False, seed: int = 0, target_error: float = 1e-6,
              regimes: dict[str, int] | None = None, **task_options: Any) -> dict:
    """Run every regime; returns the JSON-ready results (see :func:`run_regime`)."""
    if ks is None:
        ks = k_grid(1000, 8 if quick else 16)
    regimes = REGIMES if regimes is None else regimes
    t0 = time.perf_counter()
    out: dict[str, Any] = {"config": {"seed": seed, "target_error": target_error, "K": list(ks), "quick": quick,
                                      "dim": task_options.get("dim", 50), "lam": task_options.get("lam", 5.0),
                                      "condition_number": task_options.get("condition_number", 50.0),
                                      "inner_solver": "gradient descent, step 2/(mu+beta), from phi_0 = theta",
                                      "error": "||g - g*|| / ||g*||"},
                           "regimes": {}}
    for name, n in regimes.items():
        task = make_task(n, seed=seed, **task_options)
        out["regimes"][name] = run_regime(task, ks, target_error=target_error)
    out["runtime_s"] = time.perf_counter() - t0
    return out


def plot_study(results: dict, path: str | pathlib.Path) -> pathlib.Path:
    """Two log-log panels (one per regime) of error vs inner steps; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-16
    styles = {
        "maml": dict(color="tab:red", marker="o", lw=1.6, ms=4),
        "fomaml": dict(color="tab:gray", marker="x", lw=1.4, ms=5),
        "imaml_cg2": dict(color="tab:cyan", marker="v", lw=1.6, ms=5),
        "imaml_cg5": dict(color="tab:blue", marker="^", lw=3.0, ms=7, alpha=0.6),
        "imaml_cg_tol": dict(color="navy", marker="s", lw=1.2, ms=3, ls="--"),
        "imaml_adaptive": dict(color="tab:green", marker="D", lw=1.6, ms=4),
    }
    titles = {"few_shot": "(i) few-shot", "many_shot": "(ii) many-shot"}
    regimes = results["regimes"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.2 * len(regimes), 5.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], regimes.items()):
        ks = r["K"]
        for m, label in METHODS.items():
            ax.loglog(ks, [max(e, floor) for e in r["errors"][m]], label=label, **styles[m])
        ad = r["adaptive"]
        ax.loglog(ks, [max(c, floor) for c in ad["certificate_relative"]], color="tab:green", ls="--", lw=1.4,
                  label="iMAML, adaptive: its certificate")
        ax.axhline(ad["target_relative"], color="tab:green", ls=":", lw=1.0, label="adaptive mode's target")
        ax.set_title(f"{titles.get(name, name)}: n = {r['n_train']} points, "
                     f"{r['distinct_eigenvalues']} distinct eigenvalues, kappa = {r['condition_number']:.0f}",
                     fontsize=9.5)
        ax.set_xlabel("inner gradient-descent steps K")
        ax.set_ylabel("relative meta-gradient error ||g - g*|| / ||g*||")
        ax.set_ylim(floor / 2, None)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8.5, frameon=False)
    fig.suptitle("Meta-gradient accuracy on linear-regression tasks (paper's Fig. 2a setting: x in R^50, "
                 f"lam = {results['config']['lam']}, kappa = {results['config']['condition_number']:.0f}; "
                 "GD step 2/(mu+beta))", fontsize=10.5)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def save_study(results: dict, out_dir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``results.json`` and ``accuracy.png`` under ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1))
    png_path = plot_study(results, out_dir / "accuracy.png")
    return json_path, png_path
