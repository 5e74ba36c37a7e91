"""Shared pytest configuration.

float64 is enabled at import, before any test module creates an array, so
that tests can compare against float64 references. Tests that need float32
ask for it explicitly (`dtype=jnp.float32`).
"""

import jax

jax.config.update("jax_enable_x64", True)
