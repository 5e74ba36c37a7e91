"""What every nnx normalization module shares: its parameters, their view along the feature axes, the output dtype.

flax.nnx keeps ``scale`` and ``bias`` as flat ``(num_features,)`` parameters
and reshapes them at call time to the shape of the input along the feature
axes; the jaxnorm core takes them in that feature shape. The helpers here do
that reshape once, after checking that the sizes agree (flax would either
fail deep inside `reshape` or, when the sizes happen to agree, broadcast
silently).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes as _flax_dtypes

from jaxnorm import _modulation, _validation

NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def optional_param(
    enabled: bool,
    init: Any,
    shape: tuple[int, ...],
    param_dtype: Any,
    rngs: nnx.Rngs,
    metadata: Mapping[str, Any] = NO_METADATA,
) -> Any:
  """An `nnx.Param` from `init(rngs.params(), shape, param_dtype)`, or ``nnx.data(None)`` if not `enabled`.

  A key is drawn only for an enabled parameter, in the order the caller asks,
  as flax.nnx does, so that the same `rngs` give flax's values for random
  initializers too.
  """
  if not enabled:
    return nnx.data(None)
  return nnx.Param(init(rngs.params(), shape, param_dtype), **metadata)


def value(variable: Any) -> jax.Array | None:
  """The array a Variable holds, or None for an absent (None) parameter."""
  return None if variable is None else variable[...]


def feature_shape(x: jax.Array, axes: tuple[int, ...], num_features: int, axes_name: str) -> tuple[int, ...]:
  """`x.shape` along `axes`; raises unless it holds exactly `num_features` elements."""
  shape = tuple(x.shape[a] for a in axes)
  if math.prod(shape) != num_features:
    raise ValueError(
        f"`num_features`={num_features} does not match the input: x of shape {tuple(x.shape)} has shape "
        f"{shape} along `{axes_name}` ({math.prod(shape)} features)."
    )
  return shape


def as_features(a: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
  """A flat ``(num_features,)`` parameter or statistic viewed in the feature `shape` the core expects."""
  return None if a is None else a.reshape(shape)


def output_dtype(*args: Any, dtype: Any) -> Any:
  """flax's rule: `dtype` if given, else the promotion of the (non-None) arguments."""
  return _validation.promoted_dtype(*args, dtype=dtype)


def promote(module: Any, arrays: tuple[Any, ...], *, dtype: Any) -> tuple[Any, ...]:
  """``module.promote_dtype(arrays, dtype=dtype)``, flax.nnx's promotion, without casts that change nothing.

  With flax's default `promote_dtype`, the result is the same, but an array
  already of the target dtype is returned as is: flax's ``jnp.asarray(x,
  dtype)`` is an eager operation of its own, whose output `jax_debug_nans`
  flags on an input with (masked-out) NaN padding. A `promote_dtype` of the
  user's own is called unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm.nnx import _affine
    >>> x = jnp.ones(3)
    >>> _affine.promote(nnx.LayerNorm(3, rngs=nnx.Rngs(0)), (x, None), dtype=None)[0] is x
    True
  """
  if getattr(module, "promote_dtype", _flax_dtypes.promote_dtype) is not _flax_dtypes.promote_dtype:
    return module.promote_dtype(arrays, dtype=dtype)
  target = _validation.promoted_dtype(*arrays, dtype=dtype)
  return tuple(
      None if a is None else a if getattr(a, "dtype", None) == target else jax.numpy.asarray(a, target)
      for a in arrays
  )


def modulated(
    module: Any, x: jax.Array, feature_axes: tuple[int, ...], modulation: tuple[Any, Any], *, use_bias: bool = True
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, Any, float]:
  """What a per-example norm hands the core: ``(x, scale, bias, dtype, scale_offset)``.

  flax.nnx's promotion of the input, the module's ``scale``/``bias`` (the
  bias only with `use_bias`) and the call-time modulation ``(scale,
  shift)``; the output dtype; and the parameters in the feature shape of
  `x` along `feature_axes`, with the modulation folded in
  (`jaxnorm._modulation.fold`).
  """
  shape = feature_shape(x, feature_axes, module.num_features, "feature_axes")
  bias = value(module.bias) if use_bias else None
  x, scale, bias, s, t = promote(module, (x, value(module.scale), bias, *_modulation.arrays(*modulation)), dtype=module.dtype)
  dtype = output_dtype(x, scale, bias, s, t, dtype=module.dtype)
  scale, bias, scale_offset = _modulation.fold(
      x.shape, feature_axes, as_features(scale, shape), as_features(bias, shape), module.scale_offset, s, t
  )
  return x, scale, bias, dtype, scale_offset
