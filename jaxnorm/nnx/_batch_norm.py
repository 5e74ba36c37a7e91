"""`BatchNorm`: a drop-in for `flax.nnx.BatchNorm` on jaxnorm's core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

import jaxnorm
from jaxnorm import _batch_norm, _validation
from jaxnorm.nnx._affine import NO_METADATA
from jaxnorm.nnx._running_stats import BatchStatistics


class BatchNorm(BatchStatistics):
  r"""Batch normalization with `nnx.BatchStat` running statistics, a drop-in for `flax.nnx.BatchNorm`.

  Training (``use_running_average=False``):

  .. math::
      y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
      \bar\mu \leftarrow m \bar\mu + (1 - m) \mu_B, \quad
      \bar\sigma^2 \leftarrow m \bar\sigma^2 + (1 - m) \sigma_B^2

  with the batch statistics over every axis but `axis` (and across the
  `axis_name` axis of an enclosing `nnx.vmap`, `shard_map` or `pmap`);
  inference uses :math:`\bar\mu, \bar\sigma^2`. ``model.train()`` /
  ``model.eval()`` (or ``nnx.view``) switch `use_running_average`.

  State, as flax.nnx: params ``scale`` (:math:`\gamma`) and ``bias``
  (:math:`\beta`) of shape ``(num_features,)``; batch stats ``mean`` and
  ``var`` of shape ``(num_features,)``, float32. The shape of `x` along
  `axis` (an int or a tuple) must hold `num_features` elements. Constructor
  and call arguments, defaults and output dtypes are flax's; inside, a
  hand-derived VJP and a stable variance (`use_fast_variance` is accepted and
  ignored). Two deliberate differences: inference uses the float32 running
  statistics even when `dtype` is lower (flax casts them first), and the
  running statistics keep their dtype (flax lets a float64 batch promote
  them).

  Call-time ``scale=`` and ``shift=`` modulate the output per example
  (conditional batch norm, BigGAN, FiLM): ``y = norm(x) * (1 + scale) +
  shift``, with the batch (or running) statistics of plain batch norm.

  Under ``nnx.vmap``: an ensemble whose members keep their own statistics
  maps the module's state (``in_axes=0`` or ``nnx.StateAxes``); a module
  shared across the mapped axis (``in_axes=None``) in training needs
  ``axis_name`` (the name given to ``nnx.vmap``), so that one set of
  statistics is taken over the whole mapped batch and the shared running
  statistics stay unmapped.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> bn = jnnx.BatchNorm(4, rngs=nnx.Rngs(0))
    >>> y = bn(x)  # training: batch statistics, running statistics updated
    >>> bn.eval()
    >>> y = bn(x)  # inference: running statistics
    >>> sorted(nnx.state(bn, nnx.BatchStat)), bn.mean[...].shape
    (['mean', 'var'], (4,))
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
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
      saved: str = "input",
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
    self.saved = _validation.saved(saved)

  def __call__(
      self,
      x: jax.Array,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes `x` with batch statistics (training) or the running statistics (inference), then modulates it.

    Args:
      x: the input; statistics are taken over every axis but `axis`, whose
        shape must hold `num_features` elements.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the batch statistics.
      scale: optional call-time scale :math:`s` that broadcasts to `x`
        (conditional batch norm and FiLM: per example, ``(N, 1, 1, C)``
        for NHWC); the output is multiplied by ``1 + scale``.
      shift: optional call-time shift :math:`t` that broadcasts to `x`,
        added last: ``y = norm(x) * (1 + scale) + shift``.

    Returns:
      The normalized input, shaped like `x`.
    """
    return self._normalize(x, use_running_average, mask, (scale, shift))

  def _train(self, x, scale, bias, *, axes, mask, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jaxnorm.batch_norm(
        x,
        scale,
        bias,
        feature_axes=axes,
        epsilon=self.epsilon,
        where=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
        saved=self.saved,
    )


class ActivatedBatchNorm(BatchNorm):
  r"""`BatchNorm` followed by a leaky ReLU in one VJP that keeps only the activation's output (In-Place ABN).

  .. math::
      z = \operatorname{leaky\_relu}(\mathrm{BatchNorm}(x), s)

  Same arguments and state as `BatchNorm`, plus `negative_slope` :math:`s`
  (default 0.01, In-Place ABN's; 0 is a ReLU); `saved` is always "output".
  In training the backward recovers the batch norm's output from `z` (see
  `jaxnorm.activated_batch_norm`); inference applies the same activation
  after the running-statistics normalization.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> bn = jnnx.ActivatedBatchNorm(4, rngs=nnx.Rngs(0))
    >>> bn(jax.random.normal(jax.random.key(0), (8, 4))).shape
    (8, 4)
  """

  def __init__(self, num_features: int, *, negative_slope: float = 0.01, saved: str = "output", **kwargs: Any):
    if saved != "output":
      raise ValueError(f"ActivatedBatchNorm keeps its output: `saved` must be 'output', got {saved!r}.")
    super().__init__(num_features, saved="output", **kwargs)
    self.negative_slope = _validation.negative_slope(negative_slope)

  def __call__(
      self,
      x: jax.Array,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Batch norm (arguments as `BatchNorm`), then the leaky ReLU."""
    y = self._normalize(x, use_running_average, mask, (scale, shift))
    # In training the activation ran inside the VJP (`_train`).
    inference = self._resolve_use_running_average(use_running_average)
    return _batch_norm.activation(y, self.negative_slope) if inference else y

  def _train(self, x, scale, bias, *, axes, mask, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jaxnorm.activated_batch_norm(
        x,
        scale,
        bias,
        negative_slope=self.negative_slope,
        feature_axes=axes,
        epsilon=self.epsilon,
        where=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
    )
