"""jaxnorm.Standardizer against scikit-learn's StandardScaler and float64 NumPy.

References, never jaxnorm itself:

* scikit-learn's `StandardScaler` (`fit`, `partial_fit` over the same batches,
  NaN as missing) on the same float64 data: `mean_`, `var_`, `scale_`,
  `n_samples_seen_`, `transform`, `inverse_transform`;
* float64 NumPy statistics of float32 data, where scikit-learn's float32
  transform itself rounds the mean to float32 (and so is the weaker reference);
* a plain float32 Chan merge (one-word mean), to show that the streaming test
  can fail.

Shapes are tiny: JAX compile time dominates the runtime of this file.
"""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sklearn_preprocessing = pytest.importorskip("sklearn.preprocessing")
StandardScaler = sklearn_preprocessing.StandardScaler

import jaxnorm  # noqa: E402

F64 = dict(rtol=1e-12, atol=1e-12)
# Transformed values: feature 2 of `_data` has mean 1e3 and std 1e-3, and scikit-learn's float64 mean_ is
# off by about 2 ulps of 1e3 (2e-13, checked against exact rationals; ours is exact to 1e-29 with its
# two-word mean), which is 2e-10 after dividing by the std.
Y64 = dict(rtol=1e-12, atol=1e-9)
SPLITS = (1, 8, 11, 3)  # uneven batch sizes, summing to 23 rows


def _data(seed=0, n=23, f=4):
  """Features of very different offsets and spreads."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, f)) * np.array([1.0, 30.0, 1e-3, 5.0])[:f] + np.array([0.0, -7.0, 1e3, 2.0])[:f]


def _batches(x, sizes=SPLITS):
  return np.split(x, np.cumsum(sizes)[:-1])


def _assert_matches_sklearn(ours, ref, n_features):
  np.testing.assert_allclose(ours.mean, ref.mean_, **F64)
  np.testing.assert_allclose(ours.var, ref.var_, **F64)
  np.testing.assert_allclose(ours.scale, ref.scale_, **F64)
  np.testing.assert_array_equal(ours.count, np.broadcast_to(ref.n_samples_seen_, (n_features,)))


def test_fit_and_uneven_batches_match_sklearn():
  x, x_new = _data(0), _data(1, n=5)
  ref = StandardScaler().fit(x)
  whole = jaxnorm.Standardizer().fit(jnp.asarray(x))
  _assert_matches_sklearn(whole, ref, 4)

  # The same statistics from uneven batches, for us and for scikit-learn's own partial_fit.
  ours, ref_stream = jaxnorm.Standardizer(), StandardScaler()
  for xb in _batches(x):
    ours, ref_stream = ours.partial_fit(jnp.asarray(xb)), ref_stream.partial_fit(xb)
  _assert_matches_sklearn(ours, ref_stream, 4)
  _assert_matches_sklearn(ours, ref, 4)

  np.testing.assert_allclose(ours.transform(x_new), ref.transform(x_new), **Y64)
  np.testing.assert_allclose(ours.inverse_transform(x_new), ref.inverse_transform(x_new), **F64)
  # The result is standardized, and the inverse really inverts.
  y = whole.transform(x)
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-12)
  np.testing.assert_allclose(y.std(0), 1, rtol=1e-12)
  np.testing.assert_allclose(whole.inverse_transform(y), x, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("with_mean, with_std", [(False, True), (True, False), (False, False)])
def test_with_mean_with_std_match_sklearn(with_mean, with_std):
  x, x_new = _data(2), _data(3, n=5)
  ref = StandardScaler(with_mean=with_mean, with_std=with_std).fit(x)
  ours = jaxnorm.Standardizer(with_mean=with_mean, with_std=with_std).fit(x)
  np.testing.assert_allclose(ours.transform(x_new), ref.transform(x_new), **Y64)
  np.testing.assert_allclose(ours.inverse_transform(x_new), ref.inverse_transform(x_new), **F64)
  if with_std:  # scikit-learn keeps var_ only then
    np.testing.assert_allclose(ours.var, ref.var_, **F64)
    np.testing.assert_allclose(ours.scale, ref.scale_, **F64)


def test_nan_is_missing_like_sklearn_and_where_masks_anything():
  x = _data(4)
  rng = np.random.default_rng(5)
  missing = rng.random(x.shape) < 0.25
  missing[:9, 2] = True  # feature 2 has no valid sample in the first two batches
  x_nan = np.where(missing, np.nan, x)

  ours = jaxnorm.Standardizer()
  for xb in _batches(x_nan):
    ours = ours.partial_fit(xb)
  # The reference is one `fit`: scikit-learn 1.9's own partial_fit turns the mean of a feature that is
  # all-NaN in the first batch into NaN for good.
  ref = StandardScaler().fit(x_nan)
  _assert_matches_sklearn(ours, ref, 4)
  assert not np.all(ours.count == ours.count[0])  # really unequal counts per feature
  y = ours.transform(x_nan)
  np.testing.assert_array_equal(np.isnan(y), missing)  # NaN kept in transform, as scikit-learn
  np.testing.assert_allclose(y, ref.transform(x_nan), **Y64)

  # where=False ignores whatever is there, inf included: same statistics as with NaN.
  x_inf = np.where(missing, np.inf, x)
  masked = jaxnorm.Standardizer()
  for xb, mb in zip(_batches(x_inf), _batches(~missing)):
    masked = masked.partial_fit(xb, where=mb)
  _assert_matches_sklearn(masked, ref, 4)


def test_constant_features_keep_scale_one_like_sklearn():
  x = _data(6)
  x[:, 0] = 3.7
  x[:, 2] = 0.0
  ours = jaxnorm.Standardizer()
  for xb in _batches(x):
    ours = ours.partial_fit(xb)
  ref = StandardScaler().fit(x)
  np.testing.assert_array_equal(ref.scale_[[0, 2]], 1.0)  # the reference really does this
  _assert_matches_sklearn(ours, ref, 4)
  y = ours.transform(x)
  np.testing.assert_allclose(y, ref.transform(x), **Y64)
  assert np.all(np.isfinite(y))

  # float32, a constant of 1e4 fitted over uneven batches, and a feature never seen (all masked).
  x32 = np.full((23, 3), 12345.678, np.float32)
  x32[:, 1] = np.random.default_rng(7).standard_normal(23)
  where = np.ones_like(x32, bool)
  where[:, 2] = False
  s32 = jaxnorm.Standardizer()
  for xb, wb in zip(_batches(x32), _batches(where)):
    s32 = s32.partial_fit(jnp.asarray(xb), where=wb)
  np.testing.assert_array_equal(np.asarray(s32.scale)[[0, 2]], 1.0)
  np.testing.assert_array_equal(s32.count, [23, 23, 0])
  np.testing.assert_allclose(s32.scale[1], x32[:, 1].astype(np.float64).std(), rtol=1e-6)
  np.testing.assert_array_equal(s32.transform(x32[:2])[:, 0], 0.0)


def test_float32_large_offset_stays_accurate():
  rng = np.random.default_rng(8)
  x = (1e4 + rng.standard_normal((23, 3))).astype(np.float32)
  x64 = x.astype(np.float64)  # the exact values that were fitted
  ours = jaxnorm.Standardizer()
  for xb in _batches(x):
    ours = ours.partial_fit(jnp.asarray(xb))
  assert ours.mean.dtype == jnp.float32 and ours.count.dtype == jnp.int32
  np.testing.assert_allclose(ours.var, x64.var(0), rtol=1e-5)
  # The textbook float32 E[x^2] - E[x]^2 is off by orders of magnitude more (it can even be negative).
  naive = (x**2).mean(0, dtype=np.float32) - x.mean(0, dtype=np.float32) ** 2
  assert np.max(np.abs(naive / x64.var(0) - 1)) > 1e-2
  y = ours.transform(jnp.asarray(x))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, (x64 - x64.mean(0)) / x64.std(0), atol=1e-5)
  # scikit-learn accumulates in float64 but rounds the mean to float32 in its float32 transform (5e-4 at 1e4).
  ref = StandardScaler().fit(x)
  np.testing.assert_allclose(ours.var, ref.var_, rtol=1e-5)
  np.testing.assert_allclose(y, ref.transform(x), atol=2e-3)
  np.testing.assert_allclose(ours.inverse_transform(y), x64, rtol=0, atol=2e-3)  # an ulp of 1e4 is 1e-3


def test_jit_scan_stream_float32_with_drift():
  """4096 batches under lax.scan; the data's mean moves by one std halfway.

  A one-word float32 running mean stops moving once its updates fall below half
  an ulp of 1e4: checked below with a plain float32 Chan merge, so this test
  could fail.
  """
  rng = np.random.default_rng(9)
  n, b = 2**16, 16
  x = (1e4 + rng.standard_normal((n, 2)) + (np.arange(n) >= n // 2)[:, None]).astype(np.float32)
  x64 = x.astype(np.float64)

  @jax.jit
  def stream(scaler, xs):
    return jax.lax.scan(lambda s, xb: (s.partial_fit(xb), None), scaler, xs)[0]

  ours = stream(jaxnorm.Standardizer().empty(2), x.reshape(-1, b, 2))
  np.testing.assert_array_equal(ours.count, n)
  np.testing.assert_allclose(ours.mean, x64.mean(0), rtol=0, atol=1e-3)  # the rounded mean: within an ulp
  exact_mean = ours.state.mean.astype(np.float64) + ours.state.mean_residual.astype(np.float64)
  np.testing.assert_allclose(exact_mean, x64.mean(0), rtol=0, atol=1e-6)
  np.testing.assert_allclose(ours.var, x64.var(0), rtol=1e-5)
  np.testing.assert_allclose(ours.transform(x[:64]), (x64[:64] - x64.mean(0)) / x64.std(0), atol=1e-5)

  count, mean, m2 = 0, np.zeros(2, np.float32), np.zeros(2, np.float32)
  for xb in x.reshape(-1, b, 2):
    mb = xb.astype(np.float64).mean(0).astype(np.float32)
    m2b = np.square(xb.astype(np.float64) - xb.astype(np.float64).mean(0)).sum(0).astype(np.float32)
    w, delta = np.float32(b / (count + b)), mb - mean
    mean, m2, count = mean + delta * w, m2 + m2b + delta * delta * np.float32(count) * w, count + b
  assert np.min(np.abs(mean - x64.mean(0))) > 0.1
  assert np.min(np.abs(m2 / n / x64.var(0) - 1)) > 0.05


def test_jit_matches_eager_and_does_not_retrace():
  x = _data(10)
  batches = [jnp.asarray(xb) for xb in _batches(x, (7, 8, 8))]
  traces = []

  def fit_step(s, xb):
    traces.append(1)
    return s.partial_fit(xb)

  jit_fit, jit_transform = jax.jit(fit_step), jax.jit(jaxnorm.Standardizer.transform)
  ours = jit_fit(jaxnorm.Standardizer(), batches[0])  # unfitted: starts from zeros
  ours = jit_fit(ours, batches[1])
  ours = jit_fit(ours, batches[2])  # same shapes and state dtype: no retrace
  assert len(traces) == 2
  eager = jaxnorm.Standardizer().fit(batches[0]).partial_fit(batches[1]).partial_fit(batches[2])
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(eager)):
    np.testing.assert_allclose(a, b, **F64)
  ref = StandardScaler().fit(x)
  np.testing.assert_allclose(jit_transform(ours, x[:3]), ref.transform(x[:3]), **Y64)
  jit_inverse = jax.jit(jaxnorm.Standardizer.inverse_transform)
  np.testing.assert_allclose(jit_inverse(ours, x[:3]), ref.inverse_transform(x[:3]), **F64)


def test_axis_selects_the_reduced_axes():
  rng = np.random.default_rng(11)
  x = rng.standard_normal((6, 3, 4)) * 2 + 1
  # axis=0 on (N, H, C): statistics per (H, C) position, as scikit-learn on (N, H*C).
  per_position = jaxnorm.Standardizer(axis=0).fit(x[:2]).partial_fit(x[2:])
  ref = StandardScaler().fit(x.reshape(6, 12))
  np.testing.assert_allclose(per_position.var.reshape(12), ref.var_, **F64)
  np.testing.assert_allclose(per_position.transform(x[:1]).reshape(1, 12), ref.transform(x[:1].reshape(1, 12)), **F64)
  # Default: features on the last axis, every other axis reduced: (N, T, C) as (N*T, C).
  per_channel = jaxnorm.Standardizer().fit(x)
  ref = StandardScaler().fit(x.reshape(18, 4))
  np.testing.assert_allclose(per_channel.mean, ref.mean_, **F64)
  np.testing.assert_allclose(per_channel.transform(x[:1]).reshape(3, 4), ref.transform(x[0]), **F64)


def test_pytree_and_checkpoint_round_trip():
  scaler = jaxnorm.Standardizer(axis=[0], with_std=False).fit(_data(12))
  leaves, treedef = jax.tree_util.tree_flatten(scaler)
  assert len(leaves) == 4  # count, mean, mean_residual, m2; the configuration is static
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (back.axis, back.with_mean, back.with_std) == ((0,), True, False)  # the list became hashable
  assert jax.tree_util.tree_structure(jaxnorm.Standardizer().empty(4)) != treedef  # the config is in the treedef

  # flax.serialization checkpoints the state (a NamedTuple of arrays) into a template of the right shape.
  data = flax.serialization.to_bytes(scaler.state)
  template = jaxnorm.Standardizer(axis=(0,), with_std=False).empty(4, jnp.float64)
  restored = jaxnorm.Standardizer(axis=(0,), with_std=False, state=flax.serialization.from_bytes(template.state, data))
  for a, b in zip(restored.state, scaler.state):
    np.testing.assert_array_equal(a, b)
    assert np.asarray(a).dtype == b.dtype
  x_new = _data(13, n=5)
  np.testing.assert_array_equal(restored.transform(x_new), scaler.transform(x_new))
  # A restored state keeps streaming.
  more = _data(14, n=7)
  np.testing.assert_allclose(
      restored.partial_fit(more).var, StandardScaler().fit(np.concatenate([_data(12), more])).var_, **F64
  )


def test_errors_are_clear():
  fitted = jaxnorm.Standardizer().fit(np.ones((3, 4)))
  with pytest.raises(ValueError, match="not fitted"):
    jaxnorm.Standardizer().transform(np.ones((2, 4)))
  with pytest.raises(ValueError, match="not fitted"):
    _ = jaxnorm.Standardizer().scale
  with pytest.raises(ValueError, match=r"feature shape \(5,\).*\(4,\)"):
    fitted.transform(np.ones((2, 5)))
  with pytest.raises(ValueError, match=r"feature shape \(5,\).*\(4,\)"):
    fitted.partial_fit(np.ones((2, 5)))
  with pytest.raises(ValueError, match="feature shape"):
    fitted.inverse_transform(np.ones((2, 2, 3)))
  with pytest.raises(TypeError, match="floating-point"):
    jaxnorm.Standardizer().fit(np.ones((3, 4), np.int32))
  with pytest.raises(TypeError, match="floating-point"):
    fitted.transform(np.ones((3, 4), np.int32))
  with pytest.raises(ValueError, match="at least two dimensions"):
    jaxnorm.Standardizer().fit(np.ones(3))
  with pytest.raises(ValueError, match="out of range"):
    jaxnorm.Standardizer(axis=2).fit(np.ones((3, 4)))
  with pytest.raises(ValueError, match="does not broadcast"):
    jaxnorm.Standardizer().fit(np.ones((3, 4)), where=np.ones((3, 5), bool))
  with pytest.raises(TypeError, match="with_mean"):
    jaxnorm.Standardizer(with_mean="yes")
  with pytest.raises(TypeError, match="axis"):
    jaxnorm.Standardizer(axis=1.5)
  with pytest.raises(TypeError, match="dtype"):
    jaxnorm.Standardizer().empty(4, jnp.int32)
  with pytest.raises(ValueError, match="exactly one dimension"):
    jaxnorm.Standardizer().empty((2, 4))
