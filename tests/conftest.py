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
