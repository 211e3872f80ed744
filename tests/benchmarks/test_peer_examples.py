"""The peers' examples of ``benchmarks/overhead.py`` compute what they claim, and agree with each other.

``benchmarks/peer_examples.py`` writes hypertorch's logistic regression, TorchOpt's iMAML tutorial and
JAXopt's ridge regression once per implementation. The timings compare like with like only if every
implementation returns the same hypergradient, and that hypergradient is the example's: checked here
against the hand-written loop, a closed form (iMAML, ridge), central finite differences (logistic,
ridge) and the value the TorchOpt tutorial prints. The peers are not installed in CI: their tests
skip, with the reason, when a peer is missing.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bilevel as bl

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import peer_examples as pe  # noqa: E402

pytest.importorskip("sklearn")  # the logistic split and the diabetes data


def _run(example: str, impl: str, data) -> np.ndarray:
    try:
        fn = pe.EXAMPLES[example].factories[impl](data)
    except pe.Unavailable as err:
        pytest.skip(f"{impl}: {err}")
    return pe.as_vector(fn())


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("example", sorted(pe.EXAMPLES))
def test_bilevel_and_the_hand_written_loop_agree_at_the_examples_settings(example):
    ex = pe.EXAMPLES[example]
    data = ex.build(torch.float32)
    ours, hand = _run(example, "bilevel", data), _run(example, "hand_written", data)
    assert ours.shape == hand.shape and np.isfinite(ours).all()
    assert _relative(ours, hand) <= ex.rtol


def test_imaml_reproduces_the_tutorials_printed_meta_gradient_and_its_closed_form():
    # The tutorial prints (tensor([[-0.0369, 0.0248, 0.0347, 0.0067]]), tensor([0.3156])): same data, same answer.
    printed = np.array([-0.0369, 0.0248, 0.0347, 0.0067, 0.3156])
    assert np.abs(_run("imaml", "bilevel", pe.imaml_data(torch.float32)) - printed).max() <= 5e-5

    # G is quadratic: H = 2/n [x 1]^T [x 1] + lam I everywhere, and the outer loss (the mean prediction) has
    # the constant gradient c = [mean(x), 1], so dF/dtheta = lam H^-1 c whatever phi the 100 steps reach; the
    # 5 CG steps solve the 5 x 5 system exactly.
    data = pe.imaml_data(torch.float64)
    n = data.x.shape[0]
    xa = torch.cat([data.x, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = 2.0 / n * xa.T @ xa + data.lam * torch.eye(5, dtype=torch.float64)
    c = torch.cat([data.x.mean(0), torch.ones(1, dtype=torch.float64)])
    exact = (data.lam * torch.linalg.solve(H, c)).numpy()
    for impl in ("bilevel", "hand_written"):
        assert _relative(_run("imaml", impl, data), exact) <= 1e-8


def _ridge_exact(data):
    """F(theta) and dF/dtheta in closed form: w(l) = (X^T X + n l I)^-1 X^T y, l = e^theta (the minimiser of
    1/(2n)||Xw - y||^2 + l/2 ||w||^2), F = mean((X_val w - y_val)^2), dF/dtheta = -l w^T (X^T X/n + l I)^-1 grad F."""
    X, y, Xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
    n, d = X.shape
    eye = torch.eye(d, dtype=X.dtype)

    def F(theta):
        w = torch.linalg.solve(X.T @ X + n * torch.exp(theta) * eye, X.T @ y)
        return ((Xv @ w - yv) ** 2).mean(), w

    lam = torch.exp(data.theta)
    _, w = F(data.theta)
    grad_F = 2.0 / Xv.shape[0] * Xv.T @ (Xv @ w - yv)
    return F, float(-lam * w @ torch.linalg.solve(X.T @ X / n + lam * eye, grad_F))


def test_ridge_matches_its_closed_form_and_the_closed_form_matches_finite_differences():
    data = pe.ridge_data(torch.float64)
    F, exact = _ridge_exact(data)
    eps = 1e-5
    fd = float((F(data.theta + eps)[0] - F(data.theta - eps)[0]) / (2 * eps))
    assert abs(fd - exact) <= 1e-7 * abs(exact)
    assert abs(exact - 325.7626) <= 1e-3  # the value at JAXopt's starting point theta = 1
    for impl in ("bilevel", "hand_written"):  # both linear solves stop at a relative residual of 1e-5
        assert abs(_run("ridge", impl, data)[0] - exact) <= 1e-4 * abs(exact)
    # and in float32, as timed
    data32 = pe.ridge_data(torch.float32)
    assert abs(_run("ridge", "bilevel", data32)[0] - exact) <= 1e-4 * abs(exact)


def test_logistic_matches_central_finite_differences():
    # With the inner problem and the linear system solved to convergence (solver objects passed in, as
    # the compiled variant will be), the hypergradient is dF/dh: compare along a random direction.
    data = pe.logistic_data(torch.float64)
    accurate = pe.logistic_bilevel(data, solver=bl.solvers.get("gd", step_size=0.1, max_iter=3000, tol=1e-12),
                                   linear_solver=bl.linalg.get("cg", tol=1e-12))()
    newton = bl.solvers.get("newton_cg", cg_max_iter=50, tol=1e-13)
    problem = bl.InnerProblem(pe.logistic_inner)
    w0 = torch.zeros_like(data.hparams)

    def validation_loss(h):
        w = bl.solve(problem, h, (data.x_train, data.y_train), solver=newton, phi0=w0).phi
        return float(F.binary_cross_entropy_with_logits(data.x_val @ w, data.y_val))

    u = torch.randn(data.hparams.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-4
    fd = (validation_loss(data.hparams + eps * u) - validation_loss(data.hparams - eps * u)) / (2 * eps)
    assert abs(float(accurate @ u) - fd) <= 1e-6 * abs(fd)
    # The example's own budget (100 GD steps, 10 CG steps) is close to it too.
    assert _relative(_run("logistic", "bilevel", data), accurate.numpy()) <= 1e-4


@pytest.mark.parametrize("example", sorted(pe.EXAMPLES))
def test_the_compiled_variant_runs_or_says_why_not(example):
    available, reason = pe.compile_status()
    data = pe.EXAMPLES[example].build(torch.float32)
    if available:
        compiled = _run(example, "bilevel_compiled", data)
        assert _relative(compiled, _run(example, "hand_written", data)) <= pe.EXAMPLES[example].rtol
    else:
        assert "not available at this commit" in reason
        with pytest.raises(pe.Unavailable, match="not available at this commit"):
            pe.EXAMPLES[example].factories["bilevel_compiled"](data)


@pytest.mark.filterwarnings("ignore:.*integrated functorch into PyTorch")  # TorchOpt calls functorch's old API
@pytest.mark.filterwarnings("ignore:JAXopt is no longer maintained:DeprecationWarning")
@pytest.mark.parametrize("example, impl", [(name, impl) for name, ex in sorted(pe.EXAMPLES.items())
                                           for impl in ex.factories
                                           if impl not in ("bilevel", "bilevel_compiled", "hand_written")])
def test_each_installed_peer_agrees_with_the_hand_written_loop(example, impl):
    ex = pe.EXAMPLES[example]
    data = ex.build(torch.float32)
    peer = _run(example, impl, data)  # skips, with the reason, when the peer is not installed
    assert _relative(peer, _run(example, "hand_written", data)) <= ex.rtol


def test_check_agreement_names_the_implementations_that_differ():
    results = {"hand_written": np.array([1.0, 2.0]), "bilevel": np.array([1.0, 2.0]),
               "torchopt": np.array([1.0, 2.1])}
    with pytest.raises(ValueError, match=r"torchopt: .*not compare the same work"):
        pe.check_agreement(results, "hand_written", 1e-4)
    assert pe.check_agreement(results, "hand_written", 0.1)["bilevel"] == 0.0


def test_conjugate_gradient_solves_and_stops_at_rtol(gen):
    A = torch.randn(6, 6, generator=gen)
    A = A @ A.T + 6 * torch.eye(6)
    b = torch.randn(6, generator=gen)
    x = pe.conjugate_gradient(lambda v: A @ v, b, max_iter=6)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    loose = pe.conjugate_gradient(lambda v: A @ v, b, max_iter=100, rtol=1e-2)
    assert (A @ loose - b).norm() <= 1e-2 * b.norm()
    warm = pe.conjugate_gradient(lambda v: A @ v, b, max_iter=6, x0=torch.ones(6))
    torch.testing.assert_close(warm, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-12)


def test_as_vector_flattens_tensors_trees_and_arrays():
    out = pe.as_vector({"a": torch.ones(2, 2, dtype=torch.float32), "b": (torch.zeros(1), np.array([3.0]))})
    assert out.dtype == np.float64 and out.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 3.0]


def test_the_markdown_table_escapes_pipes_and_says_what_did_not_run():
    import overhead

    payload = {"commit": "abc", "quick": True, "peer_examples": {"clock": "cpu", "repeats": 3, "examples": {
        "ridge": {"title": "t", "source": "google/jaxopt x.py", "settings": "||w||^2", "fastest_pytorch_peer": "torchopt",
                  "implementations": {
                      "bilevel": {"status": "ran", "median_ms": 2.0, "x_fastest_pytorch_peer": 0.5, "x_jaxopt_jit": 20.0},
                      "hypertorch": {"status": "skipped", "reason": "not installed"},
                      "torchopt": {"status": "ran", "median_ms": 4.0, "x_fastest_pytorch_peer": 1.0},
                      "jaxopt_jit": {"status": "ran", "median_ms": 0.1}}}}}}
    table = overhead.markdown_table(payload)
    rows = [line for line in table.splitlines() if line.startswith("| `ridge`")]
    assert len(rows) == 1 and "\\|\\|w\\|\\|^2" in rows[0]
    assert "0.50x (TorchOpt)" in rows[0] and "20.00x" in rows[0] and "n/a" in rows[0]
    assert "--quick` run" in table and "hypertorch: not installed" in table
    header = table.splitlines()[0]
    assert header.count("|") == rows[0].count("|") - rows[0].count("\\|")


def test_time_alternated_reports_every_callable_per_round():
    import overhead

    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    times = overhead.time_alternated({"a": make("a"), "b": make("b")}, repeats=2, round_s=1e-4, max_calls=3)
    assert set(times) == {"a", "b"}
    for t in times.values():
        assert 1 <= t["calls"] <= 3 and len(t["wall"]) == len(t["cpu"]) == 2
