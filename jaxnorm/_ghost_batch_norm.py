"""Ghost batch normalization: batch statistics per virtual batch of a large batch."""

from __future__ import annotations

from typing import Any

import jax

from jaxnorm import _standardize, _validation


def ghost_batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    virtual_batch_size: int,
    feature_axes: _validation.Axes = _validation.DEFAULT_FEATURE_AXES,
    axis: _validation.Axes | None = None,
    epsilon: float = 1e-5,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    custom_vjp: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Ghost batch normalization (Hoffer, Hubara & Soudry, 2017).

  The leading (batch) axis of length :math:`N` is split into :math:`G = N / v`
  consecutive virtual batches of :math:`v` = `virtual_batch_size` examples,
  and each is batch-normalized with its own statistics:

  .. math::
      y_i = \gamma \, \frac{x_i - \mu_{g(i)}}{\sqrt{\sigma_{g(i)}^2 + \epsilon}} + \beta,
      \qquad g(i) = \lfloor i / v \rfloor

  where :math:`\mu_g, \sigma_g^2` (biased) are taken over the examples of
  virtual batch :math:`g` and every other axis except `feature_axes`. This
  is `batch_norm` applied to each chunk ``x[g*v:(g+1)*v]`` separately, in one
  call: `x` is reshaped to ``(G, v, ...)`` and handed to the shared kernel
  (stable statistics in at least float32, hand-derived VJP). With
  `virtual_batch_size` equal to :math:`N` it is plain `batch_norm`.

  With `axis_name`, virtual batch :math:`g` of every device is merged into
  one: its statistics are those of the union of the devices' :math:`g`-th
  chunks (so `virtual_batch_size` counts examples per device).

  Args:
    x: floating-point input whose axis 0 is the batch, e.g. `(N, C)` or
      NHWC `(N, H, W, C)`.
    scale: :math:`\gamma`, shaped like the feature axes (e.g. `(C,)`), or None.
    bias: :math:`\beta`, shaped like the feature axes, or None.
    virtual_batch_size: :math:`v`, a positive int that divides `x.shape[0]`.
    feature_axes: the axis or axes that keep their own statistics (never 0,
      the batch axis).
    axis: the same as `feature_axes` under the name `moments`, `layer_norm` and
      `linen.BatchNorm` use (e.g. `axis=1` for NCHW); give one of the two.
    epsilon: added to the variance; must be > 0.
    where: optional boolean mask broadcastable to `x`; only True positions
      enter the statistics of their virtual batch (see `batch_norm`).
    axis_name: optional mapped axis to merge each virtual batch over.
    axis_index_groups: optional groups within `axis_name`.
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, plain autodiff of the same forward (for forward mode).

  Returns:
    `(y, mean, var)`: `y` shaped like `x`; the mean and biased variance of
    *each* virtual batch, of shape ``(N // v, *feature_shape)``, in the
    accumulation dtype (at least float32). They are returned per virtual
    batch, not averaged, so that nothing is lost: a running-statistics update
    in the usual convention takes ``mean.mean(0)`` and ``var.mean(0)``, as
    `jaxnorm.linen.GhostBatchNorm` does. (The mean of the per-chunk variances
    is the within-chunk variance; it is smaller than the whole batch's variance
    by the variance of the chunk means.)

  Raises:
    ValueError: if `virtual_batch_size` does not divide `x.shape[0]`, is not
      positive, or if `feature_axes` contains the batch axis.

  Example:
    >>> import jax, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (32, 8))
    >>> y, mean, var = jaxnorm.ghost_batch_norm(x, virtual_batch_size=8)
    >>> y.shape, mean.shape, var.shape
    ((32, 8), (4, 8), (4, 8))
  """
  x = _validation.floating_input(x)
  feature_axes = _validation.feature_axes_or_axis(feature_axes, axis)
  features = _validation.canonical_axes(feature_axes, x.ndim, "feature_axes" if axis is None else "axis")
  if 0 in features:
    raise ValueError(
        f"`feature_axes`={feature_axes!r} contains axis 0, the batch axis that ghost_batch_norm "
        "splits into virtual batches; the features must be other axes."
    )
  v = _virtual_batch_size(virtual_batch_size)
  n = x.shape[0]
  if n % v:
    raise ValueError(
        f"`virtual_batch_size`={v} must divide the batch size, but x has {n} examples along axis 0 "
        f"(shape {tuple(x.shape)}); use a batch size that is a multiple of {v}."
    )
  mask = _validation.broadcast_mask(where, x.shape)
  grouped_shape = (n // v, v, *x.shape[1:])
  # In the grouped view axis 0 indexes the virtual batch and keeps its own
  # statistics; axis 1 (the examples of one virtual batch) and the other
  # non-feature axes are reduced; the parameters still span the features.
  grouped_features = tuple(a + 1 for a in features)
  reduced = tuple(a for a in range(1, len(grouped_shape)) if a not in grouped_features)
  y, mean, var = _standardize.apply(
      x,
      scale,
      bias,
      op="ghost_batch_norm",
      axes=reduced,
      axes_name="feature_axes",
      param_axes=grouped_features,
      param_explain="the shape of x along feature_axes",
      centered=True,
      epsilon=epsilon,
      where=None if mask is None else mask.reshape(grouped_shape),
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      custom_vjp=custom_vjp,
      with_statistics=True,
      # Reshaped inside the kernel: see `_standardize.Spec.view`.
      view=grouped_shape,
  )
  return y, mean, var


def _virtual_batch_size(v: Any) -> int:
  v = _validation.integer(v, "virtual_batch_size")
  if v < 1:
    raise ValueError(f"`virtual_batch_size` must be >= 1, got {v}.")
  return v
