"""`GhostBatchNorm`: batch norm with statistics per virtual batch, for flax.nnx in `BatchNorm`'s conventions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

import jaxnorm
from jaxnorm.nnx._affine import NO_METADATA
from jaxnorm.nnx._running_stats import BatchStatistics


class GhostBatchNorm(BatchStatistics):
  r"""Ghost batch normalization (Hoffer et al., 2017) with `nnx.BatchStat` running statistics.

  Training (``use_running_average=False``): the batch (axis 0, :math:`N`
  examples) is split into :math:`G = N / v` virtual batches of :math:`v` =
  `virtual_batch_size` consecutive examples, each normalized with its own
  statistics (`jaxnorm.ghost_batch_norm`); the running statistics move
  towards the mean of the virtual batches' statistics:

  .. math::
      y_i = \gamma \frac{x_i - \mu_{g(i)}}{\sqrt{\sigma_{g(i)}^2 + \epsilon}} + \beta, \qquad
      \bar\mu \leftarrow m \bar\mu + (1 - m) \tfrac1G \textstyle\sum_g \mu_g, \quad
      \bar\sigma^2 \leftarrow m \bar\sigma^2 + (1 - m) \tfrac1G \textstyle\sum_g \sigma_g^2

  Inference is `BatchNorm`'s. State, arguments, defaults and output dtypes
  are those of `jaxnorm.nnx.BatchNorm`, plus `virtual_batch_size` (None, the
  default: the whole batch, i.e. plain `BatchNorm`). A training batch whose
  size `virtual_batch_size` does not divide raises a `ValueError`.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (32, 4))
    >>> gbn = jnnx.GhostBatchNorm(4, virtual_batch_size=8, rngs=nnx.Rngs(0))
    >>> gbn(x).shape
    (32, 4)
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      virtual_batch_size: int | None = None,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self._init_batch_statistics(
        num_features,
        use_running_average=use_running_average,
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=use_bias,
        use_scale=use_scale,
        bias_init=bias_init,
        scale_init=scale_init,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        promote_dtype=promote_dtype,
        rngs=rngs,
        bias_metadata=bias_metadata,
        scale_metadata=scale_metadata,
    )
    self.use_fast_variance = use_fast_variance
    self.virtual_batch_size = virtual_batch_size

  def _train(self, x, scale, bias, *, axes, mask, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    # x has rank >= 1 here: `axis` was checked against it.
    virtual_batch_size = x.shape[0] if self.virtual_batch_size is None else self.virtual_batch_size
    y, mean, var = jaxnorm.ghost_batch_norm(
        x,
        scale,
        bias,
        virtual_batch_size=virtual_batch_size,
        feature_axes=axes,
        epsilon=self.epsilon,
        where=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
    )
    return y, mean.mean(0), var.mean(0)
