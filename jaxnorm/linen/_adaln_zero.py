"""`AdaLNZero`: DiT's adaptive layer norm, its modulation computed from a conditioning vector and initialised to zero."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

import jaxnorm
from jaxnorm import _modulation, _validation


class AdaLNZero(nn.Module):
  r"""Adaptive layer norm with zero-initialised modulation (adaLN-Zero, Peebles & Xie 2023, DiT).

  .. math::
      (t, s, g) = W\,\mathrm{SiLU}(c) + b, \qquad
      y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,(1 + s) + t

  with :math:`\mu, \sigma^2` over the last axis of `x` (a layer norm without
  parameters of its own), and :math:`W, b` (a ``Dense`` named
  ``modulation``, ``3 C`` outputs) initialised to zero, so that a block
  ``x + g * f(y)`` starts as the identity. Returns ``(y, g)``; the gate
  :math:`g` is for the residual branch. :math:`s, t, g` are per example
  (broadcast over the sequence or spatial axes); the modulated norm runs in
  jaxnorm's hand-derived VJP, which saves nothing full-size but `x`, where
  the composition ``LayerNorm(x) * (1 + s) + t`` keeps the normalized `x` as
  well; with ``saved="output"`` it keeps `y` instead, which the next Dense
  keeps anyway (see `jaxnorm.layer_norm`). A DiT block uses two (before
  attention and before the MLP):

  .. code-block:: python

      h, gate = AdaLNZero(name="norm1")(x, c)
      x = x + gate * attention(h)
      h, gate = AdaLNZero(name="norm2")(x, c)
      x = x + gate * mlp(h)

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x, c = jnp.ones((2, 5, 8)), jnp.ones((2, 16))
    >>> layer = jnn.AdaLNZero()
    >>> variables = layer.init(jax.random.key(0), x, c)
    >>> jax.tree_util.tree_map(jnp.shape, variables)["params"]["modulation"]
    {'bias': (24,), 'kernel': (16, 24)}
    >>> y, gate = layer.apply(variables, x, c)
    >>> y.shape, gate.shape, float(abs(gate).max())
    ((2, 5, 8), (2, 1, 8), 0.0)
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  saved: str = "input"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x` of shape ``(batch, ..., C)``, normalized and modulated by `c` of shape ``(batch, D)``; returns ``(y, gate)``."""
    x = _validation.floating_input(x)
    c = _validation.floating_input(c, "c")
    dense = nn.Dense(
        3 * x.shape[-1],
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.zeros,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="modulation",
    )
    shift, scale, gate = _modulation.adaln_chunks(dense, x, c)
    dtype = _validation.promoted_dtype(x, shift, dtype=self.dtype)
    y = jaxnorm.layer_norm(x, scale, shift, epsilon=self.epsilon, scale_offset=1.0, dtype=dtype, saved=self.saved)
    return y, gate
