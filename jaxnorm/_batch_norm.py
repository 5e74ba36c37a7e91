"""Batch normalization in training mode: statistics over every axis but the features."""

from __future__ import annotations

from typing import Any

import jax

from jaxnorm import _standardize, _validation


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    feature_axes: _validation.Axes = _validation.DEFAULT_FEATURE_AXES,
    axis: _validation.Axes | None = None,
    epsilon: float = 1e-5,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    custom_vjp: bool = True,
    saved: str = "input",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Batch normalization with batch statistics (Ioffe & Szegedy, 2015).

  .. math::
      y = \gamma \, \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

  where :math:`\mu_B` and :math:`\sigma_B^2` (biased) are taken over every axis
  except `feature_axes`, over the positions `where` selects, and with
  `axis_name` over every device of that mapped axis (exact for unequal numbers
  of valid elements). The variance is computed stably in at least float32.
  Gradients flow through a hand-derived VJP (see `jaxnorm._standardize`),
  also through the returned statistics.

  Args:
    x: floating-point input, e.g. `(N, C)` or NHWC `(N, H, W, C)`.
    scale: :math:`\gamma`, shaped like the feature axes (e.g. `(C,)`), or
      any array that broadcasts to `x` (conditional batch norm's per-example
      `(N, 1, 1, C)`), or None. An array of exactly the feature axes' shape
      is read as per feature.
    bias: :math:`\beta`, of either form, or None.
    feature_axes: the axis or axes that keep their own statistics.
    axis: the same as `feature_axes` under the name `moments`, `layer_norm` and
      `linen.BatchNorm` use (e.g. `axis=1` for NCHW); give one of the two.
    epsilon: added to the variance; must be > 0.
    where: optional boolean mask broadcastable to `x`; only True positions
      enter the statistics (all positions are normalized; masked-out NaN or inf
      are read as 0 and get zero gradient).
    axis_name: optional mapped axis (or tuple of axes) to merge statistics over.
      With it, `feature_axes` may cover every axis of `x` (a per-example
      model under ``jax.vmap(..., axis_name=...)``, as flax allows): the
      statistics are then taken over the mapped axis alone.
    axis_index_groups: optional groups within `axis_name` (see `jax.lax.psum`).
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, differentiate the same forward by plain autodiff
      (needed for forward mode: `jax.jvp`, `jax.jacfwd`; reverse-over-reverse
      and `jax.hessian` work through the custom VJP).
    saved: what the backward keeps of this norm: "input" (`x`, the default)
      or "output" (`y`, the array returned, from which x-hat is recovered
      as :math:`(y - \beta) / \gamma`, or :math:`/ (o + \gamma)` with a
      `scale_offset` :math:`o`), so that `x` can be freed after the forward
      where the next layer keeps `y` anyway. With "output" a multiplier
      smaller than `epsilon` in magnitude is taken as :math:`\pm\epsilon`
      (In-Place ABN's rule; the gradient wrt `scale` stays
      :math:`\sum g \hat x`), and x-hat carries the rounding of `y` in its
      dtype. Real inputs and the custom VJP only. The same in every op that
      takes it.

  Degenerate batches, the one rule of this op and the `BatchNorm` modules
  (linen and nnx) in training: a single value per feature (e.g. one example
  of shape `(1, C)`, counted over the devices of `axis_name` too) raises a
  `ValueError`, as PyTorch does, since its variance is 0 and every output
  would be the bias; an empty batch (a zero-size axis) gives mean 0 and
  variance 0, and the modules keep their running statistics. With `where`
  the count is data-dependent and not checked: a feature with one valid
  value outputs the bias, one with none keeps its running statistics.

  Returns:
    `(y, mean, var)`: `y` shaped like `x`; the batch mean and biased variance
    shaped like the feature axes, in the accumulation dtype (at least float32),
    ready for a running-statistics update.

  Example:
    >>> import jax, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (32, 8))
    >>> y, mean, var = jaxnorm.batch_norm(x)
    >>> y.shape, mean.shape
    ((32, 8), (8,))
  """
  return with_statistics(
      x,
      scale,
      bias,
      feature_axes=feature_axes,
      axis=axis,
      epsilon=epsilon,
      where=where,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      custom_vjp=custom_vjp,
      saved=saved,
  )


def activated_batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    negative_slope: float = 0.01,
    feature_axes: _validation.Axes = _validation.DEFAULT_FEATURE_AXES,
    axis: _validation.Axes | None = None,
    epsilon: float = 1e-5,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Batch normalization followed by a leaky ReLU, whose backward needs only the activation's output (In-Place ABN).

  .. math::
      y = \gamma \, \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
      z = \begin{cases} y & y \ge 0 \\ s\, y & y < 0 \end{cases}

  (Rota Bulò, Porzi & Kontschieder, CVPR 2018.) The VJP keeps `z`, the array
  returned, which the next convolution keeps anyway, and recovers `y` from it
  (:math:`y = z / s` where :math:`z < 0`) and x-hat from `y` (see
  `batch_norm`'s `saved`): neither `x` nor `y` outlives the forward. With
  ``negative_slope=0`` (ReLU), whose negative half cannot be recovered, the
  VJP keeps `y` instead, the pre-activation the backward needs (as
  ``batch_norm(..., saved="output")`` followed by `jax.nn.relu` does).
  A multiplier :math:`|\gamma| <` `epsilon` is taken as :math:`\pm\epsilon`
  (see `batch_norm`'s `saved`). Arguments as `batch_norm`; the gradient is
  that of ``jax.nn.leaky_relu(batch_norm(...)[0], negative_slope)``.

  Args:
    negative_slope: :math:`s`, in [0, 1]; In-Place ABN's default 0.01.

  Returns:
    `(z, mean, var)`, as `batch_norm` returns `(y, mean, var)`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (32, 8))
    >>> z, mean, var = jaxnorm.activated_batch_norm(x, negative_slope=0.1)
    >>> bool(jnp.allclose(z, jax.nn.leaky_relu(jaxnorm.batch_norm(x)[0], 0.1)))
    True
  """
  return with_statistics(
      x,
      scale,
      bias,
      feature_axes=feature_axes,
      axis=axis,
      epsilon=epsilon,
      where=where,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      custom_vjp=True,
      saved="output",
      negative_slope=negative_slope,
  )


def activation(y: jax.Array, negative_slope: float) -> jax.Array:
  """`activated_batch_norm`'s activation outside its VJP (the modules' inference): `jax.nn.relu` for a slope of 0."""
  return jax.nn.relu(y) if negative_slope == 0 else jax.nn.leaky_relu(y, negative_slope)


def with_statistics(
    x: Any,
    scale: Any,
    bias: Any,
    *,
    feature_axes: Any,
    axis: Any,
    epsilon: Any,
    where: Any,
    axis_name: Any,
    axis_index_groups: Any,
    dtype: Any,
    custom_vjp: bool,
    saved: str = "input",
    negative_slope: float | None = None,
    initializing: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`batch_norm`, and what the linen modules' `init` needs besides: `initializing`.

  A module's `init` drops `axis_name`, as flax does, so a per-example input
  under `vmap` then has no reduced axis (each value is its own batch, and
  the output is the bias), and models are often initialized with a single
  example: with `initializing`, neither is an error.
  """
  x = _validation.floating_input(x, allow_complex=True)
  feature_axes = _validation.feature_axes_or_axis(feature_axes, axis)
  features = _validation.canonical_axes(feature_axes, x.ndim, "feature_axes" if axis is None else "axis")
  reduced = tuple(a for a in range(x.ndim) if a not in features)
  # With `axis_name` the batch may be the mapped axis alone (a per-example
  # model under vmap, or one example per device): the statistics are then
  # taken over the devices only. Without it there is nothing to average.
  if not reduced and axis_name is None and not initializing:
    raise ValueError(
        f"`feature_axes`={feature_axes!r} covers every axis of an input of rank {x.ndim}: "
        "batch_norm needs at least one axis (the batch) to take statistics over, or an `axis_name` "
        "(e.g. of `jax.vmap(..., axis_name=...)` over the examples) to take them over the mapped axis."
    )
  if where is None and not initializing:
    _validation.more_than_one_value(x.shape, reduced, axis_name, axis_index_groups, "batch_norm")
  return _standardize.apply(
      x,
      scale,
      bias,
      op="batch_norm",
      axes=reduced,
      axes_name="feature_axes",
      param_axes=features,
      param_explain="the shape of x along feature_axes",
      centered=True,
      epsilon=epsilon,
      where=where,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      custom_vjp=custom_vjp,
      saved=saved,
      negative_slope=negative_slope,
      with_statistics=True,
  )
