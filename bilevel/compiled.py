"""``bl.compiled_hypergradient``: inner solve, linear solve and hypergradient as one compiled graph.

:func:`bilevel.hypergradient` and :func:`bilevel.argmin` stop each solve as soon as its tolerance
is met, which reads values back after every iteration; on small problems the Python and dispatch
cost of those steps outweighs the arithmetic. Here the whole computation, from ``theta`` to
``dF/dtheta``, is one function of tensors with fixed budgets (a finished solve is frozen by
:func:`torch.where`, as under :func:`torch.func.vmap`), traced once by :func:`torch.compile` and
replayed on every call. The diagnostics (the inner gradient's norm, the linear solve's true
residual, a breakdown, finiteness) are computed inside the graph and read back once, after it:
a solve that fell short warns exactly as the eager path does, and a non-finite result is an
error, never a silent NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import tree as _tree
from ._checks import check_finite_tree
from ._functorch import explain_transform_errors, functional
from .implicit import _PHI_HINT, ImplicitInfo
from .linalg.base import LinearSolveInfo, LinearSolver, LinearSolveStatus
from .linalg.hvp import _FORWARD_AD_LOCK
from .linalg.registry import get as get_linear_solver
from .problem import InnerProblem, ProximalProblem
from .solvers.base import CallableSolver, Solver, prepare
from .solvers.base import get as get_solver
from .solvers.result import SolveResult, SolverStatus
from .status import compile_failure

__all__ = ["compiled_hypergradient", "CompiledHypergradient", "CompiledInfo", "CompiledBatchInfo"]

_MISSING = object()


@dataclass
class CompiledInfo:
    """What one call of a :class:`CompiledHypergradient` measured, read back once after the graph.

    Attributes
    ----------
    value:
        The outer objective ``outer(phi, theta)`` at the returned ``phi``.
    phi:
        The inner solution, in the structure of ``phi0`` (detached).
    inner:
        The inner solve's :class:`bilevel.SolveResult`: ``iterations`` is the solver's budget
        (``max_iter``; a callable solver: 0), ``grad_norm`` and ``value`` are measured at ``phi``,
        ``converged`` says whether ``grad_norm <= tol`` (a fixed budget, ``tol = 0``: ``MAX_ITER``,
        not a failure).
    backward:
        The :class:`bilevel.ImplicitInfo` of the linear solve; its ``residual_norm`` is the true
        residual ``||grad_phi f - H v||`` (one more Hessian-vector product, in the graph).
    compiled:
        Whether this call ran the compiled graph (False: the eager run of the same function, on a
        first call or after a :class:`bilevel.CompileWarning`).
    """

    value: float
    phi: Any = field(repr=False)
    inner: SolveResult = field(repr=False)
    backward: ImplicitInfo = field(repr=False)
    compiled: bool = False


@dataclass
class CompiledBatchInfo:
    """What one :meth:`CompiledHypergradient.batched` call measured, per task, read back once after the graph.

    Attributes
    ----------
    values:
        The outer objective of each task at its ``phi``.
    phi:
        The tasks' inner solutions, stacked (a leading task dimension), in ``phi0``'s structure.
    inner_grad_norms:
        ``||grad_phi G||`` of each task at its ``phi``.
    residual_norms, relative_residuals:
        The true residual ``||grad_phi f - H v||`` of each task's linear solve, absolute and relative to
        ``||grad_phi f||``.
    converged:
        Per task: whether the linear solve met its tolerance (and the inner solve its own, where it has one).
    breakdown:
        Per task: whether the linear solver discarded a step (CG: negative curvature).
    compiled:
        Whether this call ran the compiled graph.
    """

    values: list[float]
    phi: Any = field(repr=False)
    inner_grad_norms: list[float] = field(repr=False)
    residual_norms: list[float] = field(repr=False)
    relative_residuals: list[float] = field(repr=False)
    converged: list[bool] = field(repr=False)
    breakdown: list[bool] = field(repr=False)
    compiled: bool = False


class CompiledHypergradient:
    """``theta -> (dF/dtheta, info)`` for ``F(theta) = outer(phi*(theta), theta)``, run as one compiled graph.

    Built by :func:`compiled_hypergradient`, which documents the arguments. Call it as
    ``grad, info = hg(theta, data, phi0=None, outer_data=...)``.
    """

    def __init__(self, problem: InnerProblem, outer: Callable, *, solver: str | Solver | Callable,
                 linear_solver: str | LinearSolver = "cg", hvp: str = "reverse", negative_curvature: str = "warn",
                 compile: bool = True, options: dict[str, Any] | None = None):
        if not isinstance(problem, InnerProblem):
            raise TypeError(f"problem must be a bilevel.InnerProblem or ProximalProblem, got "
                            f"{type(problem).__name__}; wrap your objective as bl.InnerProblem(objective).")
        if not callable(outer):
            raise TypeError(f"outer must be a callable outer(phi, theta) -> scalar tensor (or outer(phi, theta, "
                            f"outer_data)), got {type(outer).__name__}.")
        if problem.hyperparameters():
            raise ValueError("compiled_hypergradient does not differentiate the problem's own hyper-parameters "
                             "(a lam that requires grad); use bl.argmin, or pass lam detached.")
        self.problem, self.outer = problem, outer
        self.solver = get_solver(solver)
        if not (self.solver.vmappable or isinstance(self.solver, CallableSolver)):
            raise ValueError(
                f"compiled_hypergradient runs the inner solver on a fixed budget inside one graph, which "
                f"{self.solver!r} cannot do (it decides its steps from values read back). Use "
                f"bl.solvers.get('gd', step_size=..., max_iter=...) or bl.solvers.get('agd', step_size=..., "
                f"mu=...), or a callable solver written in torch operations.")
        self.linear_solver = get_linear_solver(linear_solver)
        if not self.linear_solver.vmappable:
            raise ValueError(
                f"compiled_hypergradient runs the linear solver on a fixed budget inside one graph, which "
                f"{self.linear_solver!r} cannot do. Use bl.linalg.get('cg', max_iter=...) or a Neumann series "
                f"with a fixed step_size.")
        if hvp not in ("reverse", "forward"):
            raise ValueError(f"hvp must be 'reverse' or 'forward' here, got {hvp!r} (the Gauss-Newton modes run in "
                             f"bl.argmin and bl.hypergradient).")
        self.hvp = hvp
        if negative_curvature not in ("warn", "first_order"):
            raise ValueError(f"negative_curvature must be 'warn' or 'first_order', got {negative_curvature!r}.")
        if negative_curvature == "first_order" and not isinstance(problem, ProximalProblem):
            raise ValueError("negative_curvature='first_order' replaces a task's hypergradient by grad_phi f, which is a "
                             "gradient for theta only when phi and theta are the same parameters: a "
                             "bl.ProximalProblem (iMAML). Use negative_curvature='warn' for other problems.")
        self.negative_curvature = negative_curvature
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}.")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of torch.compile keyword arguments (or None), got "
                            f"{type(options).__name__}.")
        self.compile = compile
        self.options = options
        # per kind of call ("single", "batched"): the compiled function; None: not yet compiled; False:
        # compiling failed, run eagerly
        self._compiled: dict[str, Any] = {}
        self._clone = False
        self._calls: dict[str, int] = {}

    def compile_options(self, device: torch.device) -> dict[str, Any]:
        """The :func:`torch.compile` keyword arguments used for ``theta`` on ``device``.

        ``dynamic=False, fullgraph=True``, and by default on the CPU ``options={"cpp_wrapper": True}``
        (the graph's buffers are allocated from C++ rather than from Python, which is faster on the
        small problems this path is for). ``options=`` given at construction is merged
        over ``dynamic`` and ``fullgraph`` and replaces the device default. On a GPU,
        ``options={"mode": "reduce-overhead"}`` replays the graph as a CUDA graph; the results are then
        copied out of the graph's memory, so that the next call does not overwrite them.
        """
        base: dict[str, Any] = {"dynamic": False, "fullgraph": True}
        if self.options is not None:
            return {**base, **self.options}
        if device.type == "cpu":
            return {**base, "options": {"cpp_wrapper": True}}
        return base

    # ------------------------------------------------------------------------------------------
    # the function of tensors that is compiled

    def _body(self, theta_leaves: list[torch.Tensor], data: Any, phi0: Any, outer_data: Any, theta_spec: Any,
              hvp_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        problem = self.problem
        theta = _tree.from_leaves(theta_spec, theta_leaves)
        fun, x0 = prepare(problem, theta, data, phi0)
        spec = fun.spec
        if isinstance(self.solver, CallableSolver):
            out = self.solver.fn(problem, fun.theta, data, fun.unflatten(x0))
            if isinstance(out, SolveResult):
                out = out.phi
            x, _ = _tree.flatten(out, "the solver's result")
            x = x.detach().to(dtype=x0.dtype, device=x0.device)
        else:
            x = self.solver.run(fun, x0).phi.detach()
        y, _ = _tree.flatten(theta, "theta")
        y = y.detach()

        def inner(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return problem.value(_tree.unflatten(p, spec), _tree.unflatten(t, theta_spec), data)

        def outer(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            args = (_tree.unflatten(p, spec), _tree.unflatten(t, theta_spec))
            return self.outer(*args) if outer_data is _MISSING else self.outer(*args, outer_data)

        grad_inner = torch.func.grad_and_value(inner, argnums=0)
        g_in, v_in = grad_inner(x, y)
        (cot, direct), value = torch.func.grad_and_value(outer, argnums=(0, 1))(x, y)

        if (hvp_mode or self.hvp) == "forward":
            def hvp(v: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(lambda p: grad_inner(p, y)[0], (x,), (v,))[1]
        else:  # reverse over reverse: the gradient's graph is built once and pulled back for every product
            _, pullback = torch.func.vjp(lambda p: grad_inner(p, y)[0], x)

            def hvp(v: torch.Tensor) -> torch.Tensor:
                return pullback(v)[0]

        transposed = {"rmatvec": hvp} if self.linear_solver.needs_rmatvec else {}
        v, linfo = self.linear_solver(hvp, cot, **transposed)
        residual = torch.linalg.vector_norm(cot - hvp(v))
        _, mixed_vjp = torch.func.vjp(lambda t: grad_inner(x, t)[0], y)
        (mixed,) = mixed_vjp(v)
        grad = direct - mixed
        broke = linfo.extra.get("breakdown")
        broke = torch.zeros((), dtype=torch.bool, device=x.device) if broke is None else broke
        if self.negative_curvature == "first_order":  # (I + H / lam)^-1 ~ I: the first-order (FOMAML) direction
            grad = torch.where(broke, direct + cot, grad)
        finite = torch.isfinite(grad).all() & torch.isfinite(x).all() & torch.isfinite(value)
        diag = torch.stack([torch.linalg.vector_norm(g_in), v_in, value, residual,
                            torch.linalg.vector_norm(cot), broke.to(value.dtype), finite.to(value.dtype)])
        return grad, x, diag

    # ------------------------------------------------------------------------------------------

    def _batched_body(self, theta_leaves: list[torch.Tensor], data: Any, phi0: Any, outer_data: Any,
                      theta_spec: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if outer_data is _MISSING:
            grads, xs, diags = torch.func.vmap(
                lambda d: self._body(theta_leaves, d, phi0, _MISSING, theta_spec, "forward"))(data)
        else:
            grads, xs, diags = torch.func.vmap(
                lambda d, o: self._body(theta_leaves, d, phi0, o, theta_spec, "forward"))(data, outer_data)
        return grads.mean(0), xs, diags

    def _execute(self, kind: str, args: tuple) -> tuple[tuple, bool]:
        """Run the body of ``kind`` ("single" or "batched"): compiled from its second call on, else eagerly."""
        body = self._body if kind == "single" else self._batched_body
        calls = self._calls[kind] = self._calls.get(kind, 0) + 1
        if self.compile and calls > 1 and self._compiled.get(kind) is not False:
            out = self._run_compiled(kind, body, args)
            if out is not None:
                return out, True
        # eagerly: the first call (a mistake in the user's code gets this library's error, not the
        # compiler's), compile=False, or after compiling failed
        with functional(), _FORWARD_AD_LOCK, explain_transform_errors("compiled_hypergradient"):
            return body(*args), False

    def _run_compiled(self, kind: str, body: Callable, args: tuple) -> tuple | None:
        compiled = self._compiled.get(kind)
        if compiled is None:
            options = self.compile_options(args[0][0].device)
            self._clone = options.get("mode") in ("reduce-overhead", "max-autotune")  # CUDA graphs reuse memory
            _ = (args[-1].numels, args[-1].size)  # cached before tracing (see Objective.enable_compile)
            compiled = self._compiled[kind] = torch.compile(body, **options)
        try:
            with functional():
                out = compiled(*args)
        except Exception as e:  # the compiler's failure: this call and the later ones run eagerly
            self._compiled[kind] = False
            warnings.warn(compile_failure(f"compiled_hypergradient of {self.problem.name!r}", e,
                                          "it runs eagerly from now on (the same values)"), stacklevel=4)
            return None
        return tuple(t.clone() for t in out) if self._clone else out

    def _prepare(self, theta: Any, phi0: Any) -> tuple[_tree.TreeSpec, list[torch.Tensor]]:
        theta_spec = _tree.tree_spec(theta, "theta")
        if phi0 is not None:
            self.problem.check_phi(phi0, theta, "phi0")
        return theta_spec, [t.detach() for t in _tree.leaves(theta)]

    def __call__(self, theta: Any, data: Any = None, *, phi0: Any = None, outer_data: Any = _MISSING
                 ) -> tuple[Any, CompiledInfo]:
        """``(dF/dtheta, info)`` at ``theta``: a tree like ``theta`` and a :class:`CompiledInfo`."""
        theta_spec, leaves = self._prepare(theta, phi0)
        if self._calls.get("single", 0) == 0 or not self.compile:
            self.problem.validate(theta, data)
        (grad, x, diag), compiled = self._execute("single", (leaves, data, phi0, outer_data, theta_spec))
        return self._finish(theta, data, phi0, theta_spec, grad, x, diag, compiled=compiled)

    def _judge(self, row: list[float]) -> tuple[SolverStatus, LinearSolveStatus, float, bool]:
        """A task's diagnostics row -> (inner status, linear status, relative residual, breakdown handled).

        ``handled``: the linear solve broke down and ``negative_curvature="first_order"`` returned the
        first-order direction instead, which is by design and not warned about.
        """
        inner_gn, _, _, residual, bnorm, broke, _ = row
        solver, lin = self.solver, self.linear_solver
        if inner_gn <= solver.tol:
            inner = SolverStatus.CONVERGED
        elif isinstance(solver, CallableSolver):
            inner = SolverStatus.NOT_STATIONARY
        else:
            inner = SolverStatus.MAX_ITER  # with tol = 0: the fixed budget asked for, not a failure
        rel = residual / bnorm if bnorm > 0 else residual
        if broke:
            linear = (LinearSolveStatus.NEGATIVE_CURVATURE if getattr(lin, "breakdown_flag", "") == "negative_curvature"
                      else LinearSolveStatus.BREAKDOWN)
        else:
            linear = LinearSolveStatus.CONVERGED if rel <= lin.tol else LinearSolveStatus.MAX_ITER
        return inner, linear, rel, bool(broke) and self.negative_curvature == "first_order"

    def _inner_failed(self, status: SolverStatus) -> bool:
        """Whether an inner status is a failure to warn about (a fixed budget reaching ``max_iter`` is not)."""
        fixed = self.solver.tol == 0 and not isinstance(self.solver, CallableSolver)
        return not status.success and not fixed

    def _linear_failed(self, status: LinearSolveStatus, handled: bool) -> bool:
        """Whether a linear status is a failure to warn about (as the eager path warns: a breakdown always, a
        missed tolerance when ``warn`` and ``tol > 0``), unless the breakdown was handled."""
        lin = self.linear_solver
        return (not status.success and status.warning is not None and not handled
                and (status.breakdown or (lin.warn and lin.tol > 0)))

    def batched(self, theta: Any, data: Any, *, phi0: Any = None, outer_data: Any = _MISSING
                ) -> tuple[Any, CompiledBatchInfo]:
        """The mean hypergradient over a batch of tasks (a meta-batch), all of them in one graph.

        ``data`` (and ``outer_data``, when given) hold the tasks along a leading dimension of every
        tensor; ``theta`` and ``phi0`` are shared. The tasks run through :func:`torch.func.vmap` inside
        the compiled function, so the whole meta-gradient is one graph (on a GPU with
        ``options={"mode": "reduce-overhead"}``, one CUDA graph). Under ``vmap`` the Hessian-vector products
        are forward over reverse whatever ``hvp`` says, as in :func:`bilevel.argmin`: reverse over reverse
        cannot run there for every network (batch norm's double backward cannot). Returns the mean over the tasks of
        ``dF_i/dtheta``, a tree like ``theta``, and a :class:`CompiledBatchInfo`; a task whose solve
        missed its tolerance is counted in one warning, and a non-finite task is an error naming it.
        """
        theta_spec, leaves = self._prepare(theta, phi0)
        if self._calls.get("batched", 0) == 0 or not self.compile:
            self.problem.validate(theta, data)
        (grad, xs, diags), compiled = self._execute("batched", (leaves, data, phi0, outer_data, theta_spec))
        rows = diags.tolist()  # the one read-back
        phi_spec = _tree.tree_spec(self.problem.default_phi0(theta) if phi0 is None else phi0, "phi0")
        bad = [i for i, row in enumerate(rows) if not row[6]]
        if bad:
            self.problem.validate(theta, data)
            raise ValueError(f"compiled_hypergradient.batched: task(s) {bad[:10]} of {len(rows)} gave a non-finite inner "
                             f"solution, outer objective or hypergradient; {_PHI_HINT}. Run such a task alone with "
                             f"the CompiledHypergradient itself (hg(theta, data_i)) for a detailed error.")
        lin, solver = self.linear_solver, self.solver
        judged = [self._judge(row) for row in rows]
        rel = [r for _, _, r, _ in judged]
        broke = [bool(row[5]) for row in rows]
        inner_missed = sum(self._inner_failed(i) for i, _, _, _ in judged)
        linear_missed = sum(self._linear_failed(lst, h) for _, lst, _, h in judged)
        converged = [(i.success or not self._inner_failed(i)) and lst.success for i, lst, _, _ in judged]
        unhandled = sum(b and not h for b, (_, _, _, h) in zip(broke, judged))
        missed = sum(self._inner_failed(i) or self._linear_failed(lst, h) for i, lst, _, h in judged)
        if missed:
            status = LinearSolveStatus.NEGATIVE_CURVATURE if unhandled else LinearSolveStatus.MAX_ITER
            warnings.warn(status.warning(
                f"compiled_hypergradient.batched: {missed} of {len(rows)} tasks missed a tolerance (inner "
                f"||grad_phi G|| <= {solver.tol:g}: {inner_missed} missed; {lin.name} to relative residual "
                f"{lin.tol:g} in {lin.max_iter} iterations: {linear_missed} missed, largest {max(rel):.3g}; "
                f"breakdowns: {unhandled})", status=status, info=None), stacklevel=2)
        phi = _stack_unflatten(xs, phi_spec)
        info = CompiledBatchInfo([row[2] for row in rows], phi, [row[0] for row in rows], [row[3] for row in rows],
                                 rel, converged, broke, compiled)
        return _tree.unflatten(grad, theta_spec), info

    def _finish(self, theta: Any, data: Any, phi0: Any, theta_spec: _tree.TreeSpec, grad: torch.Tensor,
                x: torch.Tensor, diag: torch.Tensor, *, compiled: bool) -> tuple[Any, CompiledInfo]:
        inner_gn, inner_value, value, residual, bnorm, broke, finite = diag.tolist()  # the one read-back
        phi_spec = _tree.tree_spec(self.problem.default_phi0(theta) if phi0 is None else phi0, "phi0")
        phi = _tree.unflatten(x, phi_spec)
        if not finite:  # word the error: the inputs first, then the solve, then the gradient
            self.problem.validate(theta, data)
            check_finite_tree(phi, "phi (the inner solution)", _PHI_HINT)
            raise ValueError("compiled_hypergradient: the outer objective or the hypergradient is not finite at a "
                             "finite phi; check outer (e.g. with torch.autograd.set_detect_anomaly(True)) and the "
                             "linear solver's budget.")
        solver, lin = self.solver, self.linear_solver
        status, lstatus, rel, handled = self._judge([inner_gn, inner_value, value, residual, bnorm, broke, finite])
        if self._inner_failed(status):
            warnings.warn(status.warning(
                f"compiled_hypergradient: inner solver {solver.name!r} did not reach ||grad_phi G|| <= {solver.tol:g} "
                f"(||grad_phi G|| = {inner_gn:.3g}): {status.value}", status=status, info=None), stacklevel=3)
        iterations = 0 if isinstance(solver, CallableSolver) else solver.max_iter
        inner = SolveResult(phi, status.success, iterations, inner_gn, status, status.value, {}, inner_value,
                            solver.name)
        spent = lin._budget_matvecs(False) + 1  # the fixed budget, and the product of the true residual
        linfo = LinearSolveInfo(lin.max_iter, residual, rel, lstatus.success, lstatus, spent, lin.name)
        if self._linear_failed(lstatus, handled):
            warnings.warn(lstatus.warning(
                f"compiled_hypergradient: {lin.name} did not reach relative residual {lin.tol:g} in {lin.max_iter} "
                f"iterations (true relative residual {rel:.3g}): {lstatus.value}", status=lstatus, info=linfo),
                stacklevel=3)
        backward = ImplicitInfo(linfo, spent, inner_gn, self.hvp, residual)
        info = CompiledInfo(value, phi, inner, backward, compiled)
        return _tree.unflatten(grad, theta_spec), info


def _stack_unflatten(xs: torch.Tensor, spec: _tree.TreeSpec) -> Any:
    """Rows of flat vectors (a leading task dimension) as one tree of stacked tensors."""
    parts = torch.split(xs, list(spec.numels), dim=1)
    leaves = [p.reshape(xs.shape[0], *shape) for p, shape in zip(parts, spec.shapes)]
    return _tree.from_leaves(spec, leaves)


def compiled_hypergradient(problem: InnerProblem, outer: Callable, *, solver: str | Solver | Callable,
                           linear_solver: str | LinearSolver = "cg", hvp: str = "reverse",
                           negative_curvature: str = "warn", compile: bool = True,
                           options: dict[str, Any] | None = None) -> CompiledHypergradient:
    r"""Build ``hg(theta, data) -> (dF/dtheta, info)`` that runs the inner solve, the linear solve and the
    hypergradient of ``F(theta) = outer(phi*(theta), theta)`` as one :func:`torch.compile`\ d graph.

    Parameters
    ----------
    problem:
        The inner problem (:class:`bilevel.InnerProblem` or :class:`bilevel.ProximalProblem`, with a
        ``lam`` that does not require grad).
    outer:
        ``outer(phi, theta) -> scalar``; or ``outer(phi, theta, outer_data)`` when the call passes
        ``outer_data=`` (e.g. a task's query set).
    solver:
        An inner solver that runs a fixed budget without reading values back (``gd`` with a
        ``step_size``, ``agd`` with a ``step_size`` and ``mu``: exactly ``max_iter`` steps), or a
        callable ``(problem, theta, data, phi0) -> phi`` written in torch operations (it may call the
        fixed-budget linear solvers of :mod:`bilevel.linalg`).
    linear_solver:
        ``"cg"`` or another solver with a fixed-budget path (``max_iter`` iterations, a solve that
        reaches ``tol`` frozen from then on).
    hvp:
        How Hessian-vector products are taken: ``"reverse"`` (default; ``torch.func.vjp`` of
        ``torch.func.grad``: the gradient's graph is built once and pulled back for every product) or
        ``"forward"`` (``torch.func.jvp`` of ``torch.func.grad``; some torch functions, ``F.mse_loss``
        among them, cannot run forward-mode).
    negative_curvature:
        ``"warn"`` (default): a linear solve that meets a direction of non-positive curvature (the
        inner Hessian is not positive definite at ``phi``) keeps its last iterate and warns.
        ``"first_order"``: that task's hypergradient becomes ``grad_theta f + grad_phi f``, the
        first-order (FOMAML) direction that ``(I + H / lam)^-1 ~ I`` gives, chosen per task inside the
        graph with :func:`torch.where`, without a warning (``info`` still reports the breakdown); only
        for a :class:`bilevel.ProximalProblem`, whose ``phi`` and ``theta`` are the same parameters.
    compile:
        ``False`` runs the same function eagerly (for debugging, or where no compiler is available).
    options:
        Keyword arguments of :func:`torch.compile`, over the defaults ``dynamic=False, fullgraph=True``
        (see :meth:`CompiledHypergradient.compile_options`; the default on the CPU adds
        ``options={"cpp_wrapper": True}``). On a GPU, ``{"mode": "reduce-overhead"}`` asks for CUDA graphs.

    Returns
    -------
    CompiledHypergradient
        ``grad, info = hg(theta, data=None, *, phi0=None, outer_data=...)``: ``grad`` like ``theta``,
        ``info`` a :class:`CompiledInfo`.

    Notes
    -----
    The first call runs eagerly (it validates the inputs, so a bad objective gets this library's
    error, not the compiler's); the second compiles; later calls with the same shapes replay the
    compiled graph. The diagnostics are computed in the graph and read back once: a solve
    that misses its tolerance warns as :func:`bilevel.hypergradient` does (a fixed inner budget,
    ``tol = 0``, does not), and a non-finite result raises ``ValueError`` naming the first non-finite
    input or the inner solution. If compiling fails, a :class:`bilevel.CompileWarning` says why and
    the calls run eagerly (the same values).

    The result is :func:`bilevel.hypergradient`'s at the same ``phi`` with the same linear-solve
    iterations; it differs from an eager solve stopped by a tolerance only in that the fixed budget
    may take more (frozen) iterations.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> ref = bl.testing.proximal_quadratic(dim=5, seed=0)
    >>> agd = bl.solvers.get("agd", step_size=1 / ref.smoothness, mu=ref.strongly_convex, max_iter=300, tol=0.0)
    >>> hg = bl.compiled_hypergradient(ref.problem, ref.outer, solver=agd,
    ...                                linear_solver=bl.linalg.get("cg", max_iter=5), compile=False)
    >>> g, info = hg(ref.theta, ref.data)
    >>> bool(torch.allclose(g, ref.hypergradient(), atol=1e-8)), info.backward.converged, info.compiled
    (True, True, False)

    With ``compile=True`` (the default) the second call compiles and later ones replay the graph.
    """
    return CompiledHypergradient(problem, outer, solver=solver, linear_solver=linear_solver, hvp=hvp,
                                 negative_curvature=negative_curvature, compile=compile, options=options)
