"""`BatchRenorm`: batch renormalization (Ioffe, 2017) for flax.nnx, in `BatchNorm`'s conventions."""

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


class BatchRenorm(BatchStatistics):
  r"""Batch renormalization with `nnx.BatchStat` running statistics; `jaxnorm.nnx.BatchNorm`'s conventions.

  Training (``use_running_average=False``), with the batch statistics
  :math:`\mu_B, \sigma_B^2` taken as in `BatchNorm` and the running ones
  :math:`\bar\mu, \bar\sigma^2` *before* this step's update:

  .. math::
      y = \gamma \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\, r + d\Big) + \beta, \quad
      r = \operatorname{clip}\Big(\sqrt{\tfrac{\sigma_B^2 + \epsilon}{\bar\sigma^2 + \epsilon}},
          \tfrac{1}{r_{\max}}, r_{\max}\Big), \quad
      d = \operatorname{clip}\Big(\frac{\mu_B - \bar\mu}{\sqrt{\bar\sigma^2 + \epsilon}}, -d_{\max}, d_{\max}\Big)

  with :math:`r, d` constant in the backward pass (`jaxnorm.batch_renorm`);
  then the running statistics move as in `BatchNorm`
  (:math:`\bar\mu \leftarrow m \bar\mu + (1 - m) \mu_B`, likewise the
  variance). Inference is `BatchNorm`'s.

  State, arguments, defaults and output dtypes are those of
  `jaxnorm.nnx.BatchNorm` (params ``scale``/``bias``, batch stats
  ``mean``/``var``, all ``(num_features,)``), plus the bounds: `r_max` and
  `d_max` fixed (Python numbers, ``r_max >= 1``, ``d_max >= 0``) or None (the
  default) to follow the paper's schedule `jaxnorm.batch_renorm_schedule`
  (`warmup_steps`, `r_max_final`, `r_max_steps`, `d_max_final`,
  `d_max_steps`: plain batch norm for 5k steps, then ``r_max`` up to 3 by
  step 40k and ``d_max`` up to 5 by step 25k), driven by an int32
  `nnx.BatchStat` ``steps`` (present only when a bound is scheduled) that
  counts training calls. See `jaxnorm.linen.BatchRenorm` for why the running
  variance, not the paper's running standard deviation, is kept.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> brn = jnnx.BatchRenorm(4, rngs=nnx.Rngs(0))
    >>> y = brn(x)
    >>> int(brn.steps[...]), brn.mean[...].shape
    (1, (4,))
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
      r_max: float | None = None,
      d_max: float | None = None,
      warmup_steps: int = 5000,
      r_max_final: float = 3.0,
      r_max_steps: int = 40_000,
      d_max_final: float = 5.0,
      d_max_steps: int = 25_000,
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
    self.r_max = r_max
    self.d_max = d_max
    self.warmup_steps = warmup_steps
    self.r_max_final = r_max_final
    self.r_max_steps = r_max_steps
    self.d_max_final = d_max_final
    self.d_max_steps = d_max_steps
    scheduled = r_max is None or d_max is None
    self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32)) if scheduled else nnx.data(None)

  def _train(self, x, scale, bias, *, axes, mask, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    r_max, d_max = self.r_max, self.d_max
    if self.steps is not None:
      r_sched, d_sched = jaxnorm.batch_renorm_schedule(
          self.steps[...],
          warmup_steps=self.warmup_steps,
          r_max_final=self.r_max_final,
          r_max_steps=self.r_max_steps,
          d_max_final=self.d_max_final,
          d_max_steps=self.d_max_steps,
      )
      r_max = r_sched if r_max is None else r_max
      d_max = d_sched if d_max is None else d_max
    shape = tuple(x.shape[a] for a in axes)
    # r and d are measured against the running statistics before this step's update.
    out = jaxnorm.batch_renorm(
        x,
        scale,
        bias,
        self.mean[...].reshape(shape),
        self.var[...].reshape(shape),
        r_max=r_max,
        d_max=d_max,
        feature_axes=axes,
        epsilon=self.epsilon,
        where=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
    )
    if self.steps is not None:
      self.steps[...] = self.steps[...] + 1
    return out
