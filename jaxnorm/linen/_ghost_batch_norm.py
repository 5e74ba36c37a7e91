"""`GhostBatchNorm`: batch norm with statistics per virtual batch, in `BatchNorm`'s conventions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

import jaxnorm
from jaxnorm import _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype
from jaxnorm.linen._running_stats import DEFAULT_MOMENTUM, RunningStatistics, stats_dtype


class GhostBatchNorm(nn.Module):
  r"""Ghost batch normalization (Hoffer et al., 2017) with running statistics in ``batch_stats``.

  Training (``use_running_average=False``): the batch (axis 0, of :math:`N`
  examples) is split into :math:`G = N / v` virtual batches of
  :math:`v` = `virtual_batch_size` consecutive examples, each normalized with
  its own statistics (see `jaxnorm.ghost_batch_norm`), and the running
  statistics move towards the mean of the virtual batches' statistics:

  .. math::
      y_i = \gamma \frac{x_i - \mu_{g(i)}}{\sqrt{\sigma_{g(i)}^2 + \epsilon}} + \beta, \qquad
      \bar\mu \leftarrow m \bar\mu + (1 - m) \tfrac1G \textstyle\sum_g \mu_g, \quad
      \bar\sigma^2 \leftarrow m \bar\sigma^2 + (1 - m) \tfrac1G \textstyle\sum_g \sigma_g^2

  Inference uses :math:`\bar\mu, \bar\sigma^2` exactly as `BatchNorm` does.
  The attributes, defaults, variable trees (params ``scale``/``bias``,
  batch_stats ``mean``/``var``, shaped like `axis`) and output dtypes are
  those of `flax.linen.BatchNorm` / `jaxnorm.linen.BatchNorm`, plus
  `virtual_batch_size`; ``None`` (the default) makes the whole batch one
  virtual batch, i.e. plain `BatchNorm`, so a checkpoint of either loads into
  the other. `use_fast_variance` and `force_float32_reductions` are accepted
  and ignored, as in `jaxnorm.linen.BatchNorm`.

  `convention` (``"flax"`` or ``"torch"``), `momentum` and
  `track_running_stats` work as in `BatchNorm`; under ``"torch"`` each
  virtual batch's variance gets its own unbiased correction
  :math:`n_g / (n_g - 1)` before the average over virtual batches. The
  bad-state errors are `BatchNorm`'s, a single value per feature counted per
  virtual batch (``virtual_batch_size=1`` on an ``(N, C)`` input is refused
  in training).

  A training batch whose size is not a multiple of `virtual_batch_size`
  raises a `ValueError`, except while initializing: flax models are often
  initialized with a dummy batch of any size (e.g. 1), which is then treated
  as a single virtual batch (the variables are the same either way, and init
  never updates the running statistics).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (32, 4))
    >>> gbn = jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=8)
    >>> variables = gbn.init(jax.random.key(1), x)
    >>> y, updates = gbn.apply(variables, x, mutable=["batch_stats"])
    >>> y.shape, jax.tree_util.tree_map(jnp.shape, updates)
    ((32, 4), {'batch_stats': {'mean': (4,), 'var': (4,)}})
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
  virtual_batch_size: int | None = None
  convention: str = "flax"
  track_running_stats: bool = True

  @nn.compact
  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Normalizes `x` with per-virtual-batch statistics (training) or running statistics (inference).

    Args:
      x: the input, batch along axis 0; statistics are taken over every axis
        but `self.axis` within each virtual batch.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the statistics.

    Returns:
      The normalized input, shaped like `x`.
    """
    x = _validation.floating_input(x)
    feature_axes = _validation.canonical_axes(self.axis, x.ndim, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    running = RunningStatistics(self, feature_shape, stats_dtype(x.dtype, self.dtype))
    scale, bias = affine_parameters(self, feature_shape, use_scale=self.use_scale, use_bias=self.use_bias)
    dtype = output_dtype(x, scale, bias, dtype=self.dtype)

    if running.tracking:
      use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
      if use_running_average:
        return running.normalize(x, feature_axes, scale, bias, epsilon=self.epsilon, dtype=dtype)

    # x has rank >= 1 here: `axis` was checked against it.
    virtual_batch_size = self.virtual_batch_size
    if virtual_batch_size is None:
      virtual_batch_size = x.shape[0]
    elif (
        self.is_initializing()
        and isinstance(virtual_batch_size, int)
        and virtual_batch_size > 0
        and x.shape[0] % virtual_batch_size
    ):
      virtual_batch_size = x.shape[0]  # a dummy init batch of any size (see the class docstring)
    # Counted (and checked) over the grouped view the statistics are taken over,
    # (virtual batches, examples of one, ...); a malformed call is left to
    # ghost_batch_norm's own checks below.
    count = None
    v = virtual_batch_size
    if 0 not in feature_axes and isinstance(v, int) and v > 0 and x.shape[0] % v == 0:
      grouped = (x.shape[0] // v, v, *x.shape[1:])
      reduced = tuple(a for a in range(1, len(grouped)) if a - 1 not in feature_axes)
      grouped_mask = None if mask is None else _validation.broadcast_mask(mask, x.shape, "mask").reshape(grouped)
      count = running.training_count(grouped, reduced, grouped_mask)
    y, mean, var = jaxnorm.ghost_batch_norm(
        x,
        scale,
        bias,
        virtual_batch_size=virtual_batch_size,
        feature_axes=feature_axes,
        epsilon=self.epsilon,
        where=_validation.boolean_mask(mask, "mask", x.shape),
        # At init the mapped axis need not exist yet, as in flax.
        axis_name=None if self.is_initializing() else self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
    )
    running.update(mean, var, count)
    return y
