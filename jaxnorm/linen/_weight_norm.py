"""`WeightNorm` (a drop-in for `flax.linen.WeightNorm`, with data-dependent init) and `MeanOnlyBatchNorm`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

import jaxnorm
from jaxnorm import _moments, _validation
from jaxnorm.linen._affine import output_dtype


def map_params(module: nn.Module, transform, *args, **kwargs) -> Any:
  """Calls `module.layer_instance(*args, **kwargs)` on a transformed view of its ``params``.

  `transform(path, value)` maps each parameter of the wrapped layer to the
  value the layer sees; the view is never written back. flax 0.12's wrappers
  call `map_variables` with ``init=True`` (SpectralNorm also with
  ``mutable=True``), which writes the view back: the wrapped layer's stored
  kernel becomes the *normalized* kernel at init (in the compute `dtype`), and
  for SpectralNorm again on every ``apply(..., mutable=True)``, where it
  shrinks to ``w / sigma``. Here the wrapped layer creates its own parameters
  at init with its own initializers, the normalized view is read-only, and
  only ``params`` is mapped, so the layer's other collections (e.g. an inner
  BatchNorm's ``batch_stats``) stay as mutable as the caller made them.
  """
  layer = module.layer_instance
  if module.is_initializing():
    layer(*args, **kwargs)  # the wrapped layer's own parameters, from its own initializers

  def trans_in(variables):
    return jax.tree_util.tree_map_with_path(lambda path, value: transform(path[1:], value), variables)

  return nn.map_variables(
      lambda mdl: mdl(*args, **kwargs), "params", trans_in_fn=trans_in, init=False, mutable=False
  )(layer)


class WeightNorm(nn.Module):
  r"""Weight normalization of a wrapped layer's parameters, a drop-in for `flax.linen.WeightNorm`.

  Each selected parameter `v` of `layer_instance` (by default every one
  whose path contains ``'kernel'``) is replaced, when the layer runs, by

  .. math::
      w = g \, \frac{v}{\lVert v\rVert}, \qquad
      \lVert v\rVert = \sqrt{\textstyle\sum v^2 + \epsilon},

  the norm taken over every axis except `feature_axes` (see
  `jaxnorm.weight_norm`, whose hand-derived VJP is used). `g` is a parameter
  of this module named ``'<layer name>/<path>/scale'``, shaped like `v` along
  `feature_axes` (shape `()` for ``feature_axes=None``). Attributes, defaults,
  variable names and output dtypes are flax's, so a flax checkpoint loads
  unchanged. Two differences: the wrapped layer's stored parameters are never
  overwritten by their normalized values (flax does so at init), and only the
  ``params`` collection is normalized.

  Data-dependent initialization (``data_init=True``, Salimans & Kingma):
  the batch given to ``init`` sets the parameters so that the layer's
  outputs on that batch have zero mean and unit variance per feature. With
  :math:`t` the output with :math:`g = 1` and no bias (per output feature,
  statistics over every axis but the last):

  .. math::
      g \leftarrow \frac{1}{\sqrt{\mathrm{Var}[t] + \epsilon_{init}}}, \qquad
      b \leftarrow -\frac{\mathrm{E}[t]}{\sqrt{\mathrm{Var}[t] + \epsilon_{init}}} .

  (With a non-unit `scale_init` or non-zero `bias_init` the same end state is
  reached.) The module returns the standardized output during ``init``, so
  in a deep network each later layer is initialized on the already
  initialized activations, as the paper prescribes. It requires exactly one
  normalized parameter, with the layer's output features on its last axis
  (a Dense or Conv kernel with ``feature_axes=-1``) and ``use_scale=True``;
  the layer's ``bias`` (top-level in the wrapped layer, not normalized) is
  set too. Without a bias only `g` is set (unit variance; pair it with
  `MeanOnlyBatchNorm` for the mean). Outside ``init`` it does nothing.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (64, 3)) * 5 + 2
    >>> layer = jnn.WeightNorm(nn.Dense(4), data_init=True)
    >>> variables = layer.init(jax.random.key(1), x)
    >>> sorted(variables["params"])
    ['layer_instance', 'layer_instance/kernel/scale']
    >>> y = layer.apply(variables, x)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool(jnp.allclose(y.std(0), 1, atol=1e-4))
    (True, True)

  Attributes:
    layer_instance: the module whose parameters are normalized.
    epsilon: added to the squared norm.
    dtype: dtype of the normalized parameters (default: inferred, as flax).
    param_dtype: dtype of `scale`.
    use_scale: learn `g`; if False, `g = 1`.
    scale_init: initializer of `g`.
    feature_axes: axes of each parameter that keep their own norm; None for
      one norm over the whole parameter.
    variable_filter: normalize the parameters whose path ``'<layer>/<path>'``
      contains one of these strings; None or empty for all.
    data_init: data-dependent initialization from the ``init`` batch (above).
    data_init_epsilon: added to the variance of `t` there, so a feature that
      is constant on the init batch gets a large but finite `g`.
  """

  layer_instance: nn.Module
  epsilon: float = 1e-12
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  feature_axes: Axes | None = -1
  variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})
  data_init: bool = False
  data_init_epsilon: float = 1e-10

  @nn.compact
  def __call__(self, *args, **kwargs):
    """Runs `layer_instance(*args, **kwargs)` with its selected parameters weight-normalized."""
    normalized: list[tuple[str, tuple[int, ...], bool]] = []
    y = map_params(self, functools.partial(self._normalize, normalized=normalized), *args, **kwargs)
    if self.data_init and self.is_initializing():
      y = self._data_dependent_init(y, normalized)
    return y

  def _path(self, path) -> str:
    return self.layer_instance.name + "/" + jax.tree_util.keystr(path, simple=True, separator="/")

  def _normalize(self, path, value, *, normalized):
    value = jnp.asarray(value)
    name = self._path(path)
    if self.variable_filter and not any(f in name for f in self.variable_filter):
      return value
    if self.feature_axes is None:
      features = ()
    else:
      features = _validation.canonical_axes(self.feature_axes, value.ndim, "feature_axes")
    feature_shape = tuple(value.shape[a] for a in features)
    scale = None
    if self.use_scale:
      scale = self.param(name + "/scale", self.scale_init, feature_shape, self.param_dtype)
    normalized.append((name, feature_shape, features == (value.ndim - 1,)))
    return jaxnorm.weight_norm(
        value,
        scale,
        feature_axes=features,
        epsilon=self.epsilon,
        dtype=_validation.promoted_dtype(value, scale, dtype=self.dtype),
    )

  def _data_dependent_init(self, y, normalized):
    """Rescales `g` and shifts the layer's bias so that `y` is standardized per output feature."""
    if not self.use_scale:
      raise ValueError("WeightNorm(data_init=True) needs use_scale=True: it initializes the scale g.")
    if len(normalized) != 1:
      raise ValueError(
          "WeightNorm(data_init=True) needs exactly one normalized parameter (e.g. a Dense or Conv "
          f"kernel), got {[n for n, _, _ in normalized]}; narrow `variable_filter`."
      )
    name, feature_shape, last_axis = normalized[0]
    y = _validation.floating_input(y, "the wrapped layer's output")
    if y.ndim < 2 or not last_axis or feature_shape != (y.shape[-1],):
      raise ValueError(
          f"WeightNorm(data_init=True) needs the normalized parameter {name!r} to have the layer's "
          f"output features on its last axis (feature_axes=-1), shaped like the last axis of the "
          f"output; got scale shape {feature_shape} and output shape {y.shape}."
      )
    layer = self.layer_instance
    bias = layer.get_variable("params", "bias") if layer.has_variable("params", "bias") else None
    if bias is not None and (bias.shape != feature_shape or name == layer.name + "/bias"):
      raise ValueError(
          "WeightNorm(data_init=True) needs the wrapped layer's `bias` unnormalized and of shape "
          f"{feature_shape}, got shape {bias.shape}."
      )
    mean, var = jaxnorm.moments(y, tuple(range(y.ndim - 1)))
    rstd = jax.lax.rsqrt(var + _validation.positive_epsilon(self.data_init_epsilon))
    scale = self.get_variable("params", name + "/scale")
    self.put_variable("params", name + "/scale", (scale.astype(rstd.dtype) * rstd).astype(scale.dtype))
    # Computed in the statistics' dtype, per-feature statistics broadcast
    # explicitly (clean under strict dtype and rank promotion).
    ya, mean_y, rstd_y = y.astype(rstd.dtype), _validation.to_rank(mean, y.ndim), _validation.to_rank(rstd, y.ndim)
    if bias is None:
      return (ya * rstd_y).astype(y.dtype)
    layer.put_variable("params", "bias", ((bias.astype(rstd.dtype) - mean) * rstd).astype(bias.dtype))
    return ((ya - mean_y) * rstd_y).astype(y.dtype)


class MeanOnlyBatchNorm(nn.Module):
  r"""Mean-only batch normalization (Salimans & Kingma, 2016), to pair with `WeightNorm`.

  Training (``use_running_average=False``):

  .. math::
      y = x - \mu_B + \beta, \qquad \bar\mu \leftarrow m \bar\mu + (1 - m) \mu_B

  with the batch mean :math:`\mu_B` over every axis but `axis` (over the
  positions `mask` selects, and across the devices of `axis_name`, exactly);
  inference uses the running mean :math:`\bar\mu`. Nothing is divided by a
  standard deviation: the scale comes from weight normalization's `g`, and
  the only batch noise in training is that of the mean. Conventions follow
  `BatchNorm`: ``batch_stats`` ``mean`` shaped like the feature axes (no
  ``var``), param ``bias``, momentum 0.99, statistics in at least float32, the
  running mean untouched during ``init``. Gradients by plain autodiff (the
  VJP of a mean subtraction, ``g - mean(g)``, is already minimal).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (16, 4)) + 3
    >>> bn = jnn.MeanOnlyBatchNorm(use_running_average=False)
    >>> variables = bn.init(jax.random.key(1), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-6)), jax.tree_util.tree_map(jnp.shape, updates)
    (True, {'batch_stats': {'mean': (4,)}})

  Attributes:
    use_running_average: use the running mean instead of the batch mean.
    axis: the feature axis or axes.
    momentum: decay of the running mean.
    dtype: output dtype (default: promotion of input and bias, as flax).
    param_dtype: dtype of `bias`.
    use_bias: learn :math:`\beta`.
    bias_init: initializer of :math:`\beta`.
    axis_name, axis_index_groups: mapped axis (and groups) to take the batch
      mean over.
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float = 0.99
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  bias_init: Initializer = initializers.zeros
  axis_name: Any = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Subtracts the batch mean (training) or the running mean (inference) from `x` and adds the bias.

    Args:
      x: the input; the mean is taken over every axis but `self.axis`.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the batch mean (all positions are shifted; masked-out NaN or inf
        are read as 0).

    Returns:
      `y`, shaped like `x`.
    """
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    x = _validation.floating_input(x)
    feature_axes = _validation.canonical_axes(self.axis, x.ndim, "axis")
    reduced = tuple(a for a in range(x.ndim) if a not in feature_axes)
    if not reduced:
      raise ValueError(f"`axis`={self.axis!r} covers every axis of the input: there is no batch to average over.")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), feature_shape)
    _validation.state_shape(ra_mean.value, feature_shape, "batch_stats/mean")
    momentum = _validation.momentum(self.momentum)
    bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None
    dtype = output_dtype(x, bias, dtype=self.dtype)
    acc = _validation.accumulation_dtype(x.dtype, *(() if bias is None else (bias.dtype,)))
    mask = _validation.broadcast_mask(mask, x.shape)
    y, mean = _mean_only(
        x,
        mask,
        ra_mean.value,
        bias,
        reduced=reduced,
        acc=acc,
        dtype=np.dtype(dtype),
        use_running_average=bool(use_running_average),
        # At init the mapped axis need not exist yet, as in flax.
        axis_name=None if self.is_initializing() else _validation.axis_name(self.axis_name),
        axis_index_groups=_validation.axis_index_groups(self.axis_index_groups),
    )
    if not use_running_average and not self.is_initializing():
      # The stored dtype is kept (float32 by default, as at init): a float64 batch mean is cast explicitly.
      old = ra_mean.value
      ra_mean.value = momentum * old + (1 - momentum) * mean.astype(old.dtype)
    return y


# One program, also when called eagerly: NaN padding of `x` is never the
# output of an eager operation (which `jax_debug_nans` would flag).
@functools.partial(
    jax.jit, static_argnames=("reduced", "acc", "dtype", "use_running_average", "axis_name", "axis_index_groups")
)
def _mean_only(x, mask, ra_mean, bias, *, reduced, acc, dtype, use_running_average, axis_name, axis_index_groups):
  """Mean-only batch norm: ``y = x - mean (+ bias)`` and the batch mean (feature-shaped), in `acc`."""
  stats_shape = _validation.keepdims_shape(x.shape, reduced)
  xa = x.astype(acc)
  xa = _moments.masked_zero(xa, None if mask is None else mask | jnp.isfinite(xa))
  if use_running_average:
    y, mean = xa - ra_mean.astype(acc).reshape(stats_shape), ra_mean.astype(acc)
  else:
    stats = _moments.compute(
        xa, reduced, mask, centered=True, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    # Two subtractions: x - shift is exact for x near the mean, so the
    # output keeps float32 precision when |mean| >> spread.
    y = (xa - stats.shift) - stats.offset
    mean = stats.mean.reshape(ra_mean.shape)
  if bias is not None:
    y = y + bias.astype(acc).reshape(stats_shape)
  return y.astype(dtype), mean
