r"""Weight normalization (Salimans & Kingma, 2016) with its hand-derived VJP.

Forward, for every index of the feature axes, with the sums over all the
other (reduced) axes :math:`R`:

.. math::
    r = \Big(\textstyle\sum_R v^2 + \epsilon\Big)^{-1/2}, \qquad
    w = g \, v \, r .

:math:`r` is :math:`1/\lVert v\rVert` made safe: the small `epsilon` inside the
root (flax's convention) keeps a zero `v` finite, giving :math:`w = 0`.

Backward. With :math:`G = \partial L/\partial w` and, per feature,
:math:`d = \sum_R G\, v` (the paper's :math:`\nabla_w L \cdot v`), from
:math:`\partial w_i / \partial g = v_i r` and
:math:`\partial w_i / \partial v_j = g\,(\delta_{ij} r - v_i v_j r^3)`:

.. math::
    \frac{\partial L}{\partial g} = d\, r, \qquad
    \frac{\partial L}{\partial v} = g\, r \,\big(G - v\, r^2 d\big)
    = \frac{g}{\lVert v\rVert}\Big(I - \frac{w w^\top}{\lVert w\rVert^2}\Big) G .

The last form is the paper's (it holds exactly when :math:`\epsilon = 0`; the
middle one is exact for the forward above): the gradient wrt `v` is the
gradient wrt `w`, scaled by :math:`g/\lVert v\rVert` and projected away from
`w`, so it is orthogonal to `v` and a gradient step can only grow
:math:`\lVert v\rVert`. A zero `v` gets the finite gradient
:math:`g G / \sqrt\epsilon`.

The forward saves `v`, `g` and the per-feature :math:`r` only. The backward
is written in `jax.numpy`, so it is differentiable again (grad of grad).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm import _validation


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static description: the reduced axes, epsilon and the dtypes."""

  axes: tuple[int, ...]
  epsilon: float
  out_dtype: np.dtype
  acc_dtype: np.dtype


def weight_norm(
    v: jax.Array,
    g: jax.Array | None,
    *,
    feature_axes: _validation.Axes | None = -1,
    epsilon: float = 1e-12,
    dtype: Any = None,
    custom_vjp: bool = True,
) -> jax.Array:
  r"""Weight normalization: a weight as a direction `v` and a length `g` (Salimans & Kingma, 2016).

  .. math::
      w = g \, \frac{v}{\lVert v\rVert}, \qquad
      \lVert v\rVert = \sqrt{\textstyle\sum_R v^2 + \epsilon}

  with the sum over every axis of `v` except `feature_axes` (:math:`R`),
  separately for every index of the feature axes: for a Dense kernel
  `(in, out)` and the default `feature_axes=-1`, each output unit's incoming
  weight vector gets its own norm and its own `g`. `epsilon` inside the root
  keeps a zero `v` finite (`w = 0`, finite gradients). Computed in at least
  float32; differentiated by the hand-derived VJP of the module docstring
  (:math:`\partial_g L = (G\cdot v)/\lVert v\rVert`,
  :math:`\partial_v L = \tfrac{g}{\lVert v\rVert}(I - ww^\top/\lVert w\rVert^2)\,G`).

  Args:
    v: floating-point direction, e.g. a Dense kernel `(in, out)` or a conv
      kernel `(kh, kw, in, out)`.
    g: the length, shaped like `v` along `feature_axes` (e.g. `(out,)`), or None
      for a unit norm (:math:`g = 1`).
    feature_axes: the axis or axes that keep their own norm; None or `()`
      takes one norm over the whole of `v` (then `g` has shape `()`). If it
      covers every axis, each element is its own vector: :math:`w \approx g\,\mathrm{sign}(v)`.
    epsilon: added to the squared norm; must be > 0.
    dtype: output dtype; defaults to `v.dtype`.
    custom_vjp: if False, plain autodiff of the same forward (for forward mode).

  Returns:
    `w`, shaped like `v`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> v = jnp.array([[3., 0.], [4., 2.]])
    >>> jaxnorm.weight_norm(v, jnp.array([10., 1.]))
    Array([[6., 0.],
           [8., 1.]], dtype=float32)
  """
  v = _validation.floating_input(v, "v")
  features = () if feature_axes is None else _validation.canonical_axes(feature_axes, v.ndim, "feature_axes")
  feature_shape = tuple(v.shape[a] for a in features)
  g = _validation.parameter(g, feature_shape, "g", "the shape of v along feature_axes")
  out_dtype = _validation.output_dtype(dtype, v.dtype)
  acc = _validation.accumulation_dtype(v.dtype, *(() if g is None else (g.dtype,)))
  spec = _Spec(
      axes=tuple(a for a in range(v.ndim) if a not in features),
      epsilon=_validation.positive_epsilon(epsilon, acc),
      out_dtype=out_dtype,
      acc_dtype=acc,
  )
  if g is not None:
    g = g.reshape(_validation.keepdims_shape(v.shape, spec.axes))
  if custom_vjp:
    # jax.jvp fails here, where the custom_vjp is traced: say what to do instead.
    with _validation.explain_forward_mode("weight_norm", custom_vjp, (v, g)):
      return _weight_norm_vjp(v, g, spec)
  return _forward(v, g, spec)[0]


def _forward(v, g, spec: _Spec):
  va = v.astype(spec.acc_dtype)
  rnorm = lax.rsqrt(jnp.sum(jnp.square(va), spec.axes, keepdims=True) + spec.epsilon)
  w = va * rnorm
  if g is not None:
    w = w * g.astype(spec.acc_dtype)
  return w.astype(spec.out_dtype), rnorm


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _weight_norm_vjp(v, g, spec):
  return _forward(v, g, spec)[0]


def _fwd(v, g, spec):
  w, rnorm = _forward(v, g, spec)
  return w, (v, g, rnorm)


def _bwd(spec: _Spec, residuals, grad_w):
  v, g, rnorm = residuals
  acc = spec.acc_dtype
  va = v.astype(acc)
  grad_w = grad_w.astype(acc)
  d = jnp.sum(grad_w * va, spec.axes, keepdims=True)  # G . v, per feature
  length = rnorm if g is None else g.astype(acc) * rnorm  # g / ||v||
  grad_v = length * (grad_w - va * (jnp.square(rnorm) * d))
  grad_g = None if g is None else (d * rnorm).astype(g.dtype)
  return grad_v.astype(v.dtype), grad_g


_weight_norm_vjp.defvjp(_fwd, _bwd)
