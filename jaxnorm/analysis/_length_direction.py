r"""Batch norm as a length-direction reparameterization of the weights (Kohler et al., 2018).

A dense layer :math:`a = x w` followed by batch norm (training mode, batch
statistics) computes, per unit :math:`j` with incoming weights
:math:`w_j` (column `j` of the kernel),

.. math::
    \mathrm{BN}(x w_j) = g_j \frac{x w_j - \mathrm E[x] w_j}{\sqrt{w_j^\top S w_j + \epsilon}} + \beta_j
                       = x \tilde w_j + \tilde b_j, \qquad
    \tilde w_j = g_j \frac{w_j}{\sqrt{w_j^\top S w_j + \epsilon}}, \quad
    \tilde b_j = \beta_j - \mathrm E[x]\, \tilde w_j,

with :math:`S` the (biased) covariance of the inputs over the batch. So the
layer is linear in :math:`x` with effective weights :math:`\tilde w_j`
whose *length* is set by :math:`g_j` alone and whose *direction* is that of
:math:`w_j`: batch norm decouples the two, as weight normalization
(:math:`\tilde w = g\, w / \lVert w\rVert`) does, but measuring the length
in the :math:`S`-norm :math:`\lVert w\rVert_S = \sqrt{w^\top S w}`. With
whitened inputs (:math:`S = I`, :math:`\epsilon = 0`) the two coincide.
Any bias of the dense layer cancels in :math:`x w - \mathrm E[x w]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def batch_norm_effective_weights(
    kernel: Any,
    x: Any,
    scale: Any = None,
    bias: Any = None,
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  r"""The linear layer :math:`x \tilde w + \tilde b` that Dense (`kernel`) + batch norm computes on the batch `x`.

  .. math::
      \tilde w_j = g_j \frac{w_j}{\sqrt{w_j^\top S w_j + \epsilon}}, \qquad
      \tilde b_j = \beta_j - \mathrm E[x]\,\tilde w_j, \qquad
      S = \mathrm E\big[(x - \mathrm E x)^\top (x - \mathrm E x)\big],

  expectations over the rows of `x` (the batch), :math:`S` biased, as batch
  norm's variance is. Then ``x @ w_eff + b_eff`` equals batch norm (batch
  statistics, `epsilon`, `scale` :math:`g`, `bias` :math:`\beta`) of
  ``x @ kernel`` up to rounding.

  Args:
    kernel: :math:`w`, shape `(D, U)` (flax's Dense layout: inputs by units).
    x: the batch of inputs, shape `(N, D)`.
    scale: :math:`g`, shape `(U,)`, or None (1).
    bias: :math:`\beta`, shape `(U,)`, or None (0).
    epsilon: batch norm's epsilon, added to :math:`w_j^\top S w_j`.

  Returns:
    `(w_eff, b_eff)` of shapes `(D, U)` and `(U,)`, in the promotion of
    `kernel`'s and `x`'s dtypes (computed in at least float32).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> from jaxnorm.analysis import batch_norm_effective_weights
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> w = jax.random.normal(jax.random.key(1), (3, 2))
    >>> w_eff, b_eff = batch_norm_effective_weights(w, x)
    >>> bool(jnp.allclose(x @ w_eff + b_eff[None], jaxnorm.batch_norm(x @ w)[0], atol=1e-5))
    True
  """
  kernel, x = jnp.asarray(kernel), jnp.asarray(x)
  for name, a in (("kernel", kernel), ("x", x)):
    if a.ndim != 2 or not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"`{name}` must be a 2-D floating-point array, got shape {a.shape} and dtype {a.dtype}.")
  if kernel.shape[0] != x.shape[1]:
    raise ValueError(f"`kernel` `(D, U)` and `x` `(N, D)` must agree on D; got {kernel.shape} and {x.shape}.")
  if not epsilon >= 0:
    raise ValueError(f"`epsilon` must be >= 0, got {epsilon!r}.")
  units = kernel.shape[1]
  # Decided under standard promotion also where the caller runs strict: the
  # arrays are then cast explicitly, and the sums run in at least float32.
  with jax.numpy_dtype_promotion("standard"):
    dtype = jnp.result_type(kernel, x)
    acc = jnp.promote_types(dtype, jnp.float32)
  kernel, x = kernel.astype(acc), x.astype(acc)

  def vector(v, name, default):
    if v is None:
      return jnp.full((units,), default, acc)
    v = jnp.asarray(v)
    if v.shape != (units,):
      raise ValueError(f"`{name}` must have shape ({units},) (one per unit), got {v.shape}.")
    return v.astype(acc)

  g, beta = vector(scale, "scale", 1), vector(bias, "bias", 0)
  mean = jnp.mean(x, axis=0)
  centered = x - mean[None]  # two passes: S stays accurate when |E[x]| >> spread
  hi = jax.lax.Precision.HIGHEST
  s = jnp.matmul(centered.T, centered, precision=hi) / x.shape[0]
  s_norm_sq = jnp.einsum("du,de,eu->u", kernel, s, kernel, precision=hi)
  w_eff = kernel * (g / jnp.sqrt(s_norm_sq + epsilon))[None]
  b_eff = beta - jnp.matmul(mean, w_eff, precision=hi)
  return w_eff.astype(dtype), b_eff.astype(dtype)
