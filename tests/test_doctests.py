"""The docstring examples of every jaxnorm module run as written, with JAX's float32 defaults.

conftest.py turns float64 on for this process, which would change what the
examples print (`dtype=float64`), so they run in a fresh interpreter with
`JAX_ENABLE_X64=0`, as a user would see them. `__main__` is skipped: importing
it is harmless, but it is the command line, not a library module.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import jaxnorm

RUNNER = r"""
import doctest, importlib, pkgutil, sys

import jax
import jaxnorm

assert not jax.config.jax_enable_x64, "the examples assume JAX's float32 defaults"
SKIP = {"jaxnorm.__main__"}
names = ["jaxnorm"] + [m.name for m in pkgutil.walk_packages(jaxnorm.__path__, "jaxnorm.") if m.name not in SKIP]
failed = 0
for name in names:
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  failed += result.failed
  print(f"{name} {result.attempted} {result.failed}")
sys.exit(1 if failed else 0)
"""


def test_docstring_examples_pass_in_float32():
  env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  attempted = {}
  for line in proc.stdout.splitlines():
    name, count, _ = line.split()
    attempted[name] = int(count)
  # The walk reached every layer: the functional core, linen, nnx and analysis.
  for module in (
      "jaxnorm._batch_norm",
      "jaxnorm.linen._batch_norm",
      "jaxnorm.nnx._batch_norm",
      "jaxnorm.analysis._invariance",
  ):
    assert attempted.get(module, 0) > 0, (module, sorted(attempted))


def _public_callables():
  import jaxnorm.analysis
  import jaxnorm.linen
  import jaxnorm.nnx

  for module in (jaxnorm, jaxnorm.linen, jaxnorm.nnx, jaxnorm.analysis):
    for name in module.__all__:
      obj = getattr(module, name)
      if callable(obj):
        yield pytest.param(obj, id=f"{module.__name__}.{name}")


@pytest.mark.parametrize("obj", list(_public_callables()))
def test_every_public_callable_has_an_example(obj):
  # Its own docstring, not one inherited from a flax or Python base class.
  assert ">>>" in (obj.__doc__ or ""), f"{obj.__qualname__} has no docstring example"
