"""Filter response normalization with the thresholded linear unit (TLU)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _standardize, _validation


def filter_response_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    tau: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    where: jax.Array | None = None,
    dtype: Any = None,
    custom_vjp: bool = True,
) -> jax.Array:
  r"""Filter response normalization, optionally followed by a TLU (Singh & Krishnan, 2019).

  For a channels-last input :math:`x` of shape `(N, ..., C)`, per example
  :math:`n` and channel :math:`c`:

  .. math::
      \nu^2_{nc} = \tfrac{1}{|S|} \textstyle\sum_{s \in S} x_{nsc}^2, \qquad
      z = \gamma \, \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta, \qquad
      y = \max(z, \tau)

  with :math:`S` the spatial positions (every axis between the first and the
  last) that `where` selects. Unlike batch or instance norm there is no mean
  subtraction; the learned threshold :math:`\tau` of the TLU supplies the
  offset that keeps the output from being centered at zero. Without `tau`
  the output is :math:`z` (FRN alone). The mean square is accumulated in at
  least float32 and differentiated by the shared hand-derived VJP; the TLU is
  an elementwise maximum (at a tie the gradient is split evenly).

  For an input without spatial axes, `(N, C)`, :math:`\nu^2 = x^2` and FRN
  tends to a sign function as :math:`\epsilon \to 0`; the paper makes
  :math:`\epsilon` learnable for that case, which this function does not
  (:math:`\epsilon` is a fixed number here), so pick a larger `epsilon` there.

  Args:
    x: channels-last floating-point input of rank >= 2, e.g. NHWC `(N, H, W, C)`.
    scale: :math:`\gamma` of shape `(C,)`, or None.
    bias: :math:`\beta` of shape `(C,)`, or None.
    tau: the TLU threshold :math:`\tau` of shape `(C,)`, or None for no TLU.
    epsilon: added to the mean square; must be > 0.
    where: optional boolean mask broadcastable to `x`; only True positions
      enter :math:`\nu^2` (every position is normalized; masked-out NaN or
      inf are read as 0 and get zero gradient).
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, plain autodiff of the same forward (for forward mode).

  Returns:
    `y`, shaped like `x`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> y = jaxnorm.filter_response_norm(x, jnp.ones(3), jnp.zeros(3), tau=jnp.zeros(3))
    >>> y.shape, bool((y >= 0).all())
    ((2, 4, 4, 3), True)
  """
  x = _validation.floating_input(x)
  if x.ndim < 2:
    raise ValueError(
        f"filter_response_norm expects a channels-last input (N, ..., C) of rank >= 2, got shape {tuple(x.shape)}."
    )
  channels = x.shape[-1]
  tau = _validation.parameter(tau, (channels,), "tau", "the number of channels, x.shape[-1]")
  y = _standardize.apply(
      x,
      scale,
      bias,
      op="filter_response_norm",
      axes=tuple(range(1, x.ndim - 1)),
      axes_name="axes",
      param_axes=(x.ndim - 1,),
      param_explain="the number of channels, x.shape[-1]",
      centered=False,
      epsilon=epsilon,
      where=where,
      dtype=dtype,
      custom_vjp=custom_vjp,
  )
  if tau is None:
    return y
  # The maximum commutes with rounding to y's dtype, so taking it in that
  # dtype gives the correctly rounded TLU without a wider copy of y.
  return jnp.maximum(y, _validation.to_rank(tau.astype(y.dtype), y.ndim))
