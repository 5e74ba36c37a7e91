"""Running statistics shared by the batch-statistics modules (BatchNorm, BatchRenorm, GhostBatchNorm).

One place declares them (flax's names and float32 storage in ``batch_stats``),
updates them, and normalizes with them at inference.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm


class RunningStatistics:
  """The ``mean`` and ``var`` variables of a module's ``batch_stats`` collection, shaped like the features.

  They are kept in float32 (flax's default storage), so running statistics
  never degrade to 16 bits, whatever the input dtype.
  """

  def __init__(self, module: nn.Module, feature_shape: tuple[int, ...]):
    self.module = module
    self.mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), feature_shape)
    self.var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), feature_shape)

  def update(self, batch_mean: jax.Array, batch_var: jax.Array) -> None:
    """flax's exponential moving average, ``ra = m ra + (1 - m) batch``; skipped while initializing."""
    if self.module.is_initializing():
      return
    m = self.module.momentum
    self.mean.value = m * self.mean.value + (1 - m) * batch_mean
    self.var.value = m * self.var.value + (1 - m) * batch_var

  def normalize(
      self,
      x: jax.Array,
      feature_axes: tuple[int, ...],
      scale: jax.Array | None,
      bias: jax.Array | None,
      *,
      epsilon: float,
      dtype: Any,
  ) -> jax.Array:
    """Inference: normalizes `x` with the running statistics, in flax's promoted dtype, cast once to `dtype`."""
    shape = tuple(d if i in feature_axes else 1 for i, d in enumerate(x.shape))

    def broadcast(a):
      return None if a is None else a.reshape(shape)

    compute = jnp.promote_types(x.dtype, dtype)
    y = jaxnorm.normalize(
        x.astype(compute),
        broadcast(self.mean.value),
        broadcast(self.var.value),
        broadcast(scale),
        broadcast(bias),
        epsilon=epsilon,
    )
    return y.astype(dtype)
