"""Argument checks shared by every op: axes, dtypes, epsilon, parameter shapes, masks.

Every check runs at trace time on static shapes and dtypes, and raises a
`ValueError` or `TypeError` that names the offending argument, so that bad
input never reaches XLA as an obscure shape error or broadcasts silently into a
wrong answer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad as _ad
import numpy as np

Axes = int | Sequence[int]


def as_array(x: Any) -> jax.Array:
  """`x` as a JAX array, NumPy arrays moved with `jax.device_put`.

  Run eagerly, `jnp.asarray` of a NumPy array is an operation of its own
  (JAX's `stage`), whose output `jax_debug_nans`/`jax_debug_infs` inspect: a
  NaN-padded input whose padding is masked out would raise there before any
  masking could happen. `device_put` moves the data and is not checked.
  """
  if isinstance(x, jax.Array):
    return x
  if isinstance(x, (np.ndarray, np.generic)) and not isinstance(x, np.bool_):
    return jax.device_put(x)
  return jnp.asarray(x)


def floating_input(x: Any, name: str = "x", *, allow_complex: bool = False) -> jax.Array:
  """Returns `x` as a JAX array, or raises `TypeError` unless it is real floating point (or complex, if allowed).

  `allow_complex` is set by the ops that support complex inputs as flax
  does (batch, layer, RMS, group and instance norm, `moments`, `normalize`).
  """
  x = as_array(x)
  if allow_complex and jnp.issubdtype(x.dtype, jnp.complexfloating):
    return x
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"`{name}` must be a real floating-point array, got dtype {x.dtype}; "
        f"cast it first, e.g. `{name}.astype(jnp.float32)`."
    )
  return x


def promoted_dtype(*args: Any, dtype: Any = None) -> np.dtype:
  """flax's output-dtype rule (`flax.linen.dtypes.canonicalize_dtype`): `dtype` if given, else the promotion of `args`.

  None entries are skipped; an integer promotion becomes float32. Unlike
  flax's helper, this reads only the dtypes: it never converts an argument
  with `jnp.asarray`, which run eagerly on an input holding NaN padding is an
  operation whose output `jax_debug_nans` flags. And the rule is applied
  under standard promotion, also when the caller runs with
  ``jax_numpy_dtype_promotion="strict"``: a module that mixes a bfloat16
  input with its own float32 parameters or state promotes by its documented
  rule, then casts explicitly, instead of failing.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm._validation import promoted_dtype
    >>> promoted_dtype(jnp.ones(2, jnp.bfloat16), None, jnp.ones(2, jnp.bfloat16))
    dtype(bfloat16)
  """
  if dtype is None:
    with jax.numpy_dtype_promotion("standard"):
      dtype = jnp.result_type(*(a.dtype if hasattr(a, "dtype") else a for a in args if a is not None))
    if not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(jnp.float32, dtype)
  dtype = np.dtype(jnp.dtype(dtype))
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"Dtype must be inexact: {dtype}")
  return dtype


def accumulation_dtype(*dtypes: Any) -> np.dtype:
  """The dtype statistics are accumulated in: at least float32 (float64 stays float64).

  A rule of the library, not a promotion of the caller's arrays, so it is
  decided under standard promotion even when the caller runs with
  ``jax_numpy_dtype_promotion="strict"`` (where bfloat16 and float32 have no
  common type); every array is then cast to it explicitly.
  """
  with jax.numpy_dtype_promotion("standard"):
    return np.dtype(jnp.promote_types(jnp.result_type(*dtypes), jnp.float32))


def real_dtype(dtype: Any) -> np.dtype:
  """The real counterpart of a floating or complex dtype: float32 for complex64, float64 for complex128."""
  return np.dtype(jnp.finfo(dtype).dtype)


def output_dtype(dtype: Any, default: Any) -> np.dtype:
  """The requested output `dtype` (`default` when None); raises `TypeError` unless it is floating point (complex too, for a complex `default`)."""
  out = np.dtype(default if dtype is None else jnp.dtype(dtype))
  if jnp.issubdtype(out, jnp.complexfloating) and jnp.issubdtype(default, jnp.complexfloating):
    return out
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
      if isinstance(a, (bool, np.bool_)):
        raise TypeError  # an index, but not an axis (NumPy refuses it too)
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


def real_number(value: Any, name: str) -> float:
  """`value` as a Python float; raises `TypeError` unless it is a concrete real number.

  Accepted: Python and NumPy reals (ints and floats) and concrete 0-d real
  arrays. Rejected, by name: bools (``True`` is not a hyperparameter value),
  strings (``"1e-3"`` would be parsed, hiding a configuration bug), complex
  numbers, arrays of other shapes, and traced values (a hyperparameter must
  be known at trace time).

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import real_number
    >>> real_number(1e-3, "epsilon")
    0.001
  """
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, numbers.Real) or (_is_array(value) and np.ndim(value) == 0)
  ):
    raise TypeError(f"`{name}` must be a real number (a Python or NumPy int or float), got {value!r}.")
  if _is_array(value):
    dtype = np.dtype(value.dtype)
    if dtype == np.bool_ or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"`{name}` must be a real number, got an array of dtype {dtype}.")
    if isinstance(value, jax.core.Tracer):
      # The usual cause: a hyperparameter passed as an argument of a jitted function.
      raise TypeError(
          f"`{name}` must be a Python number, got a traced value ({type(value).__name__}): it is a constant "
          f'of the compiled program, not an input. Mark it static, e.g. `jax.jit(f, static_argnames="{name}")`, '
          "or close over it instead of passing it as an argument."
      )
  return float(value)


def scale_offset(value: Any, scale: Any) -> float:
  """`scale_offset` as a float; raises unless it is a real number, and unless `scale` exists where it is nonzero.

  Example:
    >>> from jaxnorm._validation import scale_offset
    >>> scale_offset(1, [0.0])
    1.0
  """
  value = real_number(value, "scale_offset")
  if value and scale is None:
    raise ValueError(
        f"`scale_offset`={value!r} is added to `scale`, but `scale` is None: pass a scale (zeros "
        "for the identity) or leave scale_offset at 0."
    )
  return value


SAVED = ("input", "output")


def saved(value: Any, *, complex_input: bool = False, custom_vjp: bool = True) -> str:
  """`saved` ("input" or "output"), checked against what the backward from the output cannot serve.

  Example:
    >>> from jaxnorm._validation import saved
    >>> saved("output")
    'output'
  """
  if not isinstance(value, str) or value not in SAVED:
    raise ValueError(f"`saved` must be one of {SAVED} (what the backward keeps of this norm), got {value!r}.")
  if value == "output" and complex_input:
    raise ValueError(
        "`saved`='output' needs a real input and real parameters: complex ones are differentiated by plain "
        "autodiff, which keeps its own residuals. Use saved='input'."
    )
  if value == "output" and not custom_vjp:
    raise ValueError(
        "`saved`='output' chooses what the hand-derived VJP keeps; with `custom_vjp`=False there is none. "
        "Use saved='input' with custom_vjp=False."
    )
  return value


def negative_slope(value: Any) -> float:
  """A leaky ReLU's `negative_slope` as a float; raises unless it is a real number in [0, 1].

  Example:
    >>> from jaxnorm._validation import negative_slope
    >>> negative_slope(0.01)
    0.01
  """
  slope = real_number(value, "negative_slope")
  if not 0 <= slope <= 1:
    raise ValueError(
        f"`negative_slope` must be in [0, 1] (0 is a ReLU, 0.01 In-Place ABN's leaky ReLU), got {slope!r}."
    )
  return slope


def static_count(shape: tuple[int, ...], axes: tuple[int, ...], axis_name: Any = None, axis_index_groups: Any = None) -> int:
  """How many values each statistic over `axes` (and the devices of `axis_name`) sees, without a mask.

  The number of devices is static under `vmap`, `shard_map` and `pmap`
  (``psum`` of a Python constant is the axis size, and no collective).
  """
  n = math.prod(shape[a] for a in axes)
  if axis_name is not None:
    n *= len(axis_index_groups[0]) if axis_index_groups else lax.psum(1, axis_name)
  return n


def more_than_one_value(
    shape: tuple[int, ...], axes: tuple[int, ...], axis_name: Any, axis_index_groups: Any, owner: str
) -> None:
  """Raises `ValueError` when batch statistics over `axes` would see a single value per feature.

  Example:
    >>> from jaxnorm._validation import more_than_one_value
    >>> more_than_one_value((8, 4), (0,), None, None, "batch_norm")  # eight values: fine
  """
  if static_count(shape, axes, axis_name, axis_index_groups) == 1:
    over = f"axes {tuple(axes)}" + (f" and the devices of axis_name={axis_name!r}" if axis_name is not None else "")
    raise ValueError(
        f"{owner} is in training mode but gets a single value per feature (input of shape {tuple(shape)}, "
        f"statistics over {over}): the batch variance is 0, every output would equal the bias and no gradient "
        "would flow. Train with more than one value per feature, or use `use_running_average=True` "
        "(inference) for a single example."
    )


def integer(value: Any, name: str) -> int:
  """`value` as a Python int; raises `TypeError` unless it is an integer (Python or NumPy), not a bool.

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import integer
    >>> integer(np.int64(3), "num_groups")
    3
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be an int, got the bool {value!r}.")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(f"`{name}` must be an int, got {value!r}.") from None


def positive_epsilon(epsilon: Any, dtype: Any = None, name: str = "epsilon") -> float:
  """`epsilon` as a Python float; raises unless it is a real number that stays > 0 and finite in `dtype`.

  `dtype` is the dtype `epsilon` is added in (the accumulation dtype; float32,
  the narrowest accumulation dtype, when None). A value below that dtype's
  smallest normal number, ``jnp.finfo(dtype).tiny`` (1.18e-38 for float32),
  passes ``> 0`` but is flushed to 0 on CPUs and accelerators, and a constant
  input then normalizes to NaN: it is rejected, naming the smallest value that
  works.

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import positive_epsilon
    >>> positive_epsilon(1e-5)
    1e-05
  """
  value = real_number(epsilon, name)
  if not 0 < value < float("inf"):
    raise ValueError(f"`{name}` must be > 0 and finite, got {epsilon!r}.")
  dtype = np.dtype(jnp.float32 if dtype is None else dtype)
  tiny, largest = float(jnp.finfo(dtype).tiny), float(jnp.finfo(dtype).max)
  if value > largest:
    raise ValueError(
        f"`{name}`={epsilon!r} is inf in {dtype} (above {largest:.8g}): every output would be the bias. "
        f"`{name}` is added to the variance and should be small (e.g. 1e-5)."
    )
  if value < tiny:
    raise ValueError(
        f"`{name}`={epsilon!r} is below the smallest normal {dtype} number and is flushed to 0 in {dtype} "
        f"(a constant input would give NaN): `{name}` must be >= {tiny:.8g} (jnp.finfo({dtype}).tiny)."
    )
  return value


def momentum(m: Any, name: str = "momentum") -> float | jax.Array:
  """A running-statistics momentum: a number in [0, 1] as a float, or a real array with every entry in [0, 1].

  Shared by every module with running statistics (linen and nnx), so each
  rejects the same values. A concrete array is checked entry by entry and
  returned as is; a traced one cannot be checked at trace time and is returned
  unchecked. None (torch's cumulative average) is the caller's to handle.

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import momentum
    >>> momentum(0.9)
    0.9
  """
  if _is_array(m) and np.ndim(m) > 0:
    dtype = np.dtype(m.dtype)
    if dtype == np.bool_ or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"`{name}` must be a real number or a real array, got an array of dtype {dtype}.")
    if not isinstance(m, jax.core.Tracer):
      values = np.asarray(m)
      if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"`{name}` must be in [0, 1], got an array with entries {values.ravel()[:8]!r}.")
    return m
  value = real_number(m, name)
  if not 0 <= value <= 1:
    raise ValueError(f"`{name}` must be in [0, 1], got {m!r}.")
  return value


def axis_name(name: Any, arg: str = "axis_name") -> Hashable:
  """`axis_name` in a hashable form: None, one name, or a tuple of names (any sequence of names is accepted).

  `lax.psum` accepts a list of names; the ops keep `axis_name` in a static,
  hashed spec, so a list is turned into the equivalent tuple here.

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import axis_name
    >>> axis_name(["data", "model"])
    ('data', 'model')
  """
  if name is None:
    return None
  if isinstance(name, Sequence) and not isinstance(name, str):
    names = tuple(name)
    for n in names:
      if not isinstance(n, Hashable) or (isinstance(n, Sequence) and not isinstance(n, str)):
        raise TypeError(f"`{arg}` must be a name or a sequence of names, got {name!r}.")
    return names
  if not isinstance(name, Hashable):
    raise TypeError(f"`{arg}` must be a name (e.g. a str) or a sequence of names, got {name!r}.")
  return name


def axis_index_groups(groups: Any) -> tuple[tuple[int, ...], ...] | None:
  """`axis_index_groups` (see `jax.lax.psum`) as a tuple of tuples of ints, hashable like `axis_name`.

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import axis_index_groups
    >>> axis_index_groups([[0, 1], [2, 3]])
    ((0, 1), (2, 3))
  """
  if groups is None:
    return None
  try:
    return tuple(tuple(operator.index(i) for i in group) for group in groups)
  except TypeError:
    raise TypeError(
        f"`axis_index_groups` must be a sequence of sequences of device indices, got {groups!r}."
    ) from None


def state_shape(value: Any, shape: tuple[int, ...], name: str, owner: str | None = None) -> None:
  """Raises `ValueError` unless a stored state (e.g. a running statistic of a checkpoint) has exactly `shape`.

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import state_shape
    >>> state_shape(np.zeros(4), (4,), "batch_stats/mean")
  """
  if tuple(np.shape(value)) != tuple(shape):
    raise ValueError(
        f"{owner + ': ' if owner else ''}`{name}` has shape {tuple(np.shape(value))}, but this module expects {tuple(shape)} (the shape of its "
        "features): the variables come from a model of another width or layout."
    )


def _is_array(value: Any) -> bool:
  return isinstance(value, (np.ndarray, np.generic, jax.Array)) and not isinstance(value, numbers.Real)


def parameter(
    p: Any, shape: tuple[int, ...], name: str, explain: str, *, allow_complex: bool = False
) -> jax.Array | None:
  """Checks that an affine parameter is None or a floating (or, if allowed, complex) array of exactly `shape`."""
  if p is None:
    return None
  p = floating_input(p, name, allow_complex=allow_complex)
  if tuple(p.shape) != tuple(shape):
    raise ValueError(f"`{name}` must have shape {tuple(shape)} ({explain}), got {tuple(p.shape)}.")
  return p


def affine_parameter(
    p: Any,
    feature_shape: tuple[int, ...],
    feature_axes: tuple[int, ...],
    shape: tuple[int, ...],
    name: str,
    explain: str,
) -> jax.Array | None:
  """An affine parameter as an array of rank ``len(shape)`` that broadcasts to `shape`, or None.

  Two readings, tried in this order:

  - per feature: `p` has exactly `feature_shape` (the op's classic parameter,
    e.g. `(C,)`), and is laid along `feature_axes`;
  - call time: otherwise `p` has the rank of `shape` and broadcasts to it
    (size-1 axes stretched, e.g. DiT's per-example `(B, 1, C)` for `x` of
    shape `(B, T, C)`), or a lower rank and exactly the trailing axes of
    `shape` (a per-head `(H, D)` for `(B, T, H, D)`).

  Where both readings fit and differ (a `(C,)` scale of an NCHW batch norm
  whose width is also C), the per-feature one wins: pass the full rank (e.g.
  `(1, 1, 1, W)`) to mean the other. Anything else raises a `ValueError`
  naming both readings.
  """
  if p is None:
    return None
  p = floating_input(p, name, allow_complex=True)
  if tuple(p.shape) == tuple(feature_shape):
    return p.reshape(tuple(d if i in feature_axes else 1 for i, d in enumerate(shape)))
  try:
    # Below full rank, only an exact match of the trailing axes: a (1,) or
    # (5,) "scale" of a 16-wide x is far likelier a bug than a broadcast.
    if p.ndim < len(shape):
      fits = p.ndim > 0 and tuple(p.shape) == tuple(shape[len(shape) - p.ndim :])
    else:
      fits = p.ndim == len(shape) and jnp.broadcast_shapes(p.shape, shape) == tuple(shape)
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
        f"`{name}` must have shape {tuple(feature_shape)} ({explain}), or have the input's rank and "
        f"broadcast to its shape {tuple(shape)} (per example or position, e.g. {_example_shape(shape, feature_axes)}), "
        f"got {tuple(p.shape)}."
    )
  return to_rank(p, len(shape))


def _example_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  # A per-example parameter: the batch axis and the feature axes kept.
  return tuple(d if i == 0 or i in feature_axes else 1 for i, d in enumerate(shape))


def boolean_mask(mask: Any, name: str = "mask", shape: tuple[int, ...] | None = None) -> jax.Array | None:
  """`mask` as a JAX array (None stays None); raises `TypeError`, naming `name`, unless it is boolean.

  With `shape`, also a `ValueError` unless it broadcasts to `shape` (the
  mask keeps its own shape). Modules take ``mask=`` and hand it to an op's
  ``where=``; checking it here names the argument the caller actually passed.

  Example:
    >>> import numpy as np
    >>> from jaxnorm._validation import boolean_mask
    >>> boolean_mask(np.array([True, False])).dtype
    dtype('bool')
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  # A mask selects; it does not weigh. An additive attention mask (0 and -1e9)
  # or a float 0/1 mask cast to bool would read as "all valid" or select the
  # wrong elements, so anything but bool is refused instead of converted.
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f"`{name}` must be a boolean array (True = valid), got dtype {mask.dtype}; for a 0/1 mask use "
        f"`{name}.astype(bool)`, for an additive mask (0 and -inf) use `{name} == 0`."
    )
  if shape is not None:
    broadcast_mask(mask, shape, name)
  return mask


def broadcast_mask(where: Any, shape: tuple[int, ...], name: str = "where") -> jax.Array | None:
  """`where` as a boolean array of `shape`; raises unless it is boolean and broadcasts to `shape`."""
  if where is None:
    return None
  where = boolean_mask(where, name)
  try:
    target = jnp.broadcast_shapes(where.shape, shape)
  except ValueError:
    target = None
  if target != tuple(shape):
    raise ValueError(
        f"`{name}` of shape {tuple(where.shape)} does not broadcast to the input shape {tuple(shape)}."
    )
  return jnp.broadcast_to(where, shape)


def broadcast_operand(a: Any, shape: tuple[int, ...], name: str, *, allow_complex: bool = False) -> jax.Array:
  """Checks that a statistic or parameter broadcasts to the input `shape` without growing it."""
  a = floating_input(a, name, allow_complex=allow_complex)
  try:
    target = jnp.broadcast_shapes(a.shape, shape)
  except ValueError:
    target = None
  if target != tuple(shape):
    raise ValueError(f"`{name}` of shape {tuple(a.shape)} does not broadcast to the input shape {tuple(shape)}.")
  return a


def to_rank(a: jax.Array, ndim: int) -> jax.Array:
  """`a` with leading size-1 axes up to rank `ndim`: NumPy's broadcasting made explicit (for rank promotion "raise")."""
  return a.reshape((1,) * (ndim - a.ndim) + tuple(a.shape)) if a.ndim < ndim else a


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
  # `op` is a functional op ("layer_norm") or a module ("linen.LayerNorm").
  what = f"jaxnorm.{op}: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) cannot pass through "
  if "." in op:
    return TypeError(
        what + "the hand-derived jax.custom_vjp that the jaxnorm.linen and jaxnorm.nnx modules always use: "
        "differentiate the module in reverse mode (jax.grad, jax.vjp, jax.jacrev, jax.hessian), or call the "
        "functional op (e.g. `jaxnorm.layer_norm`) with `custom_vjp=False`."
    )
  return TypeError(
      what + "its hand-derived jax.custom_vjp. Pass `custom_vjp=False` to differentiate the same forward by "
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
