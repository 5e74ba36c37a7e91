"""Inference folding and frozen statistics: `fold_batch_norm` and `FrozenBatchNorm`.

References: the unfolded model itself in inference mode (with flax.linen's
BatchNorm or jaxnorm's), flax.linen.BatchNorm(use_running_average=True), and
the affine map in float64 numpy.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _flax_reference import flax_promotion
from jaxnorm import linen as jnn


class Head(nn.Module):
  bn: Any = None  # None: the folded model
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    h = nn.Dense(3, use_bias=self.bn is None, param_dtype=self.param_dtype)(h)
    return h if self.bn is None else self.bn(use_running_average=True)(h)


class Net(nn.Module):
  use_bias: bool = True
  bn: Any = None  # None: the folded model
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    folded = self.bn is None
    h = nn.Conv(4, (3, 3), feature_group_count=2, use_bias=self.use_bias or folded, param_dtype=self.param_dtype)(x)
    if not folded:
      h = self.bn(use_running_average=True, epsilon=1e-3)(h)
    h = nn.relu(h).mean((1, 2))
    # A nested layer (path Head_0/Dense_0) whose Dense has no bias before folding.
    return Head(bn=self.bn, param_dtype=self.param_dtype)(h)


def _randomized(tree, seed, dtype):
  """Every float leaf replaced by a random positive value of `dtype` (variances must stay positive)."""
  r = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: a if a.dtype == jnp.int32 else jnp.asarray(0.2 + r.uniform(size=a.shape) * 1.5, dtype), tree
  )


@pytest.mark.parametrize(
    "bn, use_bias, dtype, tol",
    [
        (nn.BatchNorm, True, jnp.float64, 1e-12),
        (functools.partial(jnn.BatchNorm, convention="torch"), False, jnp.float64, 1e-12),
        (jnn.BatchNorm, True, jnp.float32, 2e-6),
    ],
    ids=["flax-bn-bias-f64", "jaxnorm-torch-convention-nobias-f64", "jaxnorm-bn-f32"],
)
def test_folded_model_matches_unfolded(bn, use_bias, dtype, tol):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 4)) * 2 + 1, dtype)
  model = Net(use_bias=use_bias, bn=functools.partial(bn, param_dtype=dtype), param_dtype=dtype)
  # flax's BatchNorm (the unfolded model's, in the first case) makes float32 running statistics
  # beside float64 parameters at init; _randomized gives every leaf `dtype`.
  with flax_promotion() if bn is nn.BatchNorm else contextlib.nullcontext():
    variables = _randomized(jax.eval_shape(lambda: model.init(jax.random.key(0), x)), 1, dtype)
  # Some means negative: the bias shift has a sign.
  variables["batch_stats"]["BatchNorm_0"]["mean"] = variables["batch_stats"]["BatchNorm_0"]["mean"] - 1
  before = jax.tree_util.tree_map(np.asarray, variables)

  folded = jnn.fold_batch_norm(
      variables,
      [("Conv_0", "BatchNorm_0"), ("Head_0/Dense_0", ("Head_0", "BatchNorm_0"))],
      epsilon={"BatchNorm_0": 1e-3},
  )
  # No BatchNorm left: no batch_stats at all; the Dense gained a bias; dtypes kept.
  assert set(folded) == {"params"}
  assert jax.tree_util.tree_map(jnp.shape, folded) == jax.tree_util.tree_map(
      jnp.shape, jax.eval_shape(lambda: Net(param_dtype=dtype).init(jax.random.key(0), x))
  )
  assert all(a.dtype == dtype for a in jax.tree_util.tree_leaves(folded))
  y_folded = Net(param_dtype=dtype).apply(folded, x)
  y_ref = model.apply(variables, x)
  np.testing.assert_allclose(y_folded, y_ref, rtol=tol, atol=tol)
  # The input variables are left as they were.
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, variables), before)


def test_fold_formula_on_a_dense_layer():
  """kernel' and bias' against the formula in float64 numpy, with a BatchNorm without scale."""
  r = np.random.default_rng(0)
  kernel, bias = r.normal(size=(3, 2)), r.normal(size=2)
  beta, mean, var = r.normal(size=2), r.normal(size=2), r.uniform(0.5, 2, size=2)
  variables = {
      "params": {"fc": {"kernel": kernel, "bias": bias}, "bn": {"bias": beta}},
      "batch_stats": {"bn": {"mean": mean, "var": var}, "other": {"mean": mean}},
  }
  folded = jnn.fold_batch_norm(variables, [("fc", "bn")], epsilon=0.1)
  s = 1 / np.sqrt(var + 0.1)
  np.testing.assert_allclose(folded["params"]["fc"]["kernel"], kernel * s, rtol=1e-14)
  np.testing.assert_allclose(folded["params"]["fc"]["bias"], (bias - mean) * s + beta, rtol=1e-14)
  assert set(folded["params"]) == {"fc"} and set(folded["batch_stats"]) == {"other"}


def test_fold_errors_are_clear():
  variables = {
      "params": {"fc": {"kernel": jnp.ones((3, 2))}, "bn": {"scale": jnp.ones(3)}, "emb": {"embedding": jnp.ones(3)}},
      "batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}},
  }
  with pytest.raises(ValueError, match=r"must normalize the output features of layer 'fc'.*mean has shape \(3,\)"):
    jnn.fold_batch_norm(variables, [("fc", "bn")])
  with pytest.raises(ValueError, match=r"no layer variables at params/fd: params/\(top level\) holds \['bn', 'emb'"):
    jnn.fold_batch_norm(variables, [("fd", "bn")])
  with pytest.raises(ValueError, match="appears twice"):
    jnn.fold_batch_norm(variables, [("fc", "bn"), ("fc", "bn")])
  with pytest.raises(ValueError, match="no params 'kernel'"):
    jnn.fold_batch_norm(variables, [("emb", "bn")])
  with pytest.raises(TypeError, match="sequence of"):
    jnn.fold_batch_norm(variables, "fc")
  variables["params"]["fc"]["kernel"] = jnp.ones((2, 3))
  jnn.fold_batch_norm(variables, [("fc", "bn")])  # now the shapes line up
  with pytest.raises(ValueError, match="`epsilon` must be > 0"):
    jnn.fold_batch_norm(variables, [("fc", "bn")], epsilon={"bn": 0.0})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_frozen_batch_norm_is_inference_batch_norm_and_never_updates(dtype):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2, 3)) * 3 + 2, dtype)
  flax_bn = nn.BatchNorm(use_running_average=True, axis=(1, 2), epsilon=1e-3, param_dtype=dtype)
  with flax_promotion():
    variables = _randomized(flax_bn.init(jax.random.key(0), x), 1, dtype)
  frozen = jnn.FrozenBatchNorm(axis=(1, 2), epsilon=1e-3, param_dtype=dtype)
  # Same variable tree as flax's BatchNorm: the checkpoint loads unchanged.
  assert jax.tree_util.tree_map(jnp.shape, frozen.init(jax.random.key(0), x)) == jax.tree_util.tree_map(
      jnp.shape, variables
  )
  with flax_promotion():
    y_ref = flax_bn.apply(variables, x)
  tol = 1e-12 if dtype == jnp.float64 else 1e-6
  for use_running_average in (None, False, True):
    y, updates = frozen.apply(variables, x, use_running_average, mutable=["batch_stats"])
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    jax.tree_util.tree_map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])

  # The gradient wrt x is that of the affine map, in float64 numpy.
  p, s = variables["params"], variables["batch_stats"]
  ct = np.random.default_rng(2).normal(size=x.shape)
  gx = jax.grad(lambda x: jnp.sum(frozen.apply(variables, x).astype(jnp.float64) * ct))(x)
  expected = ct * np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(s["var"], np.float64) + 1e-3)
  np.testing.assert_allclose(gx, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("trainable_affine", [True, False])
def test_frozen_batch_norm_fine_tuning_keeps_statistics(trainable_affine):
  """A few optax steps in 'training mode': batch_stats never move; scale/bias move only when trainable."""
  model = jnn.FrozenBatchNorm(use_running_average=False, trainable_affine=trainable_affine, convention="torch")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  assert set(variables["batch_stats"]) == {"mean", "var", "num_batches_tracked"}  # torch convention's tree
  stats = {**variables["batch_stats"], "mean": jnp.array([1.0, -1.0, 0.5], jnp.float32)}
  variables = {**variables, "batch_stats": stats}
  opt = optax.sgd(0.1)

  @jax.jit
  def step(params, opt_state, batch_stats):
    def loss(params):
      y, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
      return jnp.mean((y - 1.0) ** 2), updates

    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    new_updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, new_updates), opt_state, updates["batch_stats"], grads

  params, opt_state, batch_stats = variables["params"], opt.init(variables["params"]), variables["batch_stats"]
  for _ in range(3):
    params, opt_state, batch_stats, grads = step(params, opt_state, batch_stats)
  jax.tree_util.tree_map(np.testing.assert_array_equal, batch_stats, variables["batch_stats"])
  leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(variables["params"]))
  moved = [not np.array_equal(a, b) for a, b in leaves]
  if trainable_affine:
    assert all(moved)
  else:
    assert not any(moved)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads))


def test_frozen_batch_norm_needs_batch_stats():
  x = jnp.ones((2, 3), jnp.float32)
  variables = jnn.FrozenBatchNorm().init(jax.random.key(0), x)
  with pytest.raises(jnn.MissingBatchStatsError, match="batch_stats"):
    jnn.FrozenBatchNorm().apply({"params": variables["params"]}, x)
