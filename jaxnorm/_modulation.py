r"""Call-time modulation of a normalization's output: adaLN, FiLM, conditional batch norm, scale-shift group norm.

The modules' ``scale=`` and ``shift=`` call arguments compute

.. math::
    y = \bigl(\hat x \, (o + \gamma) + \beta\bigr)\,(1 + s) + t ,

the norm's own (per-feature) :math:`\gamma, \beta` and offset :math:`o`
followed by DiT's ``modulate`` with a per-example (or per-position) scale
:math:`s` and shift :math:`t`. That is again :math:`\hat x\, m + b`, with
:math:`m = (o + \gamma)(1 + s)` and :math:`b = \beta (1 + s) + t`: small
arrays (shaped like :math:`s, t`) that `fold` forms before the kernel runs,
so the hand-derived VJP sees one call-time scale and bias and saves nothing
full-size but `x`; autodiff carries their gradients back to
:math:`\gamma, \beta, s, t` through the small products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _validation


def scale_initializer(init: Any, scale_offset: Any) -> Any:
  """The modules' `scale_init`: `init`, or for None one that starts the multiplier ``scale_offset + scale`` at 1.

  That is ones by default, and zeros for Gemma's zero-centred scale
  (``scale_offset=1``).
  """
  offset = _validation.real_number(scale_offset, "scale_offset")
  return jax.nn.initializers.constant(1.0 - offset) if init is None else init


def fold(
    shape: tuple[int, ...],
    feature_axes: tuple[int, ...],
    scale: jax.Array | None,
    bias: jax.Array | None,
    scale_offset: float,
    modulation_scale: Any,
    modulation_shift: Any,
) -> tuple[jax.Array | None, jax.Array | None, float]:
  """`(scale, bias, scale_offset)` for the kernel that give ``norm(x) * (1 + s) + t``.

  `scale`/`bias` are the norm's own parameters, None or of the shape of `x`
  (of `shape`) along `feature_axes`; `modulation_scale` :math:`s` and
  `modulation_shift` :math:`t` are None or arrays that broadcast to `x` (see
  `_validation.affine_parameter`; errors name them ``scale`` and ``shift``,
  the modules' call arguments). Without a modulation the arguments come back
  unchanged; with one, the offset is folded into the returned scale (and
  comes back 0). The products are formed in at least float32, the dtype the
  kernel accumulates in, so ``1 + s`` keeps the precision of a bfloat16 `s`
  near 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm._modulation import fold
    >>> s, t = jnp.full((2, 1, 4), 0.5), jnp.ones((2, 1, 4))
    >>> m, b, offset = fold((2, 3, 4), (2,), None, None, 0.0, s, t)
    >>> m.shape, b.shape, float(m[0, 0, 0]), offset
    ((2, 1, 4), (2, 1, 4), 1.5, 0.0)
  """
  scale_offset = _validation.scale_offset(scale_offset, scale)
  if modulation_scale is None and modulation_shift is None:
    return scale, bias, scale_offset
  feature_shape = tuple(shape[a] for a in feature_axes)

  def checked(p, name):
    return _validation.affine_parameter(
        p, feature_shape, feature_axes, shape, name, "the shape of x along the feature axes"
    )

  s, t = checked(modulation_scale, "scale"), checked(modulation_shift, "shift")
  gamma, beta = checked(scale, "scale"), checked(bias, "bias")
  dtype = _validation.accumulation_dtype(*(a.dtype for a in (s, t, gamma, beta) if a is not None))
  s, t, gamma, beta = (None if a is None else a.astype(dtype) for a in (s, t, gamma, beta))
  if s is not None:
    gamma = 1 + s if gamma is None else (gamma + scale_offset) * (1 + s)
    scale_offset = 0.0
    beta = None if beta is None else beta * (1 + s)
  if t is not None:
    beta = t if beta is None else beta + t
  return gamma, beta, scale_offset


def arrays(scale: Any, shift: Any) -> tuple[jax.Array | None, jax.Array | None]:
  """The call-time `scale` and `shift` as floating (or complex) JAX arrays, None kept; errors name them."""
  return tuple(
      None if p is None else _validation.floating_input(p, name, allow_complex=True)
      for name, p in (("scale", scale), ("shift", shift))
  )


def adaln_chunks(
    dense: Callable[[jax.Array], jax.Array], x: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """DiT's ``(shift, scale, gate)``: ``dense(silu(c))`` ``(..., 3 C)`` split in three and laid out for `x`.

  `c` has `x`'s leading (batch) axes and one feature axis last; the axes
  `x` has beyond them (sequence, height, width) get size 1 in each chunk.
  `c`'s shape is checked before `dense` sees it, so a misshapen `c` is
  named as such rather than failing inside the layer.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm._modulation import adaln_chunks
    >>> x, c = jnp.zeros((2, 5, 4)), jnp.zeros((2, 7))
    >>> [a.shape for a in adaln_chunks(lambda h: jnp.zeros((2, 12)), x, c)]
    [(2, 1, 4), (2, 1, 4), (2, 1, 4)]
  """
  lead = c.shape[:-1]
  if not 1 <= c.ndim <= x.ndim or any(a not in (1, b) for a, b in zip(lead, x.shape)):
    raise ValueError(
        f"`c` must have the leading axes of x and its own feature axis last, e.g. (batch, cond_features) "
        f"for x of shape {tuple(x.shape)}; got shape {tuple(c.shape)}."
    )
  m = dense(jax.nn.silu(c))
  m = m.reshape(lead + (1,) * (x.ndim - c.ndim) + m.shape[-1:])
  shift, scale, gate = jnp.split(m, 3, axis=-1)
  return shift, scale, gate
