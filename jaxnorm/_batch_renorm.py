r"""Batch renormalization (Ioffe, 2017) and its warm-up schedule for the clipping bounds.

Batch renorm is batch norm with a per-feature affine correction that maps the
batch-normalized output onto what normalizing with the running statistics
would give, as far as the clipping bounds allow:

.. math::
    y = \gamma \Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta
      = (\gamma r)\,\frac{x - \mu_B}{\sigma_B} + (\gamma d + \beta),

so it is the normalization kernel (`jaxnorm._standardize`) with the
effective parameters :math:`\gamma r` and :math:`\gamma d + \beta`. As
:math:`r` and :math:`d` are constants of the backward pass, the kernel's
hand-derived VJP (run with :math:`h = g \gamma r`) and plain autodiff of the
two products give exactly the paper's gradients; no second kernel is needed.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _moments, _standardize, _validation


def batch_renorm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running_mean: jax.Array,
    running_var: jax.Array,
    *,
    r_max: Any,
    d_max: Any,
    feature_axes: _validation.Axes = _validation.DEFAULT_FEATURE_AXES,
    axis: _validation.Axes | None = None,
    epsilon: float = 1e-5,
    where: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    custom_vjp: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Batch renormalization in training mode (Ioffe, 2017).

  .. math::
      y = \gamma \Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta, \qquad
      \sigma_B = \sqrt{\sigma_B^2 + \epsilon}, \quad
      \sigma = \sqrt{\bar\sigma^2 + \epsilon},

      r = \operatorname{clip}\big(\sigma_B / \sigma,\ 1/r_{\max},\ r_{\max}\big), \qquad
      d = \operatorname{clip}\big((\mu_B - \bar\mu) / \sigma,\ -d_{\max},\ d_{\max}\big),

  where :math:`\mu_B, \sigma_B^2` (biased) are the batch statistics, taken as
  in `batch_norm` (every axis but `feature_axes`, the positions `where`
  selects, every device of `axis_name`), and :math:`\bar\mu, \bar\sigma^2` are
  the running mean and variance. :math:`r` and :math:`d` are held constant in
  the backward pass (`stop_gradient`), as the paper prescribes: the gradient
  with respect to `x` is batch norm's gradient with :math:`\gamma r` in place
  of :math:`\gamma`, and the running statistics get no gradient.
  ``r_max = 1, d_max = 0`` is plain batch norm (exactly `batch_norm`);
  ``r_max = d_max = inf`` normalizes, in the forward pass, by the running
  statistics. The clipping bounds may be traced scalars, e.g. from
  `batch_renorm_schedule`.

  Cost: the batch statistics are needed for :math:`r, d` before the kernel
  runs, and the kernel computes them again; the two computations are the same
  operations on the same operands, so under `jax.jit` XLA's common-subexpression
  elimination merges them and the compiled program reduces over `x` as often as
  `batch_norm` does. Un-jitted (op by op) they run twice.

  Args:
    x: floating-point input, e.g. `(N, C)` or NHWC `(N, H, W, C)`.
    scale: :math:`\gamma`, shaped like the feature axes (e.g. `(C,)`), or None (1).
    bias: :math:`\beta`, shaped like the feature axes, or None (0).
    running_mean: :math:`\bar\mu`, shaped like the feature axes.
    running_var: :math:`\bar\sigma^2` (not the standard deviation), shaped like
      the feature axes.
    r_max: bound on :math:`r`, a scalar >= 1 (a Python number, or a traced
      scalar, which cannot be checked).
    d_max: bound on :math:`|d|`, a scalar >= 0 (same).
    feature_axes: the axis or axes that keep their own statistics.
    axis: the same as `feature_axes` under the name `moments`, `layer_norm` and
      `linen.BatchNorm` use (e.g. `axis=1` for NCHW); give one of the two.
    epsilon: added to both variances; must be > 0.
    where: optional boolean mask broadcastable to `x`; only True positions
      enter the batch statistics (all positions are normalized; masked-out NaN
      or inf are read as 0 and get zero gradient).
    axis_name: optional mapped axis (or tuple of axes) to merge statistics over.
    axis_index_groups: optional groups within `axis_name` (see `jax.lax.psum`).
    dtype: output dtype; defaults to `x.dtype`.
    custom_vjp: if False, differentiate the same forward by plain autodiff
      (needed for forward mode).

  Returns:
    `(y, mean, var)`: `y` shaped like `x`; the batch mean and biased variance
    shaped like the feature axes, in the accumulation dtype (at least
    float32), for the running-statistics update (differentiable, as those of
    `batch_norm`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> x = jax.random.normal(jax.random.key(0), (32, 8)) * 2 + 1
    >>> y, mean, var = jaxnorm.batch_renorm(
    ...     x, None, None, jnp.zeros(8), jnp.ones(8), r_max=3.0, d_max=5.0)
    >>> # r, d undo the batch statistics: y is x normalized by the running ones
    >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + 1e-5), atol=1e-5))
    True
  """
  x = _validation.floating_input(x)
  feature_axes = _validation.feature_axes_or_axis(feature_axes, axis)
  features = _validation.canonical_axes(feature_axes, x.ndim, "feature_axes" if axis is None else "axis")
  reduced = tuple(a for a in range(x.ndim) if a not in features)
  if not reduced:
    raise ValueError(
        f"`feature_axes`={feature_axes!r} covers every axis of an input of rank {x.ndim}: "
        "batch_renorm needs at least one axis (the batch) to take statistics over."
    )
  feature_shape = tuple(x.shape[a] for a in features)
  explain = "the shape of x along feature_axes"
  scale = _validation.parameter(scale, feature_shape, "scale", explain)
  bias = _validation.parameter(bias, feature_shape, "bias", explain)
  running = []
  for name, a in (("running_mean", running_mean), ("running_var", running_var)):
    if a is None:
      raise TypeError(f"`{name}` is required: an array of shape {feature_shape} ({explain}).")
    running.append(_validation.parameter(a, feature_shape, name, explain))
  r_max = _clip_bound(r_max, "r_max", 1.0)
  d_max = _clip_bound(d_max, "d_max", 0.0)
  mask = _validation.broadcast_mask(where, x.shape)
  # The kernel's accumulation dtype: that of batch_norm on the same x, scale, bias.
  acc = _validation.accumulation_dtype(x.dtype, *(p.dtype for p in (scale, bias) if p is not None))
  eps = _validation.positive_epsilon(epsilon, acc)
  axis_name = _validation.axis_name(axis_name)
  axis_index_groups = _validation.axis_index_groups(axis_index_groups)

  # The batch statistics exactly as the kernel will compute them (same dtype, mask, merge).
  stats = _moments.compute_program(
      x, mask, axes=reduced, centered=True, axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=acc
  )
  shift, offset, var = (jnp.squeeze(a, reduced) for a in (stats.shift, stats.offset, stats.var))
  ra_mean, ra_var = (a.astype(acc) for a in running)
  sigma = jnp.sqrt(ra_var + eps)
  r_max, d_max = jnp.asarray(r_max, acc), jnp.asarray(d_max, acc)
  r = jnp.clip(jnp.sqrt(var + eps) / sigma, 1 / r_max, r_max)
  # (shift - running mean) + offset: the batch mean's two parts keep float32 precision.
  d = jnp.clip(((shift - ra_mean) + offset) / sigma, -d_max, d_max)
  r, d = lax.stop_gradient(r), lax.stop_gradient(d)

  eff_scale, eff_bias = r, d
  if scale is not None:
    eff_scale, eff_bias = scale.astype(acc) * r, scale.astype(acc) * d
  if bias is not None:
    eff_bias = eff_bias + bias.astype(acc)
  return _standardize.apply(
      x,
      eff_scale,
      eff_bias,
      op="batch_renorm",
      axes=reduced,
      axes_name="feature_axes",
      param_axes=features,
      param_explain=explain,
      centered=True,
      epsilon=eps,
      where=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      custom_vjp=custom_vjp,
      with_statistics=True,
  )


def batch_renorm_schedule(
    step: Any,
    *,
    warmup_steps: int = 5000,
    r_max_final: float = 3.0,
    r_max_steps: int = 40_000,
    d_max_final: float = 5.0,
    d_max_steps: int = 25_000,
) -> tuple[jax.Array, jax.Array]:
  r"""The paper's warm-up schedule for the clipping bounds: `(r_max, d_max)` at `step`.

  .. math::
      r_{\max}(t) = 1 + (r_{\max}^{\text{final}} - 1)\, \lambda(t; T_r), \qquad
      d_{\max}(t) = d_{\max}^{\text{final}}\, \lambda(t; T_d), \qquad
      \lambda(t; T) = \operatorname{clip}\Big(\frac{t - t_0}{T - t_0}, 0, 1\Big)

  with :math:`t_0` = `warmup_steps`: plain batch norm (``r_max = 1``,
  ``d_max = 0``) up to step :math:`t_0`, then linear relaxation that reaches
  the final bounds at steps :math:`T_r` = `r_max_steps` and :math:`T_d` =
  `d_max_steps`, constant afterwards. The defaults are Ioffe (2017)'s: 5k
  steps of batch norm, ``r_max = 3`` by 40k steps, ``d_max = 5`` by 25k.
  Pure and elementwise in `step`, so it jits, vmaps and plots.

  Args:
    step: number of training steps taken so far (scalar or array; int or float).
    warmup_steps: steps of plain batch norm, >= 0.
    r_max_final: the final `r_max`, >= 1.
    r_max_steps: step at which `r_max` reaches `r_max_final`, >= `warmup_steps`.
    d_max_final: the final `d_max`, >= 0.
    d_max_steps: step at which `d_max` reaches `d_max_final`, >= `warmup_steps`.

  Returns:
    `(r_max, d_max)`, floating arrays shaped like `step`.

  Example:
    >>> import jaxnorm
    >>> [tuple(round(float(v), 3) for v in jaxnorm.batch_renorm_schedule(t)) for t in (0, 5000, 15000, 40000)]
    [(1.0, 0.0), (1.0, 0.0), (1.571, 2.5), (3.0, 5.0)]
  """
  warmup = _count(warmup_steps, "warmup_steps", 0, "0")
  r_steps = _count(r_max_steps, "r_max_steps", warmup, f"warmup_steps={warmup}")
  d_steps = _count(d_max_steps, "d_max_steps", warmup, f"warmup_steps={warmup}")
  r_final = _python_bound(r_max_final, "r_max_final", 1.0)
  d_final = _python_bound(d_max_final, "d_max_final", 0.0)
  t = jnp.asarray(step)
  if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
    raise TypeError(f"`step` must be an integer or floating-point number or array, got dtype {t.dtype}.")
  t = t.astype(_validation.accumulation_dtype(t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32))

  def progress(end):
    if end == warmup:  # no ramp: a step from the initial to the final bound at `end`
      return (t >= end).astype(t.dtype)
    return jnp.clip((t - warmup) / (end - warmup), 0, 1)

  return 1 + (r_final - 1) * progress(r_steps), d_final * progress(d_steps)


def _clip_bound(value: Any, name: str, minimum: float) -> Any:
  """A scalar clipping bound; checked against `minimum` when concrete (traced ones pass through)."""
  if isinstance(value, bool) or value is None:
    raise TypeError(f"`{name}` must be a real scalar >= {minimum:g}, got {value!r}.")
  if isinstance(value, (int, float)):
    _check_minimum(float(value), name, minimum)
    return value
  try:
    array = jnp.asarray(value)
  except TypeError:
    raise TypeError(f"`{name}` must be a real scalar >= {minimum:g}, got {value!r}.") from None
  if array.ndim != 0 or not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
    raise TypeError(f"`{name}` must be a real scalar, got an array of shape {array.shape} and dtype {array.dtype}.")
  try:
    concrete = float(array)
  except jax.errors.ConcretizationTypeError:
    return array  # traced (e.g. from a schedule): the caller vouches for the range
  _check_minimum(concrete, name, minimum)
  return array


def _check_minimum(value: float, name: str, minimum: float) -> None:
  if not value >= minimum:  # also rejects NaN
    raise ValueError(f"`{name}` must be >= {minimum:g}, got {value!r}.")


def _python_bound(value: Any, name: str, minimum: float) -> float:
  try:
    value = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(f"`{name}` must be a Python number, got {value!r}.") from None
  _check_minimum(value, name, minimum)
  return value


def _count(value: Any, name: str, minimum: int, what: str) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"`{name}` must be a Python int, got {value!r}.") from None
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {what}, got {value}.")
  return value
