"""`AdaLNZero`: DiT's adaptive layer norm, its modulation computed from a conditioning vector and initialised to zero."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

import jaxnorm
from jaxnorm import _modulation, _validation


class AdaLNZero(nnx.Module):
  r"""Adaptive layer norm with zero-initialised modulation (adaLN-Zero, Peebles & Xie 2023, DiT).

  .. math::
      (t, s, g) = W\,\mathrm{SiLU}(c) + b, \qquad
      y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,(1 + s) + t

  with :math:`\mu, \sigma^2` over the last axis of `x` (``num_features``
  wide; a layer norm without parameters of its own), and :math:`W, b` (an
  ``nnx.Linear`` named ``modulation``, from ``cond_features`` to
  ``3 num_features``) initialised to zero, so that a block ``x + g * f(y)``
  starts as the identity. Returns ``(y, g)``; the gate :math:`g` is for the
  residual branch. :math:`s, t, g` are per example (broadcast over the
  sequence or spatial axes); the modulated norm runs in jaxnorm's
  hand-derived VJP, which saves nothing full-size but `x` (or, with
  ``saved="output"``, `y`, which the next layer keeps anyway). The same layer
  as `jaxnorm.linen.AdaLNZero`.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> layer = jnnx.AdaLNZero(8, 16, rngs=nnx.Rngs(0))
    >>> y, gate = layer(jnp.ones((2, 5, 8)), jnp.ones((2, 16)))
    >>> y.shape, gate.shape, layer.modulation.kernel[...].shape
    ((2, 5, 8), (2, 1, 8), (16, 24))
  """

  def __init__(
      self,
      num_features: int,
      cond_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
      saved: str = "input",
  ):
    self.saved = _validation.saved(saved)
    self.modulation = nnx.Linear(
        cond_features,
        3 * num_features,
        kernel_init=nnx.initializers.zeros_init(),
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x` of shape ``(batch, ..., num_features)``, normalized and modulated by `c` of shape ``(batch, cond_features)``; returns ``(y, gate)``."""
    x = _validation.floating_input(x)
    c = _validation.floating_input(c, "c")
    if x.ndim < 1 or x.shape[-1] != self.num_features:
      raise ValueError(
          f"AdaLNZero expects x of shape (..., num_features={self.num_features}), got shape {tuple(x.shape)}."
      )
    shift, scale, gate = _modulation.adaln_chunks(self.modulation, x, c)
    dtype = _validation.promoted_dtype(x, shift, dtype=self.dtype)
    y = jaxnorm.layer_norm(x, scale, shift, epsilon=self.epsilon, scale_offset=1.0, dtype=dtype, saved=self.saved)
    return y, gate
