"""`LocalResponseNorm`: AlexNet's normalization across neighbouring channels, as an nnx module."""

from __future__ import annotations

import jax
from flax import nnx

import jaxnorm


class LocalResponseNorm(nnx.Module):
  r"""Local response normalization over the last (channel) axis; no parameters, no state.

  .. math::
      y_c = x_c \Big/ \Big(k + \frac{\alpha}{n} \sum_{c' \in \text{window}(c)} x_{c'}^2\Big)^{\beta}

  with a window of :math:`n` = `size` channels, zero outside the input: the
  semantics of `torch.nn.LocalResponseNorm` (same arguments and defaults)
  with channels last (`jaxnorm.local_response_norm`).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm import nnx as jnnx
    >>> jnnx.LocalResponseNorm(5)(jnp.ones((2, 8, 8, 16))).shape
    (2, 8, 8, 16)
  """

  def __init__(self, size: int, *, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    self.size = size
    self.alpha = alpha
    self.beta = beta
    self.k = k

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalizes channels-last `x` of shape ``(..., C)``; returns an array like `x`."""
    return jaxnorm.local_response_norm(x, self.size, alpha=self.alpha, beta=self.beta, k=self.k)
