"""Shared pytest configuration.

float64 is enabled at import, before any test module creates an array, so
that tests can compare against float64 references. Tests that need float32
ask for it explicitly (`dtype=jnp.float32`).
"""

import os

# The test extra installs XLA's GPU and TPU compiler plugins (for the
# compile-only accelerator tests, which run in their own subprocess): every
# other test process uses the CPU only, and so do the subprocesses they start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_addoption(parser):
  parser.addoption(
      "--jax-strict",
      action="store_true",
      default=os.environ.get("JAXNORM_STRICT", "") not in ("", "0"),
      help="run under jax_debug_nans, jax_debug_infs, jax_numpy_dtype_promotion='strict' and "
      "jax_numpy_rank_promotion='raise' (also JAXNORM_STRICT=1)",
  )


def pytest_configure(config):
  # JAX's debugging and strictness settings, for the whole session: the
  # library must be clean under all four (tests/test_strict_modes.py checks
  # every public op and module under them in the default run).
  if config.getoption("--jax-strict"):
    jax.config.update("jax_debug_nans", True)
    jax.config.update("jax_debug_infs", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
