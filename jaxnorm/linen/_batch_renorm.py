"""`BatchRenorm`: batch renormalization (Ioffe, 2017) as a linen module with `BatchNorm`'s conventions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

import jaxnorm
from jaxnorm import _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype
from jaxnorm.linen._running_stats import DEFAULT_MOMENTUM, RunningStatistics, stats_dtype


class BatchRenorm(nn.Module):
  r"""Batch renormalization with running statistics in the ``batch_stats`` collection.

  Training (``use_running_average=False``), with the batch statistics
  :math:`\mu_B, \sigma_B^2` taken as in `BatchNorm` and the running ones
  :math:`\bar\mu, \bar\sigma^2` *before* this step's update:

  .. math::
      y = \gamma \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\, r + d\Big) + \beta, \quad
      r = \operatorname{clip}\Big(\sqrt{\tfrac{\sigma_B^2 + \epsilon}{\bar\sigma^2 + \epsilon}},
          \tfrac{1}{r_{\max}}, r_{\max}\Big), \quad
      d = \operatorname{clip}\Big(\frac{\mu_B - \bar\mu}{\sqrt{\bar\sigma^2 + \epsilon}}, -d_{\max}, d_{\max}\Big)

  with :math:`r, d` constant in the backward pass (see `jaxnorm.batch_renorm`);
  then :math:`\bar\mu \leftarrow m \bar\mu + (1 - m) \mu_B` and
  :math:`\bar\sigma^2 \leftarrow m \bar\sigma^2 + (1 - m) \sigma_B^2`.
  Inference uses :math:`\bar\mu, \bar\sigma^2` exactly as `BatchNorm` does.

  The attributes, defaults, call arguments, variables (params ``scale``/``bias``;
  batch_stats ``mean``/``var``, shaped like the feature axes) and output
  dtypes are those of `BatchNorm` (and `flax.linen.BatchNorm`), plus the
  clipping bounds:

  * `r_max`, `d_max`: fixed bounds (Python numbers, ``r_max >= 1``,
    ``d_max >= 0``), or None (the default) to follow the paper's warm-up
    schedule `jaxnorm.batch_renorm_schedule` with the attributes
    `warmup_steps`, `r_max_final`, `r_max_steps`, `d_max_final`,
    `d_max_steps`: plain batch norm for the first 5k steps, then ``r_max``
    relaxed linearly to 3 by step 40k and ``d_max`` to 5 by step 25k. The
    schedule is driven by an int32 counter ``batch_stats['steps']`` (the
    number of training steps taken), which exists only when a bound is
    scheduled and advances with the running statistics: on every training
    call outside `init`, which, as for `BatchNorm`, needs ``batch_stats``
    mutable.

  Why the running *variance*, when the paper keeps and updates the running
  standard deviation :math:`\sigma \leftarrow \sigma + \alpha (\sigma_B - \sigma)`:
  (1) a `BatchNorm` (flax or jaxnorm) checkpoint loads unchanged (for
  ``steps``-free configurations; a scheduled one needs ``steps`` added), and
  inference is the very same computation; (2) ``r_max = 1, d_max = 0`` is then
  exactly `BatchNorm`, running statistics included; (3) the paper's
  :math:`\sigma` estimates the population standard deviation, and the square
  root of an average of batch variances is the less biased estimate of it: an
  average of batch standard deviations is biased lower by Jensen's
  inequality, most at the small batches batch renorm is meant for (for
  Gaussian data by a further 8% at 4 examples per feature, 3.5% at 8).

  `convention` selects how the running statistics are updated, exactly as
  in `BatchNorm`: ``"flax"`` (default) or ``"torch"`` (`momentum` the weight
  of the new batch, 0.1 when unset, None for a cumulative average; unbiased
  running variance; an int32 ``num_batches_tracked`` counter, which then also
  drives the warm-up schedule in place of ``steps``). There is no
  `track_running_stats`: :math:`r` and :math:`d` are measured against the
  running statistics, so batch renorm without them is not defined (it would
  be plain `BatchNorm` with ``track_running_stats=False``). The bad-state
  errors (immutable ``batch_stats``, a single value per feature in
  training, an unbound `axis_name`) are `BatchNorm`'s.

  With fixed bounds from step 0, :math:`r, d` are measured against the
  initial running statistics (mean 0, variance 1), which are meaningless
  early on; that is what the warm-up is for.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> brn = jnn.BatchRenorm(use_running_average=False)
    >>> variables = brn.init(jax.random.key(1), x)
    >>> y, updates = brn.apply(variables, x, mutable=["batch_stats"])
    >>> jax.tree_util.tree_map(jnp.shape, updates)
    {'batch_stats': {'mean': (4,), 'steps': (), 'var': (4,)}}
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
  r_max: float | None = None
  d_max: float | None = None
  warmup_steps: int = 5000
  r_max_final: float = 3.0
  r_max_steps: int = 40_000
  d_max_final: float = 5.0
  d_max_steps: int = 25_000
  convention: str = "flax"

  @nn.compact
  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Renormalizes `x` with batch statistics (training) or normalizes with running statistics (inference).

    Args:
      x: the input; statistics are taken over every axis but `self.axis`.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the batch statistics.

    Returns:
      The normalized input, shaped like `x`.
    """
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    x = _validation.floating_input(x)
    feature_axes = _validation.canonical_axes(self.axis, x.ndim, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    running = RunningStatistics(self, feature_shape, stats_dtype(x.dtype, self.dtype))
    steps = None
    if self.r_max is None or self.d_max is None:
      # Under convention="torch" the schedule reads torch's own step counter.
      steps = running.num_batches_tracked
      if steps is None:
        steps = self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))
    scale, bias = affine_parameters(self, feature_shape, use_scale=self.use_scale, use_bias=self.use_bias)
    dtype = output_dtype(x, scale, bias, dtype=self.dtype)

    if use_running_average:
      return running.normalize(x, feature_axes, scale, bias, epsilon=self.epsilon, dtype=dtype)

    reduced = tuple(a for a in range(x.ndim) if a not in feature_axes)
    count = running.training_count(x.shape, reduced, mask)
    r_max, d_max = self.r_max, self.d_max
    if steps is not None:
      r_sched, d_sched = jaxnorm.batch_renorm_schedule(
          steps.value,
          warmup_steps=self.warmup_steps,
          r_max_final=self.r_max_final,
          r_max_steps=self.r_max_steps,
          d_max_final=self.d_max_final,
          d_max_steps=self.d_max_steps,
      )
      r_max = r_sched if r_max is None else r_max
      d_max = d_sched if d_max is None else d_max
    y, mean, var = jaxnorm.batch_renorm(
        x,
        scale,
        bias,
        running.mean.value,
        running.var.value,
        r_max=r_max,
        d_max=d_max,
        feature_axes=feature_axes,
        epsilon=self.epsilon,
        where=_validation.boolean_mask(mask, "mask", x.shape),
        # At init the mapped axis need not exist yet, as in flax.
        axis_name=None if self.is_initializing() else self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
    )
    # r and d above were measured against the running statistics before this update.
    running.update(mean, var, count)
    if steps is not None and steps is not running.num_batches_tracked and not self.is_initializing():
      steps.value = steps.value + 1
    return y
