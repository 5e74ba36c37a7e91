"""`DyT`: Dynamic Tanh, a statistics-free drop-in where a model calls `LayerNorm`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

import jaxnorm
from jaxnorm import _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype


class DyT(nn.Module):
  r"""Dynamic Tanh (Zhu et al., 2025): :math:`y = \gamma \tanh(\alpha x) + \beta`.

  Parameters: ``alpha``, a learned scalar initialized at `alpha_init`
  (0.5, the paper's default); ``scale`` (:math:`\gamma`, ones) and ``bias``
  (:math:`\beta`, zeros) shaped like `feature_axes`, the same names and shapes
  as `LayerNorm`'s, so an existing ``scale``/``bias`` pair carries over. It is
  called like `LayerNorm` (``module(x)`` or ``module(x, mask=...)``) and so
  replaces it in a model unchanged; having no statistics, it ignores `mask`
  (every position is transformed on its own). Output dtype: flax's rule
  (`dtype` if given, else the promotion of the input and the parameters).
  See `jaxnorm.dyt`.

  Example:
    >>> import jax
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> variables = jnn.DyT().init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(lambda p: p.shape, variables["params"])
    {'alpha': (), 'bias': (8,), 'scale': (8,)}
  """

  alpha_init: float = 0.5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies DyT elementwise; `mask` is accepted for `LayerNorm` compatibility and has no effect."""
    del mask  # no statistics to restrict
    x = _validation.floating_input(x)
    features = _validation.canonical_axes(self.feature_axes, x.ndim, "feature_axes")
    alpha = self.param("alpha", lambda _, shape, dtype: jnp.full(shape, self.alpha_init, dtype), (), self.param_dtype)
    scale, bias = affine_parameters(
        self, tuple(x.shape[a] for a in features), use_scale=self.use_scale, use_bias=self.use_bias
    )
    return jaxnorm.dyt(
        x,
        alpha,
        scale,
        bias,
        feature_axes=features,
        dtype=output_dtype(x, alpha, scale, bias, dtype=self.dtype),
    )
