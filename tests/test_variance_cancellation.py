"""jaxnorm.analysis.variance_cancellation and naive_variance, against float64 NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.analysis import naive_variance, variance_cancellation

OFFSETS = [0.0, 1.0, 1e2, 1e4, 1e5]


def test_estimates_against_float64_numpy():
  r = variance_cancellation(OFFSETS, size=2048, std=2.0, dtype=jnp.float32, seed=3)
  z = np.random.default_rng(3).standard_normal(2048)
  for i, offset in enumerate(OFFSETS):
    x = (offset + 2.0 * z).astype(np.float32).astype(np.float64)
    assert r["offset"][i] == offset
    np.testing.assert_allclose(r["exact"][i], x.var(), rtol=1e-12)
    # jaxnorm's variance stays within float32 rounding of the truth at every offset.
    assert r["jaxnorm_rel_error"][i] < 1e-5, (offset, r["jaxnorm"][i], r["exact"][i])
    np.testing.assert_allclose(r["jaxnorm_rel_error"][i], abs(r["jaxnorm"][i] / x.var() - 1), rtol=1e-6)
  # The naive formula is fine at a small offset and garbage at |mean| / std = 5e3 and beyond.
  assert r["naive_rel_error"][0] < 1e-5
  assert min(r["naive_rel_error"][3:]) > 0.5, r["naive"]


def test_naive_variance_is_the_one_pass_formula():
  x = np.random.default_rng(0).standard_normal((5, 7))
  np.testing.assert_allclose(naive_variance(x, axis=0), np.mean(x**2, 0) - np.mean(x, 0) ** 2, rtol=1e-12)
  assert naive_variance(jnp.ones(4, jnp.float32)).dtype == jnp.float32


def test_bad_arguments():
  with pytest.raises(ValueError, match="`size`"):
    variance_cancellation([1.0], size=1)
  with pytest.raises(ValueError, match="`std`"):
    variance_cancellation([1.0], std=0.0)
  with pytest.raises(TypeError, match="`dtype`"):
    variance_cancellation([1.0], dtype=jnp.int32)
