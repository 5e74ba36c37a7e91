"""`GroupNorm` and `InstanceNorm`: drop-ins for the `flax.nnx` classes on jaxnorm's core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from jaxnorm import _group_norm, _modulation, _standardize, _validation
from jaxnorm.nnx import _affine
from jaxnorm.nnx._affine import NO_METADATA


def _groups(num_features: int, num_groups: Any, group_size: Any) -> tuple[int, int]:
  """flax.nnx's rule, checked at construction: exactly one of the two, dividing `num_features`."""
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        "Either `num_groups` or `group_size` should be specified (not both, not neither). If `group_size` "
        "is to be specified, pass `num_groups=None` as argument to override the default `num_groups` value "
        "of 32."
    )
  if group_size is None:
    groups = _group_norm.check_num_groups(num_groups, num_features)
    return groups, num_features // groups
  size = _validation.integer(group_size, "group_size")
  if size < 1 or num_features % size:
    raise ValueError(
        f"`group_size`={size} must be a positive divisor of `num_features`={num_features} "
        "(the number of channels)."
    )
  return num_features // size, size


class GroupNorm(nnx.Module):
  r"""Group normalization (Wu & He, 2018), a drop-in for `flax.nnx.GroupNorm`.

  .. math::
      y = \gamma \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta

  for a channels-last `x` of shape ``(..., num_features)``: :math:`\mu_g,
  \sigma_g^2` are taken over `reduction_axes` (by default every axis but the
  first, the batch, and the last) and the channels of each group of
  consecutive channels; params ``scale`` and ``bias`` of shape
  ``(num_features,)``. Give exactly one of `num_groups` (default 32) and
  `group_size` (then pass ``num_groups=None``); both are checked at
  construction, as in flax, and stored as attributes. Same arguments,
  defaults, state and output dtypes as flax; inside, a hand-derived VJP and a
  stable variance (`use_fast_variance` is accepted and ignored). `mask` may
  be any shape that broadcasts to `x` (flax needs the full shape).
  Beyond flax: `scale_offset` :math:`o` (the multiplier is :math:`o +
  \gamma`; the default `scale_init` starts it at 1) and the call-time
  ``scale=``/``shift=`` of a diffusion UNet's ResBlock (guided-diffusion's
  ``use_scale_shift_norm``): ``y = norm(x) * (1 + scale) + shift``.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> layer = jnnx.GroupNorm(6, num_groups=3, rngs=nnx.Rngs(0))
    >>> layer(x).shape, layer.group_size
    ((2, 4, 4, 6), 2)
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer | None = None,
      reduction_axes: Axes | None = None,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
      scale_offset: float = 0.0,
      saved: str = "input",
  ):
    self.feature_axis = -1
    self.num_groups, self.group_size = _groups(num_features, num_groups, group_size)
    shape = (num_features,)
    self.scale_offset = _validation.real_number(scale_offset, "scale_offset")
    self.saved = _validation.saved(saved)
    scale_init = _modulation.scale_initializer(scale_init, self.scale_offset)
    self.scale = _affine.optional_param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
    self.bias = _affine.optional_param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(
      self,
      x: jax.Array,
      *,
      mask: jax.Array | None = None,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes `x` of shape ``(..., num_features)``, then modulates it.

    Args:
      x: the channels-last input.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the statistics.
      scale: optional call-time scale :math:`s` that broadcasts to `x` (a
        UNet ResBlock's per-example ``(N, 1, 1, C)``); the output is
        multiplied by ``1 + scale``.
      shift: optional call-time shift :math:`t` that broadcasts to `x`,
        added last: ``y = norm(x) * (1 + scale) + shift``.

    Returns:
      `y`, shaped like `x`.
    """
    x = _validation.floating_input(x, allow_complex=True)
    if x.ndim < 1 or x.shape[-1] != self.num_features:
      raise ValueError(
          f"GroupNorm expects a channels-last x of shape (..., num_features={self.num_features}), "
          f"got shape {tuple(x.shape)}."
      )
    if self.reduction_axes is None:
      reduction_axes = list(range(1, x.ndim - 1)) + [-1]
    else:
      reduction_axes = self.reduction_axes
    reduction_axes = _validation.canonical_axes(reduction_axes, x.ndim, "reduction_axes")
    if reduction_axes[-1] != x.ndim - 1:
      raise ValueError(
          f"`reduction_axes`={self.reduction_axes!r} must include the final dimension, "
          "as this is assumed to be the feature axis."
      )
    x, gamma, beta, dtype, scale_offset = _affine.modulated(self, x, (x.ndim - 1,), (scale, shift))
    return _group_norm.standardize_groups(
        x,
        gamma,
        beta,
        num_groups=self.num_groups,
        spatial_axes=reduction_axes[:-1],
        epsilon=self.epsilon,
        where=_validation.boolean_mask(mask, "mask", x.shape),
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        scale_offset=scale_offset,
        dtype=dtype,
        saved=self.saved,
    )


class InstanceNorm(nnx.Module):
  r"""Instance normalization (Ulyanov et al., 2016), a drop-in for `flax.nnx.InstanceNorm`.

  .. math::
      y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  with :math:`\mu, \sigma^2` over every axis except the first (the batch) and
  `feature_axes`, separately for each example and feature; params ``scale``
  and ``bias`` of shape ``(num_features,)`` applied along `feature_axes`
  (whose shape must hold `num_features` elements). Same arguments, defaults,
  state and output dtypes as flax; inside, a hand-derived VJP and a stable
  variance (`use_fast_variance` is accepted and ignored). Beyond flax, as
  `GroupNorm`: `scale_offset` and the call-time ``scale=``/``shift=``.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> y = jnnx.InstanceNorm(3, rngs=nnx.Rngs(0))(x)
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-6))
    True
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
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer | None = None,
      feature_axes: Axes = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
      scale_offset: float = 0.0,
      saved: str = "input",
  ):
    shape = (num_features,)
    self.scale_offset = _validation.real_number(scale_offset, "scale_offset")
    self.saved = _validation.saved(saved)
    scale_init = _modulation.scale_initializer(scale_init, self.scale_offset)
    self.scale = _affine.optional_param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
    self.bias = _affine.optional_param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(
      self,
      x: jax.Array,
      *,
      mask: jax.Array | None = None,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes `x`, then modulates it (`mask`, `scale`, `shift` as in `GroupNorm`)."""
    x = _validation.floating_input(x, allow_complex=True)
    feature_axes = _validation.canonical_axes(self.feature_axes, x.ndim, "feature_axes")
    if 0 in feature_axes:
      raise ValueError(
          f"`feature_axes`={self.feature_axes!r} cannot include the leading dimension, "
          "as this is assumed to be the batch axis."
      )
    x, gamma, beta, dtype, scale_offset = _affine.modulated(self, x, feature_axes, (scale, shift))
    return _standardize.apply(
        x,
        gamma,
        beta,
        op=f"nnx.{type(self).__name__}",
        axes=tuple(a for a in range(1, x.ndim) if a not in feature_axes),
        axes_name="feature_axes",
        param_axes=feature_axes,
        param_explain="the shape of x along feature_axes",
        centered=True,
        epsilon=self.epsilon,
        where=_validation.boolean_mask(mask, "mask", x.shape),
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        scale_offset=scale_offset,
        dtype=dtype,
        saved=self.saved,
    )
