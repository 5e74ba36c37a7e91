"""`LocalResponseNorm`: AlexNet's normalization across neighbouring channels, as a module."""

from __future__ import annotations

import flax.linen as nn
import jax

import jaxnorm


class LocalResponseNorm(nn.Module):
  r"""Local response normalization over the last (channel) axis; no parameters.

  .. math::
      y_c = x_c \Big/ \Big(k + \frac{\alpha}{n} \sum_{c' \in \text{window}(c)} x_{c'}^2\Big)^{\beta}

  with a window of :math:`n` = `size` channels, zero outside the input: the
  semantics of `torch.nn.LocalResponseNorm` (same attributes and defaults)
  with channels last (see `jaxnorm.local_response_norm`).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> lrn = jnn.LocalResponseNorm(size=5)
    >>> lrn.apply({}, jnp.ones((2, 8, 8, 16))).shape
    (2, 8, 8, 16)
  """

  size: int
  alpha: float = 1e-4
  beta: float = 0.75
  k: float = 1.0

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalizes channels-last `x` of shape `(..., C)`; returns an array like `x`."""
    return jaxnorm.local_response_norm(x, self.size, alpha=self.alpha, beta=self.beta, k=self.k)
