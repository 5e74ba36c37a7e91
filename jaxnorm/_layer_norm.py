"""Layer normalization and RMS normalization: statistics per example over the given axes."""

from __future__ import annotations

from typing import Any

import jax

from jaxnorm import _standardize, _validation


def layer_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: _validation.Axes = -1,
    epsilon: float = 1e-6,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    scale_offset: float = 0.0,
    dtype: Any = None,
    custom_vjp: bool = True,
    saved: str = "input",
) -> jax.Array:
  r"""Layer normalization (Ba, Kiros & Hinton, 2016).

  .. math::
      y = (o + \gamma) \, \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

  with :math:`\mu, \sigma^2` (biased) over `axis`, separately for every index
  of the other axes, over the positions `where` selects. Computed stably in
  at least float32, differentiated by a hand-derived VJP.

  Args:
    x: floating-point input, e.g. `(batch, seq, d_model)`.
    scale: :math:`\gamma`, shaped like `x` along `axis` (e.g. `(d_model,)`),
      or any array that broadcasts to `x` (DiT's per-example `(batch, 1,
      d_model)`, a per-head `(heads, head_dim)`), or None. An array of
      exactly the shape along `axis` is read as per feature.
    bias: :math:`\beta`, of either form (independently of `scale`), or None.
    axis: the axis or axes to normalize over.
    epsilon: added to the variance; must be > 0.
    where: optional boolean mask broadcastable to `x` (see `batch_norm`).
    axis_name: optional mapped axis (or tuple of axes) whose devices each
      hold part of the normalized axes (a hidden dimension split by
      `jax.shard_map`): statistics are summed exactly across them; parameter
      gradients stay per device, like the parameters' shards.
    axis_index_groups: optional groups within `axis_name` (see `jax.lax.psum`).
    scale_offset: :math:`o`, added to `scale` in the accumulation dtype:
      1 gives Gemma's zero-centred scale :math:`1 + \gamma` (initialise
      :math:`\gamma` to 0). The gradient wrt `scale` is unchanged.
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, plain autodiff of the same forward (for forward mode).
    saved: "input" (default) or "output": what the backward keeps (see
      `batch_norm`).

  Returns:
    `y`, shaped like `x`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (4, 16))
    >>> y = jaxnorm.layer_norm(x, jnp.ones(16), jnp.zeros(16))
    >>> bool(jnp.allclose(y.mean(-1), 0, atol=1e-6))
    True
  """
  x = _validation.floating_input(x, allow_complex=True)
  return _standardize.apply(
      x,
      scale,
      bias,
      op="layer_norm",
      axes=axis,
      axes_name="axis",
      param_axes=_validation.canonical_axes(axis, x.ndim, "axis"),
      param_explain="the shape of x along axis",
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


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    axis: _validation.Axes = -1,
    epsilon: float = 1e-6,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    scale_offset: float = 0.0,
    dtype: Any = None,
    custom_vjp: bool = True,
    saved: str = "input",
) -> jax.Array:
  r"""Root-mean-square normalization (Zhang & Sennrich, 2019).

  .. math::
      y = (o + \gamma) \, \frac{x}{\sqrt{\tfrac1n \sum x^2 + \epsilon}}

  with the mean square over `axis`, separately for every index of the other
  axes, over the positions `where` selects; accumulated in at least float32,
  differentiated by a hand-derived VJP.

  Args:
    x: floating-point input, e.g. `(batch, seq, d_model)`.
    scale: :math:`\gamma`, shaped like `x` along `axis`, or any array that
      broadcasts to `x` (per example, per head), or None.
    axis: the axis or axes to normalize over.
    epsilon: added to the mean square; must be > 0.
    where: optional boolean mask broadcastable to `x` (see `batch_norm`).
    axis_name: optional mapped axis (or tuple of axes) whose devices each
      hold part of the normalized axes (a hidden dimension split by
      `jax.shard_map`): statistics are summed exactly across them; parameter
      gradients stay per device, like the parameters' shards.
    axis_index_groups: optional groups within `axis_name` (see `jax.lax.psum`).
    scale_offset: :math:`o`, added to `scale` in the accumulation dtype:
      1 gives Gemma's zero-centred scale :math:`1 + \gamma` (initialise
      :math:`\gamma` to 0). The gradient wrt `scale` is unchanged.
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, plain autodiff of the same forward (for forward mode).
    saved: "input" (default) or "output": what the backward keeps (see
      `batch_norm`).

  Returns:
    `y`, shaped like `x`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.rms_norm(jnp.array([[3., 4.]]), epsilon=1e-12)
    Array([[0.84852815, 1.1313709 ]], dtype=float32)
  """
  x = _validation.floating_input(x, allow_complex=True)
  return _standardize.apply(
      x,
      scale,
      None,
      op="rms_norm",
      axes=axis,
      axes_name="axis",
      param_axes=_validation.canonical_axes(axis, x.ndim, "axis"),
      param_explain="the shape of x along axis",
      centered=False,
      epsilon=epsilon,
      where=where,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      scale_offset=scale_offset,
      dtype=dtype,
      custom_vjp=custom_vjp,
      saved=saved,
  )
