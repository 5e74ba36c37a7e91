"""The documentation site builds without a warning and documents every public name.

One Sphinx build (`docs/`, the command of CONTRIBUTING.md, with `--keep-going`
so that every warning is reported) into a temporary folder, in a subprocess
with JAX on the CPU; then its API pages are searched for every public name. The notebooks are
rendered from their committed outputs, and the docstring examples are run by
tests/test_doctests.py, so the build executes nothing.
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("sphinx", reason="the documentation build needs the `docs` extra: pip install '.[docs]'")

import jaxnorm  # noqa: E402
import jaxnorm.analysis  # noqa: E402
import jaxnorm.interop  # noqa: E402
import jaxnorm.linen  # noqa: E402
import jaxnorm.nnx  # noqa: E402
from jaxnorm.cli import build_parser  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Each public module and the API page (under docs/api/) that documents its names.
PAGES = {
    jaxnorm: "functional",
    jaxnorm.linen: "linen",
    jaxnorm.nnx: "nnx",
    jaxnorm.interop: "interop",
    jaxnorm.analysis: "analysis",
}


def _public_names():
  for module, page in PAGES.items():
    for name in module.__all__:
      yield module, name, page


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("docs") / "html"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  return proc, out


def test_the_site_builds_without_warnings(site):
  proc, out = site
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert (out / "index.html").is_file()
  # MathJax is served by the site itself: math renders offline.
  assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
  assert "_static/mathjax/tex-chtml.js" in (out / "api" / "functional.html").read_text()


def test_every_public_name_has_a_docstring():
  missing = []
  for module, name, _ in _public_names():
    obj = getattr(module, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
      continue  # a constant: its API page describes it
    doc = (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__) or ""
    # Dataclasses (flax modules) and named tuples write `Name(field, ...)` where there is none.
    if not doc.strip() or re.fullmatch(rf"{re.escape(obj.__name__)}\(.*\)", doc.strip(), re.DOTALL):
      missing.append(f"{module.__name__}.{name}")
  assert not missing, f"public names without a docstring: {missing}"


def test_every_public_name_is_on_its_api_page(site):
  proc, out = site
  assert proc.returncode == 0, proc.stderr[-5000:]
  pages = {page: (out / "api" / f"{page}.html").read_text() for page in PAGES.values()}
  # Sphinx anchors each documented object at its full name.
  missing = [f"{module.__name__}.{name} (on api/{page})" for module, name, page in _public_names()
             if f'id="{module.__name__}.{name}"' not in pages[page]]
  assert not missing, f"public names missing from their API page: {missing}"


def test_every_command_and_option_is_on_the_cli_page(site):
  proc, out = site
  assert proc.returncode == 0, proc.stderr[-5000:]
  html = (out / "api" / "cli.html").read_text()
  subparsers = next(a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict))
  missing = [f"{command} {option}" for command, parser in subparsers.choices.items()
             for action in parser._actions if not isinstance(action, argparse._HelpAction)
             for option in action.option_strings or [command] if option not in html]
  assert not missing, f"missing from api/cli: {missing}"

