r"""Table 1 of Ba, Kiros & Hinton (2016), measured: which normalization ignores which transformation.

One layer, no bias before the normalization, `U` units and `D` inputs, a
batch of `N` training cases (rows of `x`):

.. math::
    a = x W^\top \quad (N \times U), \qquad h = \mathrm{norm}(a),

with `W` of shape `(U, D)` (row `i` is unit `i`'s incoming weight vector) and

* ``batch_norm``: each unit standardized over the batch (axis 0);
* ``layer_norm``: each case standardized over the units (axis 1);
* ``rms_norm``: each case divided by its root mean square over the units;
* ``weight_norm``: :math:`h = x\,\hat W^\top`, each row of `W` divided by its
  norm (`W` is the direction `v` of :math:`w = g\,v/\lVert v\rVert`; `g = 1`).

The paper asks whether the model's output is invariant, which is what
:math:`h` decides: the normalization's own gain and bias (and any bias after
it) are fixed and act after :math:`h`, so they change nothing here. A bias
*inside* :math:`a` would: :math:`x' = \delta x` then scales :math:`x W^\top`
but not the bias, and batch norm would lose its dataset re-scaling invariance.
That is why the layer has none, as in the paper.

The six transformations (`TRANSFORMATIONS`, in the paper's order):

==== ============================== ===========================================
(a)  ``weight_matrix_rescaling``    :math:`W' = \delta W`
(b)  ``weight_matrix_recentering``  :math:`W' = W + \mathbf 1 \gamma^\top`: the same
                                    :math:`\gamma` added to every unit's weights, so
                                    :math:`a'_{ni} = a_{ni} + \gamma\cdot x_n` for every unit
(c)  ``weight_vector_rescaling``    one unit's row: :math:`w'_u = \delta w_u`
(d)  ``dataset_rescaling``          every case: :math:`x'_n = \delta x_n`
(e)  ``dataset_recentering``        every case: :math:`x'_n = x_n + c`
(f)  ``single_case_rescaling``      one case: :math:`x'_m = \delta x_m`
==== ============================== ===========================================

with :math:`\delta > 0` (a negative factor flips signs, which no normalization
here undoes). An entry is "invariant" when :math:`h` does not change at all
for every `W`, `x` and parameter of the transformation; with a small
`epsilon` the measured change is then rounding error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm

METHODS = ("batch_norm", "weight_norm", "layer_norm", "rms_norm")

TRANSFORMATIONS = (
    "weight_matrix_rescaling",  # (a)
    "weight_matrix_recentering",  # (b)
    "weight_vector_rescaling",  # (c)
    "dataset_rescaling",  # (d)
    "dataset_recentering",  # (e)
    "single_case_rescaling",  # (f)
)

# Table 1 of the layer-norm paper, plus the RMSNorm row (Zhang & Sennrich, 2019):
# True where the method's output is invariant under the transformation.
_PAPER_ROWS = {
    "batch_norm": (True, False, True, True, True, False),
    "weight_norm": (True, False, True, False, False, False),
    "layer_norm": (True, True, False, True, False, True),
    "rms_norm": (True, False, False, True, False, True),
}
PAPER_TABLE: Mapping[str, Mapping[str, bool]] = {
    method: dict(zip(TRANSFORMATIONS, row)) for method, row in _PAPER_ROWS.items()
}


def _check_name(name: str, choices: Sequence[str], argument: str) -> str:
  if name not in choices:
    raise ValueError(f"`{argument}` must be one of {', '.join(map(repr, choices))}; got {name!r}.")
  return name


def _as_matrix(a: Any, name: str) -> jax.Array:
  a = jnp.asarray(a)
  if a.ndim != 2 or not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(f"`{name}` must be a 2-D floating-point array, got shape {a.shape} and dtype {a.dtype}.")
  return a


def normalized_output(method: str, w: Any, x: Any, *, epsilon: float = 1e-12) -> jax.Array:
  r"""The normalized summed inputs :math:`h` of one bias-free layer (see the module docstring).

  .. math::
      a = x W^\top, \qquad h = \mathrm{norm}(a) \quad\text{or, for weight norm,}\quad
      h = x \Big(\frac{w_i}{\lVert w_i\rVert}\Big)_i^\top .

  Args:
    method: one of `METHODS`: ``"batch_norm"`` (over the batch),
      ``"layer_norm"``, ``"rms_norm"`` (over the units) or ``"weight_norm"``
      (each unit's incoming weight vector, i.e. each row of `w`, to unit length).
    w: weights `(U, D)`, one row per unit.
    x: inputs `(N, D)`, one row per training case.
    epsilon: the op's epsilon; tiny, so that the invariances hold to rounding.

  Returns:
    `h` of shape `(N, U)`, in the dtype of `x @ w.T`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm.analysis import normalized_output
    >>> normalized_output("weight_norm", jnp.array([[3., 4.]]), jnp.array([[5., 10.]]))
    Array([[11.]], dtype=float32)
  """
  _check_name(method, METHODS, "method")
  w = _as_matrix(w, "w")
  x = _as_matrix(x, "x")
  if w.shape[1] != x.shape[1]:
    raise ValueError(f"`w` `(U, D)` and `x` `(N, D)` must agree on D; got shapes {w.shape} and {x.shape}.")
  return _normalized_output(method, w, x, epsilon)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _normalized_output(method, w, x, epsilon):
  # HIGHEST: on accelerators a default-precision matmul would round the summed
  # inputs to bf16 and drown the invariances in noise.
  def summed(w):
    return jnp.matmul(x, w.T, precision=jax.lax.Precision.HIGHEST)

  if method == "weight_norm":
    return summed(jaxnorm.weight_norm(w, None, feature_axes=0, epsilon=epsilon))
  a = summed(w)
  if method == "batch_norm":
    return jaxnorm.batch_norm(a, feature_axes=-1, epsilon=epsilon)[0]
  if method == "layer_norm":
    return jaxnorm.layer_norm(a, axis=-1, epsilon=epsilon)
  return jaxnorm.rms_norm(a, axis=-1, epsilon=epsilon)


def transform(
    transformation: str,
    w: Any,
    x: Any,
    *,
    delta: float = 3.0,
    gamma: Any = None,
    shift: Any = None,
    unit: int = 0,
    case: int = 0,
) -> tuple[jax.Array, jax.Array]:
  r"""Applies one of the paper's six transformations to the weights `w` `(U, D)` and the data `x` `(N, D)`.

  ``weight_matrix_rescaling`` :math:`W' = \delta W`;
  ``weight_matrix_recentering`` :math:`W' = W + \mathbf 1\gamma^\top` (`gamma` of shape `(D,)`);
  ``weight_vector_rescaling`` row `unit` of `W` times :math:`\delta`;
  ``dataset_rescaling`` :math:`x' = \delta x`;
  ``dataset_recentering`` :math:`x' = x + c` (`shift` :math:`c` of shape `(D,)`, added to every case);
  ``single_case_rescaling`` row `case` of `x` times :math:`\delta`.
  The other argument comes back unchanged.

  Args:
    transformation: one of `TRANSFORMATIONS`.
    w: weights `(U, D)`, one row per unit.
    x: inputs `(N, D)`, one row per training case.
    delta: the re-scaling factor (the paper's invariances assume `delta > 0`).
    gamma: `(D,)`, needed by ``weight_matrix_recentering``.
    shift: `(D,)`, needed by ``dataset_recentering``.
    unit: the row of `w` that ``weight_vector_rescaling`` re-scales.
    case: the row of `x` that ``single_case_rescaling`` re-scales.

  Returns:
    `(w', x')`, with the shapes and dtypes of `w` and `x`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm.analysis import transform
    >>> w, x = transform("weight_matrix_recentering", jnp.zeros((2, 3)), jnp.ones((1, 3)),
    ...                  gamma=jnp.array([1., 2., 3.]))
    >>> w
    Array([[1., 2., 3.],
           [1., 2., 3.]], dtype=float32)
  """
  _check_name(transformation, TRANSFORMATIONS, "transformation")
  w = _as_matrix(w, "w")
  x = _as_matrix(x, "x")

  def vector(v, name):
    if v is None:
      raise ValueError(f"`{name}` (shape ({w.shape[1]},)) is needed by {transformation!r}.")
    v = jnp.asarray(v)
    if v.shape != (w.shape[1],):
      raise ValueError(f"`{name}` must have shape ({w.shape[1]},) (the inputs D), got {v.shape}.")
    return v

  if transformation == "weight_matrix_rescaling":
    return w * delta, x
  if transformation == "weight_matrix_recentering":
    return w + vector(gamma, "gamma").astype(w.dtype)[None, :], x
  if transformation == "weight_vector_rescaling":
    return w.at[unit].multiply(delta), x
  if transformation == "dataset_rescaling":
    return w, x * delta
  if transformation == "dataset_recentering":
    return w, x + vector(shift, "shift").astype(x.dtype)[None, :]
  return w, x.at[case].multiply(delta)


def invariance_table(
    methods: Sequence[str] = METHODS,
    transformations: Sequence[str] = TRANSFORMATIONS,
    *,
    num_cases: int = 16,
    num_inputs: int = 8,
    num_units: int = 6,
    delta: float = 3.0,
    epsilon: float = 1e-12,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
  r"""Measures Table 1 of the layer-norm paper: how much each transformation changes each method's output.

  Draws standard normal `W` `(num_units, num_inputs)`, `x`
  `(num_cases, num_inputs)`, :math:`\gamma` and :math:`c` `(num_inputs,)`
  (float64 NumPy, `seed`, then cast to `dtype`), and for every method and
  transformation returns

  .. math::
      \max_{n,i} \big| h'_{ni} - h_{ni} \big|,

  :math:`h` = `normalized_output(method, W, x)` and :math:`h'` the same after
  `transform(transformation, W, x, delta=delta, gamma=gamma, shift=c)` (unit 0,
  case 0). Invariant entries come out at rounding level (about 1e-7 in
  float32); the others are of order one (compare with `PAPER_TABLE`).

  Args:
    methods: rows, any of `METHODS`.
    transformations: columns, any of `TRANSFORMATIONS`.
    num_cases, num_inputs, num_units: `N`, `D`, `U`.
    delta: the re-scaling factor, > 0.
    epsilon: passed to every op; tiny, so the invariances hold to rounding.
    dtype: float32, or float64 when `jax_enable_x64` is on.
    seed: NumPy seed of the draw.

  Returns:
    ``{method: {transformation: max abs change}}`` of Python floats, in the
    given orders (`pandas.DataFrame(table).T` is the paper's layout).

  Example:
    >>> from jaxnorm.analysis import invariance_table
    >>> table = invariance_table(["layer_norm"], ["weight_matrix_recentering", "dataset_recentering"])
    >>> table["layer_norm"]["weight_matrix_recentering"] < 1e-5
    True
    >>> table["layer_norm"]["dataset_recentering"] > 1e-2
    True
  """
  for m in methods:
    _check_name(m, METHODS, "methods")
  for t in transformations:
    _check_name(t, TRANSFORMATIONS, "transformations")
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating):
    raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype}.")
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(f"`dtype`={dtype} needs `jax.config.update('jax_enable_x64', True)`.")
  rng = np.random.default_rng(seed)
  w, x = rng.standard_normal((num_units, num_inputs)), rng.standard_normal((num_cases, num_inputs))
  gamma, shift = rng.standard_normal(num_inputs), rng.standard_normal(num_inputs)
  w, x, gamma, shift = (jnp.asarray(a, dtype) for a in (w, x, gamma, shift))

  table: dict[str, dict[str, float]] = {}
  for m in methods:
    h = normalized_output(m, w, x, epsilon=epsilon)
    row = table[m] = {}
    for t in transformations:
      w2, x2 = transform(t, w, x, delta=delta, gamma=gamma, shift=shift)
      row[t] = float(jnp.max(jnp.abs(normalized_output(m, w2, x2, epsilon=epsilon) - h)))
  return table
