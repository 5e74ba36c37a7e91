"""`FrozenBatchNorm`: batch normalization that always uses its running statistics and never updates them."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype
from jaxnorm.linen._running_stats import DEFAULT_MOMENTUM, RunningStatistics, stats_dtype


class FrozenBatchNorm(nn.Module):
  r"""Batch normalization with frozen running statistics, for fine-tuning (torchvision's ``FrozenBatchNorm2d``).

  .. math::
      y = \gamma \frac{x - \bar\mu}{\sqrt{\bar\sigma^2 + \epsilon}} + \beta

  always with the running statistics :math:`\bar\mu, \bar\sigma^2`
  (``batch_stats`` ``mean`` and ``var``, shaped like the feature axes
  `axis`), in training as at inference: the output is what
  ``BatchNorm(use_running_average=True)`` computes, and ``batch_stats`` is
  never written, even when passed as mutable. Fine-tuning with small batches
  then neither suffers from noisy batch statistics nor drifts the statistics
  the model was trained with. :math:`\gamma, \beta` (params ``scale`` and
  ``bias``) are trained as usual unless ``trainable_affine=False``, which
  stops their gradients (they stay in ``params``, so checkpoints keep
  loading; the gradients are exact zeros).

  A drop-in for `BatchNorm` (jaxnorm's or flax's): the same constructor
  arguments, defaults and variable trees, so a trained model's checkpoint
  loads unchanged and ``BatchNorm`` can be swapped for ``FrozenBatchNorm``
  without touching the call sites. `use_running_average` (attribute or call
  argument), `momentum`, `axis_name`, `axis_index_groups`,
  `use_fast_variance` and `force_float32_reductions` are accepted and
  ignored: nothing here takes batch statistics. `convention` is kept only
  for the variable tree (``"torch"`` declares ``num_batches_tracked`` too).
  `mask` is accepted at call time and ignored for the same reason. Reading
  running statistics from variables without ``batch_stats`` raises
  `MissingBatchStatsError`, as `BatchNorm` does. Gradients with respect to
  `x` are those of the affine map above (plain autodiff; :math:`\bar\mu,
  \bar\sigma^2` are constants).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 2 + 1
    >>> variables = jnn.BatchNorm(use_running_average=False).init(jax.random.key(1), x)
    >>> frozen = jnn.FrozenBatchNorm()
    >>> y, updates = frozen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> bool(jnp.array_equal(updates["batch_stats"]["mean"], variables["batch_stats"]["mean"]))
    True
    >>> bool(jnp.allclose(y, jnn.BatchNorm(use_running_average=True).apply(variables, x)))
    True
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float | None = DEFAULT_MOMENTUM
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  convention: str = "flax"
  trainable_affine: bool = True

  @nn.compact
  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Normalizes `x` with the running statistics.

    Args:
      x: the input; `self.axis` are its feature axes.
      use_running_average: accepted for `BatchNorm` compatibility and ignored.
      mask: accepted for `BatchNorm` compatibility and ignored (no
        statistics are taken from `x`).

    Returns:
      The normalized input, shaped like `x`.
    """
    del use_running_average, mask
    x = _validation.floating_input(x)
    feature_axes = _validation.canonical_axes(self.axis, x.ndim, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    # Declares the variables exactly as BatchNorm does, checks they are there, and normalizes;
    # its `update` is never called.
    running = RunningStatistics(self, feature_shape, stats_dtype(x.dtype, self.dtype))
    scale, bias = affine_parameters(self, feature_shape, use_scale=self.use_scale, use_bias=self.use_bias)
    dtype = output_dtype(x, scale, bias, dtype=self.dtype)
    if not self.trainable_affine:
      scale, bias = jax.tree_util.tree_map(jax.lax.stop_gradient, (scale, bias))
    return running.normalize(x, feature_axes, scale, bias, epsilon=self.epsilon, dtype=dtype)
