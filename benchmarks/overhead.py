"""The library's overhead over a hand-written loop and over the peers, on the peers' own examples.

Two parts, one process, one thread (``torch.set_num_threads(1)``; JAX on the CPU with one thread):

1. **Fixed-step gradient descent**, 100 steps on an L2-regularised logistic regression (200 x 20):
   ``bl.solve`` with ``bl.solvers.get("gd", step_size=0.5, max_iter=100, tol=0)`` against a loop that
   takes the same steps with ``torch.autograd.grad``. Both give the same point (checked). The two are
   timed alternately, ``--repeats`` rounds of ``--calls`` calls each, and the ratio of the medians is
   reported (top-level fields of the JSON, unchanged since commit 980fdc8).
2. **The peers' examples** (``peer_examples.py``): hypertorch's logistic regression, TorchOpt's iMAML
   tutorial and JAXopt's ridge regression, each computed as one hypergradient by ``bilevel`` (eager,
   and compiled once the library has it), by a hand-written loop, and by every peer installed here.
   All implementations of an example must agree (checked before timing; the run aborts if they do
   not); they are then timed alternately, ``--repeats`` rounds of about ``--round-s`` seconds each,
   and the medians of the per-call times (process CPU time) are compared: ratios to the fastest
   PyTorch peer and, on the ridge example, to jitted JAXopt (section ``peer_examples`` of the JSON,
   one PNG per example).

Ratios from one run only: absolute CPU times depend on the machine and its load.

    .venv/bin/python benchmarks/overhead.py                       # writes results/overhead.{json,png}
    .venv/bin/python benchmarks/overhead.py --quick --examples ridge
    .venv/bin/python benchmarks/overhead.py --table               # the README's table, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for path in (_HERE, _ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import bilevel as bl  # noqa: E402
from _common import RESULTS_DIR, display_path, environment, robust_clock, write_json  # noqa: E402
import peer_examples as pe  # noqa: E402

#: Column order and labels of the implementations (tables and figures).
IMPLEMENTATIONS = {
    "bilevel": "bilevel",
    "bilevel_compiled": "bilevel compiled",
    "hand_written": "hand-written",
    "hypertorch": "hypertorch",
    "torchopt": "TorchOpt",
    "jaxopt_jit": "JAXopt (jit)",
    "jaxopt": "JAXopt (no jit)",
}


def logistic_problem(seed: int = 0, n: int = 200, d: int = 20):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = (torch.rand(n, generator=g) > 0.5).float()

    def G(w, lam, data):
        Xd, yd = data
        return F.binary_cross_entropy_with_logits(Xd @ w, yd) + lam * (w * w).sum()
    return G, torch.tensor(0.1), (X, y), d


def time_alternated(fns: dict[str, Callable[[], Any]], repeats: int, round_s: float,
                    max_calls: int = 10_000) -> dict[str, dict[str, Any]]:
    """Time every callable in turn, ``repeats`` rounds; per round about ``round_s`` seconds each.

    Each callable's calls per round are fixed once, from a warm-up call (at least one). Returns,
    per name, ``{"calls": k, "wall": [...], "cpu": [...]}``: seconds per call in each round, by the
    wall clock and by this process's CPU time.
    """
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up (caches, lazy initialisation); the agreement check already ran each once
        start = time.perf_counter()
        fn()
        calls[name] = max(1, min(max_calls, round(round_s / max(time.perf_counter() - start, 1e-9))))
    out = {name: {"calls": calls[name], "wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls[name]):
                fn()
            t1, c1 = time.perf_counter(), time.process_time()
            out[name]["wall"].append((t1 - t0) / calls[name])
            out[name]["cpu"].append((c1 - c0) / calls[name])
    return out


def run_peer_examples(names: list[str], repeats: int, round_s: float) -> dict[str, Any]:
    """Check and time every implementation of the named peer examples; the JSON section ``peer_examples``."""
    # TorchOpt calls functorch's deprecated entry points on every call; the warning would only add noise.
    warnings.filterwarnings("ignore", message=".*integrated functorch into PyTorch.*")
    clock = robust_clock(torch.device("cpu"))
    compiled, compiled_reason = pe.compile_status()
    section: dict[str, Any] = {
        "clock": clock,
        "clock_note": ("process CPU time per call (one thread: other processes' load does not inflate it)"
                       if clock == "cpu" else "wall-clock time per call"),
        "repeats": repeats, "round_s": round_s,
        "peers": pe.peer_versions(),
        "bilevel_compiled": {"available": compiled, "reason": compiled_reason},
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "examples": {},
    }
    for name in names:
        example = pe.EXAMPLES[name]
        data = example.build()
        fns, skipped = {}, {}
        for impl, factory in example.factories.items():
            try:
                fns[impl] = factory(data)
            except pe.Unavailable as err:
                skipped[impl] = str(err)
        results = {impl: pe.as_vector(fn()) for impl, fn in fns.items()}
        try:
            diffs = pe.check_agreement(results, "hand_written", example.rtol)
        except ValueError as err:
            raise SystemExit(f"{name}: {err}") from None
        times = time_alternated(fns, repeats, round_s)
        medians = {impl: statistics.median(t[clock]) for impl, t in times.items()}
        peers = [impl for impl in pe.PYTORCH_PEERS if impl in medians]
        fastest = min(peers, key=medians.__getitem__) if peers else None
        implementations: dict[str, Any] = {}
        for impl in example.factories:
            if impl in skipped:
                implementations[impl] = {"status": "skipped", "reason": skipped[impl]}
                continue
            entry = {"status": "ran", "calls_per_round": times[impl]["calls"],
                     "times_s": {"cpu": times[impl]["cpu"], "wall": times[impl]["wall"]},
                     "median_ms": medians[impl] * 1e3, "relative_difference": diffs[impl]}
            if fastest is not None:
                entry["x_fastest_pytorch_peer"] = medians[impl] / medians[fastest]
            if pe.JAX_REFERENCE in medians:
                entry["x_jaxopt_jit"] = medians[impl] / medians[pe.JAX_REFERENCE]
            implementations[impl] = entry
        section["examples"][name] = {
            "title": example.title, "source": example.source, "settings": example.settings,
            "notes": example.notes, "agreement_rtol": example.rtol,
            "hypergradient": [float(v) for v in results["hand_written"]],
            "fastest_pytorch_peer": fastest, "implementations": implementations,
        }
        summary = ", ".join(f"{IMPLEMENTATIONS[i]} {medians[i] * 1e3:.3g} ms" for i in example.factories if i in medians)
        print(f"{name}: {summary}")
    return section


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    if entry["status"] != "ran":
        return "n/a"
    return f"{entry['median_ms']:.3g} ms"


def _ratio(entry: dict[str, Any] | None, key: str) -> str:
    return f"{entry[key]:.2f}x" if entry and entry.get("status") == "ran" and key in entry else ""


def markdown_table(payload: dict[str, Any]) -> str:
    """The README's table of the peer examples, from a payload of this script (``results/overhead.json``)."""
    section = payload.get("peer_examples")
    if not section or not section.get("examples"):
        return "(no peer examples in this file: run overhead.py without --examples none)"
    examples = section["examples"]
    columns = [impl for impl in IMPLEMENTATIONS if any(impl in e["implementations"] for e in examples.values())]
    head = (["example", "settings (source)"] + [IMPLEMENTATIONS[c] for c in columns]
            + ["bilevel / fastest PyTorch peer", "bilevel / JAXopt (jit)", "bilevel compiled / JAXopt (jit)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped: dict[str, str] = {}
    for name, e in examples.items():
        impls = e["implementations"]
        for impl, entry in impls.items():
            if entry["status"] != "ran":
                skipped.setdefault(IMPLEMENTATIONS[impl], entry["reason"])
        bl_entry = impls.get("bilevel")
        peer = e.get("fastest_pytorch_peer")
        to_peer = _ratio(bl_entry, "x_fastest_pytorch_peer") + (f" ({IMPLEMENTATIONS[peer]})" if peer else "")
        row = ([f"`{name}`", f"{e['settings']} (`{e['source']}`)"] + [_cell(impls.get(c)) for c in columns]
               + [to_peer if peer else "", _ratio(bl_entry, "x_jaxopt_jit"),
                  _ratio(impls.get("bilevel_compiled"), "x_jaxopt_jit")])
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    clock = "process CPU time" if section.get("clock") == "cpu" else "wall clock"
    quick = " **`--quick` run: a smoke test, not a measurement.**" if payload.get("quick") else ""
    lines.append("")
    lines.append(f"Median ms per hypergradient ({clock}, one thread), {section['repeats']} alternated rounds, "
                 f"commit {payload.get('commit', '?')}.{quick}")
    for label, reason in skipped.items():
        lines.append(f"n/a, {label}: {reason}")
    return "\n".join(lines)


def plot_example(name: str, result: dict[str, Any], clock: str, out: str, plt) -> str:
    """A horizontal bar chart (log-scale ms) of one example's implementations; returns the PNG's path."""
    ran = [(impl, e) for impl, e in result["implementations"].items() if e["status"] == "ran"]
    labels = [IMPLEMENTATIONS[impl] for impl, _ in ran]
    values = [e["median_ms"] for _, e in ran]
    colours = {"bilevel": "#1f77b4", "bilevel_compiled": "#17becf", "hand_written": "#999999",
               "hypertorch": "#2ca02c", "torchopt": "#ff7f0e", "jaxopt_jit": "#d62728", "jaxopt": "#e7a0a0"}
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(ran) + 1.4))
    ax.barh(labels, values, color=[colours[impl] for impl, _ in ran])
    ax.set_xscale("log")
    ax.invert_yaxis()
    for y, (v, (impl, e)) in enumerate(zip(values, ran)):
        note = f" {v:.3g} ms"
        if "x_fastest_pytorch_peer" in e and impl != result["fastest_pytorch_peer"]:
            note += f" ({e['x_fastest_pytorch_peer']:.2f}x {IMPLEMENTATIONS[result['fastest_pytorch_peer']]})"
        ax.text(v, y, note, va="center", fontsize=8)
    ax.set_xlim(min(values) / 2, max(values) * 30)
    ax.set_xlabel(f"ms per hypergradient (median, {'CPU time' if clock == 'cpu' else 'wall clock'}, log scale)")
    ax.set_title(result["title"], fontsize=10)
    not_run = [IMPLEMENTATIONS[impl] for impl, e in result["implementations"].items() if e["status"] != "ran"]
    if not_run:
        fig.text(0.01, 0.01, "not run here: " + ", ".join(not_run) + " (reasons in the JSON)", fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if not_run else 0, 1, 1))
    path = os.path.join(out, f"overhead_{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calls", type=int, default=None, help="calls per timed round of the gd case (default 20; "
                                                            "5 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="alternated rounds, the median is reported "
                                                             "(default 7; 3 with --quick)")
    p.add_argument("--round-s", type=float, default=None,
                   help="peer examples: seconds per implementation and round, which sets its calls per round "
                        "(default 0.2; 0.05 with --quick)")
    p.add_argument("--examples", default=",".join(pe.EXAMPLES),
                   help=f"comma-separated peer examples to time, from {sorted(pe.EXAMPLES)}, or 'none' "
                        f"(default: all)")
    p.add_argument("--quick", action="store_true", help="few rounds and short rounds: a smoke run, not a "
                                                        "measurement to quote")
    p.add_argument("--table", nargs="?", const=os.path.join(RESULTS_DIR, "overhead.json"), default=None,
                   metavar="JSON", help="print the Markdown table of the peer examples from JSON (default "
                                        "results/overhead.json) and exit")
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args()
    if args.table is not None:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return
    examples = [] if args.examples.strip() == "none" else [e.strip() for e in args.examples.split(",") if e.strip()]
    unknown = [e for e in examples if e not in pe.EXAMPLES]
    if unknown:
        p.error(f"--examples: unknown {unknown}; choose from {sorted(pe.EXAMPLES)} or 'none'.")
    args.calls = args.calls or (5 if args.quick else 20)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.round_s = args.round_s or (0.05 if args.quick else 0.2)
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
        "quick": args.quick,
    }
    print(f"bilevel / hand-written (fixed-step gd): {ratio:.2f} (target {payload['target_ratio']})")
    if examples:
        payload["peer_examples"] = run_peer_examples(examples, args.repeats, args.round_s)
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
    plt.close(fig)
    written = [path, os.path.join(args.out, "overhead.png")]
    for name, result in payload.get("peer_examples", {}).get("examples", {}).items():
        written.append(plot_example(name, result, payload["peer_examples"]["clock"], args.out, plt))
    if examples:
        print()
        print(markdown_table(payload))
    print("wrote " + ", ".join(display_path(w) for w in written))


if __name__ == "__main__":
    main()
