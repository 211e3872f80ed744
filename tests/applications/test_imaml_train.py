"""The few-shot application: algorithms lower the meta-loss, vmap equals the loop, checkpoints resume exactly."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal

import pytest
import torch
from helpers import class_pool

from applications.imaml.algorithms import ALGORITHMS, TASK_DIAGNOSTICS, AlgorithmConfig, MetaLearner, TaskBatch
from applications.imaml.configs import CONFIGS, PAPER_TABLE2, ExperimentConfig, get_config
from applications.imaml.data import EpisodeSampler
from applications.imaml.model import ConvNet, init_params
from applications.imaml.train import (CheckpointError, CheckpointMismatchError, Trainer, atomic_save,
                                     confidence_interval, evaluate)

ROOT = pathlib.Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("float32_default")  # the application runs in float32, like on a GPU


def fixed_batch(n_way=3, k_shot=1, k_query=2, tasks=2, seed=0) -> TaskBatch:
    ep = EpisodeSampler(class_pool(seed=seed), n_way=n_way, k_shot=k_shot, k_query=k_query, seed=seed).sample(tasks)
    return TaskBatch(ep.support_x, ep.support_y, ep.query_x, ep.query_y)


def small_config(name: str, **extra) -> AlgorithmConfig:
    options = {"inner_steps": 3, "inner_lr": 0.1, "hf_iterations": 2}
    options.update(extra)
    return AlgorithmConfig(name, **options)


def query_loss_after_adaptation(learner, theta, batch) -> float:
    total = 0.0
    for i in range(len(batch)):
        xs, ys, xq, yq = batch.task(i)
        phi = learner.adapt(theta, xs, ys)
        total += float(torch.nn.functional.cross_entropy(learner.logits(phi, xq), yq))
    return total / len(batch)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_one_meta_step_lowers_the_meta_training_loss(name):
    net = ConvNet(3)
    theta = init_params(net, seed=1)
    learner = MetaLearner(net, small_config(name, vmap=False))
    batch = fixed_batch()
    before = query_loss_after_adaptation(learner, theta, batch)
    stats = learner.meta_gradient(theta, batch)
    expected = {"query_loss", "query_accuracy", "negative_curvature"}
    if name == "imaml_gd":  # the loop path reports what decides each task's meta-gradient
        expected |= {f"{k}_{s}" for k in TASK_DIAGNOSTICS for s in ("mean", "max")}
        assert stats["inner_grad_norm_max"] >= stats["inner_grad_norm_mean"] > 0
        assert 0 <= stats["cg_relative_residual_mean"] < 1
    assert set(stats) == expected
    grads = [t.grad for t in theta.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():  # a plain gradient step along the meta-gradient
        for t in theta.values():
            t -= 0.005 * t.grad / max(1.0, float(torch.stack([g.norm() for g in grads]).norm()))
    after = query_loss_after_adaptation(learner, theta, batch)
    assert after < before, f"{name}: meta-training loss went from {before:.4f} to {after:.4f}"


def test_vmap_path_gives_the_loop_meta_gradient():
    torch.set_default_dtype(torch.float64)  # float64 so that the comparison is exact to rounding
    net = ConvNet(3)
    b = fixed_batch(tasks=3)
    batch = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y)
    grads = {}
    for vmap in (False, True):
        theta = init_params(net, seed=2)
        stats = MetaLearner(net, small_config("imaml_gd", vmap=vmap)).meta_gradient(theta, batch)
        grads[vmap] = (torch.cat([t.grad.reshape(-1) for t in theta.values()]), stats)
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-10, atol=1e-12)
    assert grads[True][1]["query_loss"] == pytest.approx(grads[False][1]["query_loss"], rel=1e-12)


def test_learned_per_parameter_lam_gets_a_gradient():
    net = ConvNet(3)
    theta = init_params(net, seed=3)
    log_lam = {k: torch.zeros_like(v).requires_grad_(True) for k, v in theta.items()}
    MetaLearner(net, small_config("imaml_gd", learn_lam=True)).meta_gradient(theta, fixed_batch(), log_lam)
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in log_lam.values())
    assert float(sum(v.grad.abs().sum() for v in log_lam.values())) > 0


def test_algorithm_config_validation():
    with pytest.raises(ValueError, match="unknown algorithm 'imaml'; available: imaml_gd"):
        AlgorithmConfig("imaml")
    with pytest.raises(ValueError, match="cg_steps must be a positive int"):
        AlgorithmConfig("imaml_gd", cg_steps=0)
    with pytest.raises(ValueError, match="lam must be a positive number"):
        AlgorithmConfig("imaml_gd", lam=-1.0)


def test_every_table2_row_has_a_config_and_a_paper_number():
    for (algo, n_way, k_shot) in PAPER_TABLE2:
        suffix = {"imaml_gd": "gd", "imaml_hf": "hf"}.get(algo, algo)
        config = get_config(f"omniglot-{n_way}w{k_shot}s-{suffix}")
        assert (config.algorithm["name"], config.n_way, config.k_shot) == (algo, n_way, k_shot)
    assert get_config("omniglot-20w1s-gd").algorithm["inner_steps"] == 25
    assert get_config("omniglot-5w5s-gd").algorithm["inner_steps"] == 16
    with pytest.raises(ValueError, match="unknown config 'x'; available:"):
        get_config("x")


def test_confidence_interval():
    mean, ci = confidence_interval(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert mean == pytest.approx(50.0)
    assert ci == pytest.approx(1.96 * 57.735 / 2, rel=1e-4)


# --- the trainer: checkpoints, resume, interruption ---------------------------------------------


def make_trainer(out, steps=4, **algo):
    config = ExperimentConfig(n_way=3, k_shot=1, k_query=2, meta_batch=2, meta_steps=steps, eval_episodes=6,
                              eval_every=0, checkpoint_every=2,
                              algorithm={"name": "imaml_gd", "inner_steps": 2, "vmap": False, **algo})
    pool = class_pool()
    train = EpisodeSampler(pool[:8], n_way=3, k_shot=1, k_query=2, seed=5)
    test = EpisodeSampler(pool[8:], n_way=3, k_shot=1, k_query=2, seed=6)
    return Trainer(config, out, train, test, progress=False)


def params(trainer):
    return torch.cat([v.detach().reshape(-1) for v in trainer.theta.values()])


def test_resume_continues_exactly(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.train()
    first = make_trainer(tmp_path / "b")
    first.train(steps=2)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    second = make_trainer(tmp_path / "b")
    second.resume()
    assert second.step == 2
    second.train()
    torch.testing.assert_close(params(second), params(straight), rtol=0, atol=0)
    assert [r["query_loss"] for r in second.history] == [r["query_loss"] for r in straight.history]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 1000


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.train()
    interrupted = make_trainer(tmp_path / "b")

    def stop_at_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted.train(on_step=stop_at_3)
    resumed = make_trainer(tmp_path / "b")
    resumed.resume()
    assert resumed.step == 3
    resumed.train()
    torch.testing.assert_close(params(resumed), params(straight), rtol=0, atol=0)


def test_resume_refuses_another_config_and_a_missing_checkpoint(tmp_path):
    make_trainer(tmp_path / "a").train(steps=2)
    with pytest.raises(ValueError, match="different configuration"):
        make_trainer(tmp_path / "a", lam=3.0).resume()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        make_trainer(tmp_path / "empty").resume()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run of ``make_trainer``: (flat parameters, history)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        trainer = make_trainer(tmp_path_factory.mktemp("straight"))
        trainer.train()
    finally:
        torch.set_default_dtype(old)
    return params(trainer), trainer.history


def signal_after_sampling(trainer, at_step, *signals):
    """Send ``signals`` to this process right after the trainer draws the batch of meta-step ``at_step``:
    in the middle of that step, where the sampler has moved on but the parameters not yet."""
    sample, calls = trainer.train_sampler.sample, []

    def sample_then_signal(batch_size):
        episode = sample(batch_size)
        calls.append(batch_size)
        if len(calls) == at_step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return episode

    trainer.train_sampler.sample = sample_then_signal


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(history):
    return [r["query_loss"] for r in history]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_step_finishes_the_step_saves_it_and_resume_is_exact(tmp_path, straight_run, sig):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupted = make_trainer(tmp_path)
    signal_after_sampling(interrupted, 3, sig)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    assert interrupted.step == interrupted.saved_step == torch.load(interrupted.checkpoint_path)["step"] == 3
    resumed = make_trainer(tmp_path)
    resumed.resume()
    assert resumed.step == 3
    resumed.train()
    torch.testing.assert_close(params(resumed), straight_run[0], rtol=0, atol=0)
    assert losses(resumed.history) == losses(straight_run[1])
    assert logged_steps(tmp_path) == [1, 2, 3, 4]


def test_a_second_signal_stops_at_once_and_keeps_the_last_consistent_checkpoint(tmp_path, straight_run):
    interrupted = make_trainer(tmp_path)  # checkpoints every 2 steps
    signal_after_sampling(interrupted, 3, signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert interrupted.saved_step == torch.load(interrupted.checkpoint_path)["step"] == 2  # not the half step 3
    resumed = make_trainer(tmp_path)
    resumed.resume()
    resumed.train()
    torch.testing.assert_close(params(resumed), straight_run[0], rtol=0, atol=0)
    assert logged_steps(tmp_path) == [1, 2, 3, 4]


class Killed(BaseException):
    """Stands for kill -9: the process ends on the spot, nothing is saved."""


def test_after_a_kill_resume_logs_every_step_once(tmp_path, straight_run):
    dying = make_trainer(tmp_path)  # checkpoints every 2 steps

    def die_after_logging_step_3(record):
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        dying.train(on_step=die_after_logging_step_3)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "query_lo')  # and a line torn by the kill
    assert torch.load(dying.checkpoint_path)["step"] == 2
    before = metrics.read_text()
    evaluation = make_trainer(tmp_path)
    evaluation.resume(training=False)  # evaluating writes nothing into the run folder
    assert evaluation.step == 2 and metrics.read_text() == before
    resumed = make_trainer(tmp_path)
    resumed.resume()
    assert logged_steps(tmp_path) == [1, 2]
    resumed.train()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert losses(records) == losses(straight_run[1])
    torch.testing.assert_close(params(resumed), straight_run[0], rtol=0, atol=0)


def test_resume_names_a_damaged_checkpoint(tmp_path):
    make_trainer(tmp_path).save()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"the checkpoint {re.escape(str(path))} is unreadable \(.*\); it is "
                                              r"truncated or not a checkpoint: delete it and train again"):
        make_trainer(tmp_path).resume()
    torch.save({"step": 1}, path)
    with pytest.raises(CheckpointError, match=r"is not a checkpoint of this application \(it lacks format, config"):
        make_trainer(tmp_path).resume()
    assert issubclass(CheckpointError, RuntimeError)
    assert issubclass(CheckpointMismatchError, CheckpointError) and issubclass(CheckpointMismatchError, ValueError)


def test_checkpoint_carries_every_cuda_devices_random_state(tmp_path, monkeypatch):
    if not torch.cuda.is_initialized():
        assert make_trainer(tmp_path).state_dict()["cuda_rng"] is None
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    restored = {}
    for name, fake in {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 2,
                       "get_rng_state_all": lambda: states,
                       "set_rng_state": lambda state, device: restored.__setitem__(device, state)}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    make_trainer(tmp_path).save()
    make_trainer(tmp_path).resume()
    assert sorted(restored) == [0, 1]
    assert all(torch.equal(restored[i], states[i]) for i in range(2))


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_final_evaluation_writes_a_summary(tmp_path):
    trainer = make_trainer(tmp_path / "a", steps=2)
    trainer.train()
    res = trainer.final_evaluation()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["episodes"] == res.episodes == 6
    assert 0.0 <= summary["accuracy"] <= 100.0 and summary["paper"] is None  # no 3-way row in Table 2


def test_cli_lists_configs(capsys):
    from applications.imaml.__main__ import main

    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CONFIGS)


REAL_OMNIGLOT = pathlib.Path(os.environ.get("BILEVEL_OMNIGLOT", ROOT.parent / "shared" / "data" / "omniglot"))


def test_cli_train_and_evaluate_on_real_omniglot(tmp_path, capsys):
    if not (REAL_OMNIGLOT / "images_background.zip").exists():
        pytest.skip(f"real Omniglot not found at {REAL_OMNIGLOT} (set BILEVEL_OMNIGLOT to run this test)")
    from applications.imaml.__main__ import main

    args = ["--data-dir", str(REAL_OMNIGLOT), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["train", "--config", "omniglot-5w1s-gd-cpu", "--out", str(tmp_path / "run"), "--steps", "2",
                 "--meta-batch", "2", "--eval-episodes", "10", *args]) == 0
    out = capsys.readouterr().out
    assert "omniglot-5w1s-gd-cpu" in out and "99.16 +- 0.35%" in out
    assert main(["evaluate", "--out", str(tmp_path / "run"), "--episodes", "10", *args]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 10


def test_negative_curvature_falls_back_to_the_first_order_direction(monkeypatch):
    import bilevel as bl
    from applications.imaml import algorithms

    net = ConvNet(3)
    batch = fixed_batch(tasks=1)
    real = bl.hypergradient

    def indefinite(*args, **kwargs):  # the backward reports negative curvature for every task
        g, info = real(*args, **kwargs)
        info.status = bl.LinearSolveStatus.NEGATIVE_CURVATURE
        return g, info

    monkeypatch.setattr(algorithms.bl, "hypergradient", indefinite)
    theta = init_params(net, seed=4)
    stats = MetaLearner(net, small_config("imaml_gd", vmap=False)).meta_gradient(theta, batch)
    assert stats["negative_curvature"] == 1
    learner = MetaLearner(net, small_config("imaml_gd", vmap=False))
    xs, ys, xq, yq = batch.task(0)
    phi = bl.solve(learner.proximal_problem(2.0), {k: v.detach() for k, v in init_params(net, seed=4).items()},
                   (xs, ys), solver=learner.inner_gd).phi
    expected = torch.func.grad(lambda p: torch.nn.functional.cross_entropy(learner.logits(p, xq), yq))(phi)
    for k, t in theta.items():
        torch.testing.assert_close(t.grad, expected[k])


def indefinite_setting(**extra):
    """A float64 batch and a weak proximal term (lam 0.01, one inner step) where exact curvature is
    indefinite: {vmap: (flat meta-gradient, negative-curvature count)} for the loop and vmap paths."""
    torch.set_default_dtype(torch.float64)
    net = ConvNet(3)
    b = fixed_batch(tasks=4, seed=3)
    batch = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y)
    results = {}
    for vmap in (False, True):
        theta = init_params(net, seed=7)
        learner = MetaLearner(net, small_config("imaml_gd", vmap=vmap, lam=0.01, inner_steps=1, inner_lr=0.5,
                                                **extra))
        stats = learner.meta_gradient(theta, batch)
        results[vmap] = (torch.cat([t.grad.reshape(-1) for t in theta.values()]), stats["negative_curvature"])
    return results, net, batch


def test_vmap_and_loop_agree_when_tasks_meet_negative_curvature():
    results, _, _ = indefinite_setting()
    assert results[False][1] == results[True][1] > 0, results
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-8, atol=1e-10)


def test_gauss_newton_curvature_vmap_equals_loop_and_never_meets_negative_curvature():
    """The setting of the test above, where exact curvature is indefinite: Gauss-Newton stays definite."""
    results, net, batch = indefinite_setting(curvature="gauss_newton")
    assert results[False][1] == results[True][1] == 0, results
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-8, atol=1e-10)
    # and it is not the first-order direction: the Gauss-Newton solve changed the gradient
    theta = init_params(net, seed=7)
    MetaLearner(net, small_config("fomaml", vmap=False, inner_steps=1, inner_lr=0.5)).meta_gradient(theta, batch)
    fo = torch.cat([t.grad.reshape(-1) for t in theta.values()])
    assert float((fo - results[False][0]).norm()) > 1e-3 * float(fo.norm())


@pytest.mark.parametrize("name", ["imaml_gd", "imaml_hf"])
def test_gauss_newton_curvature_lowers_the_meta_training_loss(name):
    net = ConvNet(3)
    theta = init_params(net, seed=1)
    learner = MetaLearner(net, small_config(name, vmap=False, curvature="gauss_newton"))
    batch = fixed_batch()
    before = query_loss_after_adaptation(learner, theta, batch)
    learner.meta_gradient(theta, batch)
    grads = [t.grad for t in theta.values()]
    with torch.no_grad():
        for t in theta.values():
            t -= 0.005 * t.grad / max(1.0, float(torch.stack([g.norm() for g in grads]).norm()))
    assert query_loss_after_adaptation(learner, theta, batch) < before


def test_curvature_option_is_validated():
    with pytest.raises(ValueError, match="curvature must be one of 'exact', 'gauss_newton', 'gauss_newton_jacobian', got 'gn'"):
        AlgorithmConfig("imaml_gd", curvature="gn")


@pytest.mark.parametrize("curvature", ["exact", "gauss_newton", "gauss_newton_jacobian"])
def test_tasks_on_worker_threads_give_the_serial_meta_gradient(curvature):
    """workers=3: the tasks of a meta-batch on threads (each with its own copy of the network) give the
    serial meta-gradient, statistics and negative-curvature count (float64: equal to rounding)."""
    torch.set_default_dtype(torch.float64)
    net = ConvNet(3)
    b = fixed_batch(tasks=4, seed=3)
    batch = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y)
    out = {}
    threads = torch.get_num_threads()
    for workers in (1, 3):
        theta = init_params(net, seed=7)
        learner = MetaLearner(net, small_config("imaml_gd", vmap=False, lam=0.01, inner_steps=1, inner_lr=0.5,
                                                curvature=curvature), workers=workers)
        stats = learner.meta_gradient(theta, batch)
        assert torch.get_num_threads() == threads  # map restores torch's threads
        out[workers] = (torch.cat([t.grad.reshape(-1) for t in theta.values()]), stats)
    torch.testing.assert_close(out[3][0], out[1][0], rtol=1e-9, atol=1e-11)
    assert out[3][1]["negative_curvature"] == out[1][1]["negative_curvature"]
    if curvature == "exact":  # the setting meets negative curvature: the per-task fallback is exercised
        assert out[1][1]["negative_curvature"] > 0
    for key in ("query_loss", "query_accuracy", "task_grad_norm_mean", "inner_grad_norm_max"):
        assert out[3][1][key] == pytest.approx(out[1][1][key], rel=1e-9), key


def test_evaluation_on_worker_threads_gives_the_serial_accuracies():
    net = ConvNet(3)
    theta = init_params(net, seed=1)
    accs = {}
    for workers in (1, 2):
        learner = MetaLearner(net, small_config("imaml_gd", vmap=False), workers=workers)
        sampler = EpisodeSampler(class_pool(seed=5), n_way=3, k_shot=1, k_query=2, seed=5)
        res = evaluate(learner, theta, sampler, 12, batch_size=5, progress=False)
        accs[workers] = (res.accuracy, res.ci95, res.episodes)
    assert accs[2] == pytest.approx(accs[1], rel=1e-6)


def test_workers_must_be_a_positive_int():
    with pytest.raises(ValueError, match="workers must be a positive int"):
        MetaLearner(ConvNet(3), small_config("imaml_gd"), workers=0)
