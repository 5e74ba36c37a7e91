"""`FilterResponseNorm`: filter response normalization with a learned TLU threshold, for flax.nnx."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Dtype, Initializer

import jaxnorm
from jaxnorm import _validation
from jaxnorm.nnx import _affine


class FilterResponseNorm(nnx.Module):
  r"""Filter response normalization + TLU (Singh & Krishnan, 2019) for channels-last inputs.

  .. math::
      y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta, \; \tau\Big), \qquad
      \nu^2 = \operatorname{mean}_{\text{spatial}}(x^2)

  per example and channel (`jaxnorm.filter_response_norm`), for `x` of shape
  ``(N, ..., num_features)``. Params ``scale`` (:math:`\gamma`, ones),
  ``bias`` (:math:`\beta`, zeros) and ``tau`` (:math:`\tau`, zeros), each of
  shape ``(num_features,)``; no running statistics, so training and
  inference agree. ``use_tau=False`` gives FRN without the TLU. Arguments and
  the output-dtype rule follow the flax.nnx normalization layers.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> layer = jnnx.FilterResponseNorm(3, rngs=nnx.Rngs(0))
    >>> layer(jax.random.normal(jax.random.key(0), (2, 8, 8, 3))).shape, layer.tau[...].shape
    ((2, 8, 8, 3), (3,))
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
      use_tau: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      tau_init: Initializer = initializers.zeros_init(),
      rngs: nnx.Rngs,
  ):
    shape = (num_features,)
    self.scale = _affine.optional_param(use_scale, scale_init, shape, param_dtype, rngs)
    self.bias = _affine.optional_param(use_bias, bias_init, shape, param_dtype, rngs)
    self.tau = _affine.optional_param(use_tau, tau_init, shape, param_dtype, rngs)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.use_tau = use_tau

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x` of shape ``(N, ..., num_features)``; `mask` selects the positions that enter :math:`\\nu^2`."""
    x = _validation.floating_input(x)
    if x.ndim < 1 or x.shape[-1] != self.num_features:
      raise ValueError(
          f"FilterResponseNorm expects a channels-last x of shape (N, ..., num_features={self.num_features}), "
          f"got shape {tuple(x.shape)}."
      )
    scale, bias, tau = (_affine.value(p) for p in (self.scale, self.bias, self.tau))
    return jaxnorm.filter_response_norm(
        x,
        scale,
        bias,
        tau,
        epsilon=self.epsilon,
        where=_validation.boolean_mask(mask, "mask", x.shape),
        dtype=_affine.output_dtype(x, scale, bias, tau, dtype=self.dtype),
    )
