"""Sphinx configuration for the bilevel documentation.

Build (warnings are errors)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
    .venv/bin/python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest

See docs/README.md for the details (offline builds, intersphinx, screenshots).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # build from a checkout even when bilevel is not installed

import bilevel  # noqa: E402

# -- Project -------------------------------------------------------------------------------------
project = "bilevel"
author = "the bilevel developers"
copyright = "the bilevel developers; MIT licence"  # noqa: A001 - Sphinx's name for it
release = bilevel.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

# MathJax from the package `sphinx-mathjax-offline` (MathJax 3 copied into _static/mathjax), so the
# site renders its equations without a network and without a CDN. Without the package, Sphinx's
# default CDN copy of MathJax is used: the pages then need a network to show the equations.
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    extensions.append("sphinx-mathjax-offline")

templates_path = ["_templates"]
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]
root_doc = "index"
default_role = "code"  # `x` is inline code, as in the docstrings' habit

# -- the public API, as the modules' __all__ lists define it --------------------------------------


def public_modules(root: str = "bilevel") -> list[str]:
    """``root`` and, recursively, every submodule that a public module lists in ``__all__``."""
    found, todo = [], [root]
    while todo:
        name = todo.pop(0)
        module = importlib.import_module(name)
        found.append(name)
        for item in getattr(module, "__all__", ()):
            value = getattr(module, item, None)
            if isinstance(value, types.ModuleType) and value.__name__ == f"{name}.{item}":
                todo.append(value.__name__)
    return found


def public_names(root: str = "bilevel") -> dict[str, object]:
    """Every public name ``module.item`` (modules excluded) mapped to its object, shortest paths first."""
    out: dict[str, object] = {}
    for name in public_modules(root):
        module = importlib.import_module(name)
        for item in getattr(module, "__all__", ()):
            value = getattr(module, item)
            if not isinstance(value, types.ModuleType):
                out[f"{name}.{item}"] = value
    return out


def _aliases_and_filenames(names: dict[str, object]) -> tuple[dict[str, str], dict[str, str]]:
    """Where one function or class is exported by several public modules (``bilevel.SolveResult``
    and ``bilevel.solvers.SolveResult``), the shortest path gets the full page and the others a
    short page pointing to it: one description per object, no duplicate-object warnings. And
    names that differ only in case (``bilevel.linalg.CG`` and ``bilevel.linalg.cg``) get distinct
    file names, for case-insensitive file systems."""
    primary: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for fullname, value in names.items():
        if not (inspect.isclass(value) or inspect.isroutine(value)):
            continue
        first = primary.setdefault(id(value), fullname)
        if first != fullname:
            aliases[fullname] = first
    groups: dict[str, list[str]] = {}
    for fullname in [*public_modules(), *names]:
        groups.setdefault(fullname.lower(), []).append(fullname)
    filenames = {}
    for group in groups.values():
        for fullname in group[1:] if len(group) > 1 else ():
            kind = "function" if inspect.isroutine(names.get(fullname)) else "object"
            filenames[fullname] = f"{fullname}-{kind}"
    return aliases, filenames


PUBLIC_NAMES = public_names()
API_ALIASES, API_FILENAMES = _aliases_and_filenames(PUBLIC_NAMES)

# -- autodoc / autosummary / napoleon -------------------------------------------------------------
autosummary_generate = True
# Document exactly what each module lists in __all__ (re-exported names included), and recurse
# only into the submodules that __all__ names: a new public module (e.g. bilevel.bounds) appears
# in the API reference as soon as bilevel/__init__.py exports it.
autosummary_ignore_module_all = False
autosummary_context = {"api_aliases": API_ALIASES}
autosummary_filename_map = API_FILENAMES
autodoc_default_options = {
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "class"  # the class docstring documents the constructor's options
add_module_names = False

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True  # dataclass "Attributes" as a compact field list (no duplicate objects)
napoleon_use_rtype = False
napoleon_preprocess_types = False

# -- doctest --------------------------------------------------------------------------------------
# Only the `.. doctest::` / `.. testcode::` blocks of the pages run under `-b doctest`. The
# Examples sections of the docstrings are plain doctest blocks: pytest runs them
# (--doctest-modules, see pyproject.toml) in their module's namespace, so they are not run twice.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import warnings
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
import torch
try:
    import cvxpy
except ImportError:  # the optional solver's tutorial blocks are skipped without it
    cvxpy = None
"""
import doctest as _doctest  # noqa: E402

doctest_default_flags = (_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE | _doctest.IGNORE_EXCEPTION_DETAIL
                         | _doctest.DONT_ACCEPT_TRUE_FOR_1)

# -- intersphinx ----------------------------------------------------------------------------------
# Links to Python, PyTorch, NumPy and SciPy need their inventories, fetched over the network at
# build time. CI and offline builds have no network, and a failed fetch is a warning (an error
# under -W), so the mapping is used only when BILEVEL_DOCS_INTERSPHINX=1 is set (the published
# build). Without it, references such as :func:`torch.func.vmap` render as plain code.
if os.environ.get("BILEVEL_DOCS_INTERSPHINX", "") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
    }
else:
    intersphinx_mapping = {}
intersphinx_timeout = 10

# -- HTML -----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"bilevel {release}"
html_theme_options = {
    "navigation_with_keys": True,
}
html_show_sourcelink = False
html_copy_source = False

# MathJax 3: macros shared by the pages' equations.
mathjax3_config = {
    "tex": {
        "macros": {
            "R": r"\mathbb{R}",
            "Alg": r"\mathcal{A}lg",
        }
    }
}


# -- the API reference's front page ---------------------------------------------------------------
_API_DIRECTIVE = """.. autosummary::
   :toctree: generated
   :recursive:

   bilevel
"""


def api_page(app, docname: str, source: list[str]) -> None:
    """Show api.rst's recursive autosummary (which generates every stub from the source on disk)
    as a hidden toctree and a summary table of all public modules, listed from __all__."""
    if docname != "api":
        return
    if _API_DIRECTIVE not in source[0]:
        raise RuntimeError("docs/api.rst lost its recursive autosummary of bilevel; conf.py's api_page() "
                           "expects it verbatim.")
    modules = "\n".join(f"   {name}" for name in public_modules())
    replacement = (".. toctree::\n   :hidden:\n\n   generated/bilevel\n\n"
                   f".. rubric:: Modules\n\n.. autosummary::\n\n{modules}\n")
    source[0] = source[0].replace(_API_DIRECTIVE, replacement)


def setup(app):
    app.connect("source-read", api_page)
