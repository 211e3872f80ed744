"""Shared pieces of the benchmark scripts: the test problems, timing and result files.

Imported by the scripts in this folder (``python benchmarks/<script>.py`` puts
the folder on ``sys.path``); it is not part of the ``bilevel`` package.

Problems
--------
:func:`mlp_task`
    A 64-256-256-10 ReLU MLP, cross-entropy on 100 random points.
:func:`convnet_task`
    The 4-block conv net of MAML / iMAML on Omniglot-sized inputs (1x28x28),
    20-way 5-shot (100 images), batch norm with batch statistics.

Both return a :class:`Task`: a :class:`bilevel.ProximalProblem` over the
network's parameters (a dict, evaluated with :func:`torch.func.functional_call`),
``theta``, the inner (support) data and an outer (query) loss.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import bilevel as bl  # noqa: E402
from applications.imaml.model import ConvNet  # noqa: E402  (the one conv net of the project)


def maxrss_mib() -> float:
    """The process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def tensor_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak of the bytes held by tensors on the CPU while ``fn()`` runs, above what was held before, in MiB.

    Every CPU allocation and free of tensor storage during ``fn()`` is recorded by
    :mod:`torch.profiler` (``profile_memory=True``) and replayed in order; the
    peak of the running sum is the CPU analogue of ``torch.cuda.max_memory_allocated``
    minus the allocation at the start. Unlike ``ru_maxrss`` it does not depend on the
    allocator's caching or on what earlier code left behind, so it is the same on
    every run (measured: equal to the byte over repeated runs). It counts tensor
    storage only, not Python objects or code pages.
    """
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2 ** 20


def peak_memory_mib(device: torch.device, fn: Callable[[], Any]) -> float:
    """Peak memory of ``fn()`` above what was allocated before it, in MiB: the CUDA allocator's
    ``max_memory_allocated`` on a GPU, :func:`tensor_peak_mib` on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return tensor_peak_mib(fn)


def current_rss_mib() -> float | None:
    """The current resident set size in MiB, where psutil can read it (for the baseline's slack)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2 ** 20

__all__ = ["Task", "mlp_task", "convnet_task", "resolve_device", "Stopwatch", "robust_clock", "time_calls",
           "environment", "write_json", "display_path", "CPU_TIME_NOTE", "RESULTS_DIR"]

#: Default output folder: ``benchmarks/results`` next to this file, whatever the working directory.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: Printed and stored with every CPU timing.
CPU_TIME_NOTE = ("CPU timings are reported as ratios only: absolute CPU times depend on the machine and its "
                 "load and are not to be quoted.")


@dataclass
class Task:
    """One inner problem of a benchmark.

    Attributes
    ----------
    name:
        Short label (``"mlp"`` or ``"convnet"``).
    problem:
        ``bl.ProximalProblem(loss, lam)`` with ``loss(phi, data)`` the network's training loss.
    theta:
        The meta-parameters: a dict of leaf tensors that require grad.
    data:
        The inner (support) batch ``(x, y)``.
    outer:
        ``outer(phi) -> scalar``: the loss of the adapted network on a query batch.
    num_params:
        Number of scalars in ``theta``.
    """

    name: str
    problem: bl.ProximalProblem
    theta: dict[str, torch.Tensor]
    data: tuple[torch.Tensor, torch.Tensor]
    outer: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    num_params: int


def resolve_device(name: str | None) -> torch.device:
    """``"auto"`` / ``None``: CUDA when available, else CPU; anything else as given to :class:`torch.device`.

    A CUDA device with an index becomes the current one, so that CUDA events and streams refer to it.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name in (None, "auto") \
        else torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def _make_task(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor,
               yq: torch.Tensor, lam: float) -> Task:
    model.requires_grad_(False)  # the module is a stateless template; theta holds the parameters

    def loss(phi: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = data
        return F.cross_entropy(torch.func.functional_call(model, phi, (inputs,)), labels)

    def outer(phi: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss(phi, (xq, yq))

    theta = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    problem = bl.ProximalProblem(loss, lam=lam, name=name)
    return Task(name, problem, theta, (x, y), outer, sum(p.numel() for p in theta.values()))


def mlp_task(device: torch.device, *, seed: int = 0, in_dim: int = 64, hidden: int = 256, num_classes: int = 10,
             batch: int = 100, lam: float = 2.0) -> Task:
    """A two-hidden-layer ReLU MLP (``in_dim``-``hidden``-``hidden``-``num_classes``) on random points."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, num_classes)).to(device)
    x, xq = (torch.randn(batch, in_dim, generator=g).to(device) for _ in range(2))
    y, yq = (torch.randint(num_classes, (batch,), generator=g).to(device) for _ in range(2))
    return _make_task("mlp", model, x, y, xq, yq, lam)


def convnet_task(device: torch.device, *, seed: int = 0, ways: int = 20, shots: int = 5, image_size: int = 28,
                 width: int = 64, lam: float = 2.0) -> Task:
    """The 4-block conv net on random ``ways``-way ``shots``-shot 1x``image_size``^2 images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ConvNet(ways, image_size=image_size, hidden=width).to(device)
    n = ways * shots
    x, xq = (torch.randn(n, 1, image_size, image_size, generator=g).to(device) for _ in range(2))
    y = torch.arange(ways).repeat_interleave(shots).to(device)
    return _make_task("convnet", model, x, y, xq, y.clone(), lam)


class Stopwatch:
    """Time a region: wall clock (CUDA events on a CUDA device) and, on the host, the process CPU time.

    Attributes
    ----------
    seconds:
        Wall-clock seconds (from CUDA events on a CUDA device).
    cpu_seconds:
        CPU seconds of this process over the region (``time.process_time``;
        ``nan`` on a CUDA device). For a single-threaded run on a shared
        machine this is the robust figure: other processes' load does not
        inflate it, while it inflates the wall clock.

    Examples
    --------
    >>> sw = Stopwatch(torch.device("cpu"))
    >>> with sw:
    ...     _ = sum(range(10))
    >>> sw.seconds >= 0 and sw.cpu_seconds >= 0
    True
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.seconds = self.cpu_seconds = float("nan")

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0
            self.cpu_seconds = time.process_time() - self._c0


def robust_clock(device: torch.device) -> str:
    """The clock whose ratios a benchmark should report: ``"cpu"`` or ``"wall"``.

    Process CPU time on the host when torch runs one thread (immune to other
    load on a shared machine); the wall clock otherwise (with several threads
    the CPU time also counts the threads' spin-waiting; on CUDA it is
    meaningless).
    """
    return "cpu" if device.type != "cuda" and torch.get_num_threads() == 1 else "wall"


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Time ``repeats`` calls of ``fn`` (no warm-up here): ``{"wall": [...], "cpu": [...]}`` in seconds."""
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(repeats):
        with Stopwatch(device) as sw:
            fn()
        times["wall"].append(sw.seconds)
        times["cpu"].append(sw.cpu_seconds)
    return times


def environment(device: torch.device) -> dict[str, Any]:
    """Facts about the machine and software that a result depends on."""
    env = {
        "torch": torch.__version__,
        "bilevel": bl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")


def display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute (for messages)."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel
