"""Groups with no valid element: the output is what an x-hat of 0 gives (the bias), and running statistics
of features with no valid value stay as they were."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

F32 = np.float32


def _x(*shape):
  return np.random.default_rng(0).normal(size=shape).astype(F32) * 3 + 1


@pytest.mark.parametrize("custom_vjp", [True, False])
@pytest.mark.parametrize(
    "name", ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"]
)
def test_all_masked_group_outputs_bias_and_gets_no_gradient(name, custom_vjp):
  if name in ("layer_norm", "rms_norm"):
    x, mask, empty = _x(3, 5), np.ones((3, 5), bool), (1, slice(None))
    params = (np.full(5, 2.0, F32), np.linspace(-1, 1, 5).astype(F32))
  elif name == "batch_norm":
    x, mask, empty = _x(4, 3), np.ones((4, 3), bool), (slice(None), 1)
    params = (np.full(3, 2.0, F32), np.array([0.5, -0.25, 1.0], F32))
  else:
    x, mask = _x(2, 3, 3, 4), np.ones((2, 3, 3, 4), bool)
    empty = (1, slice(None), slice(None), slice(0, 2))  # group 0 of example 1 (and its instance channels)
    params = (np.full(4, 2.0, F32), np.array([0.5, -0.25, 1.0, 0.0], F32))
  mask[empty] = False
  x[empty] = 1e3  # large meaningless values: x / sqrt(eps) would be ~1e6
  bias = params[1]
  op = {
      "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b, where=mask, custom_vjp=custom_vjp),
      "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s, where=mask, custom_vjp=custom_vjp),
      "batch_norm": lambda x, s, b: jaxnorm.batch_norm(x, s, b, where=mask, custom_vjp=custom_vjp)[0],
      "group_norm": lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=2, where=mask, custom_vjp=custom_vjp),
      "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x, s, b, where=mask, custom_vjp=custom_vjp),
  }[name]
  y = np.asarray(op(x, *params))
  expected = np.broadcast_to(np.zeros(()) if name == "rms_norm" else bias, x.shape)[empty]
  np.testing.assert_allclose(y[empty], expected, atol=1e-6)
  # The valid groups are unchanged by the fix: normalized as before.
  assert np.all(np.abs(y[mask]) < 10)
  ct = np.random.default_rng(1).normal(size=x.shape).astype(F32)
  dx, dscale = jax.grad(lambda x, s: jnp.sum(op(x, s, params[1]) * ct), argnums=(0, 1))(x, params[0])
  np.testing.assert_array_equal(np.asarray(dx)[empty], 0)
  assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dscale))


def test_moments_of_an_empty_group_are_zero():
  mask = np.ones((4, 3), bool)
  mask[:, 2] = False
  mean, var = jaxnorm.moments(_x(4, 3), 0, where=mask)
  assert float(mean[2]) == 0 and float(var[2]) == 0


@pytest.mark.parametrize("convention", ["flax", "torch"])
def test_linen_running_statistics_of_an_unseen_feature_stay(convention):
  x, mask = _x(6, 3), np.ones((6, 3), bool)
  mask[:, 1] = False
  module = jnn.BatchNorm(use_running_average=False, convention=convention)
  variables = module.init(jax.random.key(0), x)
  stats = {"mean": jnp.array([0.5, 0.7, 0.9]), "var": jnp.array([2.0, 3.0, 4.0])}
  variables = {**variables, "batch_stats": {**variables["batch_stats"], **stats}}
  _, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
  new = updates["batch_stats"]
  np.testing.assert_allclose(new["mean"][1], 0.7)
  np.testing.assert_allclose(new["var"][1], 3.0)
  assert float(new["mean"][0]) != 0.5 and float(new["var"][2]) != 4.0


def test_linen_ghost_batch_norm_averages_the_virtual_batches_that_have_values():
  x, mask = _x(8, 2), np.ones((8, 2), bool)
  mask[4:, 0] = False  # virtual batch 2 of feature 0 is empty
  module = jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=4, momentum=0.0)
  variables = module.init(jax.random.key(0), x)
  _, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
  np.testing.assert_allclose(updates["batch_stats"]["mean"][0], x[:4, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"][0], x[:4, 0].var(), rtol=1e-5)


def test_nnx_running_statistics_of_an_unseen_feature_stay():
  x, mask = _x(6, 3), np.ones((6, 3), bool)
  mask[:, 1] = False
  module = jnnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))
  module.mean[...] = jnp.array([0.5, 0.7, 0.9], jnp.float32)
  module.var[...] = jnp.array([2.0, 3.0, 4.0], jnp.float32)
  module(x, mask=mask)
  np.testing.assert_allclose(module.mean[...][1], 0.7)
  np.testing.assert_allclose(module.var[...][1], 3.0)
  assert float(module.mean[...][0]) != 0.5
