"""`BatchNorm`: a drop-in for `flax.linen.BatchNorm` on jaxnorm's core."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxnorm import _batch_norm, _modulation, _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype
from jaxnorm.linen._running_stats import DEFAULT_MOMENTUM, RunningStatistics, stats_dtype


class BatchNorm(nn.Module):
  r"""Batch normalization with running statistics in the ``batch_stats`` collection.

  Training (``use_running_average=False``):

  .. math::
      y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
      \bar\mu \leftarrow m \bar\mu + (1 - m) \mu_B, \quad
      \bar\sigma^2 \leftarrow m \bar\sigma^2 + (1 - m) \sigma_B^2

  with the batch statistics over every axis but `axis` (and across the
  devices of `axis_name`); inference uses :math:`\bar\mu, \bar\sigma^2`.
  The constructor and call arguments, defaults, variable trees (params
  ``scale``/``bias`` and batch_stats ``mean``/``var``, shaped like the feature
  axes) and output dtypes are those of `flax.linen.BatchNorm`, so checkpoints
  load unchanged. What differs is inside: a hand-derived VJP and a stable
  variance. `use_fast_variance` is accepted for compatibility and ignored: the
  variance is always computed from deviations about the mean, which costs no
  extra pass over memory here and does not collapse when ``|mean| >> std``.
  Likewise statistics are always reduced in at least float32, whatever
  `force_float32_reductions` says.

  Running-statistics conventions (attribute `convention`):

  * ``"flax"`` (default): the update above, `momentum` (default 0.99) the
    weight of the old value, biased :math:`\sigma_B^2`.
  * ``"torch"``, for models ported from `torch.nn.BatchNorm2d` and friends:
    :math:`\bar\mu \leftarrow (1 - m) \bar\mu + m \mu_B`,
    :math:`\bar\sigma^2 \leftarrow (1 - m) \bar\sigma^2 + m \sigma_B^2 \frac{n}{n-1}`
    (the unbiased variance, :math:`n` the valid values per feature over all
    devices; the output still uses the biased one), and an int32 counter
    ``batch_stats["num_batches_tracked"]``. `momentum` is the weight of the
    *new* batch; left unset it is torch's 0.1 (0.99 under ``"flax"``), an
    explicit value is taken as given, and ``momentum=None`` is torch's
    cumulative average (:math:`m = 1/k` at the k-th training step). A torch
    state dict maps as ``running_mean -> mean``, ``running_var -> var``,
    ``num_batches_tracked``, ``weight -> scale``, ``bias -> bias`` (NCHW to
    NHWC is a transpose of the input only).

  Call-time ``scale=`` and ``shift=`` modulate the output per example
  (conditional batch norm, BigGAN, FiLM): ``y = norm(x) * (1 + scale) +
  shift``, with the batch (or running) statistics of plain batch norm; e.g.
  the two chunks of ``nn.Embed(num_classes, 2 C)(labels)`` for class-
  conditional batch norm, usually with ``use_scale=use_bias=False``.

  ``track_running_stats=False`` (torch's name): no running statistics and no
  ``batch_stats`` variables; batch statistics are used in training and at
  inference alike, and `use_running_average` need not be set.
  `jaxnorm.linen.precise_batch_stats` replaces the running averages of a
  trained model by the exact population statistics (PreciseBN).

  Dtypes follow flax: statistics in the module's `dtype` (else the input's),
  at least float32, so bfloat16/float16 inputs get float32 statistics (no
  overflow of float16 squares) and float32 running statistics. float64 (under
  ``jax_enable_x64``) stays float64; the running statistics are then created
  in float64, where flax creates float32 and its first update turns them into
  float64: the statistics stay float64-exact (flax's first update is
  float32-rounded) and the dtype of ``batch_stats`` never changes between
  steps, as `jax.lax.scan` needs (see `jaxnorm.linen._running_stats`).

  Bad states raise clear errors: training without a mutable ``batch_stats``
  (an `ImmutableBatchStatsError`, a subclass of flax's
  `ModifyScopeVariableError`, saying to pass ``mutable=["batch_stats"]``);
  running statistics read from variables without ``batch_stats`` (a
  `MissingBatchStatsError`, a subclass of flax's `ScopeCollectionNotFound`); an
  `axis_name` that no enclosing `shard_map`/`pmap`/`vmap` binds (a
  `NameError` naming `axis_name`). A training batch with a *single value per
  feature* (e.g. one example of shape ``(1, C)``) raises a `ValueError`, as in
  PyTorch: its variance is 0, every output would equal the bias, and no
  gradient would flow, which flax returns silently. `init` is exempt (models
  are often initialized with one dummy example); with a `mask` the count is
  not static and is not checked.

  `saved` ("input", the default, or "output"): what the backward keeps, as
  in `jaxnorm.batch_norm` ("output" lets `x` be freed after the forward).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> bn = jnn.BatchNorm(use_running_average=False)
    >>> variables = bn.init(jax.random.key(1), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> jax.tree_util.tree_map(jnp.shape, updates)
    {'batch_stats': {'mean': (4,), 'var': (4,)}}
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float | None = DEFAULT_MOMENTUM
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  convention: str = "flax"
  track_running_stats: bool = True
  saved: str = "input"

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes `x` with batch statistics (training) or running statistics (inference), then modulates it.

    Args:
      x: the input; statistics are taken over every axis but `self.axis`.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the batch statistics.
      scale: optional call-time scale :math:`s` that broadcasts to `x`
        (conditional batch norm and FiLM: per example, ``(N, 1, 1, C)``
        for NHWC); the output is multiplied by ``1 + scale``.
      shift: optional call-time shift :math:`t` that broadcasts to `x`,
        added last: ``y = norm(x) * (1 + scale) + shift``.

    Returns:
      The normalized input, shaped like `x`.
    """
    return _normalize(self, x, use_running_average, mask, (scale, shift), None)


def _normalize(
    module: BatchNorm, x: jax.Array, use_running_average: bool | None, mask: Any, modulation: tuple[Any, Any],
    negative_slope: float | None,
) -> jax.Array:
  """`BatchNorm.__call__`, and with a `negative_slope` `ActivatedBatchNorm`'s: a leaky ReLU after it."""
  x = _validation.floating_input(x, allow_complex=True)
  feature_axes = _validation.canonical_axes(module.axis, x.ndim, "axis")
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  running = RunningStatistics(module, feature_shape, stats_dtype(x.dtype, module.dtype))
  gamma, beta = affine_parameters(module, feature_shape, use_scale=module.use_scale, use_bias=module.use_bias)
  modulation = _modulation.arrays(*modulation)
  dtype = output_dtype(x, gamma, beta, *modulation, dtype=module.dtype)
  gamma, beta, _ = _modulation.fold(x.shape, feature_axes, gamma, beta, 0.0, *modulation)

  if running.tracking:
    use_running_average = nn.merge_param("use_running_average", module.use_running_average, use_running_average)
    if use_running_average:
      y = running.normalize(x, feature_axes, gamma, beta, epsilon=module.epsilon, dtype=dtype)
      return y if negative_slope is None else _batch_norm.activation(y, negative_slope)
  reduced = tuple(a for a in range(x.ndim) if a not in feature_axes)
  count = running.training_count(x.shape, reduced, mask)

  y, mean, var = _batch_norm.with_statistics(
      x,
      gamma,
      beta,
      feature_axes=feature_axes,
      axis=None,
      epsilon=module.epsilon,
      where=_validation.boolean_mask(mask, "mask", x.shape),
      # At init the mapped axis need not exist yet, as in flax.
      axis_name=None if module.is_initializing() else module.axis_name,
      axis_index_groups=module.axis_index_groups,
      dtype=dtype,
      custom_vjp=True,
      saved=module.saved,
      negative_slope=negative_slope,
      initializing=module.is_initializing(),
  )
  running.update(mean, var, count)
  return y


class ActivatedBatchNorm(BatchNorm):
  r"""`BatchNorm` followed by a leaky ReLU in one VJP that keeps only the activation's output (In-Place ABN).

  .. math::
      z = \operatorname{leaky\_relu}(\mathrm{BatchNorm}(x), s)

  Same attributes, variables and running statistics as `BatchNorm`, plus
  `negative_slope` :math:`s` (default 0.01, In-Place ABN's; 0 is a ReLU).
  In training the backward recovers the batch norm's output from `z` (see
  `jaxnorm.activated_batch_norm`), so neither the input nor the
  pre-activation outlives the forward; with a ReLU it keeps the
  pre-activation. `saved` is always "output". Inference applies the same
  activation after the running-statistics normalization.

  Example:
    >>> import jax
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (8, 4))
    >>> bn = jnn.ActivatedBatchNorm(use_running_average=False)
    >>> variables = bn.init(jax.random.key(1), x)
    >>> z, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> z.shape
    (8, 4)
  """

  negative_slope: float = 0.01
  saved: str = "output"

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
      scale: jax.Array | None = None,
      shift: jax.Array | None = None,
  ) -> jax.Array:
    """Batch norm (arguments as `BatchNorm`), then the leaky ReLU."""
    if self.saved != "output":
      raise ValueError(f"ActivatedBatchNorm keeps its output: `saved` must be 'output', got {self.saved!r}.")
    return _normalize(self, x, use_running_average, mask, (scale, shift), _validation.negative_slope(self.negative_slope))
