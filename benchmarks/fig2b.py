"""Figure 2(b) of the iMAML paper: time and peak memory of ONE task's meta-gradient against the inner steps K.

Methods (all through :class:`applications.imaml.algorithms.MetaLearner`, one task, meta-batch of 1):

* ``imaml_gd``: iMAML with ``K`` steps of GD inner (``inner_lr`` 0.1, ``lam`` 2.0) and a 5-step CG implicit
  backward, the **loop path** (``vmap=False``; ``negative_curvature="first_order"``: at negative curvature
  the task's gradient falls back to ``grad_phi L_query``, one extra gradient).
* ``imaml_hf``: iMAML with the Hessian-free (``newton_cg``) inner solver, 5 CG steps per Newton direction,
  then the 5-step CG implicit backward. Its cost does not depend on ``K`` but on the Newton iterations:
  it is measured for ``--hf-iters`` (default 3, the paper's setting) and drawn as a horizontal line.
* ``maml``: ``bl.unrolled.maml`` (back-propagation through the K steps); by default on CPU only up to
  ``K = 40`` (``--maml-max-k``) to keep the run short.
* ``fomaml``: ``bl.unrolled.first_order_maml``.
* ``imaml_gn``: ``imaml_gd`` with Gauss-Newton curvature in the backward (``curvature="gauss_newton"``,
  ``hvp="gauss_newton"``): ``J^T H_CE J + lam I`` products instead of exact Hessian-vector products.
* ``torchopt``: TorchOpt's implicit iMAML, as in its iMAML example: ``torchopt.diff.implicit.custom_root``
  on the stationarity condition ``torch.func.grad(G)``, solved by ``solve_normal_cg(maxiter=5)``; the same K
  GD steps (``torch.func.grad``, no graph). ``higher``: MAML unrolled with ``higher.innerloop_ctx`` and SGD.
  Both only when importable (``pip install -e ".[peers]"``); otherwise a note is printed and stored.

Problem: the 4-conv Omniglot net (:class:`applications.imaml.model.ConvNet`, 64 filters, 1x28x28 inputs),
20-way 5-shot: 100 random support images, 20 x 5 random query images, random-init parameters
(:func:`applications.imaml.model.init_params`, seed 0).

Reference: ``grad``, one gradient of the training (support) loss with respect to theta
(``loss.backward()``), measured in the same run; times and memory are also reported as ratios to it.

Measurement (as :mod:`memory_argmin`): every configuration runs in a **fresh process** (``--worker``).
CPU: the peak is the **tensor peak** (:func:`_common.tensor_peak_mib`: every tensor allocation and free
of one meta-gradient, recorded by ``torch.profiler`` and replayed; deterministic, the CPU analogue of
``max_memory_allocated``), and also, as before, ``ru_maxrss`` after one meta-gradient minus ``ru_maxrss`` at
the baseline, which is taken after imports, setup and a warm-up run of the same method (``K = 1`` on a 20-way
1-shot task); ``ru_maxrss`` scatters by about 10% between runs. Time: minimum over the measured call and
``--repeats`` further calls of the process CPU time, one thread. CUDA: ``torch.cuda.max_memory_allocated``
minus the allocation at the baseline; CUDA events.

Cost model (study (b), ``--no-model`` skips it): a worker times, each alone, one gradient of the inner
objective ``G`` (an inner GD step), one Hessian-vector product of ``G`` (reverse-over-reverse, built from
scratch: forward + create_graph backward + second backward), and one gradient of the outer (query) loss;
the model of iMAML-GD's meta-gradient is ``K t_grad + n_CG t_hvp + t_outer`` and the script reports
``measured / model`` for every K. For ``imaml_gn`` the product is a Gauss-Newton one (forward-mode Jacobian
product, criterion Hessian, vector-Jacobian product with the forward re-run) and the model adds one gradient
(the exact ``grad_phi G`` that the engine reports as a diagnostic): ``(K + 1) t_grad + n_CG t_gn + t_outer``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fig2b.py                 # ~5 min on 2 busy CPU cores (2 workers at once)
    .venv/bin/python benchmarks/fig2b.py --quick         # K in {1, 5}, no repeats
    .venv/bin/python benchmarks/fig2b.py --ks 1 10 40 --maml-max-k 10
    .venv/bin/python benchmarks/fig2b.py --device cuda   # MAML up to K = 160 by default on CUDA

Writes ``<out>/fig2b.json`` and ``<out>/fig2b.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import bilevel as bl  # noqa: E402
from _common import (CPU_TIME_NOTE, RESULTS_DIR, current_rss_mib, display_path, environment,  # noqa: E402
                     maxrss_mib, resolve_device, tensor_peak_mib, write_json)
from applications.imaml.algorithms import AlgorithmConfig, MetaLearner, TaskBatch  # noqa: E402
from applications.imaml.model import ConvNet, init_params  # noqa: E402

KS = [1, 5, 10, 20, 40, 80, 160]
QUICK_KS = [1, 5]
WAYS, SHOTS, QUERY = 20, 5, 5
INNER_LR, LAM, CG_STEPS = 0.1, 2.0, 5
RESULT_TAG = "RESULT "
PEERS = ("torchopt", "higher")
METHODS = ("imaml_gd", "imaml_gn", "imaml_hf", "maml", "fomaml", "torchopt", "higher")




class _Clock:
    """Process CPU time (CPU) or CUDA events (CUDA) of a region, in seconds; wall clock stored as well."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "_Clock":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._e0, self._e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._e0.record()
        self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._e1.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._e0.elapsed_time(self._e1) / 1e3
        else:
            self.seconds = time.process_time() - self._c0
        self.wall = time.perf_counter() - self._t0


def _batch(device: torch.device, ways: int, shots: int, query: int, seed: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(1, ways * shots, 1, 28, 28, generator=g)
    xq = torch.randn(1, ways * query, 1, 28, 28, generator=g)
    ys = torch.arange(ways).repeat_interleave(shots)[None]
    yq = torch.arange(ways).repeat_interleave(query)[None]
    return TaskBatch(xs.to(device), ys.to(device), xq.to(device), yq.to(device))


def _make_run(method: str, k: int, device: torch.device, seed: int, shots: int = SHOTS,
              query: int = QUERY) -> tuple[Callable[[], dict[str, Any]], dict[str, torch.Tensor]]:
    """``run()``: one task's meta-gradient (or, for ``grad``, one gradient of the support loss) into theta.grad."""
    net = ConvNet(WAYS).to(device)
    net.requires_grad_(False)
    theta = init_params(net, seed=0, device=device)
    batch = _batch(device, WAYS, shots, query, seed)
    if method == "grad":
        xs, ys = batch.support_x[0], batch.support_y[0]

        def run() -> dict[str, Any]:
            for p in theta.values():
                p.grad = None
            F.cross_entropy(torch.func.functional_call(net, theta, (xs,)), ys).backward()
            return {}
        return run, theta
    if method == "torchopt":
        return _torchopt_run(net, theta, batch, k)
    if method == "higher":
        return _higher_run(net, theta, batch, k)
    hf_iter = k if method == "imaml_hf" else 3
    name, curvature = ("imaml_gd", "gauss_newton") if method == "imaml_gn" else (method, "exact")
    config = AlgorithmConfig(name, inner_steps=k if method != "imaml_hf" else 1, inner_lr=INNER_LR, lam=LAM,
                             cg_steps=CG_STEPS, hf_iterations=hf_iter, hf_cg_steps=5, vmap=False,
                             curvature=curvature)
    learner = MetaLearner(net, config)

    def run() -> dict[str, Any]:
        for p in theta.values():
            p.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bl.ConvergenceWarning)
            stats = learner.meta_gradient(theta, batch)
        return {"negative_curvature": stats.get("negative_curvature")}
    return run, theta


def _torchopt_run(net, theta, batch, k):
    """TorchOpt's implicit iMAML (its iMAML example's pattern): custom_root + normal CG, K plain GD steps."""
    import torchopt

    names = list(theta)
    xs, ys, xq, yq = batch.task(0)
    meta = tuple(theta[n] for n in names)

    def fmodel(params, x):
        return torch.func.functional_call(net, dict(zip(names, params)), (x,))

    def objective(params, meta_params, x, y):
        reg = sum(((p - m) ** 2).sum() for p, m in zip(params, meta_params))
        return F.cross_entropy(fmodel(params, x), y) + 0.5 * LAM * reg

    grad_g = torch.func.grad(objective, argnums=0)

    @torchopt.diff.implicit.custom_root(grad_g, argnums=1,
                                        solve=torchopt.linear_solve.solve_normal_cg(maxiter=CG_STEPS, atol=0))
    def inner(params, meta_params, x, y):
        fixed = tuple(m.detach() for m in meta_params)
        params = tuple(p.detach() for p in params)
        for _ in range(k):
            params = tuple(p - INNER_LR * g for p, g in zip(params, grad_g(params, fixed, x, y)))
        return params

    def run() -> dict[str, Any]:
        for p in meta:
            p.grad = None
        phi = inner(tuple(m.detach().clone() for m in meta), meta, xs, ys)
        F.cross_entropy(fmodel(phi, xq), yq).backward()
        return {}
    return run, theta


def _higher_run(net, theta, batch, k):
    """higher's unrolled MAML: innerloop_ctx over SGD steps, differentiated through the path."""
    import higher

    xs, ys, xq, yq = batch.task(0)
    net = net.to(xs.device)
    net.requires_grad_(True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(theta[name])
    params = dict(net.named_parameters())
    opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)

    def run() -> dict[str, Any]:
        for p in params.values():
            p.grad = None
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(k):
                diffopt.step(F.cross_entropy(fnet(xs), ys))
            F.cross_entropy(fnet(xq), yq).backward()
        return {}
    return run, params


def _components(device: torch.device, seed: int, repeats: int) -> dict[str, Any]:
    """Cost-model parts, each timed alone: grad of G (inner step), one HVP of G, grad of the outer loss."""
    net = ConvNet(WAYS).to(device)
    net.requires_grad_(False)
    theta = {k: v.detach() for k, v in init_params(net, seed=0, device=device).items()}
    batch = _batch(device, WAYS, SHOTS, QUERY, seed)
    xs, ys, xq, yq = batch.task(0)
    phi = {k: (v + 0.01 * torch.randn_like(v)).requires_grad_(True) for k, v in theta.items()}
    vec = {k: torch.randn_like(v) for k, v in theta.items()}
    names = list(phi)

    def G(p):
        ce = F.cross_entropy(torch.func.functional_call(net, p, (xs,)), ys)
        return ce + LAM / 2 * sum(((p[n] - theta[n]) ** 2).sum() for n in names)

    def grad_g():
        torch.autograd.grad(G(phi), [phi[n] for n in names])

    def hvp():
        g = torch.autograd.grad(G(phi), [phi[n] for n in names], create_graph=True)
        torch.autograd.grad(g, [phi[n] for n in names], [vec[n] for n in names])

    def outer():
        torch.autograd.grad(F.cross_entropy(torch.func.functional_call(net, phi, (xq,)), yq),
                            [phi[n] for n in names])

    phi_d = {n: t.detach() for n, t in phi.items()}

    def predict(p):
        return torch.func.functional_call(net, p, (xs,))

    def gn_product():  # J^T H_CE J v + lam v, the forward re-run for the vector-Jacobian product
        out, jv = torch.func.jvp(predict, (phi_d,), (vec,))
        _, hjv = torch.func.jvp(torch.func.grad(lambda o: F.cross_entropy(o, ys)), (out,), (jv,))
        _, pullback = torch.func.vjp(predict, phi_d)
        (jt,) = pullback(hjv)
        return {n: jt[n] + LAM * vec[n] for n in names}

    out: dict[str, Any] = {}
    for name, fn in (("grad_G", grad_g), ("hvp", hvp), ("gn_product", gn_product), ("outer_grad", outer)):
        fn()  # warm-up
        ts = []
        for _ in range(max(repeats, 3)):
            with _Clock(device) as c:
                fn()
            ts.append(c.seconds)
        out[name + "_s"] = min(ts)
        out[name + "_times_s"] = ts
    return out


def worker(method: str, k: int, device: torch.device, repeats: int, seed: int) -> dict[str, Any]:
    if method == "components":
        return {"method": method, "steps": 0, **_components(device, seed, repeats)}
    warm, _ = _make_run(method, 1, device, seed + 1, shots=1, query=1)
    warm()
    run, theta = _make_run(method, k, device, seed)
    del warm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    base_rss, base_cur = maxrss_mib(), current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    with _Clock(device) as c:
        out = run()
    rec: dict[str, Any] = {"method": method, "steps": k, "host_peak_mib": maxrss_mib() - base_rss,
                           "host_baseline_mib": base_rss,
                           "host_baseline_slack_mib": None if base_cur is None else base_rss - base_cur,
                           "negative_curvature": out.get("negative_curvature"),
                           "grad_norm": float(torch.linalg.vector_norm(
                               torch.cat([p.grad.reshape(-1) for p in theta.values()])))}
    if device.type == "cuda":
        rec["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2 ** 20
    rec["peak_mib"] = rec.get("cuda_peak_mib", rec["host_peak_mib"])
    times, walls = [c.seconds], [c.wall]
    for _ in range(repeats):
        with _Clock(device) as c:
            run()
        times.append(c.seconds)
        walls.append(c.wall)
    rec.update(time_s=min(times), times_s=times, wall_times_s=walls, threads=torch.get_num_threads())
    if device.type == "cpu":  # after the timed calls: the profiler slows the call it watches
        gc.collect()
        rec["tensor_peak_mib"] = tensor_peak_mib(run)
        rec["peak_mib"] = rec["tensor_peak_mib"]
    return rec


def measure(method: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(k), "--device", args.device,
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {method}/{k} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def _series(records, method):
    return sorted((r for r in records if r["method"] == method), key=lambda r: r["steps"])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    ref = _series(records, "grad")[0]
    for r in records:
        if "time_s" in r:
            r["time_ratio"] = r["time_s"] / ref["time_s"]
            r["peak_ratio_to_grad"] = r["peak_mib"] / max(ref["peak_mib"], 1e-9)
    s: dict[str, Any] = {"reference": {"time_s": ref["time_s"], "peak_mib": ref["peak_mib"]}}
    for m in METHODS:
        ser = _series(records, m)
        if not ser:
            continue
        lo, hi = ser[0], ser[-1]
        s[m] = {"steps": [lo["steps"], hi["steps"]], "peak_mib": [lo["peak_mib"], hi["peak_mib"]],
                "peak_ratio_last_first": hi["peak_mib"] / max(lo["peak_mib"], 1e-9),
                "peak_over_grad": [r["peak_ratio_to_grad"] for r in ser],
                "mib_per_step": (hi["peak_mib"] - lo["peak_mib"]) / max(hi["steps"] - lo["steps"], 1),
                "time_ratio": [r["time_ratio"] for r in ser]}
    comp = _series(records, "components")
    if comp and _series(records, "imaml_gd"):
        c = comp[0]
        model = []
        for r in _series(records, "imaml_gd"):
            t_model = r["steps"] * c["grad_G_s"] + CG_STEPS * c["hvp_s"] + c["outer_grad_s"]
            model.append({"steps": r["steps"], "measured_s": r["time_s"], "model_s": t_model,
                          "measured_over_model": r["time_s"] / t_model,
                          "negative_curvature": r["negative_curvature"]})
        model_gn = []
        for r in _series(records, "imaml_gn"):
            t_model = (r["steps"] + 1) * c["grad_G_s"] + CG_STEPS * c["gn_product_s"] + c["outer_grad_s"]
            model_gn.append({"steps": r["steps"], "measured_s": r["time_s"], "model_s": t_model,
                             "measured_over_model": r["time_s"] / t_model})
        s["cost_model"] = {"components_over_grad": {n: c[n + "_s"] / ref["time_s"]
                                                    for n in ("grad_G", "hvp", "gn_product", "outer_grad")},
                           "per_k": model, "per_k_gauss_newton": model_gn}
    # the targets, as ratios of this run
    targets: dict[str, Any] = {}
    for m in ("imaml_gd", "imaml_gn"):
        if m in s:
            targets[m] = {"flat_in_k (peak last / first <= 1.05)": s[m]["peak_ratio_last_first"],
                          "max peak / one-gradient peak (<= 2.5)": max(s[m]["peak_over_grad"])}
    by_k = {m: {r["steps"]: r["time_s"] for r in _series(records, m)} for m in ("imaml_gd", "imaml_gn", "torchopt")}
    for m in ("imaml_gd", "imaml_gn"):
        common = sorted(set(by_k[m]) & set(by_k["torchopt"]))
        if common:
            targets.setdefault(m, {})["time / torchopt per K (<= 1)"] = {
                k: by_k[m][k] / by_k["torchopt"][k] for k in common}
    peaks = {m: {r["steps"]: r["peak_mib"] for r in _series(records, m)} for m in ("imaml_gd", "imaml_gn", "higher",
                                                                                    "maml")}
    for m in ("imaml_gd", "imaml_gn"):
        for peer in ("higher", "maml"):
            common = sorted(set(peaks[m]) & set(peaks[peer]))
            if common:
                targets.setdefault(m, {})[f"{peer} peak / this peak per K (>= 5 on the GPU target)"] = {
                    k: peaks[peer][k] / peaks[m][k] for k in common}
    s["targets"] = targets
    return s


def plot(records, summary, device, path, hf_iters) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.3))
    styles = {"imaml_gd": ("C0", "o", "iMAML-GD (CG 5, exact HVPs)"),
              "imaml_gn": ("C4", "D", "iMAML-GD (CG 5, Gauss-Newton)"),
              "maml": ("C3", "s", "MAML (unrolled)"), "fomaml": ("C2", "^", "first-order MAML"),
              "torchopt": ("C5", "v", "TorchOpt implicit iMAML (normal CG 5)"),
              "higher": ("C7", "x", "higher MAML (unrolled)")}
    ks = sorted({r["steps"] for r in records if r["method"] in styles})
    for m, (col, mk, lab) in styles.items():
        ser = _series(records, m)
        if ser:
            x = [r["steps"] for r in ser]
            ax_t.plot(x, [r["time_ratio"] for r in ser], color=col, marker=mk, label=lab)
            ax_m.plot(x, [r["peak_mib"] for r in ser], color=col, marker=mk, label=lab)
    for r in _series(records, "imaml_hf"):
        if r["steps"] == max(hf_iters):
            lab = f"iMAML-HF ({r['steps']} Newton it., independent of K)"
            ax_t.axhline(r["time_ratio"], color="C1", ls="--", label=lab)
            ax_m.axhline(r["peak_mib"], color="C1", ls="--", label=lab)
    if "cost_model" in summary:
        pk = summary["cost_model"]["per_k"]
        ref = summary["reference"]["time_s"]
        ax_t.plot([p["steps"] for p in pk], [p["model_s"] / ref for p in pk], color="C0", ls=":",
                  label="iMAML-GD cost model")
    ref_mib = summary["reference"]["peak_mib"]
    ax_m.axhline(ref_mib, color="k", ls=":", label="one gradient")
    ax_t.axhline(1.0, color="k", ls=":", label="one gradient")
    clock = "CUDA events" if device.type == "cuda" else "process CPU time, 1 thread"
    what = "max_memory_allocated" if device.type == "cuda" else "tensor peak"
    ax_t.set(xscale="log", yscale="log", xlabel="inner steps K", ylabel="time / one gradient",
             title=f"meta-gradient time ({clock})")
    ax_m.set(xscale="log", yscale="log", xlabel="inner steps K", ylabel=f"peak memory, MiB ({what})",
             title=f"meta-gradient peak memory ({device.type})")
    for ax in (ax_t, ax_m):
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_m.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_m.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_t.legend(fontsize=7, loc="lower right")
    fig.suptitle("4-conv Omniglot net, 20-way 5-shot (100 support, 100 query), one task", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="K in {1, 5}, HF 1 iteration, no repeats")
    p.add_argument("--ks", type=int, nargs="+", default=None, help=f"inner steps (default {KS})")
    p.add_argument("--maml-max-k", type=int, default=None, help="largest K for unrolled MAML "
                   "(default 40 on CPU, no limit on CUDA)")
    p.add_argument("--hf-iters", type=int, nargs="+", default=None, help="Newton iterations of iMAML-HF (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the measured one (default 1; "
                   "0 with --quick)")
    p.add_argument("--jobs", type=int, default=2, help="workers at once (CPU time and ru_maxrss are per process)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-model", action="store_true", help="skip the cost-model components (study (b))")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the PNG next to an existing fig2b.json")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    args.device = str(device)
    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 0 if args.quick else 1
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args.worker[0], int(args.worker[1]), device, args.repeats,
                                             args.seed)), flush=True)
        return 0

    if args.plot_only:
        with open(args.plot_only) as f:
            saved = json.load(f)
        plot(saved["records"], saved["summary"], device, os.path.splitext(args.plot_only)[0] + ".png",
             saved["hf_iters"])
        return 0
    ks = args.ks or (QUICK_KS if args.quick else KS)
    maml_max = args.maml_max_k if args.maml_max_k is not None else (10 ** 9 if device.type == "cuda" else 40)
    hf_iters = args.hf_iters or ([1] if args.quick else [3])
    notes = []
    peers = []
    for peer in PEERS:
        if importlib.util.find_spec(peer) is None:
            notes.append(f"{peer} is not installed: skipped (optional peer: pip install -e \".[peers]\").")
            print("note:", notes[-1])
        else:
            peers.append(peer)
    configs = [("grad", 0)] + ([] if args.no_model else [("components", 0)])
    configs += [("imaml_gd", k) for k in ks] + [("imaml_gn", k) for k in ks] + [("fomaml", k) for k in ks]
    configs += [("maml", k) for k in ks if k <= maml_max] + [("imaml_hf", n) for n in hf_iters]
    if "torchopt" in peers:
        configs += [("torchopt", k) for k in ks]
    if "higher" in peers:
        configs += [("higher", k) for k in ks if k <= maml_max]
    # longest first, so that the two workers finish together
    configs.sort(key=lambda c: -(c[1] * (3 if c[0] in ("maml", "higher") else 1)))
    start = time.perf_counter()
    load_before = os.getloadavg()
    records = []
    jobs = 1 if device.type == "cuda" else args.jobs
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futs = {pool.submit(measure, m, k, args): (m, k) for m, k in configs}
        for f in concurrent.futures.as_completed(futs):
            r = f.result()
            records.append(r)
            extra = f"peak {r['peak_mib']:8.1f} MiB, time {r['time_s']:.3f} s" if "time_s" in r else "components"
            print(f"  {r['method']:10s} {r['steps']:4d}: {extra}", flush=True)
    summary = summarize(records)
    payload = {
        "benchmark": "fig2b",
        "problem": {"model": "ConvNet(20) from applications/imaml/model.py", "ways": WAYS, "shots": SHOTS,
                    "query_per_class": QUERY, "inner_lr": INNER_LR, "lam": LAM, "cg_steps": CG_STEPS,
                    "imaml_hf": "newton_cg, 5 CG steps per direction, iterations = steps field",
                    "imaml_gd_path": "MetaLearner loop path (vmap=False), negative_curvature='first_order'",
                    "imaml_gn": "imaml_gd with curvature='gauss_newton'",
                    "peers": peers},
        "ks": ks, "maml_max_k": None if maml_max >= 10 ** 9 else maml_max, "hf_iters": hf_iters,
        "quick": args.quick, "repeats": args.repeats, "jobs": jobs,
        "time_statistic": "minimum over the measured call and `repeats` further calls",
        "clock": "CUDA events" if device.type == "cuda" else "process CPU time (1 thread)",
        "memory_measure": ("max_memory_allocated - memory_allocated at baseline" if device.type == "cuda" else
                           "peak_mib: tensor peak of one meta-gradient (torch.profiler allocation events "
                           "replayed); host_peak_mib: ru_maxrss after one meta-gradient - ru_maxrss after setup "
                           "and a K=1 warm-up on a 20-way 1-shot task; fresh process per configuration"),
        "notes": notes, "environment": environment(device),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "time_note": CPU_TIME_NOTE if device.type == "cpu" else "times from CUDA events",
        "summary": summary, "records": records,
    }
    os.makedirs(args.out, exist_ok=True)
    jp, pp = os.path.join(args.out, "fig2b.json"), os.path.join(args.out, "fig2b.png")
    write_json(jp, payload)
    plot(records, summary, device, pp, hf_iters)
    print(f"\nfig2b on {device} ({time.perf_counter() - start:.0f} s); reference: one gradient, "
          f"peak {summary['reference']['peak_mib']:.1f} MiB")
    print(f"{'method':10s} {'K':>4s} {'peak MiB':>9s} {'peak/grad':>9s} {'time/grad':>9s}")
    for r in sorted(records, key=lambda r: (r["method"], r["steps"])):
        if "time_s" in r and r["method"] != "grad":
            print(f"{r['method']:10s} {r['steps']:4d} {r['peak_mib']:9.1f} {r['peak_ratio_to_grad']:9.2f} "
                  f"{r['time_ratio']:9.2f}")
    for m in METHODS:
        if m in summary:
            s = summary[m]
            print(f"{m}: peak(K={s['steps'][1]}) / peak(K={s['steps'][0]}) = {s['peak_ratio_last_first']:.2f} "
                  f"({s['mib_per_step']:+.2f} MiB per step)")
    if "cost_model" in summary:
        cm = summary["cost_model"]
        print("cost model parts / one gradient: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                              cm["components_over_grad"].items()))
        for pk in cm["per_k"]:
            print(f"  imaml_gd K={pk['steps']:4d}: measured/model = {pk['measured_over_model']:.2f} "
                  f"(negative curvature: {pk['negative_curvature']})")
        for pk in cm["per_k_gauss_newton"]:
            print(f"  imaml_gn K={pk['steps']:4d}: measured/model = {pk['measured_over_model']:.2f}")
    print("targets: " + json.dumps(summary["targets"], indent=1))
    if device.type == "cpu":
        print(CPU_TIME_NOTE)
    print(f"wrote {display_path(jp)} and {display_path(pp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
