"""Running statistics and the train/eval switch shared by the batch-statistics modules.

`BatchNorm`, `BatchRenorm` and `GhostBatchNorm` hold flax.nnx's state
(``mean``/``var`` as `nnx.BatchStat`, float32, shaped ``(num_features,)``;
``scale``/``bias`` as `nnx.Param`), switch between batch and running
statistics through the ``use_running_average`` attribute that
``Module.train()``/``Module.eval()``/``nnx.view`` set, and update the running
statistics with flax's exponential moving average. This module holds all of
that once; each layer only says how it normalizes in training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import jaxnorm
from jaxnorm import _modulation, _moments, _validation
from jaxnorm.nnx import _affine


class TrainEvalSwitch:
  """The ``use_running_average`` attribute as flax.nnx uses it (a mixin for `nnx.Module` subclasses).

  ``model.train()`` sets it to False and ``model.eval()`` to True (both
  through `nnx.Module.set_attributes`); ``nnx.view(model,
  use_running_average=...)`` calls `set_view`; a value passed at call time
  takes precedence, as in flax.
  """

  use_running_average: bool | None

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view`` (and described by ``nnx.view_info``).

    Args:
      use_running_average: if True, normalize with the stored running
        statistics (inference); if False, with batch statistics, updating the
        running ones (training); None leaves the mode as it is.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def _resolve_use_running_average(self, use_running_average: bool | None) -> bool:
    """The call-time value if given, else the attribute; raises if both are None."""
    for candidate in (use_running_average, self.use_running_average):
      if candidate is not None:
        return bool(candidate)
    name = type(self).__name__
    raise ValueError(
        f"No `use_running_average` argument was provided to {name}: pass it to the constructor "
        f"({name}(..., use_running_average=True/False)), to the call (layer(x, use_running_average=...)), "
        "or switch the model with model.train() / model.eval()."
    )


def ema_update(variable: nnx.Variable, batch_value: jax.Array, momentum: float, seen: jax.Array | None = None) -> None:
  """flax's moving average ``ra = m ra + (1 - m) batch``, stored in the variable's own shape and dtype.

  Where `seen` (None, or a boolean array of the variable's size) is False,
  the feature had no valid value in the batch and keeps its value.

  The storage dtype never changes (float32 by default, whatever the input
  dtype), so a module's state keeps the same avals from step to step, which
  `nnx.jit` caching and `nnx.scan` carries need. The new value carries no
  gradient: it is state, not an output.
  """
  # Checked here, at every update, as linen's modules do: the attribute may be
  # reassigned after construction.
  momentum = _validation.momentum(momentum)
  old = variable[...]
  batch_value = batch_value.reshape(old.shape)
  if jnp.iscomplexobj(batch_value) and not jnp.iscomplexobj(old):
    # flax.nnx's state is real (created before any input is seen): like flax.nnx, keep the real part
    # of a complex input's mean, explicitly (flax casts, with a ComplexWarning).
    batch_value = jnp.real(batch_value)
  # In the promoted dtype, explicitly: a float64 batch meets float32 state under strict promotion too.
  dtype = _validation.promoted_dtype(old, batch_value)
  new = momentum * old.astype(dtype) + (1 - momentum) * batch_value.astype(dtype)
  if seen is not None:
    new = jnp.where(seen.reshape(old.shape), new, old.astype(dtype))
  variable[...] = lax.stop_gradient(new).astype(old.dtype)


def normalize_with(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    axes: tuple[int, ...],
    epsilon: float,
    dtype: Any,
) -> jax.Array:
  """Inference: `x` normalized with given (flat, float32) statistics, computed in at least float32, cast to `dtype`.

  `scale`/`bias` are in the feature shape, or of `x`'s rank (call-time
  modulation) and broadcast to it; the statistics are used in
  their storage dtype (flax.nnx first casts them to the compute dtype, which
  at ``dtype=bfloat16`` rounds the running variance to 8 bits).
  """
  shape = tuple(d if i in axes else 1 for i, d in enumerate(x.shape))

  def broadcast(a):  # a call-time (modulated) parameter already has the rank of x
    return a if a is None or a.ndim == x.ndim else a.reshape(shape)

  compute = _validation.promoted_dtype(x.dtype, dtype)
  y = jaxnorm.normalize(
      x.astype(compute), broadcast(mean), broadcast(var), broadcast(scale), broadcast(bias), epsilon=epsilon
  )
  return y.astype(dtype)


class BatchStatistics(TrainEvalSwitch, nnx.Module):
  """The state and call-time plumbing of the batch-norm family (see the module docstring).

  Subclasses call `_init_batch_statistics` from their own `__init__` (which
  spells out flax's signature) and implement `_train`, the normalization
  with batch statistics; `__call__` does the rest.
  """

  def _init_batch_statistics(
      self,
      num_features,
      *,
      use_running_average,
      axis,
      momentum,
      epsilon,
      dtype,
      param_dtype,
      use_bias,
      use_scale,
      bias_init,
      scale_init,
      axis_name,
      axis_index_groups,
      promote_dtype,
      rngs,
      bias_metadata,
      scale_metadata,
  ) -> None:
    _validation.momentum(momentum)  # at construction too, so a bad value fails before training starts
    # Creation order (statistics, scale key, bias key) is flax.nnx.BatchNorm's.
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale = _affine.optional_param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
    self.bias = _affine.optional_param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype

  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Normalizes `x` with batch statistics (training) or the running statistics (inference).

    Args:
      x: the input; statistics are taken over every axis but `axis`, whose
        shape must hold `num_features` elements.
      use_running_average: overrides the attribute of the same name.
      mask: optional boolean array broadcastable to `x`: the positions that
        enter the batch statistics.

    Returns:
      The normalized input, shaped like `x`.
    """
    return self._normalize(x, use_running_average, mask, (None, None))

  def _normalize(self, x, use_running_average, mask, modulation) -> jax.Array:
    """`__call__`, with a call-time ``(scale, shift)`` modulation (see `jaxnorm._modulation`) or ``(None, None)``."""
    use_running_average = self._resolve_use_running_average(use_running_average)
    x = _validation.floating_input(x, allow_complex=True)
    mask = _validation.boolean_mask(mask, "mask", x.shape)
    axes = _validation.canonical_axes(self.axis, x.ndim, "axis")
    shape = _affine.feature_shape(x, axes, self.num_features, "axis")
    # flax.nnx's promotion: the input, the statistics, the parameters and the modulation together.
    x, _, _, scale, bias, *modulation = _affine.promote(
        self,
        (x, self.mean[...], self.var[...], _affine.value(self.scale), _affine.value(self.bias),
         *_modulation.arrays(*modulation)),
        dtype=self.dtype,
    )
    dtype = _affine.output_dtype(x, scale, bias, *modulation, dtype=self.dtype)
    scale, bias, _ = _modulation.fold(
        x.shape, axes, _affine.as_features(scale, shape), _affine.as_features(bias, shape), 0.0, *modulation
    )
    if use_running_average:
      return normalize_with(
          x, self.mean[...], self.var[...], scale, bias, axes=axes, epsilon=self.epsilon, dtype=dtype
      )
    y, mean, var = self._train(x, scale, bias, axes=axes, mask=mask, dtype=dtype)
    # A feature with no valid value keeps its running statistics (its batch
    # statistics are 0 and say nothing about the data).
    seen = _moments.any_valid(mask, x.shape, axes, self.axis_name, self.axis_index_groups)
    ema_update(self.mean, mean, self.momentum, seen)
    ema_update(self.var, var, self.momentum, seen)
    return y

  def _train(self, x, scale, bias, *, axes, mask, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns `(y, batch_mean, batch_var)`, the statistics shaped like the feature axes."""
    raise NotImplementedError
