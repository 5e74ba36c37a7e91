"""`LayerNorm` and `RMSNorm`: drop-ins for the `flax.linen` classes on jaxnorm's core."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _modulation, _standardize, _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype


def _per_example(
    module: nn.Module, x: jax.Array, mask: jax.Array | None, modulation: tuple[Any, Any], *, centered: bool
) -> jax.Array:
  """The shared body of LayerNorm and RMSNorm: statistics over `reduction_axes`, parameters over `feature_axes`."""
  x = _validation.floating_input(x, allow_complex=True)
  feature_axes = _validation.canonical_axes(module.feature_axes, x.ndim, "feature_axes")
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  scale, bias = affine_parameters(
      module,
      feature_shape,
      use_scale=module.use_scale,
      use_bias=centered and module.use_bias,
      scale_offset=module.scale_offset,
  )
  modulation = _modulation.arrays(*modulation)
  dtype = output_dtype(x, scale, bias, *modulation, dtype=module.dtype)
  scale, bias, scale_offset = _modulation.fold(
      x.shape, feature_axes, scale, bias, module.scale_offset, *modulation
  )
  y = _standardize.apply(
      x,
      scale,
      bias,
      op=f"linen.{type(module).__name__}",
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
  return y


class LayerNorm(nn.Module):
  r"""Layer normalization, a drop-in for `flax.linen.LayerNorm`.

  .. math::
      y = \Bigl((o + \gamma) \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta\Bigr)(1 + s) + t

  with :math:`\mu, \sigma^2` over `reduction_axes` for each example, and
  :math:`\gamma, \beta` shaped like `feature_axes`. Same arguments, defaults,
  parameters and output dtypes as flax; a hand-derived VJP and a stable
  variance inside (`use_fast_variance` is accepted and ignored; statistics are
  always reduced in at least float32).

  Beyond flax: `scale_offset` :math:`o` (default 0; 1 is Gemma's zero-centred
  scale, and the default `scale_init` then starts :math:`\gamma` at 0), and
  the call-time modulation :math:`s, t` of adaLN and FiLM, ``scale=`` and
  ``shift=`` (per example or position; see `AdaLNZero` for DiT's block). The
  modulation enters the same hand-derived VJP, which saves nothing
  full-size but `x`.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 8))
    >>> variables = jnn.LayerNorm().init(jax.random.key(1), x)
    >>> jnn.LayerNorm().apply(variables, x).shape
    (2, 8)
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer | None = None
  reduction_axes: Axes = -1
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
    return _per_example(self, x, mask, (scale, shift), centered=True)


class RMSNorm(nn.Module):
  r"""Root-mean-square normalization, a drop-in for `flax.linen.RMSNorm`.

  .. math::
      y = (o + \gamma) \frac{x}{\sqrt{\overline{x^2} + \epsilon}} \, (1 + s) + t

  with the mean square over `reduction_axes` for each example and
  :math:`\gamma` shaped like `feature_axes`. Same arguments, defaults,
  parameters and output dtypes as flax, with a hand-derived VJP.
  Beyond flax, as `LayerNorm`: `scale_offset` :math:`o` (1 for Gemma's
  ``x̂ * (1 + scale)``, with `scale` then initialised to zeros; the same
  parameter tree as Gemma's RMSNorm) and the call-time ``scale=`` :math:`s`
  and ``shift=`` :math:`t`.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 8))
    >>> variables = jnn.RMSNorm().init(jax.random.key(1), x)
    >>> sorted(variables["params"])
    ['scale']
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer | None = None
  reduction_axes: Axes = -1
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
    """Normalizes `x`, then modulates it (`mask`, `scale`, `shift` as in `LayerNorm`)."""
    return _per_example(self, x, mask, (scale, shift), centered=False)
