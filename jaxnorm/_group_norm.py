"""Group and instance normalization: per-example statistics over the spatial axes (and channel groups).

Both are instances of the one kernel in `jaxnorm._standardize`. Instance norm
reduces the spatial axes of a channels-last input. Group norm reduces the
spatial axes and, within each group, its C // G consecutive channels (channel
``c`` belongs to group ``c // (C // G)``, the contiguous grouping of the
paper, PyTorch and flax); the kernel does this on the ``(N, ..., C)`` layout
itself, with group statistics repeated over their channels
(`_moments.group_sum`), which XLA:CPU runs about twice as fast as a
``(N, ..., G, C // G)`` view.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxnorm import _standardize, _validation

_PER_CHANNEL = "one value per channel, the last axis of x"


def _channels_last(x: jax.Array, op: str, min_ndim: int, layout: str) -> None:
  if x.ndim < min_ndim:
    raise ValueError(
        f"{op} expects a channels-last `x` of shape {layout} with at least {min_ndim} dimensions, "
        f"got shape {tuple(x.shape)}."
    )


def check_num_groups(num_groups: Any, channels: int) -> int:
  """`num_groups` as an int; raises unless it is an integer >= 1 that divides `channels`."""
  groups = _validation.integer(num_groups, "num_groups")
  if groups < 1:
    raise ValueError(f"`num_groups` must be >= 1, got {groups}.")
  if channels % groups:
    raise ValueError(
        f"`num_groups`={groups} does not divide the number of channels C={channels} "
        "(the last axis of x)."
    )
  return groups


def standardize_groups(
    x: jax.Array,
    scale: Any,
    bias: Any,
    *,
    num_groups: Any,
    spatial_axes: tuple[int, ...],
    epsilon: Any,
    where: Any,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    scale_offset: float = 0.0,
    dtype: Any = None,
    custom_vjp: bool = True,
    saved: str = "input",
) -> jax.Array:
  """Group normalization of a channels-last `x` (rank >= 1) over `spatial_axes` and each channel group.

  `spatial_axes` are non-negative axes of `x` other than the last (they may
  include 0, which `flax.linen.GroupNorm(reduction_axes=...)` allows);
  `scale`/`bias` are None, of shape `(C,)`, or broadcast to `x`. Shared by `group_norm` and
  `jaxnorm.linen.GroupNorm`, which differ only in which axes they reduce.
  """
  x = _validation.floating_input(x, allow_complex=True)
  groups = check_num_groups(num_groups, x.shape[-1])
  return _standardize.apply(
      x,
      scale,
      bias,
      op="group_norm",
      axes=tuple(spatial_axes),
      axes_name="reduction_axes",
      param_axes=(x.ndim - 1,),
      param_explain=_PER_CHANNEL,
      centered=True,
      epsilon=epsilon,
      where=where,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      scale_offset=scale_offset,
      dtype=dtype,
      custom_vjp=custom_vjp,
      saved=saved,
      channel_groups=groups,
  )


def group_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    num_groups: int,
    epsilon: float = 1e-6,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    scale_offset: float = 0.0,
    dtype: Any = None,
    custom_vjp: bool = True,
    saved: str = "input",
) -> jax.Array:
  r"""Group normalization (Wu & He, 2018) of a channels-last input.

  .. math::
      y_{n,s,c} = (o + \gamma_c) \, \frac{x_{n,s,c} - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} + \beta_c,
      \qquad g = \lfloor c / (C/G) \rfloor

  where :math:`\mu_{n,g}, \sigma^2_{n,g}` (biased) are taken, for each example
  :math:`n`, over every spatial position :math:`s` and the :math:`C/G`
  channels of group :math:`g` (consecutive channels, as in PyTorch and flax),
  over the positions `where` selects. ``num_groups=1`` is layer norm over all
  non-batch axes; ``num_groups=C`` is `instance_norm`. Computed stably in at
  least float32, differentiated by a hand-derived VJP.

  Args:
    x: floating-point input of shape `(N, ..., C)`, at least `(N, C)` (as
      PyTorch requires; with no spatial axes the statistics are over the
      channels of a group only).
    scale: :math:`\gamma` of shape `(C,)`, or any array that broadcasts to
      `x` (a UNet ResBlock's per-example `(N, 1, 1, C)` scale-shift), or None.
    bias: :math:`\beta`, of either form, or None.
    num_groups: :math:`G`, an integer >= 1 that divides `C`.
    epsilon: added to the variance; must be > 0.
    where: optional boolean mask broadcastable to `x` (see `batch_norm`).
    axis_name: optional mapped axis whose devices each hold part of the
      spatial positions; statistics are merged exactly across them.
    axis_index_groups: optional groups within `axis_name` (see `jax.lax.psum`).
    scale_offset: :math:`o`, added to `scale` in the accumulation dtype
      (the multiplier is :math:`o + \gamma`; 1 for a zero-centred scale).
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, plain autodiff of the same forward (for forward mode).
    saved: "input" (default) or "output": what the backward keeps (see
      `batch_norm`).

  Returns:
    `y`, shaped like `x`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8))  # NHWC
    >>> y = jaxnorm.group_norm(x, jnp.ones(8), jnp.zeros(8), num_groups=4)
    >>> groups = y.reshape(2, 5, 5, 4, 2)
    >>> bool(jnp.allclose(groups.mean((1, 2, 4)), 0, atol=1e-6))
    True
  """
  x = _validation.floating_input(x, allow_complex=True)
  _channels_last(x, "group_norm", 2, "(N, ..., C)")
  return standardize_groups(
      x,
      scale,
      bias,
      num_groups=num_groups,
      spatial_axes=tuple(range(1, x.ndim - 1)),
      epsilon=epsilon,
      where=where,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      scale_offset=scale_offset,
      dtype=dtype,
      custom_vjp=custom_vjp,
      saved=saved,
  )


def instance_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    scale_offset: float = 0.0,
    dtype: Any = None,
    custom_vjp: bool = True,
    saved: str = "input",
) -> jax.Array:
  r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016) of a channels-last input.

  .. math::
      y_{n,s,c} = (o + \gamma_c) \, \frac{x_{n,s,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

  where :math:`\mu_{n,c}, \sigma^2_{n,c}` (biased) are taken, for each example
  :math:`n` and channel :math:`c`, over every spatial position :math:`s`, over
  the positions `where` selects. Equal to `group_norm` with ``num_groups=C``.
  Computed stably in at least float32, differentiated by a hand-derived VJP.

  Args:
    x: floating-point input of shape `(N, S1, ..., C)` with at least one
      spatial axis and more than one spatial position. As in PyTorch, a single
      position is an error: its statistics would make `y` equal `bias`
      whatever `x` is (`jaxnorm.linen.InstanceNorm` accepts it, as flax does).
    scale: :math:`\gamma` of shape `(C,)`, or any array that broadcasts to
      `x` (a UNet ResBlock's per-example `(N, 1, 1, C)` scale-shift), or None.
    bias: :math:`\beta`, of either form, or None.
    epsilon: added to the variance; must be > 0.
    where: optional boolean mask broadcastable to `x` (see `batch_norm`).
    axis_name: optional mapped axis whose devices each hold part of the
      spatial positions; statistics are merged exactly across them.
    axis_index_groups: optional groups within `axis_name` (see `jax.lax.psum`).
    scale_offset: :math:`o`, added to `scale` in the accumulation dtype
      (the multiplier is :math:`o + \gamma`; 1 for a zero-centred scale).
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, plain autodiff of the same forward (for forward mode).
    saved: "input" (default) or "output": what the backward keeps (see
      `batch_norm`).

  Returns:
    `y`, shaped like `x`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))  # NHWC
    >>> y = jaxnorm.instance_norm(x, jnp.ones(3), jnp.zeros(3))
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-6))
    True
  """
  x = _validation.floating_input(x, allow_complex=True)
  _channels_last(x, "instance_norm", 3, "(N, S1, ..., C)")
  if math.prod(x.shape[1:-1]) == 1:
    raise ValueError(
        f"instance_norm needs more than one spatial position per example and channel, got `x` of shape "
        f"{tuple(x.shape)}: statistics of a single element make the output equal `bias` whatever `x` is."
    )
  return _standardize.apply(
      x,
      scale,
      bias,
      op="instance_norm",
      axes=tuple(range(1, x.ndim - 1)),
      axes_name="x",
      param_axes=(x.ndim - 1,),
      param_explain=_PER_CHANNEL,
      centered=True,
      epsilon=epsilon,
      where=where,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      scale_offset=scale_offset,
      dtype=dtype,
      custom_vjp=custom_vjp,
      saved=saved,
  )
