r"""Running statistics shared by the batch-statistics modules (BatchNorm, BatchRenorm, GhostBatchNorm).

One place declares them (flax's names in ``batch_stats``), checks the state
they need, counts the values behind a batch statistic, updates them in the
flax or the PyTorch convention, and normalizes with them at inference.

The conventions, selected by a module's `convention` attribute:

* ``"flax"`` (the default): ``ra = m ra + (1 - m) batch`` with the *biased*
  batch variance; `momentum` :math:`m` (default 0.99) is the weight of the old
  value. Variables ``mean``, ``var``: flax's tree, so flax checkpoints load.
* ``"torch"``: ``ra = (1 - m) ra + m batch`` with the *unbiased* batch
  variance ``var_B n / (n - 1)``, `n` the number of valid values per feature
  (summed over the devices of `axis_name`); `momentum` :math:`m` (default
  0.1) is the weight of the new batch, and ``momentum=None`` is a cumulative
  average, ``m = 1 / k`` at the k-th training step. Variables ``mean``,
  ``var`` and the int32 counter ``num_batches_tracked`` (torch's
  ``running_mean``, ``running_var``, ``num_batches_tracked``).

With ``track_running_stats=False`` (torch's name) there are no running
statistics and no ``batch_stats`` variables at all: batch statistics are used
in training and at inference.
"""

from __future__ import annotations

import math
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxnorm
from jaxnorm import _validation

CONVENTIONS = ("flax", "torch")
_MOMENTUM_DEFAULTS = {"flax": 0.99, "torch": 0.1}


class _ConventionDefault(float):
  """The value of an unset `momentum`: 0.99 (flax's default), read as 0.1 (torch's) under ``convention="torch"``.

  A float equal to 0.99, so that ``BatchNorm().momentum == 0.99`` as in flax,
  but of its own type, so that an explicit ``momentum=0.99`` stays 0.99 under
  either convention.
  """

  def __repr__(self) -> str:
    return float.__repr__(self)


DEFAULT_MOMENTUM = _ConventionDefault(_MOMENTUM_DEFAULTS["flax"])


def _init_without_flax_link(error: Exception, message: str) -> None:
  # flax.errors.FlaxError.__init__ appends a link to flax's error page for the
  # class, which does not exist for jaxnorm's classes: the message says it all.
  Exception.__init__(error, message)


def _reduce_without_flax_link(error: Exception):
  # FlaxError.__reduce__ would unpickle as a plain FlaxError, adding the link.
  return (type(error), (str(error),))


class ImmutableBatchStatsError(flax.errors.ModifyScopeVariableError):
  """A training step needs to update the running statistics, but ``batch_stats`` is immutable.

  A subclass of flax's error for the same situation, so that code catching
  that one keeps working; the message says what to pass instead.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> bn = jnn.BatchNorm(use_running_average=False)
    >>> variables = bn.init(jax.random.key(0), jnp.ones((4, 2)))
    >>> try:
    ...   bn.apply(variables, jnp.ones((4, 2)))
    ... except jnn.ImmutableBatchStatsError as e:
    ...   print('mutable=["batch_stats"]' in str(e))
    True
  """

  def __init__(self, message: str):  # pylint: disable=super-init-not-called
    _init_without_flax_link(self, message)

  def __reduce__(self):
    return _reduce_without_flax_link(self)


class MissingBatchStatsError(flax.errors.ScopeCollectionNotFound):
  """The running statistics are read, but the variables hold no ``batch_stats`` (a subclass of flax's error).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> bn = jnn.BatchNorm(use_running_average=True)
    >>> variables = bn.init(jax.random.key(0), jnp.ones((4, 2)))
    >>> try:
    ...   bn.apply({"params": variables["params"]}, jnp.ones((4, 2)))
    ... except jnn.MissingBatchStatsError as e:
    ...   print("batch_stats" in str(e))
    True
  """

  def __init__(self, message: str):  # pylint: disable=super-init-not-called
    _init_without_flax_link(self, message)

  def __reduce__(self):
    return _reduce_without_flax_link(self)


def stats_dtype(x_dtype: Any, dtype: Any) -> np.dtype:
  """The dtype of batch and running statistics, flax's rule: the module's `dtype` (else `x`'s), at least float32."""
  return _validation.accumulation_dtype(x_dtype if dtype is None else dtype)


class RunningStatistics:
  """The running statistics of one module call, in the module's `convention`.

  Reads from the module: `momentum`, `convention` (default ``"flax"``),
  `track_running_stats` (default True), `axis_name`, `axis_index_groups`.

  Variables (collection ``batch_stats``, created only when tracking):
  ``mean`` and ``var`` shaped like the features, plus ``num_batches_tracked``
  (int32 scalar) under ``convention="torch"``. They are stored in
  `stats_dtype`: float32 for 16- and 32-bit models, so running statistics
  never degrade to 16 bits; float64 only when float64 is asked for (a float64
  input, or ``dtype=float64``, with ``jax_enable_x64``). flax stores float32
  at init and its first update promotes the statistics to float64 in those
  cases (its first update scales the float32 initial values in float32, so
  it agrees with ours to float32 resolution). Starting in float64 keeps the
  statistics float64-exact and the dtype of ``batch_stats`` unchanged between
  steps, which `jax.lax.scan` carries, jit caches and donated buffers need.

  Example (inside a module's compact ``__call__``)::

      running = RunningStatistics(self, feature_shape, stats_dtype(x.dtype, self.dtype))
      if use_running_average and running.tracking:
        return running.normalize(x, feature_axes, scale, bias, epsilon=self.epsilon, dtype=dtype)
      count = running.training_count(x.shape, reduced_axes, mask)
      y, mean, var = jaxnorm.batch_norm(...)
      running.update(mean, var, count)
  """

  def __init__(self, module: nn.Module, feature_shape: tuple[int, ...], dtype: Any = jnp.float32):
    self.module = module
    self.convention = _convention(module)
    self.momentum = _momentum(module, self.convention)
    self.tracking = _track_running_stats(module)
    self.dtype = np.dtype(dtype)
    self.mean = self.var = self.num_batches_tracked = None
    if not self.tracking:
      return
    self._check_state()
    self.mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, self.dtype), feature_shape)
    # The variance is real also for complex inputs (flax's `mean(|x - mean|^2)`); the mean of a
    # complex input is complex from init on (flax's turns complex at its first update).
    self.var = module.variable(
        "batch_stats", "var", lambda s: jnp.ones(s, _validation.real_dtype(self.dtype)), feature_shape
    )
    if self.convention == "torch":
      self.num_batches_tracked = module.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
    # Loaded statistics (a checkpoint of another width) would otherwise be
    # reshaped or broadcast at inference into a wrong answer, or fail deep in XLA.
    for name, var, shape in (("mean", self.mean, feature_shape), ("var", self.var, feature_shape),
                             ("num_batches_tracked", self.num_batches_tracked, ())):
      if var is not None:
        _validation.state_shape(var.value, shape, f"batch_stats/{name}", self._name())

  def _name(self) -> str:
    path = "/".join(str(p) for p in (self.module.scope.path if self.module.scope else ()))
    return f'{type(self.module).__name__} "/{path}"'

  def _check_state(self) -> None:
    """Running statistics are read: the variables must hold them (or be creatable)."""
    module = self.module
    if module.is_mutable_collection("batch_stats") or module.has_variable("batch_stats", "mean"):
      return
    raise MissingBatchStatsError(
        f"{self._name()} reads its running statistics, but the variables passed to `apply` have no "
        '"batch_stats" collection. Pass every collection `init` returned, e.g. '
        '`model.apply({"params": params, "batch_stats": batch_stats}, x, ...)`, not only "params" '
        '(in training mode also with `mutable=["batch_stats"]`).'
    )

  def _devices(self) -> int:
    """How many devices of `axis_name` (or of its group) contribute to a batch statistic; 1 without one.

    Raises a clear error when `axis_name` is not bound by an enclosing mapped
    transformation, instead of JAX's bare "unbound axis name".
    """
    axis_name = self.module.axis_name
    if axis_name is None or self.module.is_initializing():
      return 1
    try:
      # psum of a Python constant is static: the axis size, and no collective.
      devices = lax.psum(1, axis_name)
    except NameError as e:
      raise NameError(
          f"{self._name()} has `axis_name`={axis_name!r}, but no enclosing mapped transformation binds that "
          f"axis ({e}). `axis_name` merges batch statistics across the devices of a mapped axis, so call the "
          f"model inside `jax.shard_map`, `jax.pmap` or `jax.vmap` with axis_name={axis_name!r}, or drop "
          "`axis_name` (under `jax.jit` with sharded arrays the statistics are already global). "
          "(`init` ignores `axis_name`, as in flax; `apply` in training mode does not.)"
      ) from e
    groups = self.module.axis_index_groups
    return len(groups[0]) if groups is not None else devices

  def training_count(
      self, shape: tuple[int, ...], reduced_axes: tuple[int, ...], mask: jax.Array | None
  ) -> int | jax.Array | None:
    """Checks a training batch and counts the values behind each batch statistic.

    `shape` and `reduced_axes` describe the view the statistics are taken
    over (for ghost batch norm, the grouped view with the virtual-batch axis
    kept); `mask` is None or broadcastable to `shape`.

    Returns the number of valid values per statistic, summed over devices,
    when the update needs it: with a mask (an array shaped like the
    statistics: a feature without any valid value keeps its running
    statistics), under ``convention="torch"`` (a Python int without a
    mask), and for an empty batch (0: the running statistics stay). Returns
    None when it is not needed.

    Raises:
      ValueError: in training outside `init`, when every feature has a single
        value (e.g. a batch of one example of shape ``(1, C)``): the batch
        variance is 0, the output collapses to the bias, and no gradient
        reaches the layers below. Raised like PyTorch does, instead of
        returning that silently.
      NameError: if `axis_name` is not bound (see `_devices`).
    """
    if self.module.is_initializing():
      return None
    devices = self._devices()
    static = math.prod(shape[a] for a in reduced_axes) * devices
    # Without a reduced axis and without `axis_name` the op itself raises, naming `feature_axes`.
    if mask is None and (reduced_axes or self.module.axis_name is not None):
      _validation.more_than_one_value(
          tuple(shape), tuple(reduced_axes), self.module.axis_name, self.module.axis_index_groups, self._name()
      )
    if not self.tracking or (mask is None and static and self.convention != "torch"):
      return None
    if mask is None:
      return static
    mask = _validation.broadcast_mask(mask, tuple(shape), "mask")
    count = jnp.sum(mask, reduced_axes, dtype=jnp.int32)
    if self.module.axis_name is not None:
      count = lax.psum(count, self.module.axis_name, axis_index_groups=self.module.axis_index_groups)
    return count

  def update(self, batch_mean: jax.Array, batch_var: jax.Array, count: int | jax.Array | None = None) -> None:
    """Moves the running statistics towards a batch's; skipped while initializing and when not tracking.

    `batch_mean` and `batch_var` (biased) are shaped like the features, or
    carry leading group axes (ghost batch norm's virtual batches) over which
    they are averaged, after each group's unbiased correction under
    ``convention="torch"``. `count` is what `training_count` returned.

    A statistic with no valid value (count 0: every value of that feature, or
    of that virtual batch, masked out) has batch mean and variance 0, which
    say nothing about the data: it is left out of the average over groups,
    and a feature with no valid value in any group keeps its running mean
    and variance (flax would pull them towards 0).
    """
    if not self.tracking or self.module.is_initializing():
      return
    if isinstance(count, int) and count == 0:
      return  # an empty batch says nothing about the data
    if not self.module.is_mutable_collection("batch_stats"):
      raise ImmutableBatchStatsError(
          f"{self._name()} is in training mode (use_running_average=False) and updates its running statistics, "
          'but the "batch_stats" collection is immutable. Make it mutable and keep the updates: '
          '`y, updates = model.apply(variables, x, mutable=["batch_stats"])`, then '
          "`variables = {**variables, **updates}`; or, for inference, use `use_running_average=True`."
      )
    # The update is computed as flax computes it, the old value's term in the
    # stored dtype (a checkpoint's may be float32 under a float64 model, as
    # flax creates it), then promoted with the batch's: explicitly, so that
    # strict dtype promotion has nothing implicit to refuse.
    mean_dtype = _validation.promoted_dtype(self.mean.value, np.zeros((), self.dtype))
    var_dtype = _validation.real_dtype(_validation.promoted_dtype(self.var.value, np.zeros((), self.dtype)))
    batch_mean, batch_var = batch_mean.astype(mean_dtype), batch_var.astype(var_dtype)
    group_axes = tuple(range(batch_mean.ndim - self.mean.value.ndim))
    valid = None if isinstance(count, int) or count is None else jnp.asarray(count) > 0
    if self.convention == "torch":
      # PyTorch: the running variance is the unbiased one, n / (n - 1); a group
      # with at most one valid value has variance 0 and stays 0.
      if isinstance(count, int):
        batch_var = batch_var * (count / (count - 1))
      else:
        count = jnp.asarray(count, var_dtype)
        batch_var = batch_var * (count / jnp.maximum(count - 1, 1))
      steps = self.num_batches_tracked.value + 1
      # `momentum` weighs the new batch; None is the cumulative average: the k-th batch weighs 1 / k.
      m = 1 / steps.astype(var_dtype) if self.momentum is None else self.momentum
      w_old, w_new = 1 - m, m
      self.num_batches_tracked.value = steps
    else:
      w_old, w_new = self.momentum, 1 - self.momentum
    for variable, batch in ((self.mean, batch_mean), (self.var, batch_var)):
      old = variable.value
      moved = (_weight(w_old, old.dtype) * old).astype(batch.dtype) + _weight(w_new, batch.dtype) * _group_mean(
          batch, group_axes, valid
      )
      variable.value = _keep_unseen(moved, old.astype(batch.dtype), valid, group_axes)

  def normalize(
      self,
      x: jax.Array,
      feature_axes: tuple[int, ...],
      scale: jax.Array | None,
      bias: jax.Array | None,
      *,
      epsilon: float,
      dtype: Any,
  ) -> jax.Array:
    """Inference: normalizes `x` with the running statistics, in flax's promoted dtype, cast once to `dtype`.

    `scale` and `bias` are shaped like the feature axes, or (call-time
    modulation) arrays of `x`'s rank that broadcast to it.
    """
    shape = tuple(d if i in feature_axes else 1 for i, d in enumerate(x.shape))

    def broadcast(a):
      return a if a is None or a.ndim == x.ndim else a.reshape(shape)

    compute = _validation.promoted_dtype(x.dtype, dtype)
    y = jaxnorm.normalize(
        x.astype(compute),
        broadcast(self.mean.value),
        broadcast(self.var.value),
        broadcast(scale),
        broadcast(bias),
        epsilon=epsilon,
    )
    return y.astype(dtype)


def _weight(w: float | jax.Array, dtype: Any) -> float | jax.Array:
  """A Python weight as it is (weakly typed); an array weight cast to `dtype`."""
  return w if isinstance(w, (int, float)) else jnp.asarray(w).astype(dtype)


def _group_mean(a: jax.Array, group_axes: tuple[int, ...], valid: jax.Array | None = None) -> jax.Array:
  """The mean of `a` over `group_axes`, over the groups where `valid` (shaped like `a`) only."""
  if not group_axes:
    return a
  if valid is None:
    return a.mean(group_axes)
  total = jnp.sum(jnp.where(valid, a, jnp.zeros((), a.dtype)), group_axes)
  return total / jnp.maximum(jnp.sum(valid, group_axes), 1).astype(a.dtype)


def _keep_unseen(new: jax.Array, old: jax.Array, valid: jax.Array | None, group_axes: tuple[int, ...]) -> jax.Array:
  """`new`, except where a feature had no valid value (in any group): there `old`."""
  if valid is None:
    return new
  seen = jnp.any(valid, group_axes) if group_axes else valid
  return jnp.where(seen, new, old)


def _convention(module: nn.Module) -> str:
  convention = getattr(module, "convention", "flax")
  if convention not in CONVENTIONS:
    raise ValueError(
        f"`convention` must be one of {CONVENTIONS} (how running statistics are updated), got {convention!r}."
    )
  return convention


def _track_running_stats(module: nn.Module) -> bool:
  track = getattr(module, "track_running_stats", True)
  if not isinstance(track, (bool, np.bool_)):
    raise TypeError(f"`track_running_stats` must be a bool, got {track!r}.")
  return bool(track)


def _momentum(module: nn.Module, convention: str) -> float | None:
  """The momentum in the convention's meaning (a plain float), or None for torch's cumulative average."""
  m = module.momentum
  if m is None:
    if convention != "torch":
      raise ValueError(
          '`momentum`=None (a cumulative average of the batch statistics) exists only under convention="torch"; '
          'under convention="flax" momentum is the weight of the old running value, e.g. 0.99.'
      )
    return None
  if isinstance(m, _ConventionDefault):
    return _MOMENTUM_DEFAULTS[convention]
  return _validation.momentum(m)
