"""The few-shot command line under torchrun: 2 gloo processes on the CPU, on generated data.

One 2-rank run (``torchrun --standalone --nproc_per_node 2``, 4 meta-steps of 3 tasks: 2 on rank 0,
1 on rank 1) is the reference: it must train like one process over the same tasks, evaluate like one
process over the same episodes, and be reproduced exactly by a run that is stopped and resumed. A rank
that dies or hangs must end the job with a clear error. The processes run
``imaml_cli_worker.py``, the command line with ``build_samplers`` replaced by generated data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import imaml_cli_worker
import pytest
import torch
from helpers import class_pool

import bilevel as bl
from applications.imaml import __main__ as cli
from applications.imaml.model import ConvNet
from applications.imaml.train import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(imaml_cli_worker.__file__).resolve())
# 3-way 1-shot iMAML on generated data; 3 tasks per step on 2 ranks: an uneven split (2 + 1)
TINY = ["--config", "omniglot-5w1s-gd-cpu", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "3",
        "--inner-steps", "2", "--cg-steps", "2", "--eval-episodes", "9", "--quiet", "--threads", "1"]
STEPS = ["--steps", "4", "--checkpoint-every", "2"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", bl.distributed.TIMEOUT_ENV)

pytestmark = pytest.mark.usefixtures("float32_default")  # the application runs in float32


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("IMAML_WORKER")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra)
    return env


def torchrun(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 imaml_cli_worker.py ARGS`` (its output captured)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def output(proc) -> str:
    return proc.stdout + proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# batch norm removes a convolution's bias: its true gradient is zero and its computed one rounding noise,
# which Adam scales up to steps of about the learning rate (m / sqrt(v) ~ sign). Those biases leave the
# network's function unchanged; they are compared through the logits below.
def cancelled(name: str) -> bool:
    return name.startswith("features.") and name.endswith(".bias") and int(name.split(".")[1]) % 4 == 0


def flat(theta: dict, keep=lambda name: True) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for k, v in theta.items() if keep(k)])


def logits(theta: dict) -> torch.Tensor:
    x = class_pool()[:, :3].reshape(-1, 1, 28, 28).float() / 255
    return torch.func.functional_call(ConvNet(3), theta, (x,))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The reference: 4 meta-steps on 2 ranks (each drawing from its global random stream every step)."""
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    proc = torchrun("train", *TINY, *STEPS, "--out", str(run), IMAML_WORKER_DRAWS="1")
    assert proc.returncode == 0, output(proc)[-4000:]
    return run


@pytest.fixture
def one_process(tmp_path, monkeypatch, capsys):
    """Run the command line in this process on the same generated data; returns the run folder."""
    monkeypatch.setattr(cli, "build_samplers", imaml_cli_worker.generated_samplers)
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)

    def run(name: str, *args: str, expect: int = 0) -> Path:
        out = tmp_path / name
        assert cli.main(["train", *TINY, *STEPS, "--out", str(out), *args]) == expect
        capsys.readouterr()
        return out

    return run


def test_two_ranks_train_like_one_process_over_the_same_tasks(two_ranks, one_process):
    dist, single = load(two_ranks), load(one_process("single"))
    control = load(one_process("other_tasks", "--meta-batch", "2"))  # what 'not the same tasks' looks like
    assert dist["world_size"] == 2 and dist["format"] == 3 and single["format"] == 2
    keep = lambda name: not cancelled(name)  # noqa: E731
    gap = float((flat(dist["theta"], keep) - flat(single["theta"], keep)).abs().max())
    gap_control = float((flat(control["theta"], keep) - flat(single["theta"], keep)).abs().max())
    # rounding: the ranks sum their tasks' meta-gradients in another order, and Adam's first steps are
    # about the learning rate whatever the gradient's size, so parameters with tiny gradients move by noise
    assert gap < 5e-5, f"2 ranks vs 1 process: parameters differ by {gap:.3g}"
    assert gap_control > 20 * 5e-5, gap_control  # the tolerance does tell other tasks apart
    torch.testing.assert_close(logits(dist["theta"]), logits(single["theta"]), rtol=0, atol=1e-4)
    for a, b in zip(dist["history"], single["history"], strict=True):
        assert a["step"] == b["step"]
        assert a["query_loss"] == pytest.approx(b["query_loss"], rel=1e-5)
        assert a["query_accuracy"] == pytest.approx(b["query_accuracy"], rel=1e-6)
        assert a["meta_grad_norm"] == pytest.approx(b["meta_grad_norm"], rel=1e-4)
        assert a["task_grad_norm_max"] == pytest.approx(b["task_grad_norm_max"], rel=1e-5)
    # rank 0 alone wrote the run folder: every step logged once, with its all-reduce time
    logged = records(two_ranks)
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(r["comm_seconds"] >= 0 for r in logged)
    run_file = json.loads((two_ranks / "run.json").read_text())
    assert run_file["world_size"] == 2 and run_file["device"] == "cpu"
    assert (two_ranks / "learning_curve.png").is_file()


def test_the_split_final_evaluation_equals_one_process_over_the_same_episodes(two_ranks, one_process, tmp_path,
                                                                              capsys):
    copy = tmp_path / "copy"
    shutil.copytree(two_ranks, copy)
    assert cli.main(["evaluate", "--out", str(copy), "--episodes", "9", "--quiet", "--threads", "1"]) == 0
    alone = json.loads((copy / "eval-9.json").read_text())
    split = json.loads((two_ranks / "summary.json").read_text())  # 9 episodes: 5 on rank 0, 4 on rank 1
    assert split["world_size"] == 2 and split["episodes"] == alone["episodes"] == 9
    assert (split["accuracy"], split["ci95"]) == (alone["accuracy"], alone["ci95"])


def test_a_signal_to_one_rank_stops_both_after_the_same_step_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    # SIGTERM to rank 1 alone, in the middle of step 3: both ranks finish step 3, save it, and stop
    proc = torchrun("train", *TINY, *STEPS, "--out", str(run), IMAML_WORKER_DRAWS="1",
                    IMAML_WORKER_SIGNAL="1:3:SIGTERM")
    assert proc.returncode != 0
    assert f"interrupted: checkpoint of step 3 saved in {run}; continue with --resume" in proc.stderr, output(proc)
    stopped = read_checkpoint(run / "checkpoint.pt")
    assert stopped["step"] == 3 and [r["step"] for r in records(run)] == [1, 2, 3]
    assert len(stopped["rank_rng"]) == 2
    assert not torch.equal(stopped["rank_rng"][0]["cpu"], stopped["rank_rng"][1]["cpu"])  # the ranks' own streams


def test_a_rank_that_dies_ends_the_job_with_a_clear_error_and_resume_is_exact(two_ranks, tmp_path):
    run = tmp_path / "run"
    proc = torchrun("train", *TINY, *STEPS, "--out", str(run), IMAML_WORKER_DRAWS="1",
                    IMAML_WORKER_SIGNAL="1:3:SIGKILL")
    assert proc.returncode != 0
    assert "error: all_reduce failed on rank 0 of 2: another rank stopped (it crashed or was killed)" in proc.stderr
    assert f"The checkpoint in {run} holds step 2: continue with --resume" in proc.stderr
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 2 and [r["step"] for r in records(run)] == [1, 2]
    proc = torchrun("train", *TINY, *STEPS, "--out", str(run), "--resume", IMAML_WORKER_DRAWS="1")
    assert proc.returncode == 0, output(proc)[-4000:]
    resumed, straight = load(run), load(two_ranks)
    torch.testing.assert_close(flat(resumed["theta"]), flat(straight["theta"]), rtol=0, atol=0)
    for mine, theirs in zip(resumed["rank_rng"], straight["rank_rng"], strict=True):  # every rank's stream
        assert torch.equal(mine["cpu"], theirs["cpu"])
    # every step logged once, as the uninterrupted run logged it (rank 0's global draws included)
    assert records(run) == [{**r, "seconds": s["seconds"], "comm_seconds": s["comm_seconds"]}
                            for r, s in zip(records(two_ranks), records(run), strict=True)]


def test_a_rank_that_hangs_ends_the_job_after_the_timeout(tmp_path):
    """Started without torchrun (whose agent would not notice a stopped process): the timeout alone ends it."""
    run, port = tmp_path / "run", str(free_port())
    args = [sys.executable, WORKER, "train", *TINY, *STEPS, "--out", str(run), "--dist-timeout", "5"]
    procs = []
    for rank in range(2):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, IMAML_WORKER_SIGNAL="1:3:SIGSTOP")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        _, err = procs[0].communicate(timeout=90)  # rank 1 stops itself in step 3: rank 0 must not wait forever
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err
    assert ("error: all_reduce failed on rank 0 of 2: a rank did not take part within the process group's timeout "
            "of 5 s") in err
    assert "the timeout is --dist-timeout" in err and f"The checkpoint in {run} holds step 2" in err
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 2


# --- mistakes, refused before any process group starts --------------------------------------------------


@pytest.fixture
def as_rank_0_of(monkeypatch):
    """Make this process look like rank 0 of a torchrun job of ``world`` processes (no group is started)."""

    def set_world(world: int) -> None:
        for k, v in dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
            monkeypatch.setenv(k, v)

    return set_world


def one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not torch.distributed.is_initialized()
    return lines[0]


def test_more_processes_than_tasks_is_refused(tmp_path, capsys, as_rank_0_of):
    as_rank_0_of(4)
    line = one_error_line(capsys, ["train", *TINY, "--out", str(tmp_path / "run")])
    assert line == ("error: the meta-batch has 3 task(s) and torchrun started 4 processes; each process needs at "
                    "least one task of every meta-step: use --meta-batch >= 4 (a multiple of 4 keeps the ranks "
                    "equally busy) or fewer processes.")


def test_nccl_on_cpus_and_a_fixed_gpu_are_refused(tmp_path, capsys, as_rank_0_of):
    as_rank_0_of(2)
    line = one_error_line(capsys, ["train", *TINY, "--out", str(tmp_path / "run"), "--device", "cpu",
                                   "--dist-backend", "nccl"])
    assert "backend 'nccl' communicates between GPUs only, and this rank computes on 'cpu'; use backend 'gloo'" in line
    line = one_error_line(capsys, ["train", *TINY, "--out", str(tmp_path / "run"), "--device", "cuda:1"])
    assert line == ("error: --device cuda:1: under torchrun every rank takes its own GPU, cuda:LOCAL_RANK; pass "
                    "--device cuda (and restrict the GPUs with CUDA_VISIBLE_DEVICES).")


def test_resuming_on_another_number_of_processes_is_refused(two_ranks, one_process, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(two_ranks, copy)
    line = one_error_line(capsys, ["train", *TINY, *STEPS, "--out", str(copy), "--resume"])
    assert line.startswith(f"error: --resume: the checkpoint {copy / 'checkpoint.pt'} was written by a run on 2 "
                           f"processes, this run has 1; every rank's random state is in it, so resume with the "
                           f"same number: torchrun with 2 processes in all")
    assert load(copy)["step"] == 4  # untouched
