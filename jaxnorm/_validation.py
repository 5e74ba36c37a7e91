"""Argument checks shared by every op: axes, dtypes, epsilon, parameter shapes, masks.

Every check runs at trace time on static shapes and dtypes, and raises a
`ValueError` or `TypeError` that names the offending argument, so that bad
input never reaches XLA as an obscure shape error or broadcasts silently into a
wrong answer.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]


def floating_input(x: Any, name: str = "x") -> jax.Array:
  """Returns `x` as a JAX array, or raises `TypeError` unless it is real floating point."""
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"`{name}` must be a real floating-point array, got dtype {x.dtype}; "
        f"cast it first, e.g. `{name}.astype(jnp.float32)`."
    )
  return x


def accumulation_dtype(*dtypes: Any) -> np.dtype:
  """The dtype statistics are accumulated in: at least float32 (float64 stays float64)."""
  return np.dtype(jnp.promote_types(jnp.result_type(*dtypes), jnp.float32))


def output_dtype(dtype: Any, default: Any) -> np.dtype:
  """The requested output `dtype` (`default` when None); raises `TypeError` unless it is floating point."""
  out = np.dtype(default if dtype is None else jnp.dtype(dtype))
  if not jnp.issubdtype(out, jnp.floating):
    raise TypeError(f"`dtype` must be a floating-point dtype, got {out}.")
  return out


def canonical_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
  """Sorted non-negative axes; raises on out-of-range, repeated or non-integer axes."""
  seq = (axes,) if not isinstance(axes, Sequence) else tuple(axes)
  out = []
  for a in seq:
    try:
      a = operator.index(a)
    except TypeError:
      raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axes!r}.") from None
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`{name}`={axes!r} is out of range for an input of rank {ndim} "
          f"(valid axes are {-ndim}..{ndim - 1})."
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"`{name}`={axes!r} repeats an axis.")
  return tuple(sorted(out))


def positive_epsilon(epsilon: Any) -> float:
  """`epsilon` as a Python float; raises unless it is a concrete number > 0."""
  try:
    value = float(epsilon)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(f"`epsilon` must be a Python number, got {epsilon!r}.") from None
  if not value > 0:
    raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")
  return value


def parameter(p: Any, shape: tuple[int, ...], name: str, explain: str) -> jax.Array | None:
  """Checks that an affine parameter is None or a floating array of exactly `shape`."""
  if p is None:
    return None
  p = floating_input(p, name)
  if tuple(p.shape) != tuple(shape):
    raise ValueError(f"`{name}` must have shape {tuple(shape)} ({explain}), got {tuple(p.shape)}.")
  return p


def broadcast_mask(where: Any, shape: tuple[int, ...], name: str = "where") -> jax.Array | None:
  """`where` as a boolean array of `shape`; raises unless it broadcasts to `shape`."""
  if where is None:
    return None
  where = jnp.asarray(where)
  try:
    target = jnp.broadcast_shapes(where.shape, shape)
  except ValueError:
    target = None
  if target != tuple(shape):
    raise ValueError(
        f"`{name}` of shape {tuple(where.shape)} does not broadcast to the input shape {tuple(shape)}."
    )
  return jnp.broadcast_to(where.astype(bool), shape)


def broadcast_operand(a: Any, shape: tuple[int, ...], name: str) -> jax.Array:
  """Checks that a statistic or parameter broadcasts to the input `shape` without growing it."""
  a = floating_input(a, name)
  try:
    target = jnp.broadcast_shapes(a.shape, shape)
  except ValueError:
    target = None
  if target != tuple(shape):
    raise ValueError(f"`{name}` of shape {tuple(a.shape)} does not broadcast to the input shape {tuple(shape)}.")
  return a


def keepdims_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
  """`shape` with every axis in `axes` set to 1."""
  return tuple(1 if i in axes else d for i, d in enumerate(shape))
