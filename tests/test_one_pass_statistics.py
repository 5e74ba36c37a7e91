"""The statistics GPU and TPU programs use (`_moments._one_pass`), run on this CPU by forcing their branch.

On XLA:GPU and XLA:TPU the moments are sums of deviations from one value of
each group, read in one pass; the CPU keeps the two-pass formula. Both
promise the same: at a mean offset of 1e4 times the spread, float32 results
within 1e-3 of float64 (in fact far closer), exact zeros for a constant
input, a documented worst case (the pivot an outlier of its group) of about
n float32 ulps of the variance, and gradients as accurate as the CPU's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import _moments, _platform


@pytest.fixture
def accelerator():
  with _platform.force("tpu"):
    yield


def test_the_forced_branch_is_the_one_pass_formula(accelerator):
  x = jnp.zeros((8, 16), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: _moments.compute(x, (1,), None, centered=True))(x)
  prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert "cond" not in prims and "slice" in prims
  assert prims.count("reduce_sum") == 2


def _offset_data(shape, axis, seed=0, mean=1e4):
  rng = np.random.default_rng(seed)
  x64 = mean + rng.standard_normal(shape)
  x32 = x64.astype(np.float32)
  # The float64 reference of the float32 values themselves.
  ref = x32.astype(np.float64)
  return x32, ref.mean(axis), ref.var(axis)


@pytest.mark.parametrize("axis", [1, (0, 1, 2)])
def test_moments_at_a_large_mean_offset(accelerator, axis):
  shape = (64, 1024) if axis == 1 else (8, 8, 8, 16)
  x32, mean, var = _offset_data(shape, axis)
  got_mean, got_var = jaxnorm.moments(jnp.asarray(x32), axis)
  np.testing.assert_allclose(np.asarray(got_mean, np.float64), mean, rtol=0, atol=1e-3 * np.sqrt(var.max()))
  # The promise is 1e-3; the one-pass formula does far better for such data.
  np.testing.assert_allclose(np.asarray(got_var, np.float64), var, rtol=1e-5)


def test_worst_case_pivot_is_an_outlier(accelerator):
  # The pivot is the median of a group's first, middle and last element;
  # with two of them outliers it is one, and the cancellation reaches its
  # bound (mu - K)^2 / var <= n - 1.
  n = 1024
  rng = np.random.default_rng(1)
  x = rng.standard_normal((16, n))
  x[:, 0] = x[:, n // 2] = 1e3
  x32 = x.astype(np.float32)
  var = x32.astype(np.float64).var(1)
  _, got = jaxnorm.moments(jnp.asarray(x32), 1)
  rel = np.abs(np.asarray(got, np.float64) - var) / var
  assert rel.max() <= 4 * n * 2.0**-24, rel.max()


def _gradient_errors(f, x, g):
  """Relative errors of d(scale) and dx of `f(x, scale, bias)` against float64, on the program being traced."""
  c = x.shape[-1]
  s, b = np.ones(c, np.float32), np.zeros(c, np.float32)
  _, vjp64 = jax.vjp(f, *(a.astype(np.float64) for a in (x, s, b)))
  dx64, ds64, _ = vjp64(g.astype(np.float64))
  _, vjp = jax.vjp(f, x, s, b)
  dx, ds = (np.asarray(a, np.float64) for a in vjp(g)[:2])
  return np.array([np.abs(ds - ds64).max() / np.abs(ds64).max(), np.abs(dx - dx64).max() / np.abs(dx64).max()])


GRADIENT_CASES = {
    # A column with one value at 60 sigma, a cotangent near 1: sum(g x-hat) is a small difference.
    "batch_norm outlier": (lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0], (4096, 4), 60.0, 0),
    "layer_norm outlier": (lambda x, s, b: jaxnorm.layer_norm(x, s, b), (64, 1024), 60.0, -1),
    "batch_norm ordinary": (lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0], (65536, 4), None, 0),
}


def _gradient_data(name, seed):
  _, shape, outlier, axis = GRADIENT_CASES[name]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) + 3.0
  if outlier is None:
    return x.astype(np.float32), rng.standard_normal(shape).astype(np.float32)
  where = rng.integers(shape[axis])
  x[(where, slice(None)) if axis == 0 else (slice(None), where)] = outlier
  return x.astype(np.float32), (1 + 0.01 * rng.standard_normal(shape)).astype(np.float32)


def test_gradients_as_accurate_as_the_cpu_program():
  """The one-pass program's gradients are within 2x of the CPU's error against float64 (median over seeds).

  Below 4 float32 ulps of the result the errors are the rounding of the
  result itself, so that is the floor of the comparison.
  """
  data = {(name, seed): _gradient_data(name, seed) for name in GRADIENT_CASES for seed in range(4)}
  errors = {}
  for platform in ("cpu", "tpu"):
    with _platform.force(platform):  # one context per platform: forcing a branch clears JAX's caches
      errors[platform] = {key: _gradient_errors(GRADIENT_CASES[key[0]][0], *xg) for key, xg in data.items()}
  for name in GRADIENT_CASES:
    cpu, tpu = (np.median([errors[p][(name, seed)] for seed in range(4)], 0) for p in ("cpu", "tpu"))
    assert np.all(tpu <= 2 * cpu + 4 * 2.0**-24), (name, cpu, tpu)


def test_constant_groups_are_exact(accelerator):
  x = jnp.full((4, 32), 7.25, jnp.float32)
  mean, var = jaxnorm.moments(x, 1)
  assert np.all(np.asarray(var) == 0) and np.all(np.asarray(mean) == 7.25)
  y = jaxnorm.layer_norm(x)
  g = jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x) * jnp.arange(32.0, dtype=jnp.float32)[None, :]))(x)
  assert np.all(np.asarray(y) == 0) and np.all(np.isfinite(np.asarray(g)))


def _textbook(x, scale, bias, axes, groups=None):
  scale, bias = jnp.broadcast_to(scale, x.shape), jnp.broadcast_to(bias, x.shape)
  if groups is not None:
    n, *spatial, c = x.shape
    v = x.reshape(n, *spatial, groups, c // groups)
    axes_v = tuple(range(1, v.ndim - 2)) + (v.ndim - 1,)
    d = v - v.mean(axes_v, keepdims=True)
    y = (d / jnp.sqrt((d * d).mean(axes_v, keepdims=True) + 1e-6)).reshape(x.shape)
    return y * scale + bias
  d = x - x.mean(axes, keepdims=True)
  eps = 1e-5 if axes == (0, 1, 2) else 1e-6
  return d / jnp.sqrt((d * d).mean(axes, keepdims=True) + eps) * scale + bias


OPS = {
    "layer_norm": (lambda x, s, b: jaxnorm.layer_norm(x, s, b), (32, 256), lambda x, s, b: _textbook(x, s, b, (1,))),
    "batch_norm": (
        lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
        (8, 4, 4, 16),
        lambda x, s, b: _textbook(x, s, b, (0, 1, 2)),
    ),
    "group_norm": (
        lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=4),
        (4, 4, 4, 16),
        lambda x, s, b: _textbook(x, s, b, None, groups=4),
    ),
    "instance_norm": (
        lambda x, s, b: jaxnorm.instance_norm(x, s, b),
        (4, 8, 8, 8),
        lambda x, s, b: _textbook(x, s, b, None, groups=8),
    ),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_outputs_and_gradients_at_a_large_mean_offset(accelerator, op):
  apply, shape, reference = OPS[op]
  rng = np.random.default_rng(2)
  x32 = (1e4 + rng.standard_normal(shape)).astype(np.float32)
  c = shape[-1]
  s = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
  b = (0.1 * rng.standard_normal(c)).astype(np.float32)
  ct = rng.standard_normal(shape).astype(np.float32)

  def loss(f):
    return lambda x, s, b: jnp.sum(f(x, s, b) * ct.astype(x.dtype))

  args32 = [jnp.asarray(a) for a in (x32, s, b)]
  args64 = [jnp.asarray(a, jnp.float64) for a in (x32, s, b)]
  y, y64 = apply(*args32), reference(*args64)
  np.testing.assert_allclose(np.asarray(y, np.float64), y64, atol=2e-5)
  grads = jax.grad(loss(apply), argnums=(0, 1, 2))(*args32)
  grads64 = jax.grad(loss(reference), argnums=(0, 1, 2))(*args64)
  for got, want in zip(grads, grads64):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-4 * scale)
