"""The F.1 accuracy study (applications/synthetic), short version: the claims it is meant to show."""

from __future__ import annotations

import json

import pytest
import torch

from applications.synthetic import REGIMES, k_grid, make_task, run_study, save_study
from applications.synthetic.__main__ import main

KS = [1, 10, 100, 1000]
TARGET = 1e-6


@pytest.fixture(scope="module")
def study():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return run_study(ks=KS, target_error=TARGET)
    finally:
        torch.set_default_dtype(old)


def test_tasks_are_as_specified():
    few, many = make_task(REGIMES["few_shot"]), make_task(REGIMES["many_shot"])
    for task in (few, many):
        assert task.kappa == pytest.approx(50.0, rel=1e-10) and task.lam == 5.0 and task.theta.shape == (50,)
    assert few.distinct_eigenvalues == 5 and many.distinct_eigenvalues == 50
    with pytest.raises(ValueError, match="raise spread"):
        make_task(100, spread=1.0)


def test_k_grid_is_log_spaced_and_distinct():
    ks = k_grid(1000, 16)
    assert ks[0] == 1 and ks[-1] == 1000 and ks == sorted(set(ks)) and len(ks) == 16


@pytest.mark.parametrize("regime", list(REGIMES))
def test_imaml_with_cg_to_tolerance_converges_with_k(study, regime):
    err = study["regimes"][regime]["errors"]["imaml_cg_tol"]
    assert all(b < a for a, b in zip(err, err[1:])), err
    assert err[-1] < 1e-8


def test_five_cg_steps_are_exact_in_the_few_shot_regime(study):
    r = study["regimes"]["few_shot"]
    assert r["errors"]["imaml_cg5"][-1] < 1e-8
    assert r["errors"]["imaml_cg5"] == pytest.approx(r["errors"]["imaml_cg_tol"], rel=1e-3, abs=1e-12)


def test_five_cg_steps_leave_a_floor_in_the_many_shot_regime(study):
    err = study["regimes"]["many_shot"]["errors"]["imaml_cg5"]
    assert err[-1] > 1e-2  # a floor, far above CG to tolerance
    assert err[-1] == pytest.approx(err[-2], rel=0.1)  # and it has stopped falling
    # unrolled MAML goes below that floor with enough steps
    assert study["regimes"]["many_shot"]["errors"]["maml"][-1] < err[-1]
    assert study["regimes"]["many_shot"]["maml_beats_cg5_at"] is not None


@pytest.mark.parametrize("regime", list(REGIMES))
def test_two_step_floor_lies_above_the_five_step_floor(study, regime):
    floors = study["regimes"][regime]["floors_at_largest_K"]
    assert floors["imaml_cg2"] > floors["imaml_cg5"]
    assert floors["imaml_cg2"] > 1e-2


@pytest.mark.parametrize("regime", list(REGIMES))
def test_first_order_maml_does_not_converge(study, regime):
    r = study["regimes"][regime]
    assert min(r["errors"]["fomaml"]) > 0.1
    assert r["errors"]["maml"][-1] < 1e-10  # while full MAML does


@pytest.mark.parametrize("regime", list(REGIMES))
def test_adaptive_mode_meets_its_target_at_every_k(study, regime):
    ad = study["regimes"][regime]["adaptive"]
    abs_err = study["regimes"][regime]["absolute_errors"]["imaml_adaptive"]
    assert all(ad["met"])
    for err, cert in zip(abs_err, ad["certificate"]):
        assert err <= cert <= TARGET
    # the closer phi_K already is, the fewer extra inner steps it needs
    assert ad["inner_iterations"] == sorted(ad["inner_iterations"], reverse=True)
    assert ad["inner_iterations"][-1] == 0


def test_results_are_written_as_json_and_png(study, tmp_path):
    json_path, png_path = save_study(study, tmp_path / "out")
    loaded = json.loads(json_path.read_text())
    assert set(loaded["regimes"]) == set(REGIMES) and loaded["regimes"]["few_shot"]["K"] == KS
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--k-max", "0"])
    with pytest.raises(SystemExit):
        main(["--target", "-1"])
