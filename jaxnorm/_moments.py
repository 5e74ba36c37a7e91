"""Stable, maskable, device-exact statistics: the one place moments are computed.

The variance is always taken from deviations, never as ``E[x^2] - E[x]^2``,
which cancels catastrophically in float32 once ``|mean| >> std``: on the CPU
from deviations about a first estimate of the mean (`_two_pass`), on GPU and
TPU, which fuse sibling reductions into one pass over the data, from
deviations about one element of each group (`_one_pass`, with its error
bound). Across devices the merge is
exact for unequal numbers of valid elements: the counts and sums are summed
first (one stacked collective), which gives the global mean; the sums of
deviations from that global mean and of their squares are summed next (a
second stacked collective). Averaging per-device means
instead is wrong whenever devices hold different numbers of valid elements.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import jet

from jaxnorm import _platform, _validation

AxisName = Any  # a hashable name, or a tuple of names, of a mapped axis


class Moments(NamedTuple):
  """Statistics over a set of axes, shaped like the input with those axes kept as size 1.

  `count` is the number of valid elements (summed over devices). The mean is
  kept in two parts, ``mean = shift + offset``: `shift` is a first estimate
  and `offset` the small correction found from deviations about it. Centering
  as ``(x - shift) - offset`` is then nearly exact in float32 even when
  ``|mean| >> std``, where rounding the mean itself to float32 would cost up
  to half an ulp of the mean (5e-4 at 1e4). `var` is the biased variance (the
  mean square, with `shift` and `offset` zero, when not centered).
  """

  count: jax.Array
  shift: jax.Array
  offset: jax.Array
  var: jax.Array

  @property
  def mean(self) -> jax.Array:
    return self.shift + self.offset


def sum_across(values: list[jax.Array], axis_name: AxisName, axis_index_groups: Any) -> list[jax.Array]:
  """Sums same-shaped arrays across devices with one stacked `psum` (latency, not bandwidth, dominates)."""
  if axis_name is None:
    return values
  stacked = jnp.stack(values)
  try:
    summed = lax.psum(stacked, axis_name, axis_index_groups=axis_index_groups)
  except NameError as e:
    raise NameError(
        f"`axis_name`={axis_name!r} is not bound by an enclosing mapped transformation ({e}): statistics "
        "are merged across the devices of that axis, so call this inside `jax.shard_map`, `jax.pmap` or "
        f"`jax.vmap` with axis_name={axis_name!r}, or pass axis_name=None (under `jax.jit` with sharded "
        "arrays the statistics are already global)."
    ) from e
  except NotImplementedError as e:
    if axis_index_groups is None or not _varying_axes(stacked):
      raise
    # JAX raises a bare NotImplementedError for index groups under shard_map with check_vma=True.
    raise ValueError(
        f"`axis_index_groups`={axis_index_groups!r} is not supported by JAX under `jax.shard_map` with "
        "check_vma=True (the default). Use `jax.shard_map(..., check_vma=False)` or `jax.pmap`, or give each "
        "group its own mesh axis and pass that as `axis_name`."
    ) from e
  return list(summed)


def _varying_axes(a: jax.Array) -> frozenset:
  """The shard_map axes along which `a` varies (empty outside shard_map)."""
  return frozenset(jax.typeof(a).mat.varying)


def vary_like(x: jax.Array, *arrays: jax.Array | None) -> list[jax.Array | None]:
  """Casts each array to vary over the shard_map axes `x` varies over.

  A parameter replicated across devices enters a per-device computation; JAX
  does this cast implicitly for its own ops, and transposes it into a sum over
  the devices. A custom VJP must be handed arguments that already vary, or
  its per-device cotangents would not match their replicated primals.
  """
  target = _varying_axes(x)
  out = []
  for a in arrays:
    missing = () if a is None else tuple(sorted(target - _varying_axes(a), key=str))
    out.append(lax.pcast(a, missing, to="varying") if missing else a)
  return out


def masked_zero(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`x` with masked-out elements replaced by 0, so that NaN or inf there cannot leak into sums or gradients."""
  return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def any_valid(
    mask: jax.Array | None, shape: tuple[int, ...], feature_axes: tuple[int, ...], axis_name: AxisName = None,
    axis_index_groups: Any = None,
) -> jax.Array | None:
  """Whether each feature has a valid value: `mask` (broadcastable to `shape`) reduced over the non-feature axes.

  Taken over the devices of `axis_name` too. None without a mask (every
  feature is valid), unless the batch is empty. Running-statistics updates leave features without a
  valid value unchanged (their batch mean and variance are 0 by convention).
  """
  reduced = tuple(a for a in range(len(shape)) if a not in feature_axes)
  if mask is None:
    # An empty batch (a zero-size axis) has no valid value anywhere.
    return None if _static_count(shape, reduced) else jnp.zeros(tuple(shape[a] for a in feature_axes), bool)
  mask = jnp.broadcast_to(mask, shape)
  count = jnp.sum(mask, reduced, dtype=jnp.int32)
  if axis_name is not None:
    count = lax.psum(count, axis_name, axis_index_groups=axis_index_groups)
  return count > 0


def group_sum(
    a: jax.Array, axes: tuple[int, ...], channel_groups: int | None = None, portable: bool = False
) -> jax.Array:
  """Sums `a` over `axes` and, with `channel_groups` G, over each run of C // G consecutive channels.

  The result keeps the shape of `a` with `axes` set to 1; a channel-group sum
  is repeated over the channels of its group, so that it broadcasts against
  `a` in its own channels-last layout. Group norm is computed this way, not on
  a ``(..., G, C // G)`` view: XLA:CPU's fused reductions and the
  broadcasts of statistics inside them run about twice as fast when the
  contiguous axis is the full channel axis. With `portable`, the sum is the
  same on every platform (no `lax.platform_dependent`, see `compute`).
  """
  out = jnp.sum(a, axes, keepdims=True) if axes else a
  if channel_groups is None:
    return out
  if portable:
    return _channel_group_sum(out, channel_groups)
  # XLA:TPU runs the reshaped sum as a reduce, a broadcast and layout copies,
  # each a kernel of its own; one small matmul does it all.
  return _platform.by_platform(
      out, tpu=lambda o: _channel_group_dot(o, channel_groups), default=lambda o: _channel_group_sum(o, channel_groups)
  )


def _channel_group_sum(a: jax.Array, channel_groups: int) -> jax.Array:
  c = a.shape[-1]
  grouped = a.reshape(*a.shape[:-1], channel_groups, c // channel_groups)
  summed = jnp.sum(grouped, -1, keepdims=True)
  return jnp.broadcast_to(summed, grouped.shape).reshape(a.shape)


def _channel_group_dot(a: jax.Array, channel_groups: int) -> jax.Array:
  # The group sums repeated over their channels, as a product with the
  # block-diagonal 0/1 matrix of the groups. HIGHEST precision keeps float32
  # sums exact (TPU's default rounds matmul inputs to bfloat16).
  c = a.shape[-1]
  group = np.arange(c) // (c // channel_groups)
  same = jnp.asarray(group[:, None] == group[None, :], a.dtype)
  return jnp.matmul(a, same, precision=lax.Precision.HIGHEST)


def compute(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    *,
    centered: bool,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    channel_groups: int | None = None,
    forward_only: bool = False,
    portable: bool = False,
) -> Moments:
  """Moments of `x` over `axes` (and channel groups, see `group_sum`), accumulated in `dtype`.

  `dtype` defaults to `x.dtype`. The statistics have keepdims shapes (with
  `channel_groups`, repeated over the channels of each group). `mask` is None
  or a boolean array of `x.shape`. Groups with no valid element get count 0,
  mean 0 and variance 0, which keeps everything downstream finite. Each
  reduction converts `x` to `dtype` itself (see `_platform.private_copies`), so that a
  bfloat16 input is never written out in float32.

  Which formula runs depends on the backend the program is compiled for
  (`_platform.by_platform`): XLA:CPU gets `_two_pass`, with private copies;
  XLA:GPU and XLA:TPU get `_one_pass`, since they fuse sibling reductions over
  `x` into one pass (XLA:CPU runs them apart). One exception, `forward_only`
  (the statistics feed nothing but one elementwise pass over `x`, with no
  backward): a centered reduction over the last axis alone is then left to
  `_two_pass` on CUDA as well, whose chain of row reductions XLA:GPU fuses on
  Hopper into one Triton kernel that reads `x` once (`_one_pass`'s gather of
  the shift stops that fusion). Masked statistics and those merged across
  devices always use `_two_pass`.

  `portable` (the ops' ``custom_vjp=False``, plain autodiff) makes no
  platform choice: `_two_pass` and the plain channel-group sum everywhere.
  The choice is a `lax.platform_dependent`, a `cond` when traced, and
  transformations such as `jax.experimental.jet` (Taylor series), which
  that path exists for, have no rule for it.
  """
  dtype = x.dtype if dtype is None else dtype

  def total_of(a):
    return group_sum(a, axes, channel_groups, portable)

  count = _valid_count(x.shape, axes, mask, dtype, channel_groups, portable)
  xv = masked_zero(x.astype(dtype), mask)
  if not centered:
    total = total_of(jnp.square(xv))
    count, total = sum_across([count, total], axis_name, axis_index_groups)
    zero = jnp.zeros_like(total)
    return Moments(count, zero, zero, total / jnp.maximum(count, 1))
  # An empty reduction (a zero-size axis) has no element to shift by: the
  # two-pass formula gives it the empty group's statistics (0, 0).
  if mask is None and axis_name is None and not portable and x.size:
    def two_pass(x):
      return _two_pass(x, count, axes, None, None, None, dtype, channel_groups)

    def one_pass(x):
      return _one_pass(x, count, axes, dtype, channel_groups)

    rows = forward_only and axes == (x.ndim - 1,) and channel_groups is None
    return _platform.by_platform(x, cpu=two_pass, cuda=two_pass if rows else one_pass, default=one_pass)
  return _two_pass(x, count, axes, mask, axis_name, axis_index_groups, dtype, channel_groups, portable)


def _two_pass(x, count, axes, mask, axis_name, axis_index_groups, dtype, channel_groups, portable=False) -> Moments:
  """Centered moments from a first mean estimate and the deviations about it (three reductions over `x`)."""
  total = group_sum(masked_zero(x.astype(dtype), mask), axes, channel_groups, portable)
  count, total = sum_across([count, total], axis_name, axis_index_groups)
  inv_count = 1 / jnp.maximum(count, 1)
  # A first estimate of the mean carries the rounding of a large float32 sum
  # (about 3e-3 for 64 values near 1e4). Deviations from that estimate are
  # small and summed almost exactly, so two more reductions over x yield the
  # correction of the mean and the variance about it:
  #   mean = shift + E[d],  var = E[d^2] - E[d]^2,  d = x - shift,
  # which cannot cancel because E[d] is tiny next to the spread.
  shift = total * inv_count

  def deviations(tag):
    xk, shift_k = _platform.private_copies(tag, x, shift)
    return masked_zero(xk.astype(dtype) - shift_k, mask)

  d_sum = group_sum(deviations(0), axes, channel_groups, portable)
  d2_sum = group_sum(jnp.square(deviations(1)), axes, channel_groups, portable)
  d_sum, d2_sum = sum_across([d_sum, d2_sum], axis_name, axis_index_groups)
  offset = d_sum * inv_count
  var = jnp.maximum(d2_sum * inv_count - jnp.square(offset), 0)
  return Moments(count, shift, offset, var)


def abs_square(z: jax.Array) -> jax.Array:
  """:math:`|z|^2`, real: ``re(z)^2 + im(z)^2`` for complex `z` (no square root), ``z^2`` for real `z`."""
  if jnp.iscomplexobj(z):
    return jnp.square(jnp.real(z)) + jnp.square(jnp.imag(z))
  return jnp.square(z)


def complex_compute(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    *,
    centered: bool,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    dtype: Any,
    channel_groups: int | None = None,
) -> Moments:
  r"""Moments of a complex `x` (in the complex `dtype`), as flax defines them.

  .. math::
      \mu = \tfrac1N \textstyle\sum x \ (\text{complex}), \qquad
      \sigma^2 = \tfrac1N \textstyle\sum |x - \mu|^2 \ (\text{real}).

  Two passes as in `_two_pass` (``mean = shift + offset``, the variance from
  deviations about `shift`), written in plain `jax.numpy` for plain
  autodiff, with no platform choice and no private copies: complex inputs
  are rare enough that their programs need not be tuned. `count` and `var`
  are in the real counterpart of `dtype`, `shift` and `offset` in `dtype`.
  `x` is already cast to `dtype`, with unreadable masked values zeroed.
  """
  real = _validation.real_dtype(dtype)

  def total(a):
    return group_sum(a, axes, channel_groups, portable=True)

  def across(a):
    return sum_across([a], axis_name, axis_index_groups)[0]

  count = _valid_count(x.shape, axes, mask, real, channel_groups, portable=True)
  count = across(count)
  inv_count = (1 / jnp.maximum(count, 1)).astype(real)
  xv = masked_zero(x, mask)
  if not centered:
    zero = jnp.zeros(count.shape, dtype)
    return Moments(count, zero, zero, across(total(abs_square(xv))) * inv_count)
  shift = across(total(xv)) * inv_count.astype(dtype)
  d = masked_zero(x - shift, mask)
  offset = across(total(d)) * inv_count.astype(dtype)
  var = jnp.maximum(across(total(abs_square(d))) * inv_count - abs_square(offset), jnp.zeros((), real))
  return Moments(count, shift, offset, var)


def _one_pass(x, count, axes, dtype, channel_groups) -> Moments:
  r"""Centered moments in one pass over `x`: sums of deviations from one value of each group.

  With :math:`K` an element of a group of :math:`n` (the median of its first,
  middle and last element, `_pivot`) and
  :math:`d = x - K`, both sums :math:`\sum d` and :math:`\sum d^2` read `x`
  once, as one fused pass, and

  .. math::
      \mu = K + \bar d, \qquad \sigma^2 = \overline{d^2} - \bar d^{\,2}.

  Error. The subtraction cancels only by :math:`\overline{d^2} / \sigma^2 = 1 +
  (\mu - K)^2 / \sigma^2`, and since :math:`K` is a member of the group,
  :math:`(\mu - K)^2 \le (n - 1)\,\sigma^2`. So the variance carries a
  relative error of at most about :math:`n\,\varepsilon` beyond the
  summation's own, whatever :math:`|\mu| / \sigma` is (unlike
  :math:`E[x^2] - E[x]^2`, whose error grows as :math:`\varepsilon\,\mu^2
  / \sigma^2`): :math:`n\,\varepsilon` is approached only when :math:`K` is an
  outlier of its group (two of the three elements `_pivot` looks at must be
  outliers for that), and for typical data :math:`(\mu - K)^2 /
  \sigma^2` is of order 1, so the error stays a few :math:`\varepsilon`
  (:math:`\varepsilon = 2^{-24}` in float32). A constant group gives
  :math:`d = 0` exactly, hence variance 0.

  Range. A deviation from :math:`K` is at most twice the largest deviation
  :math:`D` from the mean (:math:`|x - K| \le |x - \mu| + |\mu - K|`), so
  its square could overflow where the two-pass formula's does not. The
  squares are therefore taken of :math:`h = d / 2` (exact: a power of two),
  and :math:`\sigma^2 = 4\,(a - b)(a + b)` with :math:`a = (\overline{h^2})^{1/2}`
  and :math:`b = |\bar h|`: :math:`h^2 \le D^2`, and no intermediate
  exceeds the variance's own magnitude (the square of the mean, which XLA
  rewrites as the square of a sum times a constant, is never formed), so the
  range is the two-pass formula's, :math:`n D^2` below the dtype's largest
  value (``sqrt(max / n)`` for `D`; the README's range). Beyond it
  :math:`a = \infty` and the variance is ``inf``, as on the CPU, not
  ``inf - inf``.

  The mean is kept as ``shift = K`` plus ``offset`` :math:`= 2 \bar h`, as in
  `_two_pass`; the kernel's backward re-centres it (`recentred`).
  """
  k = _pivot(x, axes).astype(dtype)
  if channel_groups is not None:
    size = x.shape[-1] // channel_groups
    k = jnp.repeat(k[..., ::size], size, axis=-1)
  d = x.astype(dtype) - k
  inv_count = 1 / jnp.maximum(count, 1)
  h_mean = group_sum(d, axes, channel_groups) * (0.5 * inv_count)
  h_square = group_sum(jnp.square(d * 0.5), axes, channel_groups) * inv_count
  # mean(h^2) - mean(h)^2 as a difference of squares, (a - b)(a + b): no
  # square of the mean is formed, which XLA would rewrite as the square of
  # the sum times a constant and overflow. Beyond the range a = inf and the
  # variance is inf (not inf - inf); a non-finite input gives NaN.
  a, b = jnp.sqrt(h_square), jnp.abs(h_mean)
  quarter_var = jnp.maximum((a - b) * (a + b), 0)
  return Moments(count, k, 2 * h_mean, 4 * quarter_var)


def recentred(
    x: jax.Array, shift: jax.Array, offset: jax.Array, count: jax.Array, axes: tuple[int, ...], channel_groups: int | None
) -> tuple[jax.Array, jax.Array]:
  r"""The mean ``shift + offset`` re-split about the mean itself, from one more sum over `x`: ``(shift, offset)``.

  `_one_pass`'s mean is ``K + offset`` with :math:`K` a member of the group:
  exact only to about :math:`\varepsilon |\mu - K|` times the summation's
  growth. The new `shift` is that mean rounded, and the new `offset` the
  mean of ``x - shift`` (over `count` values), deviations about the mean,
  summed to full precision. The kernel's backward calls it on GPU and TPU,
  where it rides in a reduction over `x` that the backward makes anyway, so
  that its sums of ``g (x - shift)`` deviate about the mean as `_two_pass`'s
  do (with :math:`K` far out, ``sum(g (x - K)) - (mu - K) sum(g)`` lost three
  digits of the scale's gradient). `x` is unmasked and already in the
  statistics' dtype.
  """
  shift = shift + offset
  return shift, group_sum(x - shift, axes, channel_groups) / jnp.maximum(count, 1)


def _pivot(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  r"""The median of each group's first, middle and last element (keepdims shape): `_one_pass`'s `K`.

  One outlier, wherever it lies in the group, is never chosen, so typical
  data keep :math:`(\mu - K)^2 / \sigma^2` of order 1.
  """
  def at(position):
    return x[tuple(slice(position(x.shape[i]), position(x.shape[i]) + 1) if i in axes else slice(None) for i in range(x.ndim))]

  a, b, c = at(lambda n: 0), at(lambda n: n // 2), at(lambda n: n - 1)
  return jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))


def _valid_count(shape, axes, mask, dtype, channel_groups, portable) -> jax.Array:
  """The number of valid elements of each group, in `dtype`, with the keepdims shape of the statistics."""
  if mask is None:
    n = _static_count(shape, axes) * (1 if channel_groups is None else shape[-1] // channel_groups)
    return jnp.full(_validation.keepdims_shape(shape, axes), n, dtype)
  return group_sum(mask.astype(dtype), axes, channel_groups, portable)


def _static_count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
  n = 1
  for a in axes:
    n *= shape[a]
  return n


def moments(
    x: jax.Array,
    axis: _validation.Axes,
    *,
    where: jax.Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    keepdims: bool = False,
) -> tuple[jax.Array, jax.Array]:
  r"""Stable mean and biased variance of `x` over `axis`.

  .. math::
      \mu = \frac{1}{n} \sum_{i \in S} x_i, \qquad
      \sigma^2 = \frac{1}{n} \sum_{i \in S} (x_i - \mu)^2

  where `S` holds the positions selected by `where` (all of them by default)
  on this device and, with `axis_name`, on every device of that mapped axis
  (or of its `axis_index_groups`), and `n = |S|`. The variance is computed
  from deviations (about the mean on the CPU, about one element of each group
  on GPU and TPU), never as ``E[x^2] - E[x]^2``, and both
  statistics are accumulated in at least float32. Masked-out elements may hold
  NaN or inf: they reach neither the statistics nor their gradients. A group
  with no valid element gets mean 0 and variance 0.

  Range: the squares are summed in the accumulation dtype, so for float32
  (and 16-bit) inputs the variance of `n` values is finite only while their
  deviations from the mean stay below about ``sqrt(3.4e38 / n)``
  (``1.8e19 / sqrt(n)``: 5.8e17 for ``n = 1024``); beyond it the variance is
  ``inf`` (and the normalizing ops output the bias, as flax and torch do).
  Rescaling by a per-group power of two before squaring would need the
  group's largest deviation first, a pass over `x` of its own on the CPU,
  for data that rarely exists; so the range is documented, not widened.
  Scale such data first, or pass float64 (with ``jax_enable_x64``).

  A complex `x` (as flax allows) gets a complex mean and the real variance
  :math:`\frac1n \sum |x_i - \mu|^2`.

  Args:
    x: floating-point (or complex) array of any shape.
    axis: an axis or tuple of axes to reduce over.
    where: optional boolean mask broadcastable to `x`; True marks valid elements.
    axis_name: optional name (or tuple of names) of a mapped axis (`pmap`,
      `shard_map`, `vmap`) whose devices all contribute; the merge is exact when
      devices hold different numbers of valid elements.
    axis_index_groups: optional groups of indices within `axis_name` that are
      reduced separately (see `jax.lax.psum`).
    keepdims: keep the reduced axes as size 1.

  Returns:
    `(mean, var)`, of `x`'s shape without the reduced axes (or with them as
    size 1), in the accumulation dtype (float32 for 16-bit inputs).

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> mean, var = jaxnorm.moments(jnp.array([[1., 2.], [3., 6.]]), axis=0)
    >>> mean, var
    (Array([2., 4.], dtype=float32), Array([1., 4.], dtype=float32))
  """
  x = _validation.floating_input(x, allow_complex=True)
  axes = _validation.canonical_axes(axis, x.ndim, "axis")
  mask = _validation.broadcast_mask(where, x.shape)
  acc = _validation.accumulation_dtype(x.dtype)
  stats = compute_program(
      x,
      mask,
      axes=axes,
      centered=True,
      axis_name=_validation.axis_name(axis_name),
      axis_index_groups=_validation.axis_index_groups(axis_index_groups),
      dtype=acc,
      # Taylor series (`jax.experimental.jet`) have no rule for the per-platform
      # choice (a `cond`): under jet the same statistics without it.
      portable=isinstance(x, jet.JetTracer),
  )
  mean, var = stats.mean, stats.var
  if not keepdims:
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
  return mean, var


@functools.partial(
    jax.jit, static_argnames=("axes", "centered", "axis_name", "axis_index_groups", "dtype", "portable")
)
def compute_program(
    x, mask, *, axes, centered, axis_name=None, axis_index_groups=None, dtype=None, portable=False
) -> Moments:
  """`compute` (or `complex_compute`, for a complex `dtype`) as one program, eagerly too.

  The program behind `moments`, batch renorm and the `Standardizer`: called
  eagerly, the statistics are computed as one executable whose outputs are
  the statistics alone, so that no full-size intermediate (``x - shift`` of
  NaN padding, say) is ever the output of an eager operation, which
  `jax_debug_nans` would flag, and the call dispatches once. `dtype`
  defaults to `x`'s; `portable` as in `compute`.
  """
  dtype = x.dtype if dtype is None else dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):
    xa = masked_zero(x.astype(dtype), None if mask is None else mask | jnp.isfinite(x))
    return complex_compute(
        xa, axes, mask, centered=centered, axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype
    )
  return compute(
      x.astype(dtype), axes, mask, centered=centered, axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=dtype, portable=portable,
  )
