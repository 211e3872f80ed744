"""Meta-learning algorithms for few-shot classification, all built on :mod:`bilevel`'s public API.

========== =========================================================================
name       meta-gradient of one task
========== =========================================================================
imaml_gd   ``bl.argmin`` of ``G = CE_support + lam/2 ||phi - theta||^2`` with
           ``inner_steps`` of gradient descent; implicit backward with CG
imaml_hf   the same ``G`` solved by Hessian-free Newton (``"newton_cg"``: 5 CG
           steps per direction, a line search, 3 iterations)
maml       ``bl.unrolled.maml``: back-propagation through the GD path on ``CE_support``
fomaml     ``bl.unrolled.first_order_maml``: ``dphi/dtheta = I``
reptile    ``theta - phi`` after ``inner_steps`` of GD (Nichol et al., 2018)
========== =========================================================================

The tasks of a meta-batch go through :func:`torch.func.vmap` together where the
algorithm allows it (``imaml_gd`` with a fixed ``lam``); the loop over tasks
stays as the reference, and the tests check both give the same meta-gradient.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

_T = TypeVar("_T")

__all__ = ["ALGORITHMS", "CURVATURES", "TASK_DIAGNOSTICS", "AlgorithmConfig", "MetaLearner", "TaskBatch"]

ALGORITHMS = ("imaml_gd", "imaml_hf", "maml", "fomaml", "reptile")
#: Curvatures of iMAML's backward linear system (:attr:`AlgorithmConfig.curvature`).
CURVATURES = ("exact", "gauss_newton", "gauss_newton_jacobian")


@dataclass
class TaskBatch:
    """A meta-batch of episodes: support ``(B, N*K, C, H, W)`` / ``(B, N*K)``, query likewise."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``i``-th episode's four tensors."""
        return self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i]


@dataclass
class AlgorithmConfig:
    """Hyper-parameters of a meta-learning algorithm.

    Attributes
    ----------
    name:
        One of :data:`ALGORITHMS`.
    inner_steps:
        Gradient steps of the inner loop (``imaml_gd``, ``maml``, ``fomaml``, ``reptile``).
    inner_lr:
        Step size of those steps.
    lam:
        Proximal strength of iMAML's ``G`` (the paper: 2.0 on Omniglot).
    cg_steps:
        CG iterations of the implicit backward (the paper: 5).
    hf_iterations, hf_cg_steps:
        Newton iterations and CG steps per Newton direction for ``imaml_hf`` (the paper: 3 and 5).
    learn_lam:
        Learn a per-parameter ``lam`` (as ``exp(log_lam)``) with the outer optimiser.
    vmap:
        Process the tasks of a meta-batch together with :func:`torch.func.vmap` where possible.
    damping:
        Tikhonov damping of the backward linear system only, ``(H_G + damping I) v = g``
        (:class:`bilevel.linalg.CG`'s ``damping``): a remedy for an indefinite inner
        Hessian early in training, at the price of a biased meta-gradient. 0 disables it.
    negative_curvature:
        What a task's meta-gradient is when CG meets negative curvature (the inner Hessian
        is indefinite at ``phi``): ``"first_order"`` (default) uses ``grad_phi L_query``, i.e.
        ``(I + H/lam)^{-1}`` replaced by ``I`` for that task; ``"truncate"`` keeps CG's last
        iterate (bilevel's behaviour). Measured in ``applications/imaml/README.md``. The
        vmap path selects per task with ``torch.where`` on CG's negative-curvature flag.
    curvature:
        The curvature in iMAML's backward linear system: ``"exact"`` (default; the Hessian of
        the support loss, reverse-over-reverse products on the loop path, forward-over-reverse
        under vmap) or ``"gauss_newton"`` (its Gauss-Newton matrix through the network's
        logits: positive semi-definite, so CG never meets negative curvature, and less than half
        the memory; ``hvp="gauss_newton"`` in :func:`bilevel.hypergradient`), or
        ``"gauss_newton_jacobian"``: the same matrix with the logits' Jacobian on the support set
        built once per task, so that CG's products cost almost nothing (for small support sets:
        5-way 1-shot has 25 logits).
    """

    name: str
    inner_steps: int = 16
    inner_lr: float = 0.1
    lam: float = 2.0
    cg_steps: int = 5
    hf_iterations: int = 3
    hf_cg_steps: int = 5
    learn_lam: bool = False
    vmap: bool = True
    damping: float = 0.0
    negative_curvature: str = "first_order"
    curvature: str = "exact"

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.name!r}; available: {', '.join(ALGORITHMS)}.")
        for key in ("inner_steps", "cg_steps", "hf_iterations", "hf_cg_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}.")
        for key in ("inner_lr", "lam"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a positive number, got {value!r}.")
        if self.negative_curvature not in ("first_order", "truncate"):
            raise ValueError(f"negative_curvature must be 'first_order' or 'truncate', got {self.negative_curvature!r}.")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {', '.join(map(repr, CURVATURES))}, got {self.curvature!r}.")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


#: Per-task facts that decide a meta-gradient's quality, summarised per meta-step by :meth:`MetaLearner.meta_gradient`
#: (mean and max over the tasks, as ``<name>_mean`` / ``<name>_max``): the inner stationarity
#: ``||grad_phi G||`` at the end of the inner loop, CG's relative residual ``||b - A v|| / ||b||`` (loop path only)
#: and the norm of the task's meta-gradient.
TASK_DIAGNOSTICS = ("inner_grad_norm", "cg_relative_residual", "task_grad_norm")


def _summarise(diagnostics: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for key, values in diagnostics.items():
        if values:
            out[f"{key}_mean"] = sum(values) / len(values)
            out[f"{key}_max"] = max(values)
    return out


class MetaLearner:
    """Computes meta-gradients and adapted parameters for one algorithm.

    Parameters
    ----------
    model:
        The network (its own parameters are ignored: ``theta`` is passed in).
    config:
        The algorithm's hyper-parameters.
    workers:
        Tasks processed at once (default 1: one after the other). With ``workers > 1`` the tasks of a
        meta-batch (and the episodes of :func:`applications.imaml.train.evaluate`) run on that many
        threads, each with one torch thread inside (:meth:`map`). On a CPU this beats the same number
        of threads inside each small operation of one task (see ``applications/imaml/README.md``); the
        meta-gradient is summed in task order, so a run is reproducible for a given ``workers``
        (other values change it only by rounding). Used by ``imaml_gd`` with the first-order fallback
        (the default) and by evaluation; the other algorithms go one task at a time.

    Examples
    --------
    >>> from applications.imaml.model import ConvNet, init_params
    >>> net = ConvNet(3)
    >>> theta = init_params(net)
    >>> learner = MetaLearner(net, AlgorithmConfig("imaml_gd", inner_steps=2))
    >>> g = torch.Generator().manual_seed(0)
    >>> batch = TaskBatch(torch.rand(2, 3, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 1),
    ...                   torch.rand(2, 3, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 1))
    >>> stats = learner.meta_gradient(theta, batch)
    >>> sorted(stats), theta["head.weight"].grad.shape
    (['negative_curvature', 'query_accuracy', 'query_loss', 'task_grad_norm_max', 'task_grad_norm_mean'], torch.Size([3, 64]))
    """

    def __init__(self, model: nn.Module, config: AlgorithmConfig, *, workers: int = 1):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive int (tasks adapted at once on CPU threads), got {workers!r}.")
        self.model = model
        self.config = config
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        c = config
        self.inner_gd = bl.solvers.get("gd", step_size=c.inner_lr, max_iter=c.inner_steps, tol=0.0)
        self.inner_hf = bl.solvers.get("newton_cg", max_iter=c.hf_iterations, cg_max_iter=c.hf_cg_steps, tol=0.0)
        self.linear = bl.linalg.get("cg", max_iter=c.cg_steps, tol=0.0, damping=c.damping)
        gauss_newton = c.curvature != "exact"
        self.hvp_loop = c.curvature if gauss_newton else "reverse"  # one task at a time
        self.hvp_vmap = c.curvature if gauss_newton else "forward"  # under torch.func.vmap

    def map(self, fn: Callable[[int], _T], n: int) -> list[_T]:
        """``[fn(0), ..., fn(n - 1)]``, on :attr:`workers` threads with one torch thread each.

        Serial when ``workers == 1`` or ``n == 1``. Otherwise torch's intra-op threads are set to 1
        for the duration (each worker is one CPU core) and restored afterwards; the results come back
        in index order. ``fn`` must not enter :func:`warnings.catch_warnings` (not thread-safe):
        the caller sets warning filters around the whole call instead.

        Examples
        --------
        >>> from applications.imaml.model import ConvNet
        >>> MetaLearner(ConvNet(3), AlgorithmConfig("imaml_gd"), workers=2).map(lambda i: i * i, 4)
        [0, 1, 4, 9]
        """
        if self.workers == 1 or n <= 1:
            return [fn(i) for i in range(n)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="imaml-task")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return list(self._pool.map(fn, range(n)))
        finally:
            torch.set_num_threads(threads)

    # -- the task loss and problems --------------------------------------------------------------
    def logits(self, phi: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The network's logits with parameters ``phi``."""
        return torch.func.functional_call(self._module(), phi, (x,))

    def _module(self) -> nn.Module:
        """:attr:`model`, or in a worker thread of :meth:`map` that thread's own copy of it.

        ``functional_call`` swaps the parameters into the module while it runs, so two threads must
        never share one module.
        """
        if self.workers == 1 or threading.current_thread() is threading.main_thread():
            return self.model
        model = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = copy.deepcopy(self.model)
        return model

    def loss(self, phi: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of ``phi`` on ``data = (x, y)``."""
        x, y = data
        return F.cross_entropy(self.logits(phi, x), y)

    def predict(self, phi: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The logits on ``data = (x, y)``'s inputs (the predictor of :meth:`proximal_problem`'s loss)."""
        return self.logits(phi, data[0])

    def proximal_problem(self, lam: Any) -> bl.ProximalProblem:
        """iMAML's inner problem with strength ``lam`` (a float or a tree like theta).

        Its loss is a :class:`bilevel.PredictionLoss` (cross-entropy of :meth:`predict`), the
        same value as :meth:`loss`, so that Gauss-Newton curvature is available.
        """
        return bl.ProximalProblem(bl.PredictionLoss(self.predict, "cross_entropy"), lam)

    def plain_problem(self) -> bl.InnerProblem:
        """The unregularised training loss as an inner problem (MAML, first-order MAML, Reptile)."""
        return bl.InnerProblem(lambda phi, theta, data: self.loss(phi, data), name="cross_entropy")

    def lam_value(self, log_lam: dict[str, torch.Tensor] | None) -> Any:
        """``lam`` for the problem: the configured float, or ``exp(log_lam)`` when it is learned."""
        if log_lam is None:
            return float(self.config.lam)
        return {k: torch.exp(v) for k, v in log_lam.items()}

    # -- adaptation (used by training and evaluation) ----------------------------------------------
    def adapt(self, theta: dict[str, torch.Tensor], support_x: torch.Tensor, support_y: torch.Tensor,
              log_lam: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Task-specific parameters from the support set, without any graph (evaluation)."""
        c = self.config
        data = (support_x, support_y)
        detached = {k: v.detach() for k, v in theta.items()}
        if c.name in ("imaml_gd", "imaml_hf"):
            lam = self.lam_value(None if log_lam is None else {k: v.detach() for k, v in log_lam.items()})
            solver = self.inner_gd if c.name == "imaml_gd" else self.inner_hf
            return bl.solve(self.proximal_problem(lam), detached, data, solver=solver).phi
        return bl.solve(self.plain_problem(), detached, data, solver=self.inner_gd).phi

    # -- meta-gradients ----------------------------------------------------------------------------
    def meta_gradient(self, theta: dict[str, torch.Tensor], batch: TaskBatch,
                      log_lam: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient averaged over ``batch``'s tasks into ``theta``'s ``.grad``.

        Returns the mean query loss and accuracy after adaptation, and how many
        tasks' backward linear solves met negative curvature (``imaml_*``).
        """
        c = self.config
        if c.name == "imaml_gd" and c.vmap and log_lam is None:
            return self._imaml_vmap(theta, batch)
        if c.name == "imaml_gd" and log_lam is None and c.negative_curvature == "first_order":
            return self._imaml_tasks(theta, batch)
        stats = {"query_loss": 0.0, "query_accuracy": 0.0, "negative_curvature": 0}
        diagnostics: dict[str, list[float]] = {}
        n = len(batch)
        for i in range(n):
            xs, ys, xq, yq = batch.task(i)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", bl.ConvergenceWarning)
                if c.name == "reptile":
                    phi = self.adapt(theta, xs, ys)
                    for k, t in theta.items():  # Reptile's direction theta - phi, used as a gradient
                        t.grad = (t.grad if t.grad is not None else torch.zeros_like(t)) + (t.detach() - phi[k]) / n
                    logits = self.logits(phi, xq)
                else:
                    phi = self._differentiable_phi(theta, xs, ys, log_lam)
                    logits = self.logits(phi, xq)
                    (F.cross_entropy(logits, yq) / n).backward()
            stats["negative_curvature"] += sum(isinstance(w.message, bl.NegativeCurvatureWarning) for w in caught)
            with torch.no_grad():
                stats["query_loss"] += float(F.cross_entropy(logits, yq)) / n
                stats["query_accuracy"] += float((logits.argmax(-1) == yq).float().mean()) / n
        stats.update(_summarise(diagnostics))
        return stats

    def _imaml_tasks(self, theta: dict[str, torch.Tensor], batch: TaskBatch) -> dict[str, float]:
        """iMAML with the first-order fallback, task by task (on :attr:`workers` threads), summed in task order."""
        n = len(batch)
        detached = {k: v.detach() for k, v in theta.items()}
        with warnings.catch_warnings():  # set here, around every worker: catch_warnings is not thread-safe
            warnings.simplefilter("ignore", bl.ConvergenceWarning)  # reported through info.status instead
            results = self.map(lambda i: self._imaml_task(detached, *batch.task(i)), n)
        stats = {"query_loss": 0.0, "query_accuracy": 0.0, "negative_curvature": 0}
        diagnostics: dict[str, list[float]] = {}
        for i, (grad, logits, negative, facts) in enumerate(results):
            for k, t in theta.items():
                t.grad = grad[k] / n if t.grad is None else t.grad + grad[k] / n
            stats["negative_curvature"] += int(negative)
            for key, value in facts.items():
                diagnostics.setdefault(key, []).append(value)
            yq = batch.query_y[i]
            with torch.no_grad():
                stats["query_loss"] += float(F.cross_entropy(logits, yq)) / n
                stats["query_accuracy"] += float((logits.argmax(-1) == yq).float().mean()) / n
        stats.update(_summarise(diagnostics))
        return stats

    def _imaml_task(self, detached, xs, ys, xq, yq):
        """One task's iMAML meta-gradient with the first-order fallback at negative curvature.

        Returns ``(grad, query logits at phi, negative curvature met, diagnostics)``; touches no shared state.
        """
        problem = self.proximal_problem(float(self.config.lam))
        data = (xs, ys)
        solved = bl.solve(problem, detached, data, solver=self.inner_gd)
        phi = solved.phi

        seen: dict[str, torch.Tensor] = {}

        def outer(p, t):
            logits = self.logits(p, xq)
            seen.setdefault("logits", logits.detach())  # the query logits at phi (first call: autograd's)
            return F.cross_entropy(logits, yq)

        # the solve's result: its last ||grad G|| is reused, not computed again
        grad, info = bl.hypergradient(problem, outer, detached, solved, data, linear_solver=self.linear,
                                      hvp=self.hvp_loop)
        negative = info.status is bl.LinearSolveStatus.NEGATIVE_CURVATURE
        if negative:  # (I + H/lam)^-1 ~ I: the first-order (FOMAML) direction grad_phi L_query
            grad = torch.func.grad(outer)(phi, detached)
        facts = {"inner_grad_norm": info.inner_grad_norm, "cg_relative_residual": info.relative_residual,
                 "task_grad_norm": float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grad.values()])))}
        return grad, seen["logits"], negative, facts

    def _differentiable_phi(self, theta, xs, ys, log_lam):
        c = self.config
        data = (xs, ys)
        if c.name in ("imaml_gd", "imaml_hf"):
            problem = self.proximal_problem(self.lam_value(log_lam))
            solver = self.inner_gd if c.name == "imaml_gd" else self.inner_hf
            return bl.argmin(problem, theta, data, solver=solver, linear_solver=self.linear, hvp=self.hvp_loop)
        if c.name == "maml":
            return bl.unrolled.maml(self.plain_problem(), theta, data, step_size=c.inner_lr, num_steps=c.inner_steps)
        return bl.unrolled.first_order_maml(self.plain_problem(), theta, data, step_size=c.inner_lr,
                                            num_steps=c.inner_steps)

    def _imaml_vmap(self, theta: dict[str, torch.Tensor], batch: TaskBatch) -> dict[str, float]:
        """All tasks at once: ``torch.func.vmap`` over solve + implicit hypergradient (forward-mode products)."""
        problem = self.proximal_problem(float(self.config.lam))
        detached = {k: v.detach() for k, v in theta.items()}

        def one_task(xs, ys, xq, yq):
            data = (xs, ys)
            phi = bl.solve(problem, detached, data, solver=self.inner_gd).phi

            def outer(p, t):
                return F.cross_entropy(self.logits(p, xq), yq)

            grad, info = bl.hypergradient(problem, outer, detached, phi, data, linear_solver=self.linear,
                                          hvp=self.hvp_vmap)
            negative = info.linear_solve.extra.get("negative_curvature", torch.zeros((), dtype=torch.bool))
            # per task, without a branch; Gauss-Newton systems (lam I + PSD) have no negative curvature
            if self.config.negative_curvature == "first_order" and self.config.curvature == "exact":
                first_order = torch.func.grad(outer)(phi, detached)
                grad = {k: torch.where(negative, first_order[k], g) for k, g in grad.items()}
            logits = self.logits(phi, xq)
            return (grad, F.cross_entropy(logits, yq), (logits.argmax(-1) == yq).float().mean(),
                    negative.to(logits.dtype))

        grads, losses, accs, negative = torch.func.vmap(one_task)(batch.support_x, batch.support_y,
                                                                  batch.query_x, batch.query_y)
        for k, t in theta.items():
            g = grads[k].mean(0)
            t.grad = g if t.grad is None else t.grad + g
        task_norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]), dim=0)
        return {"query_loss": float(losses.mean()), "query_accuracy": float(accs.mean()),
                "negative_curvature": int(negative.sum()), **_summarise({"task_grad_norm": task_norms.tolist()})}
