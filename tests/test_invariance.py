"""Table 1 of Ba, Kiros & Hinton (2016), plus the RMSNorm row, measured with jaxnorm's ops.

One bias-free layer `a = x W^T`, then batch norm (over the batch), weight norm
(each unit's incoming weight vector, a row of `W`), layer norm or RMS norm
(over the units); see `jaxnorm.analysis._invariance` for the setup.

References, never jaxnorm itself: the paper's table, written out below; the
transformations' definitions and the four normalizations as float64 NumPy.
An invariant entry must hold to rounding (float32: max abs change < 1e-5,
float64: < 1e-10, epsilon 1e-12); every "no" must change the output by > 1e-2.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm.analysis as analysis
from jaxnorm.analysis import invariance_table, normalized_output, transform


YES, NO = True, False

# (a) weight matrix re-scaling    W' = delta W
# (b) weight matrix re-centering  W' = W + 1 gamma^T (gamma added to every unit's weights)
# (c) weight vector re-scaling    one unit's row of W times delta
# (d) dataset re-scaling          x' = delta x
# (e) dataset re-centering        x' = x + c
# (f) single case re-scaling      one row of x times delta
COLUMNS = {
    "a": "weight_matrix_rescaling",
    "b": "weight_matrix_recentering",
    "c": "weight_vector_rescaling",
    "d": "dataset_rescaling",
    "e": "dataset_recentering",
    "f": "single_case_rescaling",
}
#                      a    b    c    d    e    f
TABLE_1 = {
    "batch_norm":   (YES, NO,  YES, YES, YES, NO),
    "weight_norm":  (YES, NO,  YES, NO,  NO,  NO),
    "layer_norm":   (YES, YES, NO,  YES, NO,  YES),
    "rms_norm":     (YES, NO,  NO,  YES, NO,  YES),  # Zhang & Sennrich 2019
}  # fmt: skip

CELLS = [
    pytest.param(method, COLUMNS[col], invariant, id=f"{method}-{col}-{'yes' if invariant else 'no'}")
    for method, row in TABLE_1.items()
    for col, invariant in zip(COLUMNS, row)
]

# Per dtype: the rounding bound of an invariant entry, and the re-scaling factor
# (one run grows, the other shrinks).
PRECISION = {"float32": (1e-5, 3.0), "float64": (1e-10, 0.25)}
CHANGED = 1e-2


@pytest.fixture(scope="module", params=sorted(PRECISION))
def measured(request):
  dtype = request.param
  tol, delta = PRECISION[dtype]
  table = invariance_table(list(TABLE_1), list(COLUMNS.values()), dtype=dtype, delta=delta, epsilon=1e-12)
  return table, tol


@pytest.mark.parametrize("method, transformation, invariant", CELLS)
def test_table_1(measured, method, transformation, invariant):
  table, tol = measured
  change = table[method][transformation]
  if invariant:
    assert change < tol, f"{method} should ignore {transformation}, output moved by {change:.3g}"
  else:
    assert change > CHANGED, f"{method} should not ignore {transformation}, output moved by {change:.3g}"


def test_exported_paper_table_is_table_1():
  assert analysis.TRANSFORMATIONS == tuple(COLUMNS.values())
  assert analysis.METHODS == tuple(TABLE_1)
  assert {m: tuple(analysis.PAPER_TABLE[m][t] for t in COLUMNS.values()) for m in TABLE_1} == TABLE_1


def _data(seed=0, units=5, inputs=4, cases=7):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((units, inputs)), rng.standard_normal((cases, inputs)),
          rng.standard_normal(inputs), rng.standard_normal(inputs))  # fmt: skip


def test_transformations_match_their_definitions():
  w, x, gamma, c = _data()
  delta, unit, case = 1.7, 3, 5

  def row_scaled(m, i):
    m = m.copy()
    m[i] *= delta
    return m

  expected = {
      "weight_matrix_rescaling": (delta * w, x),
      "weight_matrix_recentering": (w + np.outer(np.ones(len(w)), gamma), x),
      "weight_vector_rescaling": (row_scaled(w, unit), x),
      "dataset_rescaling": (w, delta * x),
      "dataset_recentering": (w, x + c),
      "single_case_rescaling": (w, row_scaled(x, case)),
  }
  for name, (w_ref, x_ref) in expected.items():
    w2, x2 = transform(name, w, x, delta=delta, gamma=gamma, shift=c, unit=unit, case=case)
    np.testing.assert_allclose(np.asarray(w2), w_ref, rtol=1e-15, err_msg=name)
    np.testing.assert_allclose(np.asarray(x2), x_ref, rtol=1e-15, err_msg=name)
  # (b) as the paper puts it: the same gamma . x is added to every unit's summed input.
  w2, _ = transform("weight_matrix_recentering", w, x, gamma=gamma)
  np.testing.assert_allclose(x @ np.asarray(w2).T, x @ w.T + (x @ gamma)[:, None], rtol=1e-13)


def test_normalized_output_matches_numpy():
  w, x, _, _ = _data(1)
  a = x @ w.T
  eps = 1e-12
  expected = {
      "batch_norm": (a - a.mean(0)) / np.sqrt(a.var(0) + eps),
      "layer_norm": (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + eps),
      "rms_norm": a / np.sqrt(np.mean(a**2, 1, keepdims=True) + eps),
      "weight_norm": x @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T,
  }
  for method, ref in expected.items():
    h = normalized_output(method, jnp.asarray(w), jnp.asarray(x), epsilon=eps)
    assert h.dtype == jnp.float64 and h.shape == (7, 5)
    np.testing.assert_allclose(np.asarray(h), ref, rtol=1e-10, atol=1e-12, err_msg=method)


def test_bad_arguments_name_the_argument():
  w, x, _, _ = _data()
  with pytest.raises(ValueError, match="`method`"):
    normalized_output("group_norm", w, x)
  with pytest.raises(ValueError, match="agree on D"):
    normalized_output("layer_norm", w, x[:, :3])
  with pytest.raises(ValueError, match="`transformation`"):
    transform("weight_shuffling", w, x)
  with pytest.raises(ValueError, match="`gamma`"):
    transform("weight_matrix_recentering", w, x)
  with pytest.raises(ValueError, match="`shift`"):
    transform("dataset_recentering", w, x, shift=np.ones(3))
  with pytest.raises(ValueError, match="`transformations`"):
    invariance_table(["layer_norm"], ["dataset_rescaling", "d"])
  with pytest.raises(TypeError, match="`dtype`"):
    invariance_table(dtype=np.int32)


def _private_jaxnorm_names(tree):
  """Private jaxnorm modules or names a module imports or uses, outside jaxnorm.analysis itself."""

  def private(dotted):
    return dotted.startswith("jaxnorm") and not dotted.startswith("jaxnorm.analysis") and any(
        part.startswith("_") for part in dotted.split(".")
    )

  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if private(a.name)]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxnorm"):
      if not node.module.startswith("jaxnorm.analysis"):
        found += [f"{node.module}.{a.name}" for a in node.names if private(f"{node.module}.{a.name}")]
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "jaxnorm":
      found += [f"jaxnorm.{node.attr}"] if node.attr.startswith("_") else []
  return found


def test_analysis_is_a_user_of_the_public_api():
  assert _private_jaxnorm_names(ast.parse("import jaxnorm._moments\nfrom jaxnorm import _standardize")) == [
      "jaxnorm._moments", "jaxnorm._standardize"
  ]
  for path in pathlib.Path(analysis.__file__).parent.glob("*.py"):
    assert _private_jaxnorm_names(ast.parse(path.read_text())) == [], path.name
  # `import jaxnorm` does not import it (a fresh interpreter: this one already has).
  # Without x64 a float64 table is refused rather than silently computed in float32.
  code = (
      "import sys, jaxnorm; assert 'jaxnorm.analysis' not in sys.modules\n"
      "try: jaxnorm.analysis.invariance_table(dtype='float64')\n"
      "except ValueError as e: assert 'jax_enable_x64' in str(e)\n"
      "else: raise AssertionError('float64 without x64 accepted')"
  )
  env = {**os.environ, "JAX_ENABLE_X64": "0"}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
  assert proc.returncode == 0, proc.stderr
