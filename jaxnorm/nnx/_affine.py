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
from flax.nnx.nn import dtypes

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
  return dtypes.canonicalize_dtype(*args, dtype=dtype)
