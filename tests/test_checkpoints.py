"""Orbax checkpoints: a jaxnorm model round-trips, and a flax.linen BatchNorm checkpoint loads into jaxnorm.

The reference is flax.linen itself: the checkpoint of a model built with
`flax.linen.BatchNorm` (random parameters, running statistics moved by flax's
own training-mode updates) restores unchanged into the identical model built
with `jaxnorm.linen.BatchNorm`, which then gives flax's eval outputs, and its
train outputs and running-statistic updates (flax with
``use_fast_variance=False``, the variance jaxnorm always computes).
"""

from __future__ import annotations

import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import linen as jnn

ocp = pytest.importorskip("orbax.checkpoint")


class Net(nn.Module):
  bn: Any  # nn.BatchNorm or jnn.BatchNorm: the same variable names either way

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(6, (3, 3))(x)
    h = nn.relu(self.bn(use_running_average=not train, momentum=0.8)(h))
    h = jnn.GroupNorm(num_groups=3)(h)
    h = nn.Dense(4)(h.mean((1, 2)))
    return self.bn(use_running_average=not train, momentum=0.8)(h)


FLAX = Net(bn=lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw))
OURS = Net(bn=jnn.BatchNorm)


def _data(seed, n=8):
  r = np.random.default_rng(seed)
  return jnp.asarray(r.normal(size=(n, 5, 5, 3)) * 2 + 1, jnp.float32)


@pytest.fixture
def ckpt_dir(tmp_path):
  path = tmp_path / "ckpt"
  yield path
  shutil.rmtree(tmp_path, ignore_errors=True)


def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=("train", "mutable"))


def _flax_variables():
  """The flax model's variables: random (non-initial) parameters, running statistics moved by flax's updates."""
  x = _data(0)
  shapes = jax.eval_shape(lambda: FLAX.init(jax.random.key(0), x, train=False))
  r = np.random.default_rng(1)
  def draw(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.asarray(r.uniform(0.5, 1.5, size=s.shape), s.dtype)
    return jnp.asarray(r.normal(scale=0.5, size=s.shape), s.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  apply = _jit_apply(FLAX)
  for seed in range(1, 3):
    _, updates = apply(variables, _data(seed) * seed, train=True, mutable=("batch_stats",))
    variables = {**variables, **updates}
  return variables


def _save_and_restore(path, variables, target):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.absolute(), variables)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(path.absolute(), target)
  checkpointer.close()
  return restored


def test_flax_batch_norm_checkpoint_loads_into_jaxnorm(ckpt_dir):
  flax_variables = _flax_variables()
  x = _data(9)
  # The target: the jaxnorm model's own (abstract) variables, so the tree must match exactly.
  target = jax.eval_shape(lambda: OURS.init(jax.random.key(1), x, train=False))
  restored = _save_and_restore(ckpt_dir, flax_variables, target)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(flax_variables)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(flax_variables)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  # The statistics moved away from their initial values, so the comparison means something.
  assert not np.allclose(restored["batch_stats"]["BatchNorm_0"]["var"], 1.0)

  ours, theirs = _jit_apply(OURS), _jit_apply(FLAX)
  np.testing.assert_allclose(
      ours(restored, x, train=False), theirs(flax_variables, x, train=False), rtol=1e-5, atol=1e-5
  )
  y_ours, up_ours = ours(restored, x, train=True, mutable=("batch_stats",))
  y_flax, up_flax = theirs(flax_variables, x, train=True, mutable=("batch_stats",))
  np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(up_ours), jax.tree_util.tree_leaves(up_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jaxnorm_checkpoint_round_trip(ckpt_dir):
  """Every leaf back bit for bit, int32 counters included (BatchNorm convention="torch", BatchRenorm steps)."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnn.BatchNorm(use_running_average=False, convention="torch")(nn.Dense(5)(x))
      return jnn.BatchRenorm(use_running_average=False)(jnn.LayerNorm()(h))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  apply = jax.jit(Model().apply, static_argnames="mutable")
  variables = jax.jit(Model().init)(jax.random.key(0), x)
  _, updates = apply(variables, x, mutable=("batch_stats",))
  variables = {**variables, **updates}
  restored = _save_and_restore(ckpt_dir, variables, jax.eval_shape(lambda: variables))
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert int(restored["batch_stats"]["BatchNorm_0"]["num_batches_tracked"]) == 1
  # The same state gives the same next step.
  y_restored, up_restored = apply(restored, x, mutable=("batch_stats",))
  y_saved, up_saved = apply(variables, x, mutable=("batch_stats",))
  np.testing.assert_array_equal(y_restored, y_saved)
  jax.tree_util.tree_map(np.testing.assert_array_equal, up_restored, up_saved)
