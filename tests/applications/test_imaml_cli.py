"""The few-shot command line: overrides, run folders, one-line errors, exact resume after a signal.

``build_samplers`` is replaced by generated 'characters' (as in test_imaml_train.py), so no test needs
Omniglot; the data-error tests call the real loader on empty or broken folders.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from helpers import class_pool

from applications.imaml import __main__ as cli
from applications.imaml.configs import get_config
from applications.imaml.data import EpisodeSampler

# a tiny 3-way 1-shot iMAML run on generated data: a few seconds for two meta-steps and the evaluation
TINY = ["--config", "omniglot-5w1s-gd-cpu", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2",
        "--inner-steps", "2", "--cg-steps", "2", "--eval-episodes", "4", "--quiet"]


pytestmark = pytest.mark.usefixtures("float32_default")  # the application runs in float32, like on a GPU


class SignallingSampler(EpisodeSampler):
    """Sends this process ``signals`` right after drawing its ``at``-th batch: in the middle of a meta-step."""

    at: int | None = None
    signals: tuple[int, ...] = ()
    calls = 0

    def sample(self, batch_size):
        episode = super().sample(batch_size)
        self.calls += 1
        if self.calls == self.at:
            for sig in self.signals:
                os.kill(os.getpid(), sig)
        return episode


class FakeData:
    """Stands in for ``build_samplers``: the config's episode shape on a generated pool; records each call."""

    def __init__(self):
        self.calls: list[dict] = []
        self.signal_at: int | None = None
        self.signals: tuple[int, ...] = ()

    def __call__(self, config, data_dir, *, cache_dir, download, device, progress):
        self.calls.append({"data_dir": data_dir, "cache_dir": cache_dir, "device": str(device), "config": config})
        pool = class_pool()
        shape = dict(n_way=config.n_way, k_shot=config.k_shot, k_query=config.k_query)
        train = SignallingSampler(pool[:8], rotations=True, seed=config.seed, **shape)
        train.at, train.signals = self.signal_at, self.signals
        test = EpisodeSampler(pool[8:], seed=config.seed + 10_000, **shape)
        return train, test, 1, 28


@pytest.fixture
def data(monkeypatch) -> FakeData:
    fake = FakeData()
    monkeypatch.setattr(cli, "build_samplers", fake)
    return fake


def fails(capsys, argv) -> str:
    """Run the command line, check it ends with exit status 2 and one ``error:`` line; return that line."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def checkpoint(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def flat(state):
    return torch.cat([v.reshape(-1) for v in state["theta"].values()])


# --- overrides and the run folder ---------------------------------------------------------------------


def test_train_overrides_reach_the_config(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run), "--steps", "2", "--algorithm", "fomaml",
                     "--checkpoint-every", "1", "--seed", "7", "--ways", "4", "--shots", "2", "--query", "3"]) == 0
    config = checkpoint(run)["config"]
    assert (config["n_way"], config["k_shot"], config["k_query"]) == (4, 2, 3)
    assert (config["meta_steps"], config["meta_batch"], config["eval_episodes"]) == (2, 2, 4)
    assert (config["checkpoint_every"], config["seed"]) == (1, 7)
    # --algorithm replaces the name only: the config's other options and the other overrides stay
    assert config["algorithm"] == {**cli.CONFIGS["omniglot-5w1s-gd-cpu"].algorithm, "name": "fomaml",
                                   "inner_steps": 2, "cg_steps": 2}
    assert data.calls[0]["config"].n_way == 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_evaluate_uses_the_folders_train_recorded_and_writes_its_own_file(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run), "--steps", "2", "--data-dir", str(tmp_path / "omni"),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    recorded = json.loads((run / "run.json").read_text())
    assert recorded == {"config": "omniglot-5w1s-gd-cpu", "data_dir": str((tmp_path / "omni").resolve()),
                        "cache_dir": str((tmp_path / "cache").resolve()), "device": "cpu"}
    summary = (run / "summary.json").read_text()
    capsys.readouterr()

    assert cli.main(["evaluate", "--out", str(run), "--episodes", "5", "--quiet"]) == 0
    assert data.calls[-1]["data_dir"] == recorded["data_dir"] and data.calls[-1]["cache_dir"] == recorded["cache_dir"]
    result = json.loads((run / "eval-5.json").read_text())
    assert result["episodes"] == 5 and result["steps"] == 2 and 0 <= result["accuracy"] <= 100
    assert result["ci95"] == pytest.approx(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ci95"])
    assert (run / "summary.json").read_text() == summary  # train's final evaluation is left alone

    assert cli.main(["evaluate", "--out", str(run), "--episodes", "3", "--quiet", "--data-dir", str(tmp_path / "b"),
                     "--cache-dir", str(tmp_path / "c")]) == 0
    assert (data.calls[-1]["data_dir"], data.calls[-1]["cache_dir"]) == (str(tmp_path / "b"), str(tmp_path / "c"))
    assert json.loads((run / "eval-3.json").read_text())["episodes"] == 3


# --- mistakes end in one line -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["train", "--config", "nope"], r"argument --config: unknown config 'nope'; available: .*omniglot-5w1s-gd-cpu"),
    (["train", *TINY, "--steps", "-5"], r"argument --steps: must be an integer >= 1 \(meta-steps\), got -5"),
    (["train", *TINY, "--steps", "0"], r"argument --steps: must be an integer >= 1 \(meta-steps\), got 0"),
    (["train", *TINY, "--steps", "ten"], r"argument --steps: must be an integer >= 1 \(meta-steps\), got 'ten'"),
    (["train", *TINY, "--eval-episodes", "0"], r"argument --eval-episodes: must be an integer >= 1"),
    (["train", *TINY, "--meta-batch", "0"], r"argument --meta-batch: must be an integer >= 1 \(tasks per"),
    (["train", *TINY, "--checkpoint-every", "0"], r"argument --checkpoint-every: must be an integer >= 1"),
    (["train", *TINY, "--ways", "1"], r"argument --ways: must be an integer >= 2 \(classes per episode\), got 1"),
    (["train", *TINY, "--lam", "-1"], r"argument --lam: must be a finite number > 0 \(proximal strength\)"),
    (["train", *TINY, "--algorithm", "imaml"], r"argument --algorithm: invalid choice: 'imaml' \(choose from "),
    (["train", *TINY, "--device", "gpu7"], r"argument --device: unknown device 'gpu7'; use cpu, cuda"),
    (["evaluate", "--episodes", "0"], r"argument --episodes: must be an integer >= 1 \(meta-test episodes\), got 0"),
    (["evaluate"], r"the following arguments are required: --out \(see: python -m applications.imaml evaluate"),
])
def test_argument_mistakes(tmp_path, capsys, argv, expected):
    argv = [*argv, "--out", str(tmp_path / "run")] if argv != ["evaluate"] else argv
    line = fails(capsys, argv)
    assert re.match(f"error: {expected}", line), line


def test_missing_omniglot_names_the_files_and_the_download_flag(tmp_path, capsys):
    line = fails(capsys, ["train", *TINY, "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "empty"),
                          "--cache-dir", str(tmp_path / "cache")])
    assert line.startswith(f"error: Omniglot not found in '{tmp_path / 'empty'}'")
    assert "images_background.zip" in line and "images_evaluation.zip" in line and "--download" in line
    assert "--data-dir" in line and "load_omniglot" not in line


def test_a_broken_omniglot_archive_names_the_file(tmp_path, capsys):
    omni = tmp_path / "omni"
    omni.mkdir()
    for name in ("images_background", "images_evaluation"):
        (omni / f"{name}.zip").write_bytes(b"not a zip archive")
    line = fails(capsys, ["train", *TINY, "--out", str(tmp_path / "run"), "--data-dir", str(omni),
                          "--cache-dir", str(tmp_path / "cache")])
    assert "images_background.zip' is not a valid zip archive" in line
    assert "rerun with --download" in line and "load_omniglot" not in line


def test_resume_without_a_checkpoint(tmp_path, data, capsys):
    line = fails(capsys, ["train", *TINY, "--out", str(tmp_path / "run"), "--resume"])
    assert line == (f"error: --resume: no checkpoint at {tmp_path / 'run' / 'checkpoint.pt'}; start without "
                    f"--resume, or pass the --out of the run to continue.")
    assert data.calls == []  # refused before loading any data


def test_evaluate_without_a_checkpoint(tmp_path, capsys):
    line = fails(capsys, ["evaluate", "--out", str(tmp_path / "run")])
    assert line.startswith(f"error: no checkpoint at {tmp_path / 'run' / 'checkpoint.pt'}; train first")


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a run folder" in fails(capsys, ["train", *TINY, "--out", str(tmp_path / "file")])


@pytest.fixture
def trained(tmp_path, data, capsys):
    """A run folder after one meta-step of TINY."""
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run), "--steps", "1"]) == 0
    capsys.readouterr()
    return run


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_damaged_checkpoint_is_named_with_the_fix(trained, capsys, damage, command):
    path = trained / "checkpoint.pt"
    path.write_bytes(b"\x80\x02garbage" if damage == "garbage" else path.read_bytes()[:2000])
    argv = (["evaluate", "--out", str(trained), "--quiet"] if command == "evaluate"
            else ["train", *TINY, "--out", str(trained), "--steps", "2", "--resume"])
    line = fails(capsys, argv)
    assert f"the checkpoint {path} is unreadable" in line
    assert "it is truncated or not a checkpoint: delete it and train again" in line


def test_resume_refuses_a_checkpoint_of_another_configuration(trained, capsys):
    line = fails(capsys, ["train", *TINY, "--out", str(trained), "--steps", "2", "--resume", "--ways", "4",
                          "--lam", "3"])
    lam = get_config("omniglot-5w1s-gd-cpu").algorithm["lam"]
    assert f"was written by a different configuration (algorithm.lam: checkpoint {lam}, now 3.0; n_way: checkpoint " \
           f"3, now 4); use another --out folder, or the same config and overrides as that run." in line
    # more steps, other checkpoint and evaluation intervals leave the trajectory alone: resuming with them works
    assert cli.main(["train", *TINY, "--out", str(trained), "--steps", "2", "--checkpoint-every", "5",
                     "--eval-episodes", "3", "--resume"]) == 0
    assert checkpoint(trained)["step"] == 2 and checkpoint(trained)["config"]["meta_steps"] == 2


# --- signals ------------------------------------------------------------------------------------------------


def test_sigterm_mid_step_saves_that_step_and_resume_equals_an_uninterrupted_run(tmp_path, data, capsys):
    straight = tmp_path / "straight"
    assert cli.main(["train", *TINY, "--out", str(straight), "--steps", "3"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    data.signal_at, data.signals = 2, (signal.SIGTERM,)  # during meta-step 2, after its batch was drawn
    assert cli.main(["train", *TINY, "--out", str(run), "--steps", "3", "--data-dir", str(tmp_path / "omni")]) == 130
    assert f"interrupted: checkpoint of step 2 saved in {run}; continue with --resume" in capsys.readouterr().err
    assert checkpoint(run)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == handler  # put back

    data.signal_at = None
    assert cli.main(["train", *TINY, "--out", str(run), "--steps", "3", "--resume"]) == 0
    assert data.calls[-1]["data_dir"] == str((tmp_path / "omni").resolve())  # from run.json
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    torch.testing.assert_close(flat(checkpoint(run)), flat(checkpoint(straight)), rtol=0, atol=0)
    assert resumed == expected
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_the_examples_of_the_command_line_module():
    """pytest's --doctest-modules skips files named __main__.py, so its examples run here."""
    import doctest

    result = doctest.testmod(cli, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0
