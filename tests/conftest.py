"""Shared pytest configuration: float64 references, and the settings users turn on.

float64 is enabled at import, before any test module creates an array, so
that tests can compare against float64 references. Tests that need float32
ask for it explicitly (`dtype=jnp.float32`).

Every test runs under the four settings careful users turn on:
`jax_numpy_rank_promotion="raise"` (no implicit broadcasting of arrays of
different ranks; flax's CI runs with it), `jax_numpy_dtype_promotion="strict"`
(no implicit promotion between dtypes), and `jax_debug_nans` with
`jax_debug_infs` (every operation's output checked for NaN and inf). So the
tests' own references are written for them too: float64 references are
computed on float64 copies, broadcasts are written out.

Two exceptions, each visible where it is made:
- a test that produces NaN or inf on purpose says so with
  ``@pytest.mark.nonfinite("why")``, which turns the two NaN/inf checks off
  for it alone;
- flax's own modules promote dtypes implicitly; the drop-in comparisons run
  flax's side under `_flax_reference.flax_promotion()` (see there).
"""

import os

# XLA's GPU and TPU compiler plugins (the compilers extra, for the
# compile-only accelerator tests, which run in their own subprocess) must not
# be asked for a device: every test process uses the CPU only, and so do the
# subprocesses they start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

STRICT = {
    "jax_numpy_rank_promotion": "raise",
    "jax_numpy_dtype_promotion": "strict",
    "jax_debug_nans": True,
    "jax_debug_infs": True,
}
# Also in the environment, where JAX reads them at import: the Python
# subprocesses tests start (several host devices, the CLI, the docstring
# examples, notebook kernels) run under the same settings.
os.environ.update({name.upper(): str(value) for name, value in STRICT.items()})

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "nonfinite(reason): the test makes NaN or inf on purpose; jax_debug_nans/infs are off for it"
  )
  # Here too: a plugin may have imported JAX before this file set the environment.
  for name, value in STRICT.items():
    jax.config.update(name, value)


@pytest.fixture(autouse=True)
def _nonfinite_on_purpose(request):
  """Turns jax_debug_nans/infs off for a test marked ``nonfinite`` (it says why)."""
  marker = request.node.get_closest_marker("nonfinite")
  if marker is None:
    yield
    return
  assert marker.args and marker.args[0], "@pytest.mark.nonfinite needs the reason as its argument"
  with jax.debug_nans(False), jax.debug_infs(False):
    yield
