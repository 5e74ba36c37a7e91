"""The documented range of float32 statistics: deviations up to about sqrt(float32 max / n)."""

from __future__ import annotations

import numpy as np

import jaxnorm


def _rows(magnitude, n):
  rng = np.random.default_rng(0)
  return (rng.normal(size=(2, n)) * magnitude).astype(np.float32)


def test_range_is_documented_for_users():
  doc = jaxnorm.moments.__doc__
  assert "Range:" in doc and "sqrt(3.4e38 / n)" in doc and "float64" in doc
  root = __file__.rsplit("/tests/", 1)[0]
  readme = open(root + "/README.md").read()
  assert "1.8e19 / sqrt(n)" in readme
  # The full statement (its cause, what happens beyond it, the remedy) is in the numerics guide.
  guide = open(root + "/docs/guides/numerics.md").read()
  assert "1.8e19 / sqrt(n)" in guide and "jax_enable_x64" in guide and "collapses to the bias" in guide


def test_inside_the_range_float32_statistics_are_exact():
  n = 64
  x = _rows(0.5 * 1.8e19 / np.sqrt(n) / 4, n)  # a normal sample stays within 4 sigma
  mean, var = jaxnorm.moments(x, 1)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(var, x64.var(1), rtol=1e-5)
  y = np.asarray(jaxnorm.layer_norm(x, epsilon=1e-6))
  np.testing.assert_allclose(y, (x64 - x64.mean(1, keepdims=True)) / x64.std(1, keepdims=True), atol=1e-4)


def test_beyond_the_range_the_variance_is_inf_as_documented_and_float64_works():
  n = 64
  x = _rows(5e18, n)
  _, var = jaxnorm.moments(x, 1)
  assert np.all(np.isinf(var))
  mean64, var64 = jaxnorm.moments(x.astype(np.float64), 1)
  np.testing.assert_allclose(var64, x.astype(np.float64).var(1), rtol=1e-10)
