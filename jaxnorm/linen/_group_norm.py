"""`GroupNorm` and `InstanceNorm`: drop-ins for the `flax.linen` classes on jaxnorm's core."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _group_norm, _modulation, _standardize, _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype


def _resolve_num_groups(num_groups: Any, group_size: Any, channels: int) -> int:
  """flax's rule: exactly one of `num_groups` and `group_size`; the result must divide the channels."""
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        "Either `num_groups` or `group_size` should be specified (not both, not neither). If `group_size` "
        "is to be specified, pass `num_groups=None` as argument to override the default `num_groups` value "
        "of 32."
    )
  if group_size is None:
    return _group_norm.check_num_groups(num_groups, channels)
  size = _validation.integer(group_size, "group_size")
  if size < 1:
    raise ValueError(f"`group_size` must be >= 1, got {size}.")
  if channels % size:
    raise ValueError(
        f"Number of channels ({channels}) is not multiple of the group size ({size}): `group_size` must "
        "divide the last axis of x."
    )
  return channels // size


class GroupNorm(nn.Module):
  r"""Group normalization (Wu & He, 2018), a drop-in for `flax.linen.GroupNorm`.

  .. math::
      y = \gamma \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta

  for a channels-last `x` of shape `(..., C)`: :math:`\mu_g, \sigma_g^2` are
  taken over `reduction_axes` (by default every axis but the first, the batch,
  and the last) and the channels of each group of consecutive channels;
  :math:`\gamma, \beta` have shape `(C,)`. Give exactly one of `num_groups`
  (default 32) and `group_size` (then pass ``num_groups=None``).
  ``num_groups=1`` is `LayerNorm` over all non-batch axes, ``group_size=1``
  is `InstanceNorm`. Same arguments, defaults, errors, parameters and output
  dtypes as flax; inside, a hand-derived VJP and a stable variance
  (`use_fast_variance` and `force_float32_reductions` are accepted and
  ignored: statistics are always reduced stably in at least float32).
  Beyond flax: `scale_offset` :math:`o` (the multiplier is :math:`o +
  \gamma`; the default `scale_init` starts it at 1) and the call-time
  ``scale=``/``shift=`` of a diffusion UNet's ResBlock (guided-diffusion's
  ``use_scale_shift_norm``): ``y = norm(x) * (1 + scale) + shift``.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> layer = jnn.GroupNorm(num_groups=3)
    >>> variables = layer.init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(jax.numpy.shape, variables)
    {'params': {'bias': (6,), 'scale': (6,)}}
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer | None = None
  reduction_axes: Axes | None = None
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  scale_offset: float = 0.0
  saved: str = "input"

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      *,
      mask: jax.Array | None = None,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes `x`, then modulates it.

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
    channels = x.shape[-1]
    num_groups = _resolve_num_groups(self.num_groups, self.group_size, channels)
    gamma, beta = affine_parameters(
        self, (channels,), use_scale=self.use_scale, use_bias=self.use_bias, scale_offset=self.scale_offset
    )
    modulation = _modulation.arrays(scale, shift)
    dtype = output_dtype(x, gamma, beta, *modulation, dtype=self.dtype)
    gamma, beta, scale_offset = _modulation.fold(
        x.shape, (x.ndim - 1,), gamma, beta, self.scale_offset, *modulation
    )
    return _group_norm.standardize_groups(
        x,
        gamma,
        beta,
        num_groups=num_groups,
        spatial_axes=reduction_axes[:-1],
        epsilon=self.epsilon,
        where=_validation.boolean_mask(mask, "mask", x.shape),
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        scale_offset=scale_offset,
        dtype=dtype,
        saved=self.saved,
    )


class InstanceNorm(nn.Module):
  r"""Instance normalization (Ulyanov et al., 2016), a drop-in for `flax.linen.InstanceNorm`.

  .. math::
      y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  with :math:`\mu, \sigma^2` over every axis except the first (the batch) and
  `feature_axes`, separately for each example and feature; :math:`\gamma,
  \beta` are shaped like `feature_axes`. Same arguments, defaults, errors,
  parameters and output dtypes as flax (like flax, and unlike
  `jaxnorm.instance_norm`, it accepts inputs without spatial positions, where
  the output is `bias`); inside, a hand-derived VJP and a stable variance
  (`use_fast_variance` and `force_float32_reductions` are accepted and
  ignored). Beyond flax, as `GroupNorm`: `scale_offset` and the call-time
  ``scale=``/``shift=``.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> variables = jnn.InstanceNorm().init(jax.random.key(1), x)
    >>> y = jnn.InstanceNorm().apply(variables, x)
    >>> bool(jax.numpy.allclose(y.mean((1, 2)), 0, atol=1e-6))
    True
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer | None = None
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  scale_offset: float = 0.0
  saved: str = "input"

  @nn.compact
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
    reduction_axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
    gamma, beta = affine_parameters(
        self,
        tuple(x.shape[a] for a in feature_axes),
        use_scale=self.use_scale,
        use_bias=self.use_bias,
        scale_offset=self.scale_offset,
    )
    modulation = _modulation.arrays(scale, shift)
    dtype = output_dtype(x, gamma, beta, *modulation, dtype=self.dtype)
    gamma, beta, scale_offset = _modulation.fold(x.shape, feature_axes, gamma, beta, self.scale_offset, *modulation)
    y = _standardize.apply(
        x,
        gamma,
        beta,
        op=f"linen.{type(self).__name__}",
        axes=reduction_axes,
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
    return y
