r"""The adjoint: implicit differentiation of ``phi*(theta) = argmin_phi G(phi, theta)``.

Linearise ``G`` at ``phi`` (``bilevel._linearize``), solve the linear system on
Hessian-vector products, and apply the mixed second derivative as one vector-Jacobian
product: :func:`implicit_vjp` does it for a given cotangent. :func:`bilevel.argmin` (in
``bilevel._argmin``) is the same as an autograd operation, and :func:`bilevel.hypergradient` (in
``bilevel.certify``) adds the outer objective's direct term and, on request, a certificate.

Stationarity, :math:`\nabla_\phi G(\phi^*, \theta) = 0`, gives by the implicit
function theorem, for an outer objective :math:`F(\theta) = f(\phi^*(\theta), \theta)`,

.. math::

    \frac{dF}{d\theta} = \nabla_\theta f - \partial_\theta \langle \nabla_\phi G(\phi, \theta), v\rangle,
    \qquad \nabla^2_{\phi\phi} G \; v = \nabla_\phi f,

with ``v`` from an iterative linear solver on Hessian-vector products. For
iMAML's proximal ``G`` this is the paper's Eq. 6,
``g = (I + H / lam)^{-1} grad_phi L_test(phi)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import bounds as _bounds
from . import tree as _tree
from ._checks import check_finite_tree, check_scalar
from ._functorch import explain_transform_errors, in_transform
from ._linearize import check_hvp, linearize
from .linalg.base import LinearSolveInfo, LinearSolver, LinearSolveStatus
from .linalg.hvp import DEFAULT_HVP_MODE
from .linalg.registry import get as get_linear_solver
from .problem import InnerProblem
from .solvers.result import SolveResult

__all__ = ["ImplicitInfo", "implicit_vjp"]

logger = logging.getLogger(__name__)

_PHI_HINT = ("the inner solve diverged or returned NaN; lower its step size (or use a line search, step_size=None), "
             "start closer, or check the solver's result.status")


@dataclass
class ImplicitInfo:
    """Diagnostics of one implicit-differentiation step.

    Attributes
    ----------
    linear_solve:
        The :class:`bilevel.linalg.LinearSolveInfo` of the linear solve
        ``(d2G/dphi2) v = cotangent``; its ``iterations``, ``residual_norm``,
        ``relative_residual``, ``converged``, ``status`` and ``message`` are
        also properties of this object.
    hvps:
        Hessian-vector products spent.
    inner_grad_norm:
        ``||grad_phi G(phi, theta)||`` at the ``phi`` used: how stationary the
        inner solution was (the implicit gradient assumes 0).
    hvp_mode:
        ``"reverse"`` or ``"forward"``.
    true_residual_norm:
        ``||cotangent - (d2G/dphi2) v||`` recomputed with one extra
        Hessian-vector product (only when a certificate was asked for;
        ``None`` otherwise). CG's ``residual_norm`` comes from its recurrence.
    certificate:
        A :class:`bilevel.bounds.Certificate` (``hypergradient`` with
        ``constants=`` or ``target_error=``), else ``None``.
    adaptive:
        A :class:`bilevel.bounds.AdaptiveReport` (``hypergradient`` with
        ``target_error=``), else ``None``.
    curvature:
        The :class:`bilevel.linalg.CurvatureEstimate` behind an estimated
        ``mu`` (``constants.mu=None``), else ``None``.
    """

    linear_solve: LinearSolveInfo
    hvps: int
    inner_grad_norm: float
    hvp_mode: str
    true_residual_norm: float | None = None
    certificate: _bounds.Certificate | None = field(default=None, repr=False)
    adaptive: _bounds.AdaptiveReport | None = field(default=None, repr=False)
    curvature: _bounds.CurvatureEstimate | None = field(default=None, repr=False)

    # the linear solve's own facts, read from it rather than copied
    @property
    def iterations(self) -> int:
        """Iterations of the linear solve."""
        return self.linear_solve.iterations

    @property
    def residual_norm(self) -> float:
        """``||cotangent - (d2G/dphi2) v||`` from the linear solver's recurrence."""
        return self.linear_solve.residual_norm

    @property
    def relative_residual(self) -> float:
        """:attr:`residual_norm` relative to ``||cotangent||``."""
        return self.linear_solve.relative_residual

    @property
    def converged(self) -> bool:
        """Whether the linear solve met its tolerance."""
        return self.linear_solve.converged

    @property
    def status(self) -> LinearSolveStatus:
        """Why the linear solve stopped (a :class:`bilevel.linalg.LinearSolveStatus`; set: written through)."""
        return self.linear_solve.status

    @status.setter
    def status(self, value: LinearSolveStatus) -> None:
        self.linear_solve.status = value

    @property
    def message(self) -> str:
        """Advice attached to :attr:`status`."""
        return self.status.value


def _core(problem: InnerProblem, theta_flat: torch.Tensor, theta_spec: _tree.TreeSpec, phi_flat: torch.Tensor,
          phi_spec: _tree.TreeSpec, data: Any, cotangent: torch.Tensor, linear_solver: LinearSolver,
          hvp: str, hyper: list[torch.Tensor], *, check_residual: bool = False, x0: torch.Tensor | None = None,
          keep: dict | None = None, inner_grad_norm: float | None = None
          ) -> tuple[torch.Tensor, list[torch.Tensor], ImplicitInfo]:
    """Flat engine: returns ``(-d_theta <grad G, v>, [-d_hyper <grad G, v>], info)``.

    ``check_residual``: recompute ``||cotangent - H v||`` with one more HVP (for certificates).
    ``x0``: warm start of the linear solve. ``keep``: receives ``v`` under ``"v"``.
    ``inner_grad_norm``: ``||grad_phi G||`` at ``phi`` if known (an inner solve's), not recomputed.
    """
    with explain_transform_errors(f"the implicit backward (hvp={hvp!r})"):
        # inside torch.func transforms (vmap over tasks) "reverse" runs as "forward"
        lin = linearize(problem, phi_flat, phi_spec, theta_flat, theta_spec, data, hyper, hvp,
                        grad_norm=inner_grad_norm)
        b = cotangent.detach()
        # the Hessian is symmetric (the Gauss-Newton matrix too): its transposed product is itself, which a
        # solver on the normal equations needs; the others are called as they always were
        transposed = {"rmatvec": lin.hvp} if linear_solver.needs_rmatvec else {}
        v, linfo = linear_solver(lin.hvp, b, x0, **transposed)
        true_res = None
        if check_residual:
            true_res = torch.linalg.vector_norm(b - lin.hvp(v.detach())).item()
        mixed = lin.mixed_vjp(v)
        # values cannot be read back inside a torch.func transform (vmap over tasks)
        if in_transform():
            inner_gn = float("nan")
        elif inner_grad_norm is not None:
            inner_gn = inner_grad_norm
        else:
            inner_gn = torch.linalg.vector_norm(lin.grad).item()
    lin.release()
    if keep is not None:
        keep["v"] = v.detach()
    info = ImplicitInfo(linfo, lin.count, inner_gn, lin.mode, true_res)
    logger.debug("implicit solve: %s, %d HVPs, relative residual %.3g", linfo.status.name, lin.count,
                 linfo.relative_residual)
    return -mixed[0], [-m for m in mixed[1:]], info


def _measured_curvature(info: ImplicitInfo) -> float | None:
    """The smallest curvature the linear solve met (CG reports it), or ``None``."""
    value = info.linear_solve.extra.get("min_curvature")
    if value is None or isinstance(value, torch.Tensor):
        return None
    value = float(value)
    return None if value == float("inf") else value


def _flat_detached(tree: Any, what: str) -> tuple[torch.Tensor, _tree.TreeSpec]:
    flat, spec = _tree.flatten(tree, what)
    return flat.detach(), spec


def implicit_vjp(problem: InnerProblem, theta: Any, phi: Any, data: Any, cotangent: Any, *,
                 linear_solver: str | LinearSolver = "cg", hvp: str = DEFAULT_HVP_MODE) -> tuple[Any, ImplicitInfo]:
    r"""The engine: ``(dphi*/dtheta)^T cotangent = -(d2G/dtheta dphi) (d2G/dphi2)^{-1} cotangent``.

    Parameters
    ----------
    problem:
        The inner problem.
    theta:
        Outer variables (tensor or tree).
    phi:
        An (approximate) minimiser of ``G(., theta)``, e.g. ``bl.solve(...).phi``, or the
        :class:`bilevel.SolveResult` of ``bl.solve`` for this ``theta`` and ``data``: its
        ``grad_norm`` is then reused for ``info.inner_grad_norm`` instead of computing the inner
        gradient once more (with ``hvp="gauss_newton"`` / ``"gauss_newton_jacobian"`` that saves a
        forward and backward pass through the network).
    data:
        The inner problem's data.
    cotangent:
        A tree like ``phi``: typically ``grad_phi`` of an outer loss.
    linear_solver:
        Name, options-free instance or callable (see :func:`bilevel.linalg.get`);
        default ``"cg"`` (``max_iter=100, tol=1e-10``).
    hvp:
        ``"reverse"`` (default) or ``"forward"`` Hessian-vector products (inside ``torch.func.vmap``
        ``"reverse"`` runs as ``"forward"``: reverse-over-reverse cannot run there); or
        ``"gauss_newton"``, which replaces the loss's Hessian by its Gauss-Newton matrix (needs a
        :class:`bilevel.ProximalProblem` whose loss is a :class:`bilevel.PredictionLoss`; see
        :mod:`bilevel.linalg.hvp`): positive semi-definite, so no negative curvature, less than half the
        memory of the exact modes, exact when the predictor is linear in ``phi``.

    Returns
    -------
    vjp, info:
        A tree like ``theta`` and an :class:`ImplicitInfo`.

    Notes
    -----
    Needs ``d2G/dphi2`` positive definite at ``phi``; CG stops and warns at
    negative curvature. The error of the result is bounded by the paper's
    Lemma 3 in terms of ``||phi - phi*||`` and the linear-solve residual.

    Examples
    --------
    >>> import torch, bilevel as bl
    >>> problem = bl.ProximalProblem(lambda phi, d: 0.5 * (phi ** 2).sum(), lam=1.0)
    >>> theta = torch.ones(2)
    >>> phi = bl.solve(problem, theta, None, solver=bl.solvers.get("gd", tol=1e-12)).phi
    >>> vjp, info = bl.implicit_vjp(problem, theta, phi, None, torch.ones(2))
    >>> vjp  # dphi*/dtheta = lam / (1 + lam) = 0.5
    tensor([0.5000, 0.5000])
    """
    phi, known_norm = solved_point(phi)
    problem.validate(theta, data)
    problem.check_phi(phi, theta, "phi")
    return _implicit_vjp(problem, theta, phi, data, cotangent, linear_solver, hvp, known_norm)


def _implicit_vjp(problem: InnerProblem, theta: Any, phi: Any, data: Any, cotangent: Any,
                  linear_solver: str | LinearSolver, hvp: str, known_norm: float | None) -> tuple[Any, ImplicitInfo]:
    """:func:`implicit_vjp` after ``problem.validate(theta, data)`` and ``problem.check_phi(phi, theta)``."""
    check_finite_tree(phi, "phi", _PHI_HINT)
    check_hvp(problem, hvp)
    theta_flat, theta_spec = _flat_detached(theta, "theta")
    phi_flat, phi_spec = _flat_detached(phi, "phi")
    cot_spec = _tree.tree_spec(cotangent, "cotangent")
    if not _tree.same_structure(cot_spec, phi_spec):
        raise ValueError(f"cotangent is {cot_spec.describe()} but phi is {phi_spec.describe()}; pass a "
                         f"cotangent with phi's structure (e.g. the gradient of the outer loss w.r.t. phi).")
    check_finite_tree(cotangent, "cotangent", "the outer loss gradient overflowed; check the outer loss")
    cot_flat, _ = _flat_detached(cotangent, "cotangent")
    vjp, _, info = _core(problem, theta_flat, theta_spec, phi_flat, phi_spec, data, cot_flat,
                         get_linear_solver(linear_solver), hvp, [], inner_grad_norm=known_norm)
    return _tree.unflatten(vjp, theta_spec), info


def solved_point(phi: Any) -> tuple[Any, float | None]:
    """``(phi, ||grad_phi G|| at phi or None)`` from a point or a :class:`bilevel.SolveResult`.

    A result's ``grad_norm`` is its solver's last measurement at ``result.phi``: the engine reuses it
    instead of computing the inner gradient again (``nan``, as under ``vmap``, is not reused).
    """
    if isinstance(phi, SolveResult):
        norm = phi.grad_norm
        return phi.phi, (norm if isinstance(norm, float) and math.isfinite(norm) else None)
    return phi, None


def _outer_grads(outer: Callable[[Any, Any], torch.Tensor], theta: Any, phi: Any) -> tuple[Any, Any, bool]:
    """``(grad_phi f, grad_theta f, f depends on theta)`` at ``(phi, theta)``, as trees like phi and theta.

    Inside a ``torch.func`` transform (``vmap`` over tasks) the gradients come from ``torch.func.grad``, and
    whether ``f`` depends on ``theta`` is not known (reported as False; certificates refuse transforms anyway).
    """
    if in_transform():
        def f_of(p, t):
            return check_scalar(outer(p, t), "the outer objective")

        gp, gt = torch.func.grad(f_of, argnums=(0, 1))(_tree.map(lambda t: t.detach(), phi),
                                                        _tree.map(lambda t: t.detach(), theta))
        return gp, gt, False
    with torch.enable_grad():
        th = _tree.map(lambda t: t.detach().requires_grad_(True), theta)
        ph = _tree.map(lambda t: t.detach().requires_grad_(True), phi)
        f = check_scalar(outer(ph, th), "the outer objective")
        lt, lp = _tree.leaves(th), _tree.leaves(ph)
        grads = torch.autograd.grad(f, lp + lt, allow_unused=True) if f.requires_grad else [None] * (len(lp) + len(lt))
    gp = [torch.zeros_like(p) if g is None else g for p, g in zip(lp, grads[: len(lp)])]
    gt = [torch.zeros_like(t) if g is None else g for t, g in zip(lt, grads[len(lp):])]
    depends_on_theta = any(g is not None for g in grads[len(lp):])
    return _tree.from_leaves(_tree.tree_spec(phi), gp), _tree.from_leaves(_tree.tree_spec(theta), gt), depends_on_theta
