"""Inputs at the edges, on the CPU's program and on the GPU/TPU one (`_platform.force("tpu")`).

* The ends of the documented float32 range: deviations up to ``sqrt(max / n)``
  normalize; beyond it the variance is ``inf`` and the output is the bias,
  never NaN, wherever the large value sits in its group.
* Zero-size reduction axes: the empty group's statistics (mean 0, variance
  0) and an empty output, on every path; the modules keep their running
  statistics.
* A single value per feature in training: one `ValueError` for the
  functional `batch_norm` and the linen and nnx `BatchNorm`, also under
  `jax.vmap` with an `axis_name` over one example.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import _platform
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

PLATFORMS = ["cpu", "tpu"]


def on(platform):
  """The GPU/TPU branch forced for "tpu"; for "cpu" the program as it is lowered here (both branches traced)."""
  return _platform.force("tpu") if platform == "tpu" else contextlib.nullcontext()


INSIDE = [[2e19, 0.0], [0.0, 2e19], [2e19, 0.0, 1e19]]  # deviations of 1e19: inside sqrt(3.4e38 / n)
BEYOND = [[1e20, 0.0], [0.0, 1e20], [1e20, 1e20, 0.0], [3e38, -3e38, 0.0, 1.0]]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_inside_the_range_the_largest_deviations_normalize(platform):
  with on(platform):  # one context per platform: forcing a branch clears JAX's caches
    for row in INSIDE:
      x = np.array([row], np.float32)
      x64 = x.astype(np.float64)
      _, var = jaxnorm.moments(x, 1)
      y = jaxnorm.layer_norm(x)
      np.testing.assert_allclose(var, x64.var(1), rtol=1e-6, err_msg=str(row))
      ref = (x64 - x64.mean(1, keepdims=True)) / x64.std(1, keepdims=True)
      np.testing.assert_allclose(y, ref, atol=1e-6, err_msg=str(row))


@pytest.mark.nonfinite("the variance beyond the float32 range is inf by design")
@pytest.mark.parametrize("platform", PLATFORMS)
def test_beyond_the_range_the_variance_is_inf_and_the_output_the_bias(platform):
  with on(platform):
    for row in BEYOND:
      x = np.array([row], np.float32)
      bias = np.arange(1, len(row) + 1, dtype=np.float32)
      _, var = jaxnorm.moments(x, 1)
      y = jaxnorm.layer_norm(x, None, bias)
      _, _, bn_var = jaxnorm.batch_norm(x.T, None, None)
      assert np.isinf(var).all() and np.isinf(bn_var).all(), row
      np.testing.assert_array_equal(y, bias[None], err_msg=str(row))


EMPTY = {
    "moments": lambda: jaxnorm.moments(jnp.zeros((0, 3), jnp.float32), 0),
    "batch_norm": lambda: jaxnorm.batch_norm(jnp.zeros((0, 3), jnp.float32), jnp.ones(3), jnp.zeros(3)),
    "batch_renorm": lambda: jaxnorm.batch_renorm(
        jnp.zeros((0, 3), jnp.float32), jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3), r_max=3.0, d_max=5.0
    ),
    "layer_norm": lambda: jaxnorm.layer_norm(jnp.zeros((3, 0), jnp.float32)),
    "group_norm": lambda: jaxnorm.group_norm(jnp.zeros((2, 0, 4), jnp.float32), num_groups=2),
}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_zero_size_reduction_axes(platform):
  with on(platform):
    outs = {name: f() for name, f in EMPTY.items()}
    grads = jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x, jnp.ones(0), jnp.zeros(0))))(jnp.zeros((3, 0)))
  assert grads.shape == (3, 0)
  for name, out in outs.items():
    for a in jax.tree.leaves(out):
      assert np.all(np.asarray(a) == 0), (name, a)  # the empty group's statistics; empty outputs


def test_modules_keep_their_running_statistics_on_an_empty_batch():
  for convention in ("flax", "torch"):
    bn = jnn.BatchNorm(use_running_average=False, convention=convention)
    variables = bn.init(jax.random.key(0), jnp.ones((4, 3)))
    stats = {**variables["batch_stats"], "mean": jnp.full(3, 2.0), "var": jnp.full(3, 3.0)}
    y, updates = bn.apply({**variables, "batch_stats": stats}, jnp.zeros((0, 3)), mutable=["batch_stats"])
    assert y.shape == (0, 3)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], stats)
  module = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
  module.mean[...] = jnp.full(3, 2.0)
  assert module(jnp.zeros((0, 3))).shape == (0, 3)
  np.testing.assert_array_equal(module.mean[...], np.full(3, 2.0))
  np.testing.assert_array_equal(module.var[...], np.ones(3))


def _linen_single():
  bn = jnn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.ones((1, 4)))
  return bn.apply(variables, jnp.ones((1, 4)), mutable=["batch_stats"])


SINGLE = {
    "batch_norm": lambda: jaxnorm.batch_norm(jnp.ones((1, 4))),
    "nnx.BatchNorm": lambda: jnnx.BatchNorm(4, rngs=nnx.Rngs(0))(jnp.ones((1, 4))),
    "linen.BatchNorm": _linen_single,
}


def _vmapped_linen(convention):
  bn = jnn.BatchNorm(use_running_average=False, axis_name="batch", convention=convention)
  variables = bn.init(jax.random.key(0), jnp.ones(3))
  return lambda: jax.vmap(lambda x: bn.apply(variables, x, mutable=["batch_stats"]), axis_name="batch")(jnp.ones((1, 3)))


SINGLE.update({f"linen.BatchNorm vmap {c}": _vmapped_linen(c) for c in ("flax", "torch")})
SINGLE["batch_norm vmap"] = lambda: jax.vmap(
    lambda x: jaxnorm.batch_norm(x, axis_name="batch"), axis_name="batch"
)(jnp.ones((1, 3)))


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_a_single_value_per_feature_raises_everywhere(name):
  with pytest.raises(ValueError, match="single value per feature"):
    SINGLE[name]()


def test_a_masked_single_value_and_init_are_not_checked():
  # With a mask the count is data-dependent: one valid value outputs the bias.
  y, _, var = jaxnorm.batch_norm(jnp.ones((2, 3)), None, jnp.full(3, 5.0), where=jnp.array([[True], [False]]))
  np.testing.assert_array_equal(var, 0)
  np.testing.assert_allclose(y, 5.0)
  # Models are often initialized with one dummy example.
  jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((1, 3)))


def test_complex_parameters_with_a_real_input_give_a_complex_output():
  """As flax's modules and jaxnorm's own: the imaginary part is kept, not cast away."""
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  scale = np.full(4, 1 + 2j, np.complex64)
  y = jaxnorm.layer_norm(x, scale)
  assert y.dtype == jnp.complex64
  x64 = x.astype(np.float64)
  ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6) * (1 + 2j)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert jaxnorm.layer_norm(x, scale, dtype=jnp.complex64).dtype == jnp.complex64
  module = jnn.LayerNorm().apply({"params": {"scale": scale, "bias": np.zeros(4, np.float32)}}, x)
  np.testing.assert_allclose(module, y, rtol=1e-6)


BAD_ARGUMENTS = {
    "axis=True": (lambda: jaxnorm.layer_norm(np.ones((2, 3), np.float32), axis=True), TypeError, "`axis`"),
    "feature_axes=(False,)": (lambda: jaxnorm.batch_norm(np.ones((2, 3), np.float32), feature_axes=(False,)), TypeError, "`feature_axes`"),
    "epsilon=1e39": (lambda: jaxnorm.layer_norm(np.ones((2, 3), np.float32), epsilon=1e39), ValueError, "inf in float32"),
    "linen epsilon=0": (lambda: jnn.LayerNorm(epsilon=0.0).init(jax.random.key(0), jnp.ones((2, 3))), ValueError, "`epsilon`"),
    "linen mask shape": (
        lambda: jnn.LayerNorm().init(jax.random.key(0), jnp.ones((2, 4)), mask=jnp.ones(8, bool)), ValueError, "`mask` of shape"),
    "nnx mask shape": (lambda: jnnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))(
        jnp.ones((2, 3, 4)), mask=jnp.ones((5, 1, 1), bool)), ValueError, "`mask` of shape"),
}


@pytest.mark.parametrize("name", sorted(BAD_ARGUMENTS))
def test_bad_arguments_name_what_the_caller_passed(name):
  f, error, match = BAD_ARGUMENTS[name]
  with pytest.raises(error, match=match):
    f()
