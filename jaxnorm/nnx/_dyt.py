"""`DyT`: Dynamic Tanh for flax.nnx, a statistics-free drop-in where a model calls `LayerNorm`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Axes, Dtype, Initializer

import jaxnorm
from jaxnorm import _validation
from jaxnorm.nnx import _affine


class DyT(nnx.Module):
  r"""Dynamic Tanh (Zhu et al., 2025): :math:`y = \gamma \tanh(\alpha x) + \beta`.

  Params: ``alpha``, a learned scalar initialized at `alpha_init` (0.5, the
  paper's default), and ``scale`` (:math:`\gamma`, ones) and ``bias``
  (:math:`\beta`, zeros) of shape ``(num_features,)`` applied along
  `feature_axes`, the names and shapes of `LayerNorm`'s, so that it replaces
  a `LayerNorm` in a model unchanged (called as ``layer(x)`` or
  ``layer(x, mask=...)``; having no statistics, it ignores `mask`). Output
  dtype: flax's rule (`dtype` if given, else the promotion of the input and
  the parameters). See `jaxnorm.dyt`.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> layer = jnnx.DyT(8, rngs=nnx.Rngs(0))
    >>> layer(jax.random.normal(jax.random.key(0), (2, 5, 8))).shape, float(layer.alpha[...])
    ((2, 5, 8), 0.5)
  """

  def __init__(
      self,
      num_features: int,
      *,
      alpha_init: float = 0.5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      feature_axes: Axes = -1,
      rngs: nnx.Rngs,
  ):
    shape = (num_features,)
    self.alpha = nnx.Param(jnp.full((), alpha_init, param_dtype))
    self.scale = _affine.optional_param(use_scale, scale_init, shape, param_dtype, rngs)
    self.bias = _affine.optional_param(use_bias, bias_init, shape, param_dtype, rngs)
    self.num_features = num_features
    self.alpha_init = alpha_init
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes

  def __call__(self, x: jax.Array, *, mask: Any = None) -> jax.Array:
    """Applies DyT elementwise; `mask` is accepted for `LayerNorm` compatibility and has no effect."""
    del mask  # no statistics to restrict
    x = _validation.floating_input(x)
    axes = _validation.canonical_axes(self.feature_axes, x.ndim, "feature_axes")
    shape = _affine.feature_shape(x, axes, self.num_features, "feature_axes")
    alpha, scale, bias = self.alpha[...], _affine.value(self.scale), _affine.value(self.bias)
    return jaxnorm.dyt(
        x,
        alpha,
        _affine.as_features(scale, shape),
        _affine.as_features(bias, shape),
        feature_axes=axes,
        dtype=_affine.output_dtype(x, alpha, scale, bias, dtype=self.dtype),
    )
