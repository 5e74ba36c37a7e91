r"""The one normalization kernel behind batch, layer, RMS, group and instance norm, with its hand-derived VJP.

Forward, over a reduction set :math:`R` of :math:`N` valid positions (the
positions `mask` selects, on every device of `axis_name`):

.. math::
    \mu = \tfrac1N \textstyle\sum_R x, \quad
    v = \tfrac1N \textstyle\sum_R (x-\mu)^2, \quad
    r = (v + \epsilon)^{-1/2}, \quad
    \hat x = (x - \mu)\, r, \quad
    y = \gamma \hat x + \beta .

Without centering (RMS norm) :math:`\mu = 0` and :math:`v` is the mean square.
With a `scale_offset` :math:`o` (Gemma's zero-centred scale, :math:`o = 1`)
the multiplier is :math:`o + \gamma` throughout; :math:`\gamma`, :math:`\beta`
may be per feature or any array that broadcasts to :math:`x` (adaLN, FiLM,
conditional batch norm, per-head scales): only their reductions change.
The mean is held as a float32 estimate plus a small correction (see
`_moments.Moments`) and :math:`x - \mu` is formed as ``(x - shift) - offset``,
so the normalized output keeps float32 precision (about 5e-7 at a mean of
1e4 times the spread) instead of losing half an ulp of the mean.
Every position, valid or not, is normalized with the statistics of the valid
ones (as flax does); a masked-out value that is NaN or inf is read as 0. A
group with no valid element has :math:`\hat x = 0` (:math:`r` is set to 0):
it outputs :math:`\beta`, with zero gradient wrt :math:`x` and :math:`\gamma`,
instead of :math:`x/\sqrt\epsilon`.

Backward. Write :math:`g = \partial L/\partial y`, :math:`h = \gamma g =
\partial L / \partial \hat x`, and :math:`\langle\cdot\rangle` for a sum over
the *whole* reduction group (masked positions too: their outputs also depend
on :math:`\mu` and :math:`r`), taken across devices. With
:math:`\partial\mu/\partial x_j = 1/N`, :math:`\partial v/\partial x_j = 2(x_j-\mu)/N`
and :math:`\partial r/\partial v = -r^3/2`, for a valid position :math:`j`:

.. math::
    \frac{\partial L}{\partial x_j}
    = r\Big(h_j - \tfrac1N\langle h\rangle - \hat x_j\,\tfrac1N\langle h \hat x\rangle\Big).

A masked-out position only feeds its own output: :math:`\partial L/\partial x_j = r h_j`
(0 where it was non-finite). Without centering the :math:`\langle h\rangle`
term vanishes.
:math:`\partial L/\partial\gamma = \sum g\hat x` and
:math:`\partial L/\partial\beta = \sum g`, summed over the axes the parameters
are broadcast along, on this device (under shard_map, JAX then sums them
over the devices a replicated parameter is shared by; see `standardize`).

The forward saves the input itself (no new buffer), the parameters, the mask
and per-group statistics; :math:`\hat x` is recomputed in the backward, which
costs one fused elementwise pass and saves a full-size residual. The backward
is written in `jax.numpy`, so it is differentiable again: grad-of-grad and
`jax.jacrev(jax.jacrev(f))` work.

How it is laid out for XLA. One jaxpr serves every backend; what differs is
chosen when it is lowered (`_platform`): XLA:GPU and XLA:TPU get one-pass
statistics (`_moments._one_pass`) and no private copies, XLA:CPU gets what
follows. On XLA:CPU reading memory is cheap next to writing it, so
the compiled programs write nothing full-size but their output (`y`, or `dx`
with the parameter gradients); `tests/test_fused_programs.py` checks it on
the optimized HLO. Every full-size term (:math:`x - \text{shift}`,
:math:`\hat x`, :math:`h`, the float32 view of a bfloat16 input) is built
by the one fusion that consumes it, from private copies of the statistics
that XLA cannot merge (`_platform.private_copies`). Where the parameters are
constant along some reduced axes (all of them for batch and instance norm,
the spatial ones for group norm), the backward first sums over those axes,
where :math:`\langle g \hat x\rangle = r(\langle g\,(x - \text{shift})\rangle
- \text{offset}\,\langle g\rangle)`: two reductions with one broadcast
each give both the parameter gradients and, after small sums over the
remaining axes, :math:`\langle h\rangle` and :math:`\langle h\hat x\rangle`.
Group norm stays in the channels-last layout, its group statistics repeated
over their channels (`_moments.group_sum`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm import _moments, _platform, _validation


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static description of one normalization: what to reduce, how, and the output dtype."""

  axes: tuple[int, ...]
  centered: bool
  epsilon: float
  out_dtype: np.dtype
  acc_dtype: np.dtype
  axis_name: Any = None
  axis_index_groups: Any = None
  # With G here, each reduction group also spans C // G consecutive channels
  # of the last axis (group norm); see `_moments.group_sum`.
  channel_groups: int | None = None
  # With a shape here, `x` (and the output) keep their own shape, and the
  # normalization runs on the reshaped view of this shape, which `axes`,
  # the parameters and the mask refer to (ghost batch norm's virtual
  # batches). The reshape happens inside the kernel, so that the residual
  # the forward saves is the input itself, never a reshaped copy: an extra
  # output of the compiled forward that `jax_debug_nans` would inspect.
  view: tuple[int, ...] | None = None
  # Added to `scale` in the accumulation dtype: y = x-hat (scale_offset +
  # scale) + bias, Gemma's zero-centred scale with 1 (see `multiplier`).
  scale_offset: float = 0.0
  # What the forward keeps for the backward: "input" (x) or "output" (y,
  # from which the backward recovers x-hat; see `_bwd_from_output`).
  saved: str = "input"
  # The dtype of `x` (of its cotangent), which the backward from the output
  # cannot read from a saved `x`.
  in_dtype: np.dtype | None = None
  # With a number here, a leaky ReLU of this slope (0: ReLU) follows the
  # affine part, inside the VJP (In-Place ABN; see `_forward` and
  # `_deactivate`). Only with saved == "output".
  negative_slope: float | None = None


def multiplier(scale: jax.Array | None, spec: Spec) -> jax.Array | None:
  """The multiplier of x-hat, ``scale_offset + scale``, in the accumulation dtype (None without a scale).

  The offset is added after the cast, so a bfloat16 ``scale`` near 0 keeps
  its own precision (1 + 0.01 is not representable in bfloat16 to 3 digits).
  With ``spec.saved == "output"`` a multiplier of magnitude below `epsilon`
  is replaced by ``±epsilon`` (+ for 0), as In-Place ABN and Apex do: the
  backward divides by it to recover x-hat from `y`.
  """
  if scale is None:
    return None
  g = scale.astype(spec.acc_dtype)
  g = g + spec.scale_offset if spec.scale_offset else g
  if spec.saved != "output":
    return g
  eps = jnp.asarray(spec.epsilon, g.dtype)
  return jnp.where(g < 0, jnp.minimum(g, -eps), jnp.maximum(g, eps))


def standardize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    spec: Spec,
    *,
    custom_vjp: bool = True,
) -> jax.Array:
  """Normalizes `x` over `spec.axes` and applies the affine parameters.

  `scale` and `bias` are None or arrays of `x.ndim` dimensions that broadcast
  to `x` (to `spec.view` with a view); `mask` is None or a boolean array of
  `x.shape` (of `spec.view`). Arguments are
  assumed checked (see `_validation`). With `custom_vjp=False` the same
  forward is differentiated by plain autodiff, which forward mode needs.
  """
  # Under shard_map, parameters replicated across devices must vary like `x`
  # before they enter the custom VJP: their cotangents vary, and JAX sums them
  # over the devices when it transposes this cast.
  scale, bias, mask = _moments.vary_like(x, scale, bias, mask)
  if custom_vjp:
    return _standardize_vjp(x, scale, bias, mask, spec)
  return _forward(x, scale, bias, mask, spec, portable=True)[0]


def _readable(x: jax.Array, mask: jax.Array | None) -> jax.Array | None:
  """Where `x` may be read: everywhere, except masked-out non-finite values."""
  return None if mask is None else mask | jnp.isfinite(x)


def _view(x, spec: Spec):
  return x if spec.view is None else x.reshape(spec.view)


def _forward(x, scale, bias, mask, spec: Spec, forward_only: bool = False, portable: bool = False):
  shape, x = x.shape, _view(x, spec)
  stats = _moments.compute(
      x,
      spec.axes,
      mask,
      centered=spec.centered,
      axis_name=spec.axis_name,
      axis_index_groups=spec.axis_index_groups,
      dtype=spec.acc_dtype,
      channel_groups=spec.channel_groups,
      forward_only=forward_only,
      portable=portable,
  )
  rstd = _rstd(stats, mask, spec)
  y = _normalized(2, x, mask, stats.shift, stats.offset, rstd, spec.acc_dtype)
  if scale is not None:
    y = y * multiplier(scale, spec)
  if bias is not None:
    y = y + bias.astype(spec.acc_dtype)
  if spec.negative_slope:
    y = jnp.where(y >= 0, y, y * spec.negative_slope)
  y = y.astype(spec.out_dtype)
  if spec.saved == "output":
    # XLA:CPU copies an elementwise function of x into each of its consumers,
    # the backward's too, which would then read x and keep it alive. It does
    # not copy a division: dividing by an exact 1 makes `y` a buffer of its
    # own that the backward reads (values unchanged). The 1 is made full-size
    # from `y` itself, as XLA rewrites a division by a broadcast into a
    # product. Other backends keep `y` as it is.
    y = _platform.by_platform(y, cpu=lambda y: y / jnp.where(y != y, y, jnp.ones((), y.dtype)), default=lambda y: y)
  # What the backward from the output reads: the output itself, or with a
  # ReLU, which loses the negative half, the array before it.
  kept = y.reshape(shape)
  if spec.negative_slope == 0:
    y = jnp.maximum(y, jnp.zeros((), y.dtype))
  return y.reshape(shape), (stats, rstd, kept)


def _rstd(stats: _moments.Moments, mask: jax.Array | None, spec: Spec) -> jax.Array:
  """``(var + epsilon)^(-1/2)``, and 0 for a group with no valid element.

  Such a group has mean 0 and variance 0; ``1/sqrt(epsilon)`` would scale its
  (meaningless) values by 300-1000. With 0 its x-hat is 0, so it outputs the
  bias, and the backward, which carries `rstd` in every term of the
  normalized part, gives it zero gradient wrt `x` and `scale`. A small
  `where` on the statistics: without a mask every group is valid and nothing
  is added to the program.
  """
  rstd = lax.rsqrt(stats.var + spec.epsilon)
  if mask is None:
    return rstd
  return jnp.where(stats.count > 0, rstd, jnp.zeros((), rstd.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _standardize_vjp(x, scale, bias, mask, spec):
  # Not differentiated: the statistics feed only y (see `_moments.compute`).
  return _forward(x, scale, bias, mask, spec, forward_only=True)[0]


def _deviation(tag: int, x, mask, shift, acc, *small):
  """``x - shift`` in the accumulation dtype, from private copies of `x`, `shift` and `small`.

  Every full-size use calls this with its own `tag` (see
  `_platform.private_copies`), so that XLA recomputes it from `x` inside each
  consumer instead of writing it out. A masked-out value that is NaN or inf
  is read as 0. Returns the deviation and the copies of `small`.
  """
  x, shift, *small = _platform.private_copies(tag, x, shift, *small)
  xa = x.astype(acc)
  return _moments.masked_zero(xa, _readable(xa, mask)) - shift, small


def _normalized(tag: int, x, mask, shift, offset, rstd, acc):
  """x-hat in the accumulation dtype (see `_deviation`)."""
  d, (offset, rstd) = _deviation(tag, x, mask, shift, acc, offset, rstd)
  # Two subtractions, not one: x - shift is exact for x near the mean.
  return (d - offset) * rstd


def _fwd(x, scale, bias, mask, spec):
  y, (stats, rstd, kept) = _forward(x, scale, bias, mask, spec)
  if spec.saved == "output":
    # `kept` is the very array returned to the caller (but with a ReLU):
    # nothing new is kept but the statistics and, with a mask, where `x`
    # could be read.
    return y, (kept, scale, bias, mask, _readable(x, mask), stats.count, rstd)
  return y, (x, scale, bias, mask, stats.count, stats.shift, stats.offset, rstd)


def _bwd(spec: Spec, residuals, g):
  if spec.saved == "output":
    return _bwd_from_output(spec, residuals, g)
  x, scale, bias, mask, count, shift, offset, rstd = residuals
  shape, x, g = x.shape, _view(x, spec), _view(g, spec)
  acc = spec.acc_dtype
  # d(scale) = sum(g x-hat) whatever the offset; only dx sees scale_offset + scale.
  gamma = multiplier(scale, spec)

  # Each full-size term is rebuilt from (x, g) by the consumer that needs it,
  # under its own tag (see `_platform.private_copies`): the program writes
  # nothing full-size but dx, and converts bfloat16 inputs in registers.
  def xhat(tag):
    return _normalized(tag, x, mask, shift, offset, rstd, acc)

  def cotangent(tag):
    return _platform.private_copies(tag, g)[0].astype(acc)

  def h(tag):
    gk = cotangent(tag)
    return gk if gamma is None else gk * _platform.private_copies(tag, gamma)[0]

  def finish(a):
    # The rest of a group sum, on arrays already summed over `outer` (small).
    return _moments.group_sum(a, inner, spec.channel_groups)

  # `outer`: the reduced axes along which the parameters are constant (all of
  # them for batch and instance norm, the spatial ones for group norm, none
  # for layer norm); `inner`: the other reduced axes.
  outer = tuple(a for a in spec.axes if _constant_over((a,), scale, bias))
  inner = tuple(a for a in spec.axes if a not in outer)
  inv_n = 1 / jnp.maximum(count, 1)
  # GPU and TPU: the one-pass mean is ``pivot + offset`` with the pivot a
  # member of the group (`_moments._one_pass`), exact to about eps |mean -
  # pivot|; the CPU's two-pass mean has a tiny offset, and its program stays
  # as it is. Where the parameters are constant over the group, sum(g x-hat)
  # multiplies the mean's error by sum(g): the mean is re-centred first, by
  # one more sum that rides in this backward's reductions over x.
  one_pass = spec.centered and mask is None and spec.axis_name is None
  if outer and one_pass:
    def recentred(x, shift, offset):
      return _moments.recentred(x.astype(acc), shift, offset, count, spec.axes, spec.channel_groups)

    shift, offset = _platform.by_platform(x, shift, offset, cpu=lambda x, s, o: (s, o), default=recentred)
  if outer:
    # Sum over `outer` first, where x-hat = ((x - shift) - offset) rstd has
    # constant offset and rstd: sum(g x-hat) = rstd (sum(g (x - shift)) -
    # offset sum(g)). Two reductions over (x, g), each with one broadcast,
    # give the parameter gradients of this device and, after the small
    # `inner` sums, the sums of the dx formula. No cancellation: offset is
    # tiny next to the spread.
    g_sum = jnp.sum(cotangent(4), outer, keepdims=True)
    g_dev = jnp.sum(cotangent(3) * _deviation(3, x, mask, shift, acc)[0], outer, keepdims=True)
    g_xhat = rstd * (g_dev - offset * g_sum)
    d_scale = None if scale is None else _reduce_to(g_xhat, scale.shape)
    d_bias = None if bias is None else _reduce_to(g_sum, bias.shape)
    sums = [finish(g_xhat if gamma is None else g_xhat * gamma)]
    if spec.centered:
      sums.append(finish(g_sum if gamma is None else g_sum * gamma))
  else:
    # rstd and offset are constant over each group, so on the CPU they leave
    # the sums: sum(h x-hat) = rstd (sum(h (x - shift)) - offset sum(h)). On
    # GPU and TPU the offset is as large as the spread (see above), and that
    # difference would cancel: x-hat is formed element by element there.
    h_sum = finish(h(5)) if spec.centered else None

    def factored():
      h_dev = finish(h(4) * _deviation(4, x, mask, shift, acc)[0])
      return rstd * h_dev if h_sum is None else rstd * (h_dev - offset * h_sum)

    sums = [_platform.by_platform(cpu=factored, default=lambda: finish(h(4) * xhat(4))) if one_pass else factored()]
    if spec.centered:
      sums.append(h_sum)
    d_scale = None if scale is None else _reduce_to(cotangent(3) * xhat(3), scale.shape)
    # Times an exact 1 made from the statistics: XLA:TPU rewrites a float32 sum
    # of a bfloat16 cotangent alone into a bfloat16 reduction that it runs as
    # a pass of its own (a third of layer norm's backward on (8192, 1024)).
    d_bias = None if bias is None else _reduce_to(cotangent(7) * (rstd * 0 + 1), bias.shape)
  sums = _moments.sum_across(sums, spec.axis_name, spec.axis_index_groups)
  correction = xhat(6) * (sums[0] * inv_n)
  if spec.centered:
    correction = correction + sums[1] * inv_n
  # Only valid positions move the statistics, so only they get the correction.
  dx = rstd * (h(6) - _moments.masked_zero(correction, mask))
  x6 = _platform.private_copies(6, x)[0]
  dx = _moments.masked_zero(dx, _readable(x6, mask))
  d_scale = None if d_scale is None else d_scale.astype(scale.dtype)
  d_bias = None if d_bias is None else d_bias.astype(bias.dtype)
  return dx.astype(x.dtype).reshape(shape), d_scale, d_bias, None


def _bwd_from_output(spec: Spec, residuals, g):
  r"""The backward from the output: x-hat is recovered as :math:`(y - \beta) / \gamma'`.

  With :math:`\gamma' = o + \gamma` (clamped, see `multiplier`) and
  :math:`h = \gamma' g`, the sums of the dx formula need no division:
  :math:`\langle h \hat x\rangle = \langle g (y - \beta)\rangle`; nor does
  d(bias); d(scale) divides a small sum, :math:`\sum g (y - \beta) / \gamma'`
  (:math:`\gamma'` is constant over the axes it is summed along). Only the
  :math:`\hat x` term of dx divides element by element. The recovered
  :math:`\hat x` carries the rounding of `y` in its dtype, about
  :math:`\varepsilon_y (|\hat x| + |\beta| / |\gamma'|)`.
  """
  y, scale, bias, mask, readable, count, rstd = residuals
  shape, y, g = y.shape, _view(y, spec), _view(g, spec)
  if readable is not None:
    readable = _view(readable, spec)
  acc = spec.acc_dtype
  gamma = multiplier(scale, spec)
  small = [a for a in (gamma, bias) if a is not None]
  slopes = jnp.asarray([spec.negative_slope or 0, 1 / (spec.negative_slope or 1)], acc)

  def terms(tag):
    # (g, y - bias, gamma) from private copies (see `_platform.private_copies`),
    # the slopes too: an inverted activation must differ from tag to tag.
    yk, gk, slopes_k, *rest = _platform.private_copies(tag, y, g, slopes, *small)
    yk, gk = _deactivate(yk, gk, spec.negative_slope, slopes_k)
    gam = rest.pop(0) if gamma is not None else None
    dev = yk.astype(acc) if bias is None else yk.astype(acc) - rest[0].astype(acc)
    return gk.astype(acc), dev, gam

  def finish(a):
    return _moments.group_sum(a, inner, spec.channel_groups)

  outer = tuple(a for a in spec.axes if _constant_over((a,), scale, bias))
  inner = tuple(a for a in spec.axes if a not in outer)
  if outer:
    # As in `_bwd`: two reductions over (y, g) give the parameter gradients
    # and, after small sums over `inner`, both sums of the dx formula.
    g_sum = jnp.sum(terms(4)[0], outer, keepdims=True)
    gk, dev, _ = terms(3)
    g_dev = jnp.sum(gk * dev, outer, keepdims=True)
    d_scale = None if scale is None else _reduce_to(g_dev, scale.shape) / gamma
    d_bias = None if bias is None else _reduce_to(g_sum, bias.shape)
    sums = [finish(g_dev)] + ([finish(g_sum if gamma is None else g_sum * gamma)] if spec.centered else [])
  else:
    gk, dev, _ = terms(3)
    sums = [finish(gk * dev)]
    if spec.centered:
      gk, _, gam = terms(4)
      sums.append(finish(gk if gam is None else gk * gam))
    if scale is None:
      d_scale = None
    else:
      gk, dev, _ = terms(5)
      d_scale = _reduce_to(gk * dev, scale.shape) / gamma
    d_bias = None if bias is None else _reduce_to(terms(7)[0], bias.shape)
  sums = _moments.sum_across(sums, spec.axis_name, spec.axis_index_groups)
  inv_n = 1 / jnp.maximum(count, 1)
  gk, dev, gam = terms(6)
  xhat = dev if gam is None else dev / gam
  correction = xhat * (sums[0] * inv_n)
  if spec.centered:
    correction = correction + sums[1] * inv_n
  h = gk if gam is None else gk * gam
  dx = rstd * (h - _moments.masked_zero(correction, mask))
  dx = _moments.masked_zero(dx, readable)
  d_scale = None if d_scale is None else d_scale.astype(scale.dtype)
  d_bias = None if d_bias is None else d_bias.astype(bias.dtype)
  return dx.astype(spec.in_dtype).reshape(shape), d_scale, d_bias, None


def _deactivate(a: jax.Array, g: jax.Array, negative_slope: float | None, slopes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The norm's output and its cotangent, from what the backward kept of the activation and the activation's cotangent.

  A leaky ReLU of slope s > 0 is inverted: ``y = a`` where ``a >= 0``, else
  ``a / s``, and the cotangent takes the derivative 1 or s. With a ReLU
  (s = 0) `a` is the norm's output itself; the cotangent is zeroed where
  ``a <= 0``, as `jax.nn.relu` does. `slopes` holds s and 1 / s: XLA:CPU
  keeps a division's result in memory where it fuses a product.
  """
  if negative_slope is None:
    return a, g
  if negative_slope == 0:
    return a, jnp.where(a > 0, g, jnp.zeros((), g.dtype))
  positive = a >= 0
  a = a.astype(slopes.dtype)
  return jnp.where(positive, a, a * slopes[1]), jnp.where(positive, g, g * slopes[0].astype(g.dtype))


def _constant_over(axes: tuple[int, ...], *params: jax.Array | None) -> bool:
  """Whether every given parameter has size 1 along all of `axes` (is constant over them)."""
  return all(p is None or all(p.shape[a] == 1 for a in axes) for p in params)


def _reduce_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `a` over the axes along which an array of `shape` (same rank) was broadcast."""
  axes = tuple(i for i, (n, m) in enumerate(zip(a.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(a, axes, keepdims=True)


_standardize_vjp.defvjp(_fwd, _bwd)


def apply(
    x: Any,
    scale: Any,
    bias: Any,
    *,
    op: str,
    axes: Any,
    axes_name: str,
    param_axes: Any,
    param_explain: str,
    centered: bool,
    epsilon: Any,
    where: Any,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    custom_vjp: bool = True,
    with_statistics: bool = False,
    channel_groups: int | None = None,
    view: tuple[int, ...] | None = None,
    scale_offset: Any = 0.0,
    saved: Any = "input",
    negative_slope: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
  """Validates the public arguments of the op named `op` and runs `standardize`.

  `axes` are the reduction axes (checked under the name `axes_name`); with
  `channel_groups` G (already checked to divide C) each group also spans C // G
  consecutive channels of the last axis;
  `param_axes` are the axes a per-feature `scale`/`bias` spans; any other
  parameter must broadcast to `x` (see `_validation.affine_parameter`).
  `scale_offset` is added to `scale` inside the kernel (see `multiplier`).
  `saved` is what the backward keeps, "input" or "output" (see
  `_bwd_from_output`); a `negative_slope` adds a leaky ReLU after the
  affine part (0: ReLU), inside the VJP, and needs ``saved="output"``. Returns `y`, or with `with_statistics` `(y, mean, var)`, the statistics
  squeezed to the non-reduced axes. With `view`, a shape of as many elements
  as `x`, the normalization runs on `x` reshaped to it (which `axes`,
  `param_axes` and `where` refer to) and `y` has `x`'s shape. The statistics are computed by plain
  differentiable code outside the custom VJP, so that JAX itself transposes
  their collectives (under vmap or shard_map their cotangents arrive already
  summed over devices; under pmap they do not). Under jit, XLA merges these
  reductions with the identical ones inside the kernel.
  """
  x = _validation.floating_input(x, allow_complex=True)
  view = None if view is None else tuple(view)
  vshape = x.shape if view is None else view
  axes = _validation.canonical_axes(axes, len(vshape), axes_name)
  param_axes = _validation.canonical_axes(param_axes, len(vshape), "feature_axes")
  param_shape = tuple(vshape[a] for a in param_axes)
  params = [
      _validation.affine_parameter(p, param_shape, param_axes, vshape, name, param_explain)
      for name, p in (("scale", scale), ("bias", bias))
  ]
  scale_offset = _validation.scale_offset(scale_offset, scale)
  # Complex parameters make a complex output, also for a real `x` (as flax's
  # modules give): the default is then the complex counterpart of x's dtype.
  complex_params = [p.dtype for p in params if p is not None and jnp.issubdtype(p.dtype, jnp.complexfloating)]
  out_dtype = _validation.output_dtype(dtype, _validation.promoted_dtype(x, *complex_params))
  acc_dtype = _validation.accumulation_dtype(x.dtype, out_dtype, *(p.dtype for p in params if p is not None))
  is_complex = bool(jnp.issubdtype(acc_dtype, jnp.complexfloating))
  saved = _validation.saved(saved, complex_input=is_complex, custom_vjp=custom_vjp)
  if negative_slope is not None and saved != "output":
    raise ValueError(f"an activation inside the VJP (`negative_slope`) needs saved='output', got saved={saved!r}.")
  spec = Spec(
      axes=axes,
      centered=centered,
      epsilon=_validation.positive_epsilon(epsilon, _validation.real_dtype(acc_dtype)),
      out_dtype=out_dtype,
      acc_dtype=acc_dtype,
      # Lists of names (which lax.psum accepts) as tuples: the spec is hashed.
      axis_name=_validation.axis_name(axis_name),
      axis_index_groups=_validation.axis_index_groups(axis_index_groups),
      channel_groups=channel_groups,
      view=view,
      scale_offset=scale_offset,
      saved=saved,
      in_dtype=x.dtype,
      negative_slope=None if negative_slope is None else _validation.negative_slope(negative_slope),
  )
  mask = _validation.broadcast_mask(where, vshape)
  if is_complex:
    return _complex_run(x, params[0], params[1], mask, spec=spec, with_statistics=with_statistics)
  # Under jax.jvp the custom VJP fails inside this call: say what to do instead.
  with _validation.explain_forward_mode(op, custom_vjp, (x, scale, bias)):
    return _run(x, params[0], params[1], mask, spec=spec, custom_vjp=custom_vjp, with_statistics=with_statistics)


# One compiled program per shape and Spec: called eagerly, the op runs as one
# executable instead of dispatching its few dozen primitives one by one; under
# an enclosing jit it is inlined.
@functools.partial(jax.jit, static_argnames=("spec", "custom_vjp", "with_statistics"))
def _run(x, scale, bias, mask, *, spec: Spec, custom_vjp: bool, with_statistics: bool):
  y = standardize(x, scale, bias, mask, spec, custom_vjp=custom_vjp)
  if not with_statistics:
    return y
  stats = _moments.compute(
      _view(x, spec),
      spec.axes,
      mask,
      centered=spec.centered,
      axis_name=spec.axis_name,
      axis_index_groups=spec.axis_index_groups,
      dtype=spec.acc_dtype,
      channel_groups=spec.channel_groups,
      portable=not custom_vjp,
  )
  return y, jnp.squeeze(stats.mean, spec.axes), jnp.squeeze(stats.var, spec.axes)


@functools.partial(jax.jit, static_argnames=("spec", "with_statistics"))
def _complex_run(x, scale, bias, mask, *, spec: Spec, with_statistics: bool):
  r"""The normalization of a complex `x` (or of complex parameters), as flax computes it, by plain autodiff.

  .. math::
      \mu = \tfrac1N \textstyle\sum x, \quad
      \sigma^2 = \tfrac1N \textstyle\sum |x - \mu|^2, \quad
      y = \gamma\,(x - \mu)\,(\sigma^2 + \epsilon)^{-1/2} + \beta,

  with :math:`\mu`, :math:`y` complex and :math:`\sigma^2` real (see
  `_moments.complex_compute`). Differentiated by JAX itself, not by the
  hand-derived VJP: that one is derived for real :math:`x`, where
  :math:`\partial v / \partial x = 2 (x - \mu) / N`; for complex :math:`x`
  the variance is a real function of :math:`x` and :math:`\bar x`, the
  cotangents follow JAX's convention for complex functions (the conjugate
  Wirtinger derivative), and every product in the formula would need its
  conjugate placed by hand. Plain autodiff of the same math gets that right by
  construction, also for forward mode and higher orders; complex inputs are
  rare enough that the saved memory pass is not worth a second derivation.
  Masking, groups without a valid element and `axis_name` behave as on the
  real path.
  """
  acc = spec.acc_dtype
  shape, x = x.shape, _view(x, spec)
  xa = _moments.masked_zero(x.astype(acc), _readable(x, mask))
  stats = _moments.complex_compute(
      xa,
      spec.axes,
      mask,
      centered=spec.centered,
      axis_name=spec.axis_name,
      axis_index_groups=spec.axis_index_groups,
      dtype=acc,
      channel_groups=spec.channel_groups,
  )
  rstd = _rstd(stats, mask, spec).astype(acc)
  y = ((xa - stats.shift) - stats.offset) * rstd
  if scale is not None:
    y = y * multiplier(scale, spec)
  if bias is not None:
    y = y + bias.astype(acc)
  y = y.astype(spec.out_dtype).reshape(shape)
  if not with_statistics:
    return y
  return y, jnp.squeeze(stats.mean, spec.axes), jnp.squeeze(stats.var, spec.axes)
