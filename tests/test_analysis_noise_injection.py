"""Santurkar et al.'s noisy batch norm: sample_noise, inject_noise and the NoiseInjection linen layer.

References, never jaxnorm itself: the protocol's distributions (REFERENCES.md)
checked with scipy's Kolmogorov-Smirnov tests and float64 NumPy; the
distortion is read off `inject_noise` as a black box (its value at a = 0 is
m, at a = 1 is s + m), and its gradient against plain autodiff of
``s * a + m`` with that noise held fixed.
"""

from __future__ import annotations

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxnorm import linen as jnn
from jaxnorm.analysis import PAPER_NOISE, NoiseInjection, inject_noise, sample_noise

# KS p-values below this fail; with fixed seeds this is a check of the law, not a flaky test.
P_MIN = 1e-3


def black_box(key, shape, **kw):
  """(s, m) as the function applies them: f(0) = m, f(1) = s + m."""
  zeros = jnp.zeros(shape, jnp.float64)
  m = np.asarray(inject_noise(key, zeros, **kw))
  s = np.asarray(inject_noise(key, zeros + 1, **kw)) - m
  return s, m


def test_paper_values_are_the_defaults():
  assert PAPER_NOISE == {"n_mu": 0.5, "n_sigma": 1.25, "r_mu": 0.1, "r_sigma": 0.1}
  noise = sample_noise(jax.random.key(3), (4000, 2), dtype=jnp.float64)
  s, m = black_box(jax.random.key(3), (4000, 2))
  np.testing.assert_allclose(s, np.broadcast_to(noise.scale, s.shape), rtol=1e-6)
  np.testing.assert_allclose(m, np.broadcast_to(noise.shift, m.shape), atol=1e-6)


def test_per_sample_laws_around_per_unit_centres():
  kw = dict(n_mu=2.0, n_sigma=3.0, r_mu=0.3, r_sigma=0.2)
  key = jax.random.key(0)
  n, units = 4000, 5
  s, m = black_box(key, (n, units), **kw)
  noise = sample_noise(key, (n, units), dtype=jnp.float64, **kw)
  mu, sigma = np.asarray(noise.unit_shift), np.asarray(noise.unit_scale)
  assert mu.shape == sigma.shape == (units,)
  assert np.all(np.abs(mu) <= 2.0) and np.all((sigma >= 1) & (sigma <= 3.0))
  for j in range(units):
    # m_ij ~ U(mu_j - r_mu, mu_j + r_mu), s_ij ~ N(sigma_j, r_sigma), independent over samples i.
    assert stats.kstest(m[:, j], stats.uniform(mu[j] - 0.3, 0.6).cdf).pvalue > P_MIN
    assert stats.kstest(s[:, j], stats.norm(sigma[j], 0.2).cdf).pvalue > P_MIN
  # Units really have their own centres: they differ by far more than the per-sample spread.
  assert np.ptp(m.mean(0)) > 0.05 and np.ptp(s.mean(0)) > 0.05


def test_per_unit_centres_are_uniform_over_draws():
  def centres(key):
    noise = sample_noise(key, (2, 64), dtype=jnp.float64, n_mu=0.5, n_sigma=1.25)
    return noise.unit_shift, noise.unit_scale

  mu, sigma = jax.vmap(centres)(jax.random.split(jax.random.key(1), 64))
  assert stats.kstest(np.ravel(mu), stats.uniform(-0.5, 1.0).cdf).pvalue > P_MIN
  assert stats.kstest(np.ravel(sigma), stats.uniform(1.0, 0.25).cdf).pvalue > P_MIN


def test_affine_in_the_activations_and_constant_gradient():
  key = jax.random.key(2)
  a = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)))
  s, m = black_box(key, a.shape)
  np.testing.assert_allclose(inject_noise(key, a), s * np.asarray(a) + m, rtol=1e-12, atol=1e-12)
  c = jnp.asarray(np.random.default_rng(1).normal(size=a.shape))
  grad = jax.grad(lambda a: jnp.sum(inject_noise(key, a) * c))(a)
  reference = jax.grad(lambda a: jnp.sum((jnp.asarray(s) * a + jnp.asarray(m)) * c))(a)
  np.testing.assert_allclose(grad, reference, rtol=1e-12)


def test_feature_maps_share_one_draw_per_sample_and_channel():
  s, m = black_box(jax.random.key(4), (3, 5, 4, 2))
  # Same value at every pixel of (sample i, channel j), different across samples and channels.
  np.testing.assert_array_equal(s, np.broadcast_to(s[:, :1, :1, :], s.shape))
  np.testing.assert_array_equal(m, np.broadcast_to(m[:, :1, :1, :], m.shape))
  assert len(np.unique(m[:, 0, 0, :])) == 6
  # Units along axis 1 instead (NCHW-like): constant over the last two axes.
  s, _ = black_box(jax.random.key(4), (3, 2, 5), feature_axis=1)
  np.testing.assert_array_equal(s, np.broadcast_to(s[:, :, :1], s.shape))


def test_keys_control_the_draw_and_dtype_is_kept():
  a = jnp.ones((8, 3), jnp.float32)
  y1, y2 = inject_noise(jax.random.key(0), a), inject_noise(jax.random.key(0), a)
  y3 = inject_noise(jax.random.key(1), a)
  assert y1.dtype == jnp.float32
  np.testing.assert_array_equal(y1, y2)
  assert np.all(np.asarray(y1) != np.asarray(y3))


def test_linen_layer_in_a_model():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train, noisy=True):
      x = nn.Dense(3)(x)
      x = jnn.BatchNorm(use_running_average=not train)(x)
      return NoiseInjection(deterministic=not (train and noisy))(x)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
  net = Net()
  variables = net.init(jax.random.key(0), x, train=False)
  assert set(variables) == {"params", "batch_stats"}  # the noise layer adds no variables
  clean, _ = net.apply(variables, x, train=True, noisy=False, mutable=["batch_stats"])

  def noisy(seed):
    y, _ = net.apply(variables, x, train=True, rngs={"noise": jax.random.key(seed)}, mutable=["batch_stats"])
    return np.asarray(y)

  y0, y1 = noisy(0), noisy(1)
  np.testing.assert_array_equal(y0, noisy(0))  # the key decides the draw
  assert not np.allclose(y0, y1)
  # Units keep their identity: each noisy unit correlates with its clean unit far more than with another.
  corr = np.corrcoef(np.asarray(clean).T, y0.T)[:3, 3:]
  assert np.all(np.diag(corr) > 0.95)
  # Evaluation is the identity after batch norm with running statistics, no rng needed.
  np.testing.assert_array_equal(net.apply(variables, x, train=False), net.apply(variables, x, train=False))
  with pytest.raises(flax.errors.InvalidRngError, match="noise"):
    net.apply(variables, x, train=True, mutable=["batch_stats"])


def test_linen_layer_matches_the_law():
  layer = NoiseInjection(n_mu=1.0, n_sigma=2.0, r_mu=0.2, r_sigma=0.1, deterministic=False)
  zeros = jnp.zeros((3000, 2))
  rngs = {"noise": jax.random.key(5)}
  m = np.asarray(layer.apply({}, zeros, rngs=rngs))
  s = np.asarray(layer.apply({}, zeros + 1, rngs=rngs)) - m
  for j in range(2):
    centre = (m[:, j].max() + m[:, j].min()) / 2
    assert abs(centre) <= 1.0 + 1e-3
    assert stats.kstest(m[:, j], stats.uniform(centre - 0.2, 0.4).cdf).pvalue > P_MIN
    assert 1.0 - 0.01 <= s[:, j].mean() <= 2.0 + 0.01
    assert abs(s[:, j].std() - 0.1) < 0.01


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(n_sigma=0.5), ValueError, "n_sigma"),
        (dict(n_mu=-1.0), ValueError, "n_mu"),
        (dict(r_sigma=-0.1), ValueError, "r_sigma"),
        (dict(sample_axis=1, feature_axis=-1), ValueError, "must differ"),
        (dict(feature_axis=2), ValueError, "feature_axis"),
    ],
)
def test_bad_arguments(kw, error, match):
  with pytest.raises(error, match=match):
    inject_noise(jax.random.key(0), jnp.ones((4, 3)), **kw)


def test_integer_activations_are_refused():
  with pytest.raises(TypeError, match="floating"):
    inject_noise(jax.random.key(0), jnp.ones((4, 3), jnp.int32))
