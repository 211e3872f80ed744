"""The documentation builds without warnings, documents every public name, and its examples run.

The site is built once per session, with the same command as CI (``sphinx-build -W``), into a
temporary folder; the doctest build reuses its parsed sources. Skipped, with the reason, when
Sphinx or the theme is not installed (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import types
import zlib

import pytest

import bilevel

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

NEEDS_SPHINX = "Sphinx and the furo theme are needed to build the docs: pip install -e '.[docs]'"
pytest.importorskip("sphinx", reason=NEEDS_SPHINX)
pytest.importorskip("furo", reason=NEEDS_SPHINX)


def sphinx_build(builder: str, out: pathlib.Path, doctrees: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BILEVEL_DOCS_INTERSPHINX"}  # never the network
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, "-d", str(doctrees),
           str(DOCS), str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def failure_report(proc: subprocess.CompletedProcess) -> str:
    return f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("docs")


@pytest.fixture(scope="session")
def html(build_dir) -> pathlib.Path:
    proc = sphinx_build("html", build_dir / "html", build_dir / "doctrees")
    assert proc.returncode == 0, "sphinx-build -W -b html failed (a warning is an error):\n" + failure_report(proc)
    return build_dir / "html"


def read_inventory(path: pathlib.Path) -> dict[str, set[str]]:
    """``objects.inv`` (Sphinx inventory format 2) as ``{name: {"py:class", ...}}``."""
    header, _, _, _, compressed = path.read_bytes().split(b"\n", 4)
    assert header.startswith(b"# Sphinx inventory version 2"), header
    entries: dict[str, set[str]] = {}
    for line in zlib.decompress(compressed).decode("utf-8").splitlines():
        match = re.match(r"(.+?)\s+(\S+?:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)$", line)
        if match:
            entries.setdefault(match.group(1), set()).add(match.group(2))
    return entries


def public_modules() -> list[str]:
    """``bilevel`` and, recursively, every submodule that a public module lists in ``__all__``."""
    found, todo = [], ["bilevel"]
    while todo:
        name = todo.pop(0)
        module = importlib.import_module(name)
        found.append(name)
        for item in getattr(module, "__all__", ()):
            value = getattr(module, item)
            if isinstance(value, types.ModuleType):
                todo.append(value.__name__)
    return found


def test_the_html_site_builds_without_warnings(html):
    for page in ("index.html", "getting_started.html", "concepts.html", "inner_solvers.html",
                 "linear_solvers.html", "error_bounds.html", "api.html",
                 "tutorials/hyperparameters.html", "tutorials/custom_solvers.html", "tutorials/lasso.html",
                 "tutorials/constrained_qp.html", "tutorials/deep_equilibrium.html"):
        assert (html / page).is_file(), page


def test_every_public_name_is_in_the_api_reference(html):
    inventory = read_inventory(html / "objects.inv")
    expected = []
    for name in public_modules():
        expected.append((name, "py:module"))
        module = importlib.import_module(name)
        for item in module.__all__:
            if not isinstance(getattr(module, item), types.ModuleType):
                expected.append((f"{name}.{item}", "py:"))
    missing = [name for name, role in expected if not any(r.startswith(role) for r in inventory.get(name, ()))]
    assert not missing, f"public names missing from the API reference: {missing}"
    # the modules named in the brief are all there (bilevel.bounds too, once it is exported)
    for name in ("bilevel", "bilevel.solvers", "bilevel.linalg", "bilevel.tree", "bilevel.unrolled",
                 "bilevel.testing"):
        assert "py:module" in inventory.get(name, set()), name


def test_every_public_submodule_is_exported_or_re_exported():
    """A new public module (say bilevel/bounds.py) reaches the API reference only through __all__:
    it must be listed in bilevel.__all__, or everything it exports must be re-exported by bilevel."""
    exported = {id(getattr(bilevel, n)) for n in bilevel.__all__}
    unreachable = {}
    for info in pkgutil.iter_modules(bilevel.__path__):
        if info.name.startswith("_") or info.name in bilevel.__all__:
            continue
        module = importlib.import_module(f"bilevel.{info.name}")
        names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
        lost = [n for n in names if id(getattr(module, n)) not in exported]
        if lost:
            unreachable[module.__name__] = lost
    assert not unreachable, (f"public modules whose names are neither in bilevel.__all__ nor re-exported by bilevel "
                             f"(add the module to bilevel.__all__): {unreachable}")


def test_the_pages_code_examples_and_tutorials_run(html, build_dir):
    proc = sphinx_build("doctest", build_dir / "doctest", build_dir / "doctrees")
    output = (build_dir / "doctest" / "output.txt")
    report = output.read_text() if output.is_file() else ""
    assert proc.returncode == 0, "sphinx-build -b doctest failed:\n" + report[-6000:] + failure_report(proc)
    # every page with examples ran them, the tutorials included
    for page in ("getting_started", "concepts", "inner_solvers", "linear_solvers", "error_bounds",
                 "tutorials/hyperparameters", "tutorials/custom_solvers", "tutorials/lasso",
                 "tutorials/constrained_qp", "tutorials/deep_equilibrium"):
        assert f"Document: {page}\n" in report, f"no examples of {page} ran"
    assert re.search(r"\n\s+0 failures in tests", report), report[-3000:]
