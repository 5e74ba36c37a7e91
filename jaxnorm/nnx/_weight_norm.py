"""`WeightNorm` (a drop-in for `flax.nnx.WeightNorm` that leaves the wrapped weights alone) and `MeanOnlyBatchNorm`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

import jaxnorm
from jaxnorm import _moments, _validation
from jaxnorm.nnx import _affine, _param_view
from jaxnorm.nnx._running_stats import TrainEvalSwitch, ema_update


class WeightNorm(nnx.Module):
  r"""Weight normalization of a wrapped layer's parameters, a drop-in for `flax.nnx.WeightNorm`.

  Each parameter `v` of `layer_instance` that `variable_filter` selects (by
  default those whose path contains ``'kernel'``) is replaced, when the
  layer runs, by

  .. math::
      w = g \, \frac{v}{\lVert v\rVert}, \qquad
      \lVert v\rVert = \sqrt{\textstyle\sum v^2 + \epsilon},

  the norm over every axis except `feature_axes` (`jaxnorm.weight_norm`, with
  its hand-derived VJP). The lengths `g` live in ``scales``, a dict keyed by
  the parameter's path in the layer (flax's layout, e.g.
  ``scales[('kernel',)]``), each shaped like `v` along `feature_axes` (``()``
  for ``feature_axes=None``) and created by `scale_init` in `param_dtype`.
  Constructor and call arguments, defaults and output dtypes are flax's.

  Differences from flax.nnx 0.12, both bugs there: the lengths are
  `nnx.Param` (flax stores raw arrays, which optimizers built with
  ``wrt=nnx.Param`` never train), and the wrapped layer's parameters are
  never overwritten (flax writes ``g v / ||v||`` into the layer's kernel on
  every call, so the stored `v` is lost and repeated calls renormalize a
  normalized weight). The layer runs on a read-only view of its parameters
  (see `jaxnorm.nnx._param_view`); its other state, e.g. an inner BatchNorm's
  statistics, is updated as usual. `normalized_params()` returns the
  weights as the layer sees them. `promote_dtype` is accepted for
  compatibility and, as in flax, not used.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> layer = jnnx.WeightNorm(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    >>> v = layer.layer_instance.kernel[...]
    >>> y = layer(jnp.ones((5, 8)))
    >>> bool((layer.layer_instance.kernel[...] == v).all())  # untouched
    True
    >>> w = layer.normalized_params()["kernel"][...]
    >>> np.allclose(np.linalg.norm(w, axis=0), 1.0)
    True
  """

  def __init__(
      self,
      layer_instance: nnx.Module,
      *,
      feature_axes: Axes | None = -1,
      use_scale: bool = True,
      scale_init: Initializer = initializers.ones,
      epsilon: float = 1e-12,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      variable_filter: Any = nnx.PathContains("kernel"),
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    self.layer_instance = layer_instance
    self.feature_axes = () if feature_axes is None else feature_axes
    self.use_scale = use_scale
    self.scale_init = scale_init
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
    self.promote_dtype = promote_dtype
    scales = {}
    for path, param in _param_view.param_paths(layer_instance):
      if self.variable_filter(path, param):
        axes = _validation.canonical_axes(self.feature_axes, param.ndim, "feature_axes")
        shape = tuple(param.shape[a] for a in axes)
        if use_scale:
          scales[path] = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
    self.scales = nnx.data(scales) if use_scale else None

  def __call__(self, x: jax.Array, *args, **kwargs) -> Any:
    """``layer_instance(x, *args, **kwargs)`` with the selected parameters weight-normalized."""
    return _param_view.call(self.layer_instance, self._normalize, x, *args, **kwargs)

  def normalized_params(self) -> nnx.State:
    """The wrapped layer's parameters as the layer sees them when called through this module."""
    return nnx.state(_param_view.view(self.layer_instance, self._normalize), nnx.Param)

  def _normalize(self, path: tuple, param: nnx.Param) -> jax.Array | None:
    if not self.variable_filter(path, param):
      return None
    v = param[...]
    axes = _validation.canonical_axes(self.feature_axes, v.ndim, "feature_axes")
    scale = None
    if self.use_scale:
      if path not in self.scales:
        raise RuntimeError(
            f"WeightNorm has no scale for the parameter {path} of the wrapped layer: its parameters "
            "must not change after the WeightNorm is constructed."
        )
      scale = self.scales[path][...]
    return jaxnorm.weight_norm(
        v, scale, feature_axes=axes, epsilon=self.epsilon, dtype=_affine.output_dtype(v, scale, dtype=self.dtype)
    )

  def init_from_data(self, x: jax.Array, *args, epsilon: float = 1e-10, **kwargs) -> jax.Array:
    r"""Data-dependent initialization (Salimans & Kingma, 2016) from the batch `x`; returns the new output.

    With :math:`t` the layer's output on `x` (per output feature, the
    statistics over every axis but the last), sets

    .. math::
        g \leftarrow \frac{g}{\sqrt{\mathrm{Var}[t] + \epsilon}}, \qquad
        b \leftarrow \frac{b - \mathrm{E}[t]}{\sqrt{\mathrm{Var}[t] + \epsilon}}

    so that the layer's outputs on `x` have zero mean and unit variance per
    feature (what `jaxnorm.linen.WeightNorm(data_init=True)` does at
    ``init``). Call it once, in order through a network, before training. It
    needs ``use_scale=True`` and exactly one normalized parameter with the
    layer's output features on its last axis (a Linear or Conv kernel with
    ``feature_axes=-1``); the layer's top-level ``bias`` parameter, if any, is
    set too (without one, only `g`: pair it with `MeanOnlyBatchNorm`).
    `epsilon` keeps a feature constant on `x` finite.
    """
    if not self.use_scale:
      raise ValueError("WeightNorm.init_from_data needs use_scale=True: it initializes the scale g.")
    if len(self.scales) != 1:
      raise ValueError(
          "WeightNorm.init_from_data needs exactly one normalized parameter (e.g. a Linear or Conv kernel), "
          f"got {sorted(self.scales)}; narrow `variable_filter`."
      )
    ((path, scale),) = self.scales.items()
    params = dict(_param_view.param_paths(self.layer_instance))
    y = _validation.floating_input(self(x, *args, **kwargs), "the wrapped layer's output")
    ndim = params[path].ndim
    last_axis = _validation.canonical_axes(self.feature_axes, ndim, "feature_axes") == (ndim - 1,)
    if y.ndim < 2 or not last_axis or scale.shape != (y.shape[-1],):
      raise ValueError(
          f"WeightNorm.init_from_data needs the normalized parameter {path} to have the layer's output "
          f"features on its last axis (feature_axes=-1), shaped like the last axis of the output; got "
          f"scale shape {scale.shape} and output shape {y.shape}."
      )
    bias = params.get(("bias",))
    if bias is not None and (bias.shape != scale.shape or path == ("bias",)):
      raise ValueError(
          "WeightNorm.init_from_data needs the wrapped layer's `bias` unnormalized and of shape "
          f"{scale.shape}, got shape {bias.shape}."
      )
    mean, var = jaxnorm.moments(y, tuple(range(y.ndim - 1)))
    rstd = jax.lax.rsqrt(var + _validation.positive_epsilon(epsilon))
    scale[...] = (scale[...].astype(rstd.dtype) * rstd).astype(scale[...].dtype)
    # Computed in the statistics' dtype, per-feature statistics broadcast
    # explicitly (clean under strict dtype and rank promotion).
    ya, mean_y, rstd_y = y.astype(rstd.dtype), _validation.to_rank(mean, y.ndim), _validation.to_rank(rstd, y.ndim)
    if bias is None:
      return (ya * rstd_y).astype(y.dtype)
    bias[...] = ((bias[...].astype(rstd.dtype) - mean) * rstd).astype(bias[...].dtype)
    return ((ya - mean_y) * rstd_y).astype(y.dtype)


class MeanOnlyBatchNorm(TrainEvalSwitch, nnx.Module):
  r"""Mean-only batch normalization (Salimans & Kingma, 2016), to pair with `WeightNorm`.

  Training (``use_running_average=False``):

  .. math::
      y = x - \mu_B + \beta, \qquad \bar\mu \leftarrow m \bar\mu + (1 - m) \mu_B

  with the batch mean :math:`\mu_B` over every axis but `axis` (over the
  positions `mask` selects, and across `axis_name`, exactly); inference uses
  the running mean :math:`\bar\mu`. Nothing is divided by a standard
  deviation: the scale comes from weight normalization's `g`. State: batch
  stat ``mean`` and param ``bias``, shaped ``(num_features,)``; conventions
  (``train()``/``eval()``, momentum 0.99, float32 statistics, output dtype)
  as `jaxnorm.nnx.BatchNorm`. Plain autodiff (the VJP of a mean subtraction,
  ``g - mean(g)``, is already minimal).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> x = jax.random.normal(jax.random.key(0), (16, 4)) + 3
    >>> y = jnnx.MeanOnlyBatchNorm(4, rngs=nnx.Rngs(0))(x)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-6))
    True
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float = 0.99,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    _validation.momentum(momentum)  # at construction too, so a bad value fails before training starts
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.bias = _affine.optional_param(use_bias, bias_init, (num_features,), param_dtype, rngs)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype

  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Subtracts the batch mean (training) or the running mean (inference) from `x` and adds the bias.

    Args:
      x: the input; the mean is taken over every axis but `axis`, whose shape
        must hold `num_features` elements.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the batch mean (all positions are shifted; masked-out NaN or inf
        are read as 0).

    Returns:
      `y`, shaped like `x`.
    """
    use_running_average = self._resolve_use_running_average(use_running_average)
    x = _validation.floating_input(x)
    feature_axes = _validation.canonical_axes(self.axis, x.ndim, "axis")
    reduced = tuple(a for a in range(x.ndim) if a not in feature_axes)
    if not reduced:
      raise ValueError(f"`axis`={self.axis!r} covers every axis of the input: there is no batch to average over.")
    _affine.feature_shape(x, feature_axes, self.num_features, "axis")
    stats_shape = _validation.keepdims_shape(x.shape, reduced)
    x, _, bias = _affine.promote(self, (x, self.mean[...], _affine.value(self.bias)), dtype=self.dtype)
    dtype = _affine.output_dtype(x, bias, dtype=self.dtype)
    acc = _validation.accumulation_dtype(x.dtype, *(() if bias is None else (bias.dtype,)))
    mask = _validation.broadcast_mask(mask, x.shape)
    xa = x.astype(acc)
    xa = _moments.masked_zero(xa, None if mask is None else mask | jnp.isfinite(xa))
    if use_running_average:
      y = xa - self.mean[...].astype(acc).reshape(stats_shape)
    else:
      stats = _moments.compute(
          xa,
          reduced,
          mask,
          centered=True,
          axis_name=_validation.axis_name(self.axis_name),
          axis_index_groups=_validation.axis_index_groups(self.axis_index_groups),
      )
      # Two subtractions: x - shift is exact for x near the mean, so the
      # output keeps float32 precision when |mean| >> spread.
      y = (xa - stats.shift) - stats.offset
      ema_update(self.mean, stats.mean, self.momentum)
    if bias is not None:
      y = y + bias.astype(acc).reshape(stats_shape)
    return y.astype(dtype)
