"""`precise_batch_stats` (PreciseBN) against the statistics of the concatenated layer inputs.

Reference: the model is run in training mode on each batch with its parameters fixed; each
batch-norm layer's input is recorded by the model itself (`sow`, independent of the code
under test), the records of all batches are concatenated, and float64 NumPy takes the mean
and variance per feature (ddof=1 for a layer in the PyTorch convention; masked positions
dropped). flax.linen.BatchNorm layers in the model are recomputed too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

TOL = dict(rtol=1e-10, atol=1e-12)


class Net(nn.Module):
  """Two jaxnorm BatchNorm layers (one in the torch convention), ghost, flax and mean-only batch norm."""

  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    ra = not train
    h = nn.Dense(5, param_dtype=jnp.float64)(x)
    self.sow("inputs", "bn1_in", h)
    h = jnn.BatchNorm(use_running_average=ra, param_dtype=jnp.float64, axis_name=self.axis_name, name="bn1")(h)
    h = nn.relu(nn.Dense(4, param_dtype=jnp.float64)(h))
    self.sow("inputs", "bn2_in", h)
    h = jnn.BatchNorm(use_running_average=ra, convention="torch", param_dtype=jnp.float64, name="bn2")(h, mask=mask)
    self.sow("inputs", "ghost_in", h)
    h = jnn.GhostBatchNorm(use_running_average=ra, virtual_batch_size=2, param_dtype=jnp.float64, name="ghost")(h)
    self.sow("inputs", "flax_bn_in", h)
    with flax_promotion():  # flax's BatchNorm promotes its float32 statistics with the float64 input implicitly
      h = nn.BatchNorm(use_running_average=ra, param_dtype=jnp.float64, name="flax_bn")(h)
    self.sow("inputs", "mean_only_in", h * 2 + 1)
    return jnn.MeanOnlyBatchNorm(use_running_average=ra, param_dtype=jnp.float64, name="mean_only")(h * 2 + 1)


def _batches(n=4, size=6):
  r = np.random.default_rng(0)
  # Batches from different distributions: the pooled variance differs from a mean of batch variances.
  return [jnp.asarray(r.normal(size=(size, 3)) * (1 + i) + 3 * i) for i in range(n)]


def _layer_inputs(model, variables, batches, **kwargs):
  """Each layer's input in training mode, concatenated over the batches (float64)."""
  records = {}
  run = jax.jit(lambda b: model.apply(variables, b, train=True, mutable=["batch_stats", "inputs"], **kwargs))
  for b in batches:
    _, state = run(b)
    for name, (value,) in state["inputs"].items():
      records.setdefault(name.removesuffix("_in"), []).append(np.asarray(value))
  return {k: np.concatenate(v) for k, v in records.items()}


def test_equals_statistics_of_concatenated_layer_inputs():
  model, batches = Net(), _batches()
  variables = model.init(jax.random.key(0), batches[0], train=False)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}  # no "inputs" yet
  new = jnn.precise_batch_stats(model, variables, batches, train=True)
  inputs = _layer_inputs(model, variables, batches)
  for name, ddof in [("bn1", 0), ("bn2", 1), ("ghost", 0), ("flax_bn", 0)]:
    # Stored dtypes are kept: float64 here, except flax's BatchNorm, which creates float32 statistics.
    dtype = variables["batch_stats"][name]["var"].dtype
    assert new[name]["mean"].dtype == dtype and new[name]["var"].dtype == dtype
    tol = TOL if dtype == jnp.float64 else dict(rtol=2 * float(jnp.finfo(dtype).eps), atol=4 * float(jnp.finfo(dtype).eps))
    np.testing.assert_allclose(new[name]["mean"], inputs[name].mean(0), **tol)
    np.testing.assert_allclose(new[name]["var"], inputs[name].var(0, ddof=ddof), **tol)
  assert variables["batch_stats"]["flax_bn"]["var"].dtype == jnp.float32
  np.testing.assert_allclose(new["mean_only"]["mean"], inputs["mean_only"].mean(0), rtol=1e-6)  # float32 storage
  assert set(new["mean_only"]) == {"mean"}
  # Counters are left alone; the input variables are not modified.
  assert int(new["bn2"]["num_batches_tracked"]) == 0
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], 0)
  # Not a mean of per-batch variances (which misses the spread of the batch means).
  per_batch = np.mean([np.var(r, 0) for r in np.split(inputs["bn1"], len(batches))], 0)
  assert np.all(np.asarray(new["bn1"]["var"]) > 1.5 * per_batch)


def test_apply_function_mask_num_batches_and_axis_name():
  """An apply function with a mask; `num_batches`; a model whose layer merges over a mapped axis."""
  batches = _batches(5)
  masks = [jnp.asarray(np.random.default_rng(i).random((6, 1)) < 0.7) for i in range(5)]
  model = Net(axis_name="batch")
  variables = model.init(jax.random.key(0), batches[0], train=False)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}  # no "inputs" yet
  pairs = list(zip(batches, masks))

  def apply_fn(v, batch):
    x, mask = batch
    return model.apply(v, x, train=True, mask=mask, mutable=["batch_stats"])

  new = jnn.precise_batch_stats(apply_fn, variables, iter(pairs), num_batches=3, axis_name="batch")
  used = pairs[:3]
  records = {"bn1": [], "bn2": []}
  run = jax.jit(
      jax.vmap(
          lambda x, m: model.apply(variables, x, train=True, mask=m, mutable=["batch_stats", "inputs"]),
          axis_name="batch",
      )
  )
  for x, mask in used:
    _, state = run(x[None], mask[None])
    records["bn1"].append(np.asarray(state["inputs"]["bn1_in"][0][0]))
    records["bn2"].append(np.asarray(state["inputs"]["bn2_in"][0][0])[np.asarray(mask)[:, 0]])
  bn1, bn2 = np.concatenate(records["bn1"]), np.concatenate(records["bn2"])
  np.testing.assert_allclose(new["bn1"]["mean"], bn1.mean(0), **TOL)
  np.testing.assert_allclose(new["bn1"]["var"], bn1.var(0), **TOL)
  np.testing.assert_allclose(new["bn2"]["mean"], bn2.mean(0), **TOL)
  np.testing.assert_allclose(new["bn2"]["var"], bn2.var(0, ddof=1), **TOL)


def test_clear_errors():
  model, batches = Net(), _batches(2)
  variables = model.init(jax.random.key(0), batches[0], train=False)
  with pytest.raises(ValueError, match="inference mode"):
    jnn.precise_batch_stats(model, variables, batches, train=False)
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    jnn.precise_batch_stats(model, {"params": variables["params"]}, batches, train=True)
  with pytest.raises(ValueError, match="yielded no batch"):
    jnn.precise_batch_stats(model, variables, [], train=True)
  dense = nn.Dense(3, param_dtype=jnp.float64)
  with pytest.raises(ValueError, match="No batch-norm layer ran"):
    jnn.precise_batch_stats(dense, {**dense.init(jax.random.key(0), batches[0]), "batch_stats": {}}, batches)
