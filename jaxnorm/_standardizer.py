r"""Streaming feature standardization: scikit-learn's `StandardScaler` as an immutable JAX pytree.

Statistics of the training data are accumulated batch by batch and reused,
unchanged, on any later data (validation, inference). The running state per
feature is `(count, mean, M2)`, ``M2 = sum (x - mean)^2``; a new batch's
moments come from `_moments.compute` (two passes, stable) and are folded in
with Chan's merge, which is exact for any split of the data into batches:

.. math::
    n = n_A + n_B, \quad \delta = \mu_B - \mu_A, \quad
    \mu = \mu_A + \delta \tfrac{n_B}{n}, \quad
    M_2 = M_{2,A} + M_{2,B} + \delta^2 \tfrac{n_A n_B}{n} .

The mean is kept in two words, `mean` plus `mean_residual` (the part of the
running mean that rounding `mean` to the state's dtype lost). A plain float32
running mean stops moving once the updates ``delta * n_B / n`` fall below half
an ulp of the mean: at a mean of 1e4 that is 5e-4, reached after about 2e3
batches per unit of drift, after which a shift of the data is silently
ignored. The residual keeps those updates, and centering as
``(x - mean) - mean_residual`` keeps float32 precision at large offsets, as
`_moments.Moments` does for batch statistics.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _moments, _validation


class StandardizerState(NamedTuple):
  """The fitted statistics of a `Standardizer`, every field shaped like the features.

  A NamedTuple of arrays, so it checkpoints as is (`flax.serialization`,
  orbax) and travels through `jit`, `lax.scan` and `vmap`.

  Attributes:
    count: int32, the number of valid (not NaN, not masked-out) samples seen.
    mean: the running mean, rounded to the state's dtype.
    mean_residual: exact running mean minus `mean` (at most half an ulp of `mean`).
    m2: the sum of squared deviations from the mean; the variance is ``m2 / count``.
  """

  count: jax.Array
  mean: jax.Array
  mean_residual: jax.Array
  m2: jax.Array


def chan_merge(a: StandardizerState, b: StandardizerState) -> StandardizerState:
  r"""Chan's merge of two partial `(count, mean, M2)` summaries; associative and exact for unequal counts.

  .. math::
      n = n_A + n_B, \quad \delta = \mu_B - \mu_A, \quad
      \mu = \mu_A + \delta \tfrac{n_B}{n}, \quad
      M_2 = M_{2,A} + M_{2,B} + \delta^2 \tfrac{n_A n_B}{n}

  Means are two-word (`mean + mean_residual`); the result is renormalized so
  that `mean` is the rounded mean. A side with count 0 contributes nothing
  (its mean is ignored). Both sides must share shape and dtype.
  """
  dtype = a.mean.dtype
  n = a.count + b.count
  n_a, n_b = a.count.astype(dtype), b.count.astype(dtype)
  # Counts are converted to floats one at a time: n_a * n_b could overflow int32.
  w = n_b / jnp.maximum(n_a + n_b, 1)
  # High words first: for means of the same magnitude that difference is exact.
  delta = (b.mean - a.mean) + (b.mean_residual - a.mean_residual)
  mean, residual = _two_sum(a.mean, a.mean_residual + delta * w)
  m2 = a.m2 + b.m2 + jnp.square(delta) * (n_a * w)
  # With an empty `a`, `mean + delta` would round away b's residual: take b as is.
  empty = a.count == 0
  return StandardizerState(
      n,
      jnp.where(empty, b.mean, mean),
      jnp.where(empty, b.mean_residual, residual),
      jnp.where(empty, b.m2, m2),
  )


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Knuth's TwoSum: `s = fl(a + b)` and the rounding error `e`, with `a + b == s + e` exactly."""
  s = a + b
  b_virtual = s - a
  return s, (a - (s - b_virtual)) + (b - b_virtual)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Standardizer:
  r"""Standardizes features with statistics of the training data, like scikit-learn's `StandardScaler`.

  .. math::
      y = \frac{x - \mu}{s}, \qquad
      s = \begin{cases} \sqrt{\sigma^2} & \sigma^2 > (\varepsilon\,\mu)^2 \\
                        1 & \text{otherwise (a constant feature)} \end{cases}

  with the mean :math:`\mu` and biased variance :math:`\sigma^2` of every
  feature over all samples passed to `fit`/`partial_fit`, and
  :math:`\varepsilon` the machine epsilon of the state's dtype. As in
  scikit-learn, a constant feature (a spread within rounding of its mean) is
  centered but not scaled; `with_mean=False` drops :math:`\mu` from the
  transform, `with_std=False` drops :math:`s` (the statistics are computed
  either way). Features are the last axis by default: `axis` names the
  reduced (sample) axes, so `axis=0` on `(N, H, W, C)` data keeps statistics
  per pixel and channel, and the default reduces `(N, T, C)` over `N` and `T`.

  The object is immutable and a pytree: `fit` and `partial_fit` return a new
  `Standardizer`, and every method can be `jax.jit`-ed (as a function of the
  `Standardizer` and the data) or run inside `lax.scan`. The configuration is
  static; `state` (a `StandardizerState` NamedTuple, None before fitting)
  holds the arrays: checkpoint it with `flax.serialization.to_bytes(s.state)`
  and restore with `from_bytes(Standardizer(...).empty(shape).state, data)`,
  or save the whole `Standardizer` with orbax (restoring needs a target
  of the same configuration). Batches are merged with Chan's
  formula, so any split of the data gives the same statistics (up to
  rounding), and the statistics are accumulated in at least float32 with a
  two-word mean (see the module docstring), so float32 data with a mean
  1e4 times its spread is standardized to float32 precision.

  Missing values: NaN entries are ignored by `fit`/`partial_fit` (as in
  scikit-learn) and stay NaN in `transform`; `where=False` masks out any
  other entry, whatever it holds. A feature with no valid sample has count 0,
  mean 0 and scale 1. An inf that is not masked out makes that feature's
  statistics inf/NaN (scikit-learn rejects such input; under `jit` no error
  can be raised).

  Correspondence with scikit-learn: `mean` is `mean_`, `var` is `var_`,
  `scale` is `scale_` (returned even with `with_std=False`), `count` is
  `n_samples_seen_` (always per feature). `count` is int32 and so exact up to
  2**31 - 1 samples per feature.

  Shapes: with reduced axes `A`, data `x` of rank `r` has the features
  ``x.shape`` without the axes in `A`; every statistic has that shape, and
  `transform` accepts any `x` of rank `r` with the same feature shape (the
  sample axes may have any length).

  Args:
    axis: the reduced (sample) axis or axes; None (default) means every axis
      but the last.
    with_mean: subtract the mean in `transform` (and add it back in `inverse_transform`).
    with_std: divide by the scale in `transform` (and multiply in `inverse_transform`).
    state: the fitted statistics, or None.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[1., 10.], [3., 10.], [1., 10.], [3., 10.]])
    >>> scaler = jaxnorm.Standardizer().fit(x[:1]).partial_fit(x[1:])  # same as .fit(x)
    >>> scaler.mean, scaler.var, scaler.scale  # the constant feature keeps scale 1
    (Array([ 2., 10.], dtype=float32), Array([1., 0.], dtype=float32), Array([1., 1.], dtype=float32))
    >>> jax.jit(jaxnorm.Standardizer.transform)(scaler, jnp.array([[6., 11.]]))
    Array([[4., 1.]], dtype=float32)
    >>> # Streaming under jit: start from an empty state of fixed shape and dtype.
    >>> step = lambda s, batch: (s.partial_fit(batch), None)
    >>> scaler, _ = jax.lax.scan(step, jaxnorm.Standardizer().empty(2), x.reshape(2, 2, 2))
    >>> scaler.count, scaler.mean
    (Array([4, 4], dtype=int32), Array([ 2., 10.], dtype=float32))
  """

  axis: int | tuple[int, ...] | None = None
  with_mean: bool = True
  with_std: bool = True
  state: StandardizerState | None = None

  State: ClassVar[type] = StandardizerState

  def __post_init__(self):
    for name in ("with_mean", "with_std"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
      object.__setattr__(self, name, bool(getattr(self, name)))
    # The axis is static (pytree metadata), so it must be hashable: lists become tuples.
    axis = self.axis
    if axis is not None:
      try:
        axis = operator.index(axis) if not isinstance(axis, Sequence) else tuple(operator.index(a) for a in axis)
      except TypeError:
        raise TypeError(f"`axis` must be None, an int or a tuple of ints, got {self.axis!r}.") from None
      object.__setattr__(self, "axis", axis)

  # -- fitting ----------------------------------------------------------------------------------

  def empty(self, feature_shape: int | Sequence[int], dtype: Any = jnp.float32) -> Standardizer:
    """This configuration with zero statistics (count 0) of the given feature shape and dtype.

    Use it as the initial carry of `lax.scan` or as the template to restore
    a checkpointed `state` into; `partial_fit` on it equals `fit`.

    Args:
      feature_shape: the shape of the features, e.g. `(C,)` or `C` for the
        default `axis`; `(H, W, C)` for `axis=0` on `(N, H, W, C)` data.
      dtype: the floating dtype of the statistics (at least float32 is advised).
    """
    shape = (feature_shape,) if not isinstance(feature_shape, Sequence) else tuple(feature_shape)
    try:
      shape = tuple(operator.index(d) for d in shape)
    except TypeError:
      raise TypeError(f"`feature_shape` must be an int or a tuple of ints, got {feature_shape!r}.") from None
    if any(d < 0 for d in shape):
      raise ValueError(f"`feature_shape` must not be negative, got {feature_shape!r}.")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype}.")
    if self.axis is None and len(shape) != 1:
      raise ValueError(
          f"`feature_shape`={feature_shape!r}: with `axis=None` the features are the last axis, "
          "so `feature_shape` must have exactly one dimension."
      )
    if self.axis is not None:
      # Checks that `axis` fits the rank implied by the feature shape.
      n_reduced = 1 if isinstance(self.axis, int) else len(self.axis)
      _validation.canonical_axes(self.axis, len(shape) + n_reduced, "axis")
    zero = jnp.zeros(shape, dtype)
    return dataclasses.replace(self, state=StandardizerState(jnp.zeros(shape, jnp.int32), zero, zero, zero))

  def fit(self, x: jax.Array, *, where: jax.Array | None = None) -> Standardizer:
    """A new `Standardizer` with the statistics of `x` alone (previous statistics are discarded).

    Args:
      x: floating-point samples, e.g. `(N, C)`.
      where: optional boolean mask broadcastable to `x`; only True entries
        (that are not NaN) enter the statistics.

    Returns:
      A fitted `Standardizer`; its statistics are in the accumulation dtype
      of `x` (at least float32).
    """
    return dataclasses.replace(self, state=None).partial_fit(x, where=where)

  def partial_fit(self, x: jax.Array, *, where: jax.Array | None = None) -> Standardizer:
    """A new `Standardizer` whose statistics also cover the batch `x` (Chan's merge).

    An unfitted `Standardizer` starts from zero statistics in the accumulation
    dtype of `x`; a fitted one keeps its state's dtype, so that the state's
    shapes and dtypes never change (a valid `lax.scan` carry).

    Args:
      x: floating-point batch with the feature shape of the state (the sample
        axes may have any length).
      where: optional boolean mask broadcastable to `x`; only True entries
        (that are not NaN) enter the statistics.
    """
    x = _validation.floating_input(x)
    axes = self._reduced_axes(x.ndim)
    features = _feature_shape(x.shape, axes)
    state = self.state if self.state is not None else self._zeros(features, x.dtype)
    self._check_features(features, state, "x")
    mask = _validation.broadcast_mask(where, x.shape)
    # NaN is "missing" (scikit-learn's convention): it never enters the statistics.
    valid = ~jnp.isnan(x) if mask is None else mask & ~jnp.isnan(x)
    dtype = jnp.dtype(state.mean.dtype)
    acc = _validation.accumulation_dtype(x.dtype, dtype)
    m = _moments.compute_program(x, valid, axes=axes, centered=True, dtype=acc)
    mean, residual = _two_sum(m.shift, m.offset)
    mean_state = mean.astype(dtype)
    # Whatever rounding `mean` to the state's dtype loses goes into the residual.
    residual_state = ((mean - mean_state.astype(acc)) + residual).astype(dtype)
    batch = StandardizerState(
        # Counted in int32, not taken from m.count: a float32 count is exact only up to 2**24.
        count=jnp.sum(valid, axes, dtype=jnp.int32),
        mean=mean_state.reshape(features),
        mean_residual=residual_state.reshape(features),
        m2=(m.var * m.count).astype(dtype).reshape(features),
    )
    state = StandardizerState(*(jnp.asarray(s) for s in state))
    return dataclasses.replace(self, state=chan_merge(state, batch))

  # -- applying ---------------------------------------------------------------------------------

  def transform(self, x: jax.Array) -> jax.Array:
    """Standardizes `x`: ``(x - mean) / scale`` per feature; shaped like `x`, in `x.dtype`.

    Statistics broadcast along the sample axes, which may have any length.
    NaN stays NaN.
    """
    x, axes, state = self._prepare(x, "x")
    acc = _validation.accumulation_dtype(x.dtype, state.mean.dtype)
    shape = _validation.keepdims_shape(x.shape, axes)
    y = x.astype(acc)
    if self.with_mean:
      # Two subtractions: x - mean is exact for x near the mean, the residual is small.
      y = (y - state.mean.astype(acc).reshape(shape)) - state.mean_residual.astype(acc).reshape(shape)
    if self.with_std:
      y = y / self.scale.astype(acc).reshape(shape)
    return y.astype(x.dtype)

  def inverse_transform(self, y: jax.Array) -> jax.Array:
    """Undoes `transform`: ``y * scale + mean`` per feature; shaped like `y`, in `y.dtype`."""
    y, axes, state = self._prepare(y, "y")
    acc = _validation.accumulation_dtype(y.dtype, state.mean.dtype)
    shape = _validation.keepdims_shape(y.shape, axes)
    x = y.astype(acc)
    if self.with_std:
      x = x * self.scale.astype(acc).reshape(shape)
    if self.with_mean:
      x = (x + state.mean_residual.astype(acc).reshape(shape)) + state.mean.astype(acc).reshape(shape)
    return x.astype(y.dtype)

  # -- statistics -------------------------------------------------------------------------------

  @property
  def count(self) -> jax.Array:
    """Valid samples seen per feature (scikit-learn's `n_samples_seen_`), int32."""
    return jnp.asarray(self._fitted_state().count)

  @property
  def mean(self) -> jax.Array:
    """Mean per feature (scikit-learn's `mean_`), in the state's dtype."""
    return jnp.asarray(self._fitted_state().mean)

  @property
  def var(self) -> jax.Array:
    """Biased variance per feature (scikit-learn's `var_`): ``m2 / count``, 0 for a feature never seen."""
    state = self._fitted_state()
    m2 = jnp.asarray(state.m2)
    return m2 / jnp.maximum(state.count, 1).astype(m2.dtype)

  @property
  def scale(self) -> jax.Array:
    r"""Divisor per feature (scikit-learn's `scale_`): ``sqrt(var)``, 1 for constant features.

    A feature counts as constant when :math:`\sigma^2 \le (\varepsilon \mu)^2`,
    i.e. its spread is within the rounding of its mean in the state's dtype.
    (scikit-learn's bound :math:`(n \varepsilon \mu)^2` grows with the number
    of samples, which in float32 would declare real features constant after a
    few million samples; the stable statistics here do not need it.)
    """
    var = self.var
    mean = jnp.asarray(self._fitted_state().mean)
    constant = var <= jnp.square(jnp.finfo(var.dtype).eps * mean)
    # sqrt of a where-ed variance, so gradients with respect to the state stay finite at var = 0.
    return jnp.sqrt(jnp.where(constant, jnp.ones_like(var), var))

  # -- helpers ----------------------------------------------------------------------------------

  def _reduced_axes(self, ndim: int) -> tuple[int, ...]:
    if self.axis is None:
      if ndim < 2:
        raise ValueError(
            f"the input has rank {ndim}, but with `axis=None` (features on the last axis) it needs at "
            "least two dimensions (samples, features): pass `x[:, None]` for a single feature, or set "
            "`axis=0` to reduce a 1-D array to one scalar statistic."
        )
      return tuple(range(ndim - 1))
    return _validation.canonical_axes(self.axis, ndim, "axis")

  def _zeros(self, features: tuple[int, ...], dtype: Any) -> StandardizerState:
    return self.empty(features, _validation.accumulation_dtype(dtype)).state

  def _fitted_state(self) -> StandardizerState:
    if self.state is None:
      raise ValueError(
          "this Standardizer is not fitted yet: call `fit` or `partial_fit` first (each returns a new, "
          "fitted Standardizer), or `empty` for zero statistics."
      )
    return self.state

  def _check_features(self, features: tuple[int, ...], state: StandardizerState, name: str) -> None:
    fitted = tuple(np.shape(state.mean))
    if features != fitted:
      raise ValueError(
          f"`{name}` has feature shape {features} (its shape without the reduced axes), but this "
          f"Standardizer holds statistics for feature shape {fitted}."
      )

  def _prepare(self, x: Any, name: str) -> tuple[jax.Array, tuple[int, ...], StandardizerState]:
    state = self._fitted_state()
    x = _validation.floating_input(x, name)
    axes = self._reduced_axes(x.ndim)
    self._check_features(_feature_shape(x.shape, axes), state, name)
    return x, axes, StandardizerState(*(jnp.asarray(s) for s in state))


def _feature_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(d for i, d in enumerate(shape) if i not in axes)


jax.tree_util.register_dataclass(
    Standardizer, data_fields=["state"], meta_fields=["axis", "with_mean", "with_std"]
)
