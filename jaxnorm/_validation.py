"""Argument checks shared by every op: axes, dtypes, epsilon, parameter shapes, masks.

Every check runs at trace time on static shapes and dtypes, and raises a
`ValueError` or `TypeError` that names the offending argument, so that bad
input never reaches XLA as an obscure shape error or broadcasts silently into a
wrong answer.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.interpreters import ad as _ad
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
  if ndim == 0 and seq:
    # "valid axes are 0..-1" would hide the real problem: there is no axis at all.
    raise ValueError(
        f"The input is a scalar (rank 0), but `{name}`={axes!r} names an axis: the op needs an "
        "input of rank at least 1 (add one, e.g. `x[None]` or `x.reshape(1)`)."
    )
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
    if isinstance(epsilon, jax.core.Tracer):
      # The usual cause: epsilon passed as an argument of a jitted function.
      raise TypeError(
          f"`epsilon` must be a Python number, got a traced value ({type(epsilon).__name__}): it "
          "is a constant of the compiled program, not an input. Mark it static, e.g. "
          '`jax.jit(f, static_argnames="epsilon")`, or close over it instead of passing it as an argument.'
      ) from None
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


class _DefaultAxis(int):
  """An int that is the default `feature_axes`, told apart from an explicit -1.

  It prints and compares as -1, so signatures and hashes are unchanged; only
  `feature_axes_or_axis` looks at its identity, to see whether the caller gave
  `feature_axes` at all.
  """

  __slots__ = ()

  def __repr__(self) -> str:
    return "-1"


DEFAULT_FEATURE_AXES = _DefaultAxis(-1)


def feature_axes_or_axis(feature_axes: Axes, axis: Axes | None) -> Axes:
  """The feature axes of a batch-norm op, given as `feature_axes` or as `axis` (one of the two).

  `axis` is the name `moments`, `layer_norm` and `linen.BatchNorm` use; for
  the batch-norm family it means the same as `feature_axes`: the axes that keep
  their own statistics.
  """
  if axis is None:
    return feature_axes
  if feature_axes is not DEFAULT_FEATURE_AXES:
    raise TypeError(
        f"Give the feature axes once: `axis`={axis!r} and `feature_axes`={feature_axes!r} were both "
        "passed (they are the same argument: the axes that keep their own statistics)."
    )
  return axis


# JAX's message when jvp meets a custom_vjp function (jax/_src/custom_derivatives.py).
_JVP_OF_CUSTOM_VJP = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


def _forward_mode_error(op: str) -> TypeError:
  return TypeError(
      f"jaxnorm.{op}: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) cannot pass through "
      "its hand-derived jax.custom_vjp. Pass `custom_vjp=False` to differentiate the same forward by "
      f"plain autodiff, e.g. `jaxnorm.{op}(..., custom_vjp=False)`; reverse mode (jax.grad, jax.vjp, "
      "jax.jacrev, jax.hessian) works either way. The jaxnorm.linen and jaxnorm.nnx modules always "
      "use the custom VJP: differentiate them in reverse mode."
  )


@contextlib.contextmanager
def explain_forward_mode(op: str, custom_vjp: bool, operands: Any) -> Iterator[None]:
  """Raises a `TypeError` naming the fix where JAX would say only "can't apply forward-mode autodiff".

  Forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`) cannot pass through
  a `jax.custom_vjp`. JAX raises its error, a `TypeError`, when the custom_vjp
  function is bound under a JVP trace, or, under an enclosing jit, only when
  that jit is lowered, far from this call. So the check is made up front: an
  operand that is itself a JVP tracer means the kernel would be traced for
  forward mode (under `jax.hessian` the operands are linearize tracers: the
  custom VJP handles them). JAX's own error is still caught and rewritten if it
  surfaces inside the block; every other error passes through untouched.

  Args:
    op: the public op's name, for the message.
    custom_vjp: the op's `custom_vjp` argument (False: nothing to check).
    operands: the op's differentiable inputs (a pytree).
  """
  if custom_vjp and any(isinstance(leaf, _ad.JVPTracer) for leaf in jax.tree.leaves(operands)):
    raise _forward_mode_error(op)
  try:
    yield
  except TypeError as e:
    if not custom_vjp or _JVP_OF_CUSTOM_VJP not in str(e):
      raise
    raise _forward_mode_error(op) from e
