"""Normalization with given statistics (inference with running statistics)."""

from __future__ import annotations

import jax
from jax import lax

from jaxnorm import _validation


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    epsilon: float = 1e-5,
) -> jax.Array:
  r"""Normalizes `x` with given statistics, e.g. running averages at inference.

  .. math::
      y = (x - \mu) \, (\sigma^2 + \epsilon)^{-1/2} \, \gamma + \beta

  Every operand broadcasts to `x` (so feature statistics of shape `(C,)` apply
  to NHWC inputs directly). The arithmetic is elementwise and runs in at least
  float32; the result has `x`'s dtype. Being elementwise, plain autodiff is
  already optimal here, so no custom VJP is used and every transformation,
  forward mode included, works.

  Args:
    x: floating-point input of any shape.
    mean, var: statistics broadcastable to `x` (`var` >= 0).
    scale, bias: optional affine parameters broadcastable to `x`.
    epsilon: added to `var`; must be > 0.

  Returns:
    `y`, shaped like `x`, in `x.dtype`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.normalize(jnp.array([[1., 5.]]), jnp.array([1., 1.]), jnp.array([4., 4.]), epsilon=1e-12)
    Array([[0., 2.]], dtype=float32)
  """
  x = _validation.floating_input(x, allow_complex=True)
  operands = {"mean": mean, "var": var, "scale": scale, "bias": bias}
  checked = {
      # Complex inputs (as flax allows): complex mean and parameters, a real variance.
      k: None if v is None else _validation.broadcast_operand(v, x.shape, k, allow_complex=k != "var")
      for k, v in operands.items()
  }
  acc = _validation.accumulation_dtype(*(v.dtype for v in checked.values() if v is not None), x.dtype)
  # Each operand to x's rank first: per-channel statistics of shape (C,) meet
  # NHWC `x` by explicit broadcasting, as `jax_numpy_rank_promotion="raise"` requires.
  checked = {k: None if v is None else _validation.to_rank(v, x.ndim) for k, v in checked.items()}
  real = _validation.real_dtype(acc)
  multiplier = lax.rsqrt(checked["var"].astype(real) + _validation.positive_epsilon(epsilon, real)).astype(acc)
  if checked["scale"] is not None:
    multiplier = multiplier * checked["scale"].astype(acc)
  y = (x.astype(acc) - checked["mean"].astype(acc)) * multiplier
  if checked["bias"] is not None:
    y = y + checked["bias"].astype(acc)
  return y.astype(x.dtype)
