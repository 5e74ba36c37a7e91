"""batch_norm_effective_weights: Dense + batch norm as a length-direction reparameterization (Kohler et al. 2018).

References, never jaxnorm itself: batch norm of ``x @ kernel`` in float64
NumPy (two-pass biased variance), and, for whitened inputs (S = I), the
weight-norm formula w~ = g w / ||w|| in NumPy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.analysis import batch_norm_effective_weights


def numpy_batch_norm(a, g, beta, eps):
  mean = a.mean(0)
  var = ((a - mean) ** 2).mean(0)
  return g * (a - mean) / np.sqrt(var + eps) + beta


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_reproduces_batch_norm(offset):
  r = np.random.default_rng(0)
  x = r.normal(size=(32, 5)) @ r.normal(size=(5, 5)) + offset  # correlated inputs, maybe far from zero
  w, g, beta = r.normal(size=(5, 3)), r.uniform(0.5, 2, size=3), r.normal(size=3)
  w_eff, b_eff = batch_norm_effective_weights(jnp.asarray(w), jnp.asarray(x), jnp.asarray(g), jnp.asarray(beta))
  expected = numpy_batch_norm(x @ w, g, beta, 1e-5)
  np.testing.assert_allclose(x @ np.asarray(w_eff) + np.asarray(b_eff), expected, atol=1e-8 * (1 + offset))
  # The length is g's alone: ||w~_j||_S = g_j / sqrt(1 + eps / w^T S w).
  s = np.cov(x.T, bias=True)
  s_norm = np.sqrt(np.einsum("du,de,eu->u", np.asarray(w_eff), s, np.asarray(w_eff)))
  wsw = np.einsum("du,de,eu->u", w, s, w)
  np.testing.assert_allclose(s_norm, g / np.sqrt(1 + 1e-5 / wsw), rtol=1e-9)
  # The direction is w's.
  cos = np.sum(np.asarray(w_eff) * w, 0) / (np.linalg.norm(np.asarray(w_eff), axis=0) * np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(cos, 1, rtol=1e-12)


def test_whitened_inputs_give_weight_norm():
  r = np.random.default_rng(1)
  z = r.normal(size=(64, 4))
  z = z - z.mean(0)
  # Whiten exactly: S = I for the biased covariance.
  chol = np.linalg.cholesky(z.T @ z / len(z))
  x = z @ np.linalg.inv(chol).T + 3.0
  w, g = r.normal(size=(4, 2)), np.array([0.7, 1.9])
  w_eff, _ = batch_norm_effective_weights(jnp.asarray(w), jnp.asarray(x), jnp.asarray(g), epsilon=0.0)
  np.testing.assert_allclose(w_eff, g * w / np.linalg.norm(w, axis=0), rtol=1e-10)


def test_float32_and_defaults():
  r = np.random.default_rng(2)
  x = jnp.asarray(r.normal(size=(16, 3)), jnp.float32)
  w = jnp.asarray(r.normal(size=(3, 2)), jnp.float32)
  w_eff, b_eff = batch_norm_effective_weights(w, x)
  assert w_eff.dtype == b_eff.dtype == jnp.float32
  expected = numpy_batch_norm(np.asarray(x, np.float64) @ np.asarray(w, np.float64), 1.0, 0.0, 1e-5)
  np.testing.assert_allclose(np.asarray(x @ w_eff + b_eff[None]), expected, atol=2e-5)


@pytest.mark.parametrize(
    "kernel, x, kw, match",
    [
        ((3,), (4, 3), {}, "kernel"),
        ((3, 2), (4, 5), {}, "agree on D"),
        ((3, 2), (4, 3), {"scale": np.ones(3)}, "scale"),
        ((3, 2), (4, 3), {"epsilon": -1.0}, "epsilon"),
    ],
)
def test_bad_arguments(kernel, x, kw, match):
  with pytest.raises(ValueError, match=match):
    batch_norm_effective_weights(jnp.ones(kernel), jnp.ones(x), **kw)
