"""The README's code and the examples run, and print what they promise."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_snippet_runs_and_fills_theta_grad():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md lost its python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    theta = namespace["theta"]
    assert theta.grad is not None and theta.grad.shape == (5,) and torch.isfinite(theta.grad).all()
    assert float(theta.grad.norm()) > 0


def test_quickstart_prints_matching_hypergradients():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    exact = re.search(r"exact\s*: \[(.*?)\]", out, flags=re.S).group(1).split()
    implicit = re.search(r"implicit\s*: \[(.*?)\]", out, flags=re.S).group(1).split()
    assert exact == implicit
    err = float(re.search(r"iMAML, CG to tol 1e-14\s+(\S+)", out).group(1))
    assert err < 1e-8


def test_the_lasso_port_agrees_with_the_closed_form_and_shows_the_smooth_error():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "lasso_implicit_diff.py")], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert len(rows) == 2
    for theta, nonzero, composite, exact, naive in rows:
        assert abs(float(composite) - float(exact)) <= 1e-6 * max(1.0, abs(float(exact)))
        if 0 < int(nonzero) < 10:  # exact zeros: treating |w| as smooth is wrong there
            assert abs(float(naive) - float(exact)) > 1e-3 * max(1.0, abs(float(exact)))
    assert rows[0][0] == "1.0" and abs(float(rows[0][2]) - 155.66) < 0.005  # JAXopt's exact value at theta = 1


def test_the_fixed_point_port_agrees_with_unrolling_and_finite_differences():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "fixed_point_deq.py")], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "forward: CONVERGED" in out
    unrolled = float(re.search(r"max \|implicit - unrolled\|\s*= (\S+)", out).group(1))
    fd = float(re.search(r"max \|implicit - finite diff.\|\s*= (\S+)", out).group(1))
    assert unrolled < 1e-8 and fd < 1e-6
