"""`LayerNorm` and `RMSNorm`: drop-ins for the `flax.nnx` classes on jaxnorm's core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from jaxnorm import _modulation, _standardize, _validation
from jaxnorm.nnx import _affine
from jaxnorm.nnx._affine import NO_METADATA


def per_example(
    module: nnx.Module, x: jax.Array, mask: jax.Array | None, modulation: tuple[Any, Any], *, centered: bool
) -> jax.Array:
  """The shared body of LayerNorm and RMSNorm: statistics over `reduction_axes`, parameters along `feature_axes`."""
  x = _validation.floating_input(x, allow_complex=True)
  feature_axes = _validation.canonical_axes(module.feature_axes, x.ndim, "feature_axes")
  x, scale, bias, dtype, scale_offset = _affine.modulated(module, x, feature_axes, modulation, use_bias=centered)
  return _standardize.apply(
      x,
      scale,
      bias,
      op=f"nnx.{type(module).__name__}",
      axes=module.reduction_axes,
      axes_name="reduction_axes",
      param_axes=feature_axes,
      param_explain="the shape of x along feature_axes",
      centered=centered,
      epsilon=module.epsilon,
      where=_validation.boolean_mask(mask, "mask", x.shape),
      axis_name=module.axis_name,
      axis_index_groups=module.axis_index_groups,
      scale_offset=scale_offset,
      dtype=dtype,
      saved=module.saved,
  )


class LayerNorm(nnx.Module):
  r"""Layer normalization, a drop-in for `flax.nnx.LayerNorm`.

  .. math::
      y = \Bigl((o + \gamma) \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta\Bigr)(1 + s) + t

  with :math:`\mu, \sigma^2` over `reduction_axes` for each example; params
  ``scale`` (:math:`\gamma`) and ``bias`` (:math:`\beta`) of shape
  ``(num_features,)``, applied along `feature_axes` (whose shape must hold
  `num_features` elements). Same arguments, defaults, state and output
  dtypes as flax; inside, a hand-derived VJP and a stable variance
  (`use_fast_variance` is accepted and ignored).

  Beyond flax: `scale_offset` :math:`o` (default 0; 1 is Gemma's zero-centred
  scale, and the default `scale_init` then starts :math:`\gamma` at 0), and
  the call-time modulation :math:`s, t` of adaLN and FiLM, ``scale=`` and
  ``shift=`` (per example or position; see `AdaLNZero` for DiT's block),
  inside the same hand-derived VJP.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

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
      scale_init: Initializer | None = None,
      reduction_axes: Axes = -1,
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
    self.reduction_axes = reduction_axes
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
    """Normalizes `x`, then modulates it.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the statistics.
      scale: optional call-time scale :math:`s` that broadcasts to `x`
        (DiT's per-example ``(batch, 1, features)``); the output is
        multiplied by ``1 + scale``, as in DiT's ``modulate``.
      shift: optional call-time shift :math:`t` that broadcasts to `x`,
        added last: ``y = norm(x) * (1 + scale) + shift``.

    Returns:
      `y`, shaped like `x`.
    """
    return per_example(self, x, mask, (scale, shift), centered=True)


class RMSNorm(nnx.Module):
  r"""Root-mean-square normalization, a drop-in for `flax.nnx.RMSNorm`.

  .. math::
      y = (o + \gamma) \frac{x}{\sqrt{\overline{x^2} + \epsilon}} \, (1 + s) + t

  with the mean square over `reduction_axes` for each example and the param
  ``scale`` (:math:`\gamma`) of shape ``(num_features,)`` applied along
  `feature_axes`. Same arguments (`mask` may be passed positionally, as in
  flax), defaults, state and output dtypes as flax, with a hand-derived VJP.
  Beyond flax, as `LayerNorm`: `scale_offset` :math:`o` (1 for Gemma's
  ``x̂ * (1 + scale)``, `scale` then initialised to zeros: the parameters of
  the RMSNorm in flax's ``examples/gemma``) and the call-time ``scale=``
  :math:`s` and ``shift=`` :math:`t`.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

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
      scale_init: Initializer | None = None,
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
      scale_offset: float = 0.0,
      saved: str = "input",
  ):
    self.scale_offset = _validation.real_number(scale_offset, "scale_offset")
    self.saved = _validation.saved(saved)
    scale_init = _modulation.scale_initializer(scale_init, self.scale_offset)
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

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array | None = None,
      *,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes `x`, then modulates it (`mask`, `scale`, `shift` as in `LayerNorm`)."""
    return per_example(self, x, mask, (scale, shift), centered=False)
