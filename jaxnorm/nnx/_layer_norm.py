"""`LayerNorm` and `RMSNorm`: drop-ins for the `flax.nnx` classes on jaxnorm's core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from jaxnorm import _standardize, _validation
from jaxnorm.nnx import _affine
from jaxnorm.nnx._affine import NO_METADATA


def per_example(module: nnx.Module, x: jax.Array, mask: jax.Array | None, *, centered: bool) -> jax.Array:
  """The shared body of LayerNorm and RMSNorm: statistics over `reduction_axes`, parameters along `feature_axes`."""
  x = _validation.floating_input(x, allow_complex=True)
  feature_axes = _validation.canonical_axes(module.feature_axes, x.ndim, "feature_axes")
  shape = _affine.feature_shape(x, feature_axes, module.num_features, "feature_axes")
  scale = _affine.value(module.scale)
  bias = _affine.value(module.bias) if centered else None
  if centered:
    x, scale, bias = _affine.promote(module, (x, scale, bias), dtype=module.dtype)
  else:
    x, scale = _affine.promote(module, (x, scale), dtype=module.dtype)
  return _standardize.apply(
      x,
      _affine.as_features(scale, shape),
      _affine.as_features(bias, shape),
      op=f"nnx.{type(module).__name__}",
      axes=module.reduction_axes,
      axes_name="reduction_axes",
      param_axes=feature_axes,
      param_explain="the shape of x along feature_axes",
      centered=centered,
      epsilon=module.epsilon,
      where=_validation.boolean_mask(mask, "mask"),
      axis_name=module.axis_name,
      axis_index_groups=module.axis_index_groups,
      dtype=_affine.output_dtype(x, scale, bias, dtype=module.dtype),
  )


class LayerNorm(nnx.Module):
  r"""Layer normalization, a drop-in for `flax.nnx.LayerNorm`.

  .. math::
      y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  with :math:`\mu, \sigma^2` over `reduction_axes` for each example; params
  ``scale`` (:math:`\gamma`) and ``bias`` (:math:`\beta`) of shape
  ``(num_features,)``, applied along `feature_axes` (whose shape must hold
  `num_features` elements). Same arguments, defaults, state and output
  dtypes as flax; inside, a hand-derived VJP and a stable variance
  (`use_fast_variance` is accepted and ignored).

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    >>> jnnx.LayerNorm(8, rngs=nnx.Rngs(0))(x).shape
    (2, 3, 8)
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    shape = (num_features,)
    self.scale = _affine.optional_param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
    self.bias = _affine.optional_param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (broadcastable to `x`) selects the positions that enter the statistics."""
    return per_example(self, x, mask, centered=True)


class RMSNorm(nnx.Module):
  r"""Root-mean-square normalization, a drop-in for `flax.nnx.RMSNorm`.

  .. math::
      y = \gamma \frac{x}{\sqrt{\overline{x^2} + \epsilon}}

  with the mean square over `reduction_axes` for each example and the param
  ``scale`` (:math:`\gamma`) of shape ``(num_features,)`` applied along
  `feature_axes`. Same arguments (`mask` may be passed positionally, as in
  flax), defaults, state and output dtypes as flax, with a hand-derived VJP.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (2, 8))
    >>> layer = jnnx.RMSNorm(8, rngs=nnx.Rngs(0))
    >>> layer(x).shape, sorted(nnx.state(layer, nnx.Param))
    ((2, 8), ['scale'])
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_scale: bool = True,
      scale_init: Initializer = initializers.ones,
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self.scale = _affine.optional_param(use_scale, scale_init, (num_features,), param_dtype, rngs, scale_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (broadcastable to `x`) selects the positions that enter the statistics."""
    return per_example(self, x, mask, centered=False)
