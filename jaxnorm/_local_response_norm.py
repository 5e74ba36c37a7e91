"""Local response normalization across neighbouring channels (AlexNet's LRN)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm import _validation


def local_response_norm(
    x: jax.Array,
    size: int,
    *,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
) -> jax.Array:
  r"""Local response normalization (Krizhevsky et al., 2012) over the last (channel) axis.

  .. math::
      y_c = x_c \Big/ \Big(k + \frac{\alpha}{n} \sum_{c'=c-\lfloor n/2 \rfloor}^{c+\lfloor (n-1)/2 \rfloor} x_{c'}^2\Big)^{\beta}

  with :math:`n` = `size` and channels outside :math:`0..C-1` counting as
  zero. These are exactly the semantics of
  `torch.nn.functional.local_response_norm` (including the window of an even
  `size`, which reaches one channel further back than forward, and the
  division by :math:`n` whatever the number of channels inside the window),
  except that the channels are the *last* axis here, as everywhere in JAX,
  where torch takes axis 1. Any leading axes are fine.

  The window sum is one `lax.reduce_window` over the squares, accumulated in
  at least float32; gradients come from plain autodiff, which is already
  efficient for this local, statistics-free op, so every transformation,
  forward mode included, works.

  Args:
    x: channels-last floating-point input `(..., C)`, e.g. NHWC.
    size: :math:`n`, the number of channels in the window (a positive int).
    alpha: multiplicative factor :math:`\alpha`.
    beta: exponent :math:`\beta`.
    k: additive constant :math:`k`.

  Returns:
    `y`, shaped like `x`, in `x.dtype`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.ones((1, 4))
    >>> y = jaxnorm.local_response_norm(x, 3, alpha=3.0, beta=1.0, k=0.0)
    >>> [round(float(v), 4) for v in y[0]]  # 2 channels in the edge windows, 3 inside
    [0.5, 0.3333, 0.3333, 0.5]
  """
  x = _validation.floating_input(x)
  if x.ndim < 1:
    raise ValueError("local_response_norm needs an input with a channel axis (the last one), got a scalar.")
  size = _validation.integer(size, "size")
  if size < 1:
    raise ValueError(f"`size` must be >= 1, got {size}.")
  acc = _validation.accumulation_dtype(x.dtype)
  xa = x.astype(acc)
  ones = (1,) * (x.ndim - 1)
  # A concrete zero (numpy, not a traced jnp value) lets JAX recognise the
  # window sum, which it can differentiate; a generic reduce_window it cannot.
  window_sum = lax.reduce_window(
      jnp.square(xa),
      np.zeros((), acc),
      lax.add,
      window_dimensions=(*ones, size),
      window_strides=(*ones, 1),
      padding=(*((0, 0),) * (x.ndim - 1), (size // 2, (size - 1) // 2)),
  )
  return (xa / (k + (alpha / size) * window_sum) ** beta).astype(x.dtype)
