"""The peers' own examples, written again here from their published settings, one hypergradient per call.

Three examples, each computed by every implementation that can run here:

``logistic``
    hypertorch's ``examples/logistic_regression.ipynb`` (prolearner/hypertorch): per-feature L2
    weights of a logistic regression tuned on a validation split; 100 steps of the gradient-descent
    fixed-point map, then 10 conjugate-gradient steps.
``imaml``
    TorchOpt's ``tutorials/5_Implicit_Differentiation.ipynb`` (metaopt/torchopt): one iMAML task, a
    linear model adapting to 20 points under a proximal term; 100 SGD steps, a 5-step linear solve.
``ridge``
    JAXopt's ``examples/implicit_diff/ridge_reg_implicit_diff.py`` (google/jaxopt): ridge regression
    on scikit-learn's diabetes data, the inner problem solved by conjugate gradient inside
    ``custom_root``; the hypergradient with respect to the log of the L2 weight.

The code is this project's own, written from the settings of those files (cited in each
builder's docstring); none of theirs is copied. For every example there are:

``bilevel``
    the public API only (``bl.argmin``, ``bl.InnerProblem`` / ``bl.ProximalProblem``, solver objects
    from ``bl.solvers.get`` / ``bl.linalg.get``), written as a user would; the solver and
    linear-solver objects are arguments, so a compiled variant can be plugged in;
``bilevel_compiled``
    the same problem through :func:`bilevel.compiled_hypergradient`: inner solve, linear solve and
    hypergradient as one ``torch.compile`` graph on fixed budgets (the example's own budgets; the
    settings say where a budget replaces a tolerance);
``hand_written``
    plain ``torch.autograd`` and a textbook conjugate gradient (:func:`conjugate_gradient`) doing the
    same steps;
the peers
    ``hypertorch``, ``torchopt``, ``jaxopt_jit`` and ``jaxopt`` (un-jitted), imported lazily; a
    missing one raises :class:`Unavailable` with the reason.

A factory takes the example's data and returns a callable of no arguments that computes one
hypergradient from scratch (inner solve and backward) and returns it; :func:`as_vector` turns
any of the results into one flat float64 NumPy vector so that they can be compared. Every
implementation of an example computes the same quantity, so they agree up to the rounding of
their (float32) arithmetic and of their linear solvers' tolerances: :func:`check_agreement`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import bilevel as bl  # noqa: E402

__all__ = ["Example", "EXAMPLES", "Unavailable", "conjugate_gradient", "as_vector", "check_agreement",
           "compile_status", "peer_versions", "PYTORCH_PEERS", "JAX_REFERENCE"]

#: The PyTorch peers; ratios are taken to the fastest of those that ran.
PYTORCH_PEERS = ("hypertorch", "torchopt")
#: The implementation the compiled path is measured against on the ridge example.
JAX_REFERENCE = "jaxopt_jit"


class Unavailable(RuntimeError):
    """An implementation that cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# shared pieces


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, max_iter: int,
                       rtol: float = 0.0, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Textbook conjugate gradient on ``A x = b``, ``A`` symmetric positive definite, on 1-D tensors.

    Runs ``max_iter`` steps, or fewer once ``||b - A x|| <= rtol ||b||`` (checked only when
    ``rtol > 0``, since the check reads the residual back every step). Starts from ``x0``, or
    from zero without spending a product on it.

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0]), max_iter=2)
    tensor([0.0909, 0.6364])
    """
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    p = r.clone()
    rr = r.dot(r)
    stop = rtol ** 2 * float(b.dot(b)) if rtol > 0 else None
    for _ in range(max_iter):
        if stop is not None and float(rr) <= stop:
            break
        Ap = matvec(p)
        alpha = rr / p.dot(Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_next = r.dot(r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x


def as_vector(result: Any) -> np.ndarray:
    """One flat float64 NumPy vector from a tensor, a JAX array, or a list / tuple / dict of them."""
    if isinstance(result, dict):
        return np.concatenate([as_vector(v) for v in result.values()])
    if isinstance(result, (list, tuple)):
        return np.concatenate([as_vector(v) for v in result])
    if isinstance(result, torch.Tensor):
        return result.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return np.asarray(result, dtype=np.float64).reshape(-1)


def check_agreement(results: dict[str, np.ndarray], reference: str, rtol: float) -> dict[str, float]:
    """Relative differences ``||g - g_ref|| / ||g_ref||`` of every result to ``results[reference]``.

    Raises ``ValueError`` naming the implementations that differ by more than ``rtol`` (then the
    timings would not compare the same work).
    """
    ref = results[reference]
    scale = max(float(np.linalg.norm(ref)), np.finfo(np.float64).tiny)
    diffs = {name: float(np.linalg.norm(vec - ref)) / scale for name, vec in results.items()}
    bad = {name: d for name, d in diffs.items() if not d <= rtol}
    if bad:
        listing = ", ".join(f"{name}: {d:.2e}" for name, d in sorted(bad.items()))
        raise ValueError(f"these implementations disagree with {reference} by more than rtol={rtol:g} "
                         f"(relative norm of the difference): {listing}. They do not compute the same "
                         f"hypergradient, so their timings would not compare the same work.")
    return diffs


def compile_status() -> tuple[bool, str]:
    """Whether ``bl.compiled_hypergradient`` exists at this commit, and a sentence saying so."""
    if hasattr(bl, "compiled_hypergradient"):
        return True, "bl.compiled_hypergradient is available"
    return False, "not available at this commit: bilevel has no compiled_hypergradient"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hypergrad_module():
    """prolearner/hypertorch's ``hypergrad`` module, or :class:`Unavailable` with the reason."""
    try:
        module = importlib.import_module("hypergrad")
    except ImportError:
        raise Unavailable(
            "not installed: prolearner/hypertorch (module `hypergrad`) is not on PyPI. PyPI's `hypertorch` "
            "is an unrelated hypergraph-learning library (it also pins torch<2.13) and PyPI's `hypergrad` is "
            "moskomule/hypergrad, another project; install the GitHub repository's code to include it."
        ) from None
    if not all(hasattr(module, name) for name in ("CG", "fixed_point", "reverse_unroll")):
        raise Unavailable(f"the installed `hypergrad` ({getattr(module, '__file__', '?')}) is not "
                          f"prolearner/hypertorch's: it has no hypergrad.CG / fixed_point / reverse_unroll.")
    return module


def _torchopt():
    try:
        return importlib.import_module("torchopt")
    except ImportError:
        raise Unavailable("not installed (pip install torchopt)") from None


def _jax():
    """``(jax, jax.numpy)``, on the CPU and, unless ``XLA_FLAGS`` is already set, with one thread."""
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    try:
        jax = importlib.import_module("jax")
        importlib.import_module("jaxopt")
    except ImportError as err:
        raise Unavailable(f"not installed ({err.name}; pip install jax jaxopt)") from None
    return jax, importlib.import_module("jax.numpy")


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the peers (``None``: not installed). ``hypertorch`` is the distribution
    of that name, whatever it is; :func:`_hypergrad_module` checks the module itself."""
    return {name: _version(name) for name in ("hypertorch", "hypergrad", "torchopt", "jax", "jaxlib", "jaxopt",
                                              "higher")}


@dataclass
class Example:
    """One peer example: how to build its data, and a factory per implementation."""

    name: str
    title: str
    source: str
    settings: str
    build: Callable[..., Any]
    factories: dict[str, Callable[[Any], Callable[[], Any]]]
    #: Relative norm of the difference to ``hand_written`` that the implementations must stay under.
    rtol: float
    notes: list[str] = field(default_factory=list)


def _bilevel_compiled(factory: Callable[[Any], tuple[Any, Callable[[Any], Any]]]):
    """The ``bilevel_compiled`` factory of an example.

    ``factory(data)`` returns ``(hg, call)``: a :func:`bilevel.compiled_hypergradient` and
    ``call(hg) -> hypergradient``. The first two calls run here (the eager one, then the one that
    compiles), so that the agreement check and the timings see the compiled graph; a diagnostic the
    graph reads back (a budget too short for its tolerance) is an error here, not a warning.
    """
    def make(data):
        available, reason = compile_status()
        if not available:
            raise Unavailable(reason)
        hg, call = factory(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", bl.ConvergenceWarning)
            call(hg)
            call(hg)
        return lambda: call(hg)
    return make


# ---------------------------------------------------------------------------------------------
# 1. hypertorch: logistic regression with per-feature L2 weights


@dataclass
class LogisticData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    hparams: torch.Tensor


LOGISTIC = dict(n=1000, d=20, val_fraction=0.5, seed=1, inner_lr=0.1, inner_steps=100, cg_steps=10)


def logistic_data(dtype: torch.dtype = torch.float32) -> LogisticData:
    """The data of prolearner/hypertorch ``examples/logistic_regression.ipynb``.

    n = 1000 points in d = 20 dimensions drawn with NumPy's seed 1: an oracle ``w ~ N(0, I)``,
    ``x ~ N(0, I)``, labels ``1[x w + 0.1 N(0, 1) > 0]``, split in halves by scikit-learn's
    ``train_test_split`` drawing from the same NumPy stream (as the notebook does through the global
    seed). The hyperparameters are one L2 weight per feature, all ones.
    """
    from sklearn.model_selection import train_test_split

    s = LOGISTIC
    rng = np.random.RandomState(s["seed"])
    w_oracle = rng.randn(s["d"])
    x = rng.randn(s["n"], s["d"])
    y = (x @ w_oracle + 0.1 * rng.randn(s["n"]) > 0.0).astype(float)
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=s["val_fraction"], random_state=rng)
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return LogisticData(t(x_tr), t(y_tr), t(x_val), t(y_val), torch.ones(s["d"], dtype=dtype))


def logistic_inner(w: torch.Tensor, h: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Training cross-entropy plus ``1/2 sum_i h_i w_i^2``."""
    x, y = data
    return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (h * w * w).sum()


def logistic_bilevel(data: LogisticData, *, solver=None, linear_solver=None) -> Callable[[], torch.Tensor]:
    s = LOGISTIC
    solver = solver or bl.solvers.get("gd", step_size=s["inner_lr"], max_iter=s["inner_steps"], tol=0.0)
    linear_solver = linear_solver or bl.linalg.get("cg", max_iter=s["cg_steps"], tol=0.0)
    problem = bl.InnerProblem(logistic_inner)
    train = (data.x_train, data.y_train)
    h = data.hparams.clone().requires_grad_(True)
    w0 = torch.zeros_like(data.hparams)

    def hypergradient():
        w = bl.argmin(problem, h, train, solver=solver, linear_solver=linear_solver, phi0=w0)
        val_loss = F.binary_cross_entropy_with_logits(data.x_val @ w, data.y_val)
        return torch.autograd.grad(val_loss, h)[0]
    return hypergradient


def logistic_compiled(data: LogisticData):
    s = LOGISTIC
    hg = bl.compiled_hypergradient(
        bl.InnerProblem(logistic_inner),
        lambda w, h: F.binary_cross_entropy_with_logits(data.x_val @ w, data.y_val),
        solver=bl.solvers.get("gd", step_size=s["inner_lr"], max_iter=s["inner_steps"], tol=0.0),
        linear_solver=bl.linalg.get("cg", max_iter=s["cg_steps"], tol=0.0))
    train, h, w0 = (data.x_train, data.y_train), data.hparams.clone(), torch.zeros_like(data.hparams)
    return hg, lambda hg: hg(h, train, phi0=w0)[0]


def logistic_hand_written(data: LogisticData) -> Callable[[], torch.Tensor]:
    s = LOGISTIC
    train = (data.x_train, data.y_train)
    h = data.hparams.clone().requires_grad_(True)

    def hypergradient():
        w = torch.zeros_like(data.hparams)
        for _ in range(s["inner_steps"]):
            w = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(logistic_inner(w, h.detach(), train), w)
            w = w - s["inner_lr"] * g
        w = w.detach().requires_grad_(True)
        (grad_w,) = torch.autograd.grad(logistic_inner(w, h, train), w, create_graph=True)
        (b,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(data.x_val @ w, data.y_val), w)
        v = conjugate_gradient(lambda u: torch.autograd.grad(grad_w, w, u, retain_graph=True)[0], b,
                               max_iter=s["cg_steps"])
        return -torch.autograd.grad(grad_w, h, v)[0]
    return hypergradient


def logistic_hypertorch(data: LogisticData) -> Callable[[], torch.Tensor]:
    """hypertorch's own method for its example: ``hg.CG`` on the gradient-descent map.

    Not run in this project (the package is not installable from PyPI); written against
    prolearner/hypertorch ``hypergrad/hypergradients.py`` and guarded by the agreement check.
    """
    hg = _hypergrad_module()
    s = LOGISTIC
    train = (data.x_train, data.y_train)
    hparams = [data.hparams.clone().requires_grad_(True)]

    def gd_map(params, hp):
        (g,) = torch.autograd.grad(logistic_inner(params[0], hp[0], train), params, create_graph=True)
        return [params[0] - s["inner_lr"] * g]

    def val_loss(params, hp):
        return F.binary_cross_entropy_with_logits(data.x_val @ params[0], data.y_val)

    def hypergradient():
        w = torch.zeros_like(data.hparams)
        for _ in range(s["inner_steps"]):
            w = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(logistic_inner(w, hparams[0].detach(), train), w)
            w = w - s["inner_lr"] * g
        return hg.CG([w.detach()], hparams, K=s["cg_steps"], fp_map=gd_map, outer_loss=val_loss, set_grad=False)[0]
    return hypergradient


def logistic_torchopt(data: LogisticData) -> Callable[[], torch.Tensor]:
    """TorchOpt's ``custom_root`` on the gradient of the inner objective, ``torchopt.sgd`` inside and
    plain CG for the linear solve, 10 steps with both tolerances at zero (so that it runs all ten)."""
    torchopt = _torchopt()
    s = LOGISTIC
    train = (data.x_train, data.y_train)
    h = data.hparams.clone().requires_grad_(True)

    def stationarity(w, hp, x, y):
        return torch.func.grad(logistic_inner)(w, hp, (x, y))

    @torchopt.diff.implicit.custom_root(stationarity, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(maxiter=s["cg_steps"], rtol=0.0,
                                                                             atol=0.0))
    def inner_solve(w, hp, x, y):
        optimizer = torchopt.sgd(lr=s["inner_lr"])
        state = optimizer.init(w)
        with torch.enable_grad():
            for _ in range(s["inner_steps"]):
                (grad,) = torch.autograd.grad(logistic_inner(w, hp, (x, y)), w)
                updates, state = optimizer.update(grad, state, inplace=True)
                w = torchopt.apply_updates(w, updates, inplace=True)
        return w

    def hypergradient():
        w0 = torch.zeros_like(data.hparams).requires_grad_(True)
        w = inner_solve(w0, h, *train)
        return torch.autograd.grad(F.binary_cross_entropy_with_logits(data.x_val @ w, data.y_val), h)[0]
    return hypergradient


# ---------------------------------------------------------------------------------------------
# 2. TorchOpt: one iMAML task (proximal inner problem)


@dataclass
class IMAMLData:
    x: torch.Tensor
    y: torch.Tensor
    theta: dict[str, torch.Tensor]
    lam: float


IMAML = dict(n=20, dim=4, seed=0, noise=0.5, lam=1.0, inner_lr=2e-2, inner_steps=100, solve_steps=5)


def imaml_data(dtype: torch.dtype = torch.float32) -> IMAMLData:
    """The data of metaopt/torchopt ``tutorials/5_Implicit_Differentiation.ipynb``.

    Torch's seed 0 (a ``torch.Generator`` seeded 0 draws the same numbers as ``torch.manual_seed(0)``):
    ``x ~ N(0, I)`` of shape (20, 4), a true weight (4, 1) and bias (1) ``~ N(0, 1)``, targets
    ``x w + b + 0.5 N(0, 1)``. The meta-parameters are those of ``nn.Linear(4, 1)`` with the weight
    set to ones and the bias to zero.
    """
    s = IMAML
    g = torch.Generator().manual_seed(s["seed"])
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32)  # noqa: E731  (float32, as there)
    x, w, b = draw(s["n"], s["dim"]), draw(s["dim"], 1), draw(1)
    y = x @ w + b + s["noise"] * draw(s["n"], 1)
    theta = {"weight": torch.ones(1, s["dim"], dtype=dtype), "bias": torch.zeros(1, dtype=dtype)}
    return IMAMLData(x.to(dtype), y.to(dtype), theta, s["lam"])


def imaml_predict(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The linear model ``x W^T + b`` (what ``nn.Linear`` computes)."""
    return F.linear(x, params["weight"], params["bias"])


def imaml_train_loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return F.mse_loss(imaml_predict(params, x), y)


def imaml_bilevel(data: IMAMLData, *, solver=None, linear_solver=None) -> Callable[[], torch.Tensor]:
    s = IMAML
    solver = solver or bl.solvers.get("gd", step_size=s["inner_lr"], max_iter=s["inner_steps"], tol=0.0)
    linear_solver = linear_solver or bl.linalg.get("cg", max_iter=s["solve_steps"], tol=0.0)
    problem = bl.ProximalProblem(imaml_train_loss, lam=data.lam)
    theta = {k: v.clone().requires_grad_(True) for k, v in data.theta.items()}

    def hypergradient():
        phi = bl.argmin(problem, theta, (data.x, data.y), solver=solver, linear_solver=linear_solver)
        outer = imaml_predict(phi, data.x).mean()
        return torch.autograd.grad(outer, list(theta.values()))
    return hypergradient


def imaml_compiled(data: IMAMLData):
    s = IMAML
    hg = bl.compiled_hypergradient(
        bl.ProximalProblem(imaml_train_loss, lam=data.lam),
        lambda phi, theta: imaml_predict(phi, data.x).mean(),
        solver=bl.solvers.get("gd", step_size=s["inner_lr"], max_iter=s["inner_steps"], tol=0.0),
        linear_solver=bl.linalg.get("cg", max_iter=s["solve_steps"], tol=0.0))
    theta = {k: v.clone() for k, v in data.theta.items()}
    return hg, lambda hg: tuple(hg(theta, (data.x, data.y))[0].values())


def imaml_hand_written(data: IMAMLData) -> Callable[[], tuple[torch.Tensor, ...]]:
    s = IMAML
    names = list(data.theta)
    theta = [data.theta[k] for k in names]
    sizes = [t.numel() for t in theta]

    def as_dict(flat):
        return dict(zip(names, (p.view_as(t) for p, t in zip(flat.split(sizes), theta))))

    def G(flat):
        prox = 0.5 * data.lam * sum(((p - t) ** 2).sum() for p, t in zip(flat.split(sizes), theta))
        return imaml_train_loss(as_dict(flat), (data.x, data.y)) + prox

    def hypergradient():
        phi = torch.cat([t.reshape(-1) for t in theta])
        for _ in range(s["inner_steps"]):
            phi = phi.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(G(phi), phi)
            phi = phi - s["inner_lr"] * g
        phi = phi.detach().requires_grad_(True)
        (grad_phi,) = torch.autograd.grad(G(phi), phi, create_graph=True)
        (b,) = torch.autograd.grad(imaml_predict(as_dict(phi), data.x).mean(), phi)
        v = conjugate_gradient(lambda u: torch.autograd.grad(grad_phi, phi, u, retain_graph=True)[0], b,
                               max_iter=s["solve_steps"])
        return tuple((data.lam * v).split(sizes))  # dF/dtheta = lam H^-1 grad F for a proximal problem
    return hypergradient


def imaml_torchopt(data: IMAMLData) -> Callable[[], tuple[torch.Tensor, ...]]:
    """As the tutorial writes it: ``custom_root`` on ``grad`` of the inner objective, ``torchopt.sgd``
    with in-place updates from a copy of the meta-parameters, ``solve_normal_cg(maxiter=5, atol=0)``
    (the tutorial's ``functorch.make_functional`` model becomes a tuple of tensors here)."""
    torchopt = _torchopt()
    s = IMAML
    names = list(data.theta)
    meta = tuple(data.theta[k].clone().requires_grad_(True) for k in names)

    def objective(params, meta_params, x, y):
        prox = sum(0.5 * ((p - m) ** 2).sum() for p, m in zip(params, meta_params))
        return imaml_train_loss(dict(zip(names, params)), (x, y)) + data.lam * prox

    @torchopt.diff.implicit.custom_root(torch.func.grad(objective, argnums=0), argnums=1,
                                        solve=torchopt.linear_solve.solve_normal_cg(maxiter=s["solve_steps"],
                                                                                    atol=0))
    def inner_solve(params, meta_params, x, y):
        optimizer = torchopt.sgd(lr=s["inner_lr"])
        state = optimizer.init(params)
        with torch.enable_grad():
            for _ in range(s["inner_steps"]):
                grads = torch.autograd.grad(objective(params, meta_params, x, y), params)
                updates, state = optimizer.update(grads, state, inplace=True)
                params = torchopt.apply_updates(params, updates, inplace=True)
        return params

    def hypergradient():
        start = tuple(m.detach().clone().requires_grad_(True) for m in meta)
        phi = inner_solve(start, meta, data.x, data.y)
        outer = imaml_predict(dict(zip(names, phi)), data.x).mean()
        return torch.autograd.grad(outer, meta)
    return hypergradient


# ---------------------------------------------------------------------------------------------
# 3. JAXopt: ridge regression on the diabetes data, theta = log(l2reg)


@dataclass
class RidgeData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    theta: torch.Tensor


RIDGE = dict(test_size=0.33, split_seed=0, theta=1.0, inner_cg_steps=20, rtol=1e-5)


def ridge_data(dtype: torch.dtype = torch.float32) -> RidgeData:
    """The data of google/jaxopt ``examples/implicit_diff/ridge_reg_implicit_diff.py``.

    scikit-learn's diabetes set (442 x 10), each row scaled to unit norm
    (``preprocessing.normalize``), split 67/33 by ``train_test_split(test_size=0.33, random_state=0)``
    (296 training and 146 validation rows). ``theta = 1``, the outer variable: the inner L2 weight is
    ``exp(theta)``.
    """
    from sklearn import datasets, model_selection, preprocessing

    X, y = datasets.load_diabetes(return_X_y=True)
    X = preprocessing.normalize(X)
    x_tr, x_val, y_tr, y_val = model_selection.train_test_split(X, y, test_size=RIDGE["test_size"],
                                                                random_state=RIDGE["split_seed"])
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return RidgeData(t(x_tr), t(y_tr), t(x_val), t(y_val), torch.tensor(RIDGE["theta"], dtype=dtype))


def ridge_inner(w: torch.Tensor, theta: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``1/(2n) ||X w - y||^2 + exp(theta)/2 ||w||^2``: minimised by ``(X^T X + n e^theta I)^-1 X^T y``."""
    x, y = data
    r = x @ w - y
    return 0.5 * (r * r).mean() + 0.5 * torch.exp(theta) * (w * w).sum()


def ridge_validation(w: torch.Tensor, data: RidgeData) -> torch.Tensor:
    r = data.x_val @ w - data.y_val
    return (r * r).mean()


def ridge_bilevel(data: RidgeData, *, inner_cg=None, linear_solver=None) -> Callable[[], torch.Tensor]:
    """The inner problem is solved by a callable solver running ``inner_cg`` (a ``bl.linalg`` solver)
    on the normal equations, as the example solves it with ``solve_cg`` inside ``custom_root``.

    ``bl.argmin`` judges a callable's answer by ``||grad_phi G|| <= tol``: the tolerance given here
    is the stationarity that CG's relative residual ``1e-5`` guarantees, with a factor 10 of slack
    for the float32 rounding of the gradient's evaluation.
    """
    s = RIDGE
    inner_cg = inner_cg or bl.linalg.get("cg", max_iter=s["inner_cg_steps"], tol=s["rtol"], warn=False)
    linear_solver = linear_solver or bl.linalg.get("cg", tol=s["rtol"])
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    rhs = x.T @ y

    def ridge_cg(problem, theta, train, phi0):
        ridge = n * torch.exp(theta)
        w, _ = inner_cg(lambda u: x.T @ (x @ u) + ridge * u, rhs, x0=phi0)
        return w

    solver = bl.solvers.get(ridge_cg, tol=10 * s["rtol"] * float(rhs.norm()) / n)
    problem = bl.InnerProblem(ridge_inner)
    theta = data.theta.clone().requires_grad_(True)
    w0 = torch.zeros(x.shape[1], dtype=x.dtype)

    def hypergradient():
        w = bl.argmin(problem, theta, (x, y), solver=solver, linear_solver=linear_solver, phi0=w0)
        return torch.autograd.grad(ridge_validation(w, data), theta)[0]
    return hypergradient


#: The backward budget of the compiled ridge hypergradient: conjugate gradient solves a system of
#: dimension 10 (the diabetes features) in at most 10 iterations in exact arithmetic; the graph
#: checks the true residual against the tolerance on every call (a shortfall is a warning).
RIDGE_COMPILED_BACKWARD_ITERATIONS = 10


def ridge_compiled(data: RidgeData):
    """The inner solve is the same callable (CG on the normal equations, 20 iterations at most, frozen once its
    relative residual is 1e-5); the backward CG runs a fixed :data:`RIDGE_COMPILED_BACKWARD_ITERATIONS`
    iterations with the same tolerance, checked after the graph."""
    s = RIDGE
    n = data.x_train.shape[0]
    inner_cg = bl.linalg.get("cg", max_iter=s["inner_cg_steps"], tol=s["rtol"], warn=False)

    def ridge_cg(problem, theta, train, phi0):
        x, y = train
        ridge = n * torch.exp(theta)
        w, _ = inner_cg(lambda u: x.T @ (x @ u) + ridge * u, x.T @ y, x0=phi0)
        return w

    rhs_norm = float((data.x_train.T @ data.y_train).norm())
    hg = bl.compiled_hypergradient(
        bl.InnerProblem(ridge_inner), lambda w, theta: ridge_validation(w, data),
        solver=bl.solvers.get(ridge_cg, tol=10 * s["rtol"] * rhs_norm / n),
        linear_solver=bl.linalg.get("cg", max_iter=RIDGE_COMPILED_BACKWARD_ITERATIONS, tol=s["rtol"]))
    train, theta = (data.x_train, data.y_train), data.theta.clone()
    w0 = torch.zeros(data.x_train.shape[1], dtype=data.x_train.dtype)
    return hg, lambda hg: hg(theta, train, phi0=w0)[0]


def ridge_hand_written(data: RidgeData) -> Callable[[], torch.Tensor]:
    s = RIDGE
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    rhs = x.T @ y
    theta = data.theta.clone().requires_grad_(True)

    def hypergradient():
        ridge = n * torch.exp(theta.detach())
        w = conjugate_gradient(lambda u: x.T @ (x @ u) + ridge * u, rhs, max_iter=s["inner_cg_steps"], rtol=s["rtol"])
        w = w.requires_grad_(True)
        (grad_w,) = torch.autograd.grad(ridge_inner(w, theta, (x, y)), w, create_graph=True)
        (b,) = torch.autograd.grad(ridge_validation(w, data), w)
        v = conjugate_gradient(lambda u: torch.autograd.grad(grad_w, w, u, retain_graph=True)[0], b,
                               max_iter=100, rtol=s["rtol"])
        return -torch.autograd.grad(grad_w, theta, v)[0]
    return hypergradient


def ridge_torchopt(data: RidgeData) -> Callable[[], torch.Tensor]:
    """The JAXopt example in TorchOpt, whose ``custom_root`` and ``linear_solve`` mirror JAXopt's:
    ``solve_cg(ridge=n l2reg, init=w0, maxiter=20)`` inside, the default backward solve."""
    torchopt = _torchopt()
    s = RIDGE
    x, y = data.x_train, data.y_train
    theta = data.theta.clone().requires_grad_(True)

    def stationarity(w, l2reg, x, y):
        return torch.func.grad(_ridge_inner_l2)(w, l2reg, x, y)

    @torchopt.diff.implicit.custom_root(stationarity, argnums=1)
    def inner_solve(w0, l2reg, x, y):
        solve = torchopt.linear_solve.solve_cg(ridge=len(y) * l2reg, init=w0, maxiter=s["inner_cg_steps"])
        return solve(lambda u: x.T @ (x @ u), x.T @ y)

    def hypergradient():
        w = inner_solve(torch.zeros(x.shape[1], dtype=x.dtype), torch.exp(theta), x, y)
        return torch.autograd.grad(ridge_validation(w, data), theta)[0]
    return hypergradient


def _ridge_inner_l2(w, l2reg, x, y):
    r = x @ w - y
    return 0.5 * (r * r).mean() + 0.5 * l2reg * (w * w).sum()


def _ridge_jaxopt(data: RidgeData, jit: bool) -> Callable[[], Any]:
    """The example itself in JAX: ``custom_root(jax.grad(objective))`` around ``solve_cg`` with the
    ridge ``n l2reg``, 20 iterations from zero, the default (normal-CG) backward solve;
    ``jax.grad`` of the validation loss with respect to theta, with ``jax.jit`` or without."""
    jax, jnp = _jax()
    from jaxopt import implicit_diff, linear_solve

    s = RIDGE

    def objective(w, l2reg, train):
        x, y = train
        r = x @ w - y
        return 0.5 * jnp.mean(r ** 2) + 0.5 * l2reg * jnp.sum(w ** 2)

    @implicit_diff.custom_root(jax.grad(objective))
    def inner_solve(w0, l2reg, train):
        x, y = train
        return linear_solve.solve_cg(matvec=lambda u: x.T @ (x @ u), b=x.T @ y, ridge=y.shape[0] * l2reg,
                                     init=w0, maxiter=s["inner_cg_steps"])

    def validation(theta, w0, arrays):
        x_tr, y_tr, x_val, y_val = arrays
        w = inner_solve(w0, jnp.exp(theta), (x_tr, y_tr))
        return jnp.mean((x_val @ w - y_val) ** 2), w

    grad = jax.grad(validation, has_aux=True)
    if jit:
        grad = jax.jit(grad)
    f32 = lambda t: jnp.asarray(t.detach().to(torch.float32).numpy())  # noqa: E731
    arrays = tuple(f32(t) for t in (data.x_train, data.y_train, data.x_val, data.y_val))
    theta, w0 = f32(data.theta), jnp.zeros(data.x_train.shape[1], dtype=jnp.float32)

    def hypergradient():
        g, _ = grad(theta, w0, arrays)
        return g.block_until_ready()
    return hypergradient


# ---------------------------------------------------------------------------------------------
# the registry


EXAMPLES: dict[str, Example] = {
    "logistic": Example(
        name="logistic",
        title="hypertorch: logistic regression, per-feature L2 weights",
        source="prolearner/hypertorch examples/logistic_regression.ipynb",
        settings=(f"n={LOGISTIC['n']} (half train, half validation), d={LOGISTIC['d']}, NumPy seed 1; "
                  f"inner: {LOGISTIC['inner_steps']} GD steps of {LOGISTIC['inner_lr']} from 0 on "
                  f"BCE + 1/2 sum h_i w_i^2, h = 1; hypergradient w.r.t. h (20): {LOGISTIC['cg_steps']} CG steps; "
                  f"float32"),
        build=logistic_data,
        factories={"bilevel": logistic_bilevel,
                   "bilevel_compiled": _bilevel_compiled(logistic_compiled),
                   "hand_written": logistic_hand_written,
                   "hypertorch": logistic_hypertorch,
                   "torchopt": logistic_torchopt},
        rtol=1e-4,
    ),
    "imaml": Example(
        name="imaml",
        title="TorchOpt: iMAML, one task (proximal inner problem)",
        source="metaopt/torchopt tutorials/5_Implicit_Differentiation.ipynb",
        settings=(f"x (20, 4), y = x w + b + 0.5 noise, torch seed 0; nn.Linear(4, 1) from weight 1, bias 0; "
                  f"inner: MSE + {IMAML['lam']}/2 ||phi - theta||^2, {IMAML['inner_steps']} SGD steps of "
                  f"{IMAML['inner_lr']}; outer: mean prediction on x; linear solve {IMAML['solve_steps']} steps "
                  f"(TorchOpt: normal CG as in the tutorial; bilevel and hand-written: CG); float32"),
        build=imaml_data,
        factories={"bilevel": imaml_bilevel,
                   "bilevel_compiled": _bilevel_compiled(imaml_compiled),
                   "hand_written": imaml_hand_written,
                   "torchopt": imaml_torchopt},
        rtol=1e-4,
        notes=["The tutorial prints the meta-gradient (weight -0.0369, 0.0248, 0.0347, 0.0067; bias 0.3156); "
               "every implementation here reproduces it."],
    ),
    "ridge": Example(
        name="ridge",
        title="JAXopt: ridge regression, hypergradient w.r.t. log L2 weight",
        source="google/jaxopt examples/implicit_diff/ridge_reg_implicit_diff.py",
        settings=("diabetes (sklearn), unit-norm rows, 67/33 split random_state=0 (296 train); inner "
                  "1/(2n)||Xw - y||^2 + e^theta/2 ||w||^2 solved by CG (20 iterations, relative residual 1e-5) "
                  "from 0; outer: validation MSE; theta = 1; backward linear solve to relative residual 1e-5 "
                  "(JAXopt and TorchOpt: their default normal CG; bilevel and hand-written: CG; bilevel compiled: "
                  f"CG on a fixed budget of {RIDGE_COMPILED_BACKWARD_ITERATIONS} iterations, the tolerance checked "
                  "after the graph); float32"),
        build=ridge_data,
        factories={"bilevel": ridge_bilevel,
                   "bilevel_compiled": _bilevel_compiled(ridge_compiled),
                   "hand_written": ridge_hand_written,
                   "torchopt": ridge_torchopt,
                   "jaxopt_jit": lambda data: _ridge_jaxopt(data, jit=True),
                   "jaxopt": lambda data: _ridge_jaxopt(data, jit=False)},
        rtol=1e-4,
    ),
}
