"""Dynamic Tanh (DyT): an elementwise, statistics-free replacement for layer normalization."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _validation


def dyt(
    x: jax.Array,
    alpha: Any,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    feature_axes: _validation.Axes = -1,
    dtype: Any = None,
) -> jax.Array:
  r"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, 2025).

  .. math::
      y = \gamma \tanh(\alpha x) + \beta

  with a scalar :math:`\alpha` (learned; 0.5 is the paper's initial value)
  and :math:`\gamma, \beta` shaped like `feature_axes`. It takes no
  statistics: the tanh squashes the rare extreme activations the way layer
  norm's division does in trained transformers, at the cost of one
  elementwise pass. Computed in at least float32; being elementwise, plain
  autodiff is optimal, so there is no custom VJP and every transformation
  works.

  Args:
    x: floating-point input, e.g. `(batch, seq, d_model)`.
    alpha: :math:`\alpha`, a scalar (Python number or 0-d floating array).
    scale: :math:`\gamma`, shaped like `x` along `feature_axes` (e.g. `(d_model,)`), or None.
    bias: :math:`\beta`, same shape as `scale`, or None.
    feature_axes: the axis or axes `scale` and `bias` span.
    dtype: output dtype; defaults to `x.dtype`.

  Returns:
    `y`, shaped like `x`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> y = jaxnorm.dyt(jnp.array([[0.0, 2.0, -40.0]]), 0.5, jnp.full(3, 2.0), jnp.ones(3))
    >>> [round(float(v), 4) for v in y[0]]
    [1.0, 2.5232, -1.0]
  """
  x = _validation.floating_input(x)
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    alpha = _validation.floating_input(alpha, "alpha")
    if alpha.shape != ():
      raise ValueError(f"`alpha` must be a scalar (shape ()), got shape {tuple(alpha.shape)}.")
  features = _validation.canonical_axes(feature_axes, x.ndim, "feature_axes")
  param_shape = tuple(x.shape[a] for a in features)
  broadcast_shape = tuple(d if i in features else 1 for i, d in enumerate(x.shape))
  params = [
      _validation.parameter(p, param_shape, name, "the shape of x along feature_axes")
      for name, p in (("scale", scale), ("bias", bias))
  ]
  out_dtype = _validation.output_dtype(dtype, x.dtype)
  # A Python-number alpha is weakly typed and does not widen the computation.
  acc = _validation.accumulation_dtype(x, alpha, *(p for p in params if p is not None))
  y = jnp.tanh(jnp.asarray(alpha, acc) * x.astype(acc))
  if params[0] is not None:
    y = y * params[0].reshape(broadcast_shape).astype(acc)
  if params[1] is not None:
    y = y + params[1].reshape(broadcast_shape).astype(acc)
  return y.astype(out_dtype)
