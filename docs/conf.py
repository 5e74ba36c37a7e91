"""Sphinx configuration of jaxnorm's documentation.

Build: python -m sphinx -W -b html docs docs/_build/html
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # autodoc imports jax; no accelerator needed

import jaxnorm

project = "jaxnorm"
author = "The jaxnorm authors"
copyright = "2026, The jaxnorm authors"
release = version = jaxnorm.__version__

extensions = [
    "myst_nb",  # Markdown pages and the notebooks (also registers myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx-mathjax-offline",  # serves MathJax from _static: no CDN
    "sphinxarg.ext",  # the CLI page
]

exclude_patterns = ["_build"]

# `name` in a docstring: a link where Sphinx knows the name, else code.
default_role = "py:obj"

# API pages: Google-style docstrings, signatures as written in the source.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True

# Notebooks are rendered from their committed outputs, never executed here.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]

html_theme = "sphinx_book_theme"
html_title = f"jaxnorm {version}"
html_theme_options = {
    "show_toc_level": 2,
}


def _drop_builtin_docstrings(app, what, name, obj, options, lines):
  """A constant's docstring is its type's (`dict`, `tuple`): the API page describes it instead."""
  if what == "data" and getattr(obj, "__doc__", None) == type(obj).__doc__:
    lines.clear()


def setup(app):
  app.connect("autodoc-process-docstring", _drop_builtin_docstrings)
