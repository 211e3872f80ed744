"""The side-by-side command and the results blocks of the READMEs (numbers come from committed JSON files)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from applications.imaml import compare, quote
from applications.imaml.configs import ExperimentConfig, get_config


pytestmark = pytest.mark.usefixtures("float32_default")  # the application runs in float32


def fake_splits(data_dir, cache_dir, seed):
    g = torch.Generator().manual_seed(seed)
    pools = torch.randint(0, 256, (2, 12, 17, 1, 28, 28), generator=g, dtype=torch.uint8)
    return SimpleNamespace(train=pools[0], test=pools[1])


@pytest.fixture
def small_settings(monkeypatch):
    monkeypatch.setattr(compare, "load_splits", fake_splits)


def test_compare_trains_every_setting_on_the_same_budget_and_episodes(small_settings, tmp_path, capsys):
    status = compare.main(["--out", str(tmp_path), "--settings", "imaml", "fomaml-peers", "--tasks", "32",
                           "--episodes", "6", "--curve-episodes", "3", "--curve-points", "2", "--query", "2"])
    assert status == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert set(data["summary"]) == {"imaml", "fomaml-peers"}
    for run in data["runs"]:
        assert run["tasks_seen"] >= 32
        assert [p["tasks"] for p in run["curve"]][0] == 0 and run["curve"][-1]["tasks"] >= 32
        assert run["final"]["tasks"]["episodes"] == 6
        assert 0.0 <= run["final"]["tasks"]["accuracy"] <= 100.0
        assert run["training_seconds"] > 0
    # the same meta-test episodes for every setting: the untrained curves' first points are adaptation from
    # different networks, but the episodes (hence the label sets) are drawn by the same seeded sampler
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "imaml" in capsys.readouterr().out
    # a second call reuses the finished runs instead of training again
    before = (tmp_path / "runs" / "imaml-s0.json").stat().st_mtime_ns
    assert compare.main(["--out", str(tmp_path), "--settings", "imaml", "--tasks", "32", "--episodes", "6",
                         "--curve-episodes", "3", "--curve-points", "2", "--query", "2"]) == 0
    assert (tmp_path / "runs" / "imaml-s0.json").stat().st_mtime_ns == before


def test_compare_evaluates_at_equal_wall_time_too(small_settings, tmp_path):
    assert compare.main(["--out", str(tmp_path), "--settings", "imaml", "--tasks", "8", "--seconds", "0.5",
                         "--episodes", "4", "--curve-episodes", "2", "--curve-points", "1", "--query", "2"]) == 0
    run = json.loads((tmp_path / "compare.json").read_text())["runs"][0]
    assert run["final"]["seconds"]["seconds"] >= 0.5 and run["final"]["tasks"]["tasks"] >= 8
    # a decaying schedule trains a second time for the seconds budget, its cosine spanning that run
    timed = json.loads((tmp_path / "runs" / "imaml-time-s0.json").read_text())
    assert timed["training_seconds"] >= 0.5 and timed["config"]["meta_steps"] >= 1
    cfg = ExperimentConfig(**timed["config"])
    assert cfg.lr_schedule == "cosine"
    assert [st["lr"] for st in timed["steps"]] == pytest.approx([cfg.learning_rate(i) for i in range(len(timed["steps"]))])


def _row(seeds, accs, ci):
    return {"seeds": seeds, "accuracy_at_tasks": sum(accs) / len(accs), "ci95_at_tasks": ci,
            "per_seed_at_tasks": [(a, ci) for a in accs]}


def test_margins_say_ahead_only_when_the_intervals_do_not_overlap():
    summary = {"imaml": _row([0, 1], [88.0, 87.0], 0.6), "maml-peers": _row([1, 0], [86.0, 86.5], 0.6),
               "fomaml-peers": _row([0, 1], [87.0, 86.4], 0.5)}
    m = compare.margins(summary)
    assert set(m) == {"maml-peers@tasks", "fomaml-peers@tasks"}  # no seconds budget in these rows
    maml = m["maml-peers@tasks"]
    assert maml["lead"] == pytest.approx(87.5 - 86.25) and maml["intervals"] == pytest.approx(1.2)
    assert maml["ahead"] is True
    assert maml["lead_min_over_seeds"] == pytest.approx(87.0 - 86.0)  # paired by seed, not by position
    fo = m["fomaml-peers@tasks"]
    assert fo["lead"] == pytest.approx(0.8) and fo["ahead"] is False  # a lead inside the intervals
    assert compare.margins({"maml-peers": summary["maml-peers"]}) == {}  # nothing to compare with
    other = compare.margins({"study-k5": summary["imaml"], "maml-peers": summary["maml-peers"]}, reference="study-k5")
    assert other["maml-peers@tasks"]["reference"] == "study-k5"
    assert other["maml-peers@tasks"]["lead"] == pytest.approx(maml["lead"])


def test_compare_settings_and_errors(tmp_path, capsys):
    cfg = compare.setting_config("maml-peers", 3)
    assert isinstance(cfg, ExperimentConfig) and cfg.seed == 3
    assert cfg.network["blocks"] == 3 and cfg.meta_batch == 32 and cfg.k_query == 15
    assert cfg.algorithm["name"] == "maml" and cfg.algorithm["inner_steps"] == 5
    assert compare.setting_config("imaml", 0).algorithm == get_config("omniglot-5w1s-gd-cpu").algorithm
    with pytest.raises(ValueError, match="unknown setting 'x'; available: imaml"):
        compare.setting_config("x", 0)
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--tasks", "0"])
    assert "must be > 0" in capsys.readouterr().err
    assert compare.main(["--out", str(tmp_path), "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_readme_results_blocks_match_the_committed_results_files():
    stale = quote.stale_blocks()
    assert not stale, f"regenerate with python -m applications.imaml.quote write: {stale}"


def test_committed_results_were_measured_on_todays_configurations():
    stale = quote.stale_configs()
    assert not stale, "measure these again (the configuration changed after they were measured):\n" + "\n".join(stale)


def test_a_changed_configuration_makes_its_results_stale(tmp_path, monkeypatch, capsys):
    from applications.imaml.configs import get_config

    monkeypatch.setattr(quote, "RESULTS_DIR", tmp_path)
    today = get_config("omniglot-5w1s-gd-cpu")
    runs = [{"seed": 0, "config": today.replace(seed=0).to_dict()},
            {"seed": 1, "config": today.replace(seed=1, outer_lr=today.outer_lr / 3).to_dict()},
            {"seed": 2, "config": today.replace(seed=2, meta_steps=today.meta_steps // 2).to_dict()}]
    (tmp_path / "main_job.json").write_text(json.dumps({"config": runs[0]["config"], "runs": runs}))
    study = {"runs": [{"setting": "study-k5", "seed": 0,
                       "config": compare.setting_config("study-k5", 0).replace(meta_steps=7).to_dict()},
                      {"setting": "imaml", "seed": 1,
                       "config": compare.setting_config("imaml", 1).replace(algorithm={"lam": 2.0}).to_dict()},
                      {"setting": "gone", "seed": 0, "config": {}}]}
    (tmp_path / "study.json").write_text(json.dumps(study))
    stale = quote.stale_configs()
    assert len(stale) == 4, stale
    assert stale[0].startswith("main_job: seed 1: outer_lr:")
    assert stale[1].startswith("main_job: seed 2: meta_steps:")
    assert stale[2] == "study: imaml seed 1: algorithm.lam: 2.0 measured, 0.5 now"
    assert stale[3] == "study: gone: no longer a setting"
    monkeypatch.setattr(quote, "stale_blocks", lambda: [])  # the texts agree; the configurations do not
    assert quote.main(["check"]) == 1
    assert "measure them again" in capsys.readouterr().err


def test_the_study_plot_draws_every_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(quote, "RESULTS_DIR", tmp_path)
    assert quote.main(["plot-study"]) == 2  # no results file yet: one clear error
    summary = {name: {"accuracy_at_tasks": 80.0 + i, "ci95_at_tasks": 1.0, "seconds_per_task": 0.1 * (i + 1),
                      "per_seed_at_tasks": [(79.5 + i, 1.0), (80.5 + i, 1.0)]}
               for i, name in enumerate(["imaml", "study-k5", "study-q15"])}
    (tmp_path / "study.json").write_text(json.dumps({"summary": summary,
                                                      "arguments": {"tasks": 600, "seeds": [0, 1]}}))
    assert quote.main(["plot-study"]) == 0
    png = (tmp_path / "study.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_results_blocks_are_regenerated_from_their_files(tmp_path, monkeypatch):
    monkeypatch.setattr(quote, "RESULTS_DIR", tmp_path)
    (tmp_path / "main_job.json").write_text(json.dumps({
        "runs": [{"seed": 0, "accuracy": 91.234, "ci95": 0.8, "train_seconds": 300.0, "eval_seconds": 30.0,
                  "wall_seconds": 340.0, "last20_query_accuracy": 90.0, "best20_query_accuracy": 91.0}],
        "mean_accuracy": 91.234, "commits": ["abc123"]}))
    text = "before\n<!-- results:main-job -->\nold text\n<!-- /results:main-job -->\nafter\n"
    new = quote.rewrite(text)
    assert "91.23 ± 0.80%" in new and "old text" not in new and new.startswith("before\n")
    assert new.endswith("<!-- /results:main-job -->\nafter\n") and "abc123" in new
    assert quote.rewrite(new) == new
    with pytest.raises(ValueError, match="unknown results block 'nope'"):
        quote.render("nope")
    with pytest.raises(FileNotFoundError, match="results/compare.json is missing"):
        quote.render("compare")
