"""Bad states of the batch-statistics modules get clear errors, where flax fails obscurely or silently.

The references are flax.linen's own behaviour in the same states (its error type, or the silent
output it returns) and PyTorch's (which refuses a single value per channel in training).
"""

from __future__ import annotations

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import linen as jnn

torch = pytest.importorskip("torch")

C = 3
LAYERS = [
    ("BatchNorm", {}),
    ("BatchRenorm", {"r_max": 2.0, "d_max": 1.0}),
    ("GhostBatchNorm", {"virtual_batch_size": 2}),
]


def _x(shape=(4, C), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("name, kwargs", LAYERS)
def test_training_without_mutable_batch_stats_names_the_fix(name, kwargs):
  x = _x()
  layer = getattr(jnn, name)(use_running_average=False, **kwargs)
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(jnn.ImmutableBatchStatsError, match=r'mutable=\["batch_stats"\]') as info:
    layer.apply(variables, x)
  # Still the error flax raises in this state, so code that catches flax's keeps working.
  assert isinstance(info.value, flax.errors.ModifyScopeVariableError)
  assert "training mode" in str(info.value) and "use_running_average=True" in str(info.value)
  flax_bn = nn.BatchNorm(use_running_average=False)
  with pytest.raises(flax.errors.ModifyScopeVariableError) as flax_info:
    flax_bn.apply(flax_bn.init(jax.random.key(0), x), x)
  assert "mutable=" not in str(flax_info.value)  # what flax says does not name the fix


def test_missing_batch_stats_names_the_collection():
  x = _x()
  layer = jnn.BatchNorm()
  variables = layer.init(jax.random.key(0), x, use_running_average=True)
  for use_running_average in [True, False]:
    with pytest.raises(jnn.MissingBatchStatsError, match='no "batch_stats" collection') as info:
      layer.apply({"params": variables["params"]}, x, use_running_average=use_running_average)
    assert isinstance(info.value, flax.errors.ScopeCollectionNotFound)  # flax's type in this state
  # Without running statistics there is nothing to be missing or mutable.
  no_stats = jnn.BatchNorm(track_running_stats=False)
  y = no_stats.apply(no_stats.init(jax.random.key(0), x), x)
  assert y.shape == x.shape


@pytest.mark.parametrize("name, kwargs", LAYERS)
def test_single_value_per_feature_in_training_raises_like_torch(name, kwargs):
  x1 = _x((1, C))
  if name == "GhostBatchNorm":  # one example per virtual batch
    kwargs = {"virtual_batch_size": 1}
  layer = getattr(jnn, name)(use_running_average=False, **kwargs)
  # init with a dummy batch of one is fine (nothing is updated), and so is inference.
  variables = layer.init(jax.random.key(0), x1)
  assert layer.copy(use_running_average=True).apply(variables, x1).shape == (1, C)
  with pytest.raises(ValueError, match="single value per feature"):
    layer.apply(variables, x1 if name != "GhostBatchNorm" else _x((2, C)), mutable=["batch_stats"])
  # The reference behaviours: torch refuses, flax returns the bias for every input.
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    torch.nn.BatchNorm1d(C).train()(torch.tensor(np.asarray(x1)))
  flax_bn = nn.BatchNorm(use_running_average=False, bias_init=nn.initializers.constant(0.25))
  y, _ = flax_bn.apply(flax_bn.init(jax.random.key(0), x1), x1, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, 0.25)


def test_more_than_one_value_per_feature_is_fine():
  """One example with spatial axes, or one per device over a mapped axis, has several values per feature."""
  layer = jnn.BatchNorm(use_running_average=False)
  x = _x((1, 2, 2, C))
  variables = layer.init(jax.random.key(0), x)
  y, _ = layer.apply(variables, x, mutable=["batch_stats"])
  assert np.all(np.isfinite(y)) and np.ptp(np.asarray(y)) > 0
  mapped = jnn.BatchNorm(use_running_average=False, axis_name="d")
  xs = _x((2, 1, C))
  y, _ = jax.vmap(lambda x: mapped.apply(variables, x, mutable=["batch_stats"]), axis_name="d")(xs)
  half = np.asarray(xs[0] - xs[1], np.float64) / 2  # two values per feature: +-half / sqrt(half^2 + eps)
  np.testing.assert_allclose(y[0], half / np.sqrt(half**2 + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(y[1], -half / np.sqrt(half**2 + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("name, kwargs", LAYERS)
def test_unbound_axis_name_is_named(name, kwargs):
  x = _x()
  layer = getattr(jnn, name)(use_running_average=False, axis_name="batch", **kwargs)
  variables = layer.init(jax.random.key(0), x)  # init ignores axis_name, as in flax
  with pytest.raises(NameError, match=r"`axis_name`='batch'.*shard_map"):
    layer.apply(variables, x, mutable=["batch_stats"])
  # Inside a transformation that binds the axis it works.
  jax.vmap(lambda x: layer.apply(variables, x, mutable=["batch_stats"]), axis_name="batch")(x[None])
