"""Mixed precision: bfloat16/float16 inputs, `dtype`/`param_dtype` as in flax.linen, float64 kept.

References:
* output and statistics dtypes: `flax.linen` (BatchNorm, LayerNorm, RMSNorm, GroupNorm) for the same
  `dtype`/`param_dtype`/input dtype;
* values: a float64 NumPy computation on the very same (already rounded) inputs and parameters,
  at the resolution of each dtype (tolerances from `jnp.finfo(dtype).eps`); and flax's values
  at the coarser of that resolution and the resolution flax itself computes in;
* float16 inputs are ~300-1000, whose squares (~1e6) overflow float16 (max 65504): statistics
  must be accumulated in float32;
* gradients: float64 autodiff of a textbook `jax.numpy` batch/layer norm, at float16 resolution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

BF16, F16, F32, F64 = jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64
C = 4


def eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def _data(shape, dtype, seed=0):
  """Values in [300, 1000]: their float16 squares overflow."""
  return jnp.asarray(np.random.default_rng(seed).uniform(300, 1000, size=shape), dtype)


def _f64(a):
  return np.asarray(a, np.float64)


def _reference(name, x, scale, bias):
  """Textbook float64 forward on the exact values of `x` and the parameters; also the batch statistics."""
  x = _f64(x)
  if name == "BatchNorm":
    axes, groups = (0, 1), None
  elif name == "GroupNorm":
    axes, groups = (1, 3), 2
  else:
    axes, groups = (-1,), None
  xg = x.reshape(*x.shape[:-1], groups, C // groups) if groups else x
  if name == "RMSNorm":
    mean, var = 0.0, (xg**2).mean(axes, keepdims=True)
  else:
    mean, var = xg.mean(axes, keepdims=True), xg.var(axes, keepdims=True)
  eps_ = 1e-5 if name == "BatchNorm" else 1e-6
  y = ((xg - mean) / np.sqrt(var + eps_)).reshape(x.shape)
  y = y * _f64(scale) + (0 if bias is None else _f64(bias))
  return y, np.squeeze(mean), np.squeeze(var)


def _module(lib, name, **kwargs):
  extra = {"use_running_average": False} if name == "BatchNorm" else {}
  if name == "GroupNorm":
    extra["num_groups"] = 2
  return getattr(lib, name)(**kwargs, **extra, use_fast_variance=False) if lib is nn else getattr(lib, name)(
      **kwargs, **extra
  )


def _params(variables, param_dtype):
  r = np.random.default_rng(1)
  return {k: jnp.asarray(1 + 0.3 * r.normal(size=v.shape), param_dtype) for k, v in variables["params"].items()}


CASES = [
    # (x dtype, dtype, param_dtype): the output dtype is flax's promotion.
    (BF16, None, F32),  # -> float32
    (BF16, None, BF16),  # -> bfloat16
    (F16, None, F16),  # -> float16, values whose squares overflow float16
    (F16, F32, F16),  # -> float32
    (F32, BF16, F32),  # -> bfloat16
    (F32, F16, F32),  # -> float16
    (F64, None, F32),  # -> float64
    (F64, F32, F64),  # -> float32
    (BF16, None, F64),  # -> float64 (flax computes the statistics in float32 here; we in float64)
    (F32, F64, F32),  # -> float64, wider than the input: computed in float64, as flax does
]


@pytest.mark.parametrize("x_dtype, dtype, param_dtype", CASES, ids=lambda d: getattr(d, "__name__", str(d)))
@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm"])
def test_dtypes_and_values_like_flax(name, x_dtype, dtype, param_dtype):
  x = _data((3, 2, C), x_dtype)
  theirs = _module(nn, name, dtype=dtype, param_dtype=param_dtype)
  ours = _module(jnn, name, dtype=dtype, param_dtype=param_dtype)
  with flax_promotion():
    variables = theirs.init(jax.random.key(0), x)
  ours_init = ours.init(jax.random.key(0), x)
  assert jax.tree_util.tree_map(jnp.shape, ours_init) == jax.tree_util.tree_map(jnp.shape, variables)
  assert jax.tree_util.tree_map(lambda a: a.dtype, ours_init["params"]) == jax.tree_util.tree_map(
      lambda a: a.dtype, variables["params"]
  )
  variables = {**variables, "params": _params(variables, param_dtype)}
  with flax_promotion():
    y_theirs, up_theirs = theirs.apply(variables, x, mutable=["batch_stats"])
  if ours_init.get("batch_stats"):
    variables = {**variables, "batch_stats": ours_init["batch_stats"]}
  y_ours, up_ours = ours.apply(variables, x, mutable=["batch_stats"])

  assert y_ours.dtype == y_theirs.dtype
  assert jax.tree_util.tree_map(lambda a: a.dtype, up_ours) == jax.tree_util.tree_map(lambda a: a.dtype, up_theirs)

  params = variables["params"]
  y_ref, mean_ref, var_ref = _reference(name, x, params["scale"], params.get("bias"))
  # Rounding the exact result to the output dtype, plus float32-level (or better) statistics;
  # |x - mean| / std <= 3 here, so the statistics' relative error is not amplified much.
  acc = jaxnorm._validation.accumulation_dtype(x_dtype, param_dtype, *(() if dtype is None else (dtype,)))
  tol = eps(y_ours.dtype)
  np.testing.assert_allclose(_f64(y_ours), y_ref, rtol=tol, atol=tol + 32 * eps(acc))
  # flax computes its statistics in `dtype` (else x's dtype), at least float32.
  flax_acc = jaxnorm._validation.accumulation_dtype(x_dtype if dtype is None else dtype)
  tol_flax = max(tol, eps(flax_acc))
  np.testing.assert_allclose(_f64(y_ours), _f64(y_theirs), rtol=2 * tol_flax, atol=2 * tol_flax + 32 * eps(flax_acc))

  if name == "BatchNorm":
    stats = up_ours["batch_stats"]
    stat_eps = eps(stats["mean"].dtype)
    np.testing.assert_allclose(_f64(stats["mean"]), 0.01 * mean_ref, rtol=8 * stat_eps)
    np.testing.assert_allclose(_f64(stats["var"]), 0.99 + 0.01 * var_ref, rtol=8 * stat_eps)


@pytest.mark.parametrize("x_dtype", [BF16, F16])
@pytest.mark.parametrize("module", ["BatchNorm", "BatchRenorm", "GhostBatchNorm"])
def test_half_inputs_keep_float32_running_statistics(module, x_dtype):
  """Several jitted training steps on 16-bit inputs: float32 running statistics, equal to a float64 EMA."""
  kwargs = {"r_max": 1.0, "d_max": 0.0} if module == "BatchRenorm" else {}
  layer = getattr(jnn, module)(use_running_average=False, momentum=0.8, **kwargs)
  xs = [_data((8, C), x_dtype, seed=s) for s in range(3)]
  variables = layer.init(jax.random.key(0), xs[0])
  assert all(v.dtype == F32 for v in jax.tree_util.tree_leaves(variables["batch_stats"]))
  step = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))
  mean, var = np.zeros(C), np.ones(C)
  for x in xs:
    y, updates = step(variables, x)
    variables = {**variables, **updates}
    assert y.dtype == F32  # flax's promotion with float32 parameters
    assert np.all(np.isfinite(_f64(y)))
    mean = 0.8 * mean + 0.2 * _f64(x).mean(0)
    var = 0.8 * var + 0.2 * _f64(x).var(0)
  stats = variables["batch_stats"]
  assert stats["mean"].dtype == F32 and stats["var"].dtype == F32
  np.testing.assert_allclose(stats["mean"], mean, rtol=16 * eps(F32))
  np.testing.assert_allclose(stats["var"], var, rtol=64 * eps(F32))
  # Inference with 16-bit parameters: float16 output, computed in float32 from the running statistics.
  x = xs[0]
  y = layer.copy(use_running_average=True, param_dtype=x_dtype).apply(
      {**variables, "params": jax.tree_util.tree_map(lambda p: p.astype(x_dtype), variables["params"])}, x
  )
  assert y.dtype == x_dtype
  y_ref = (_f64(x) - _f64(stats["mean"])) / np.sqrt(_f64(stats["var"]) + 1e-5)
  np.testing.assert_allclose(_f64(y), y_ref, rtol=eps(x_dtype), atol=eps(x_dtype))


def _textbook(x, scale, bias, axes):
  mean = x.mean(axes, keepdims=True)
  var = ((x - mean) ** 2).mean(axes, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-5) * scale[None] + bias[None]


@pytest.mark.parametrize("name, axes", [("batch_norm", (0,)), ("layer_norm", (1,))])
def test_float16_gradients_against_float64_autodiff(name, axes):
  """Gradients of float16 inputs whose squares overflow float16: finite, and float64's at float16 resolution."""
  x = _data((6, C), F16)
  scale, bias = jnp.asarray([0.5, 1.0, 2.0, 1.5], F16), jnp.asarray([0.1, -0.2, 0.3, 0.0], F16)
  ct = jnp.asarray(np.random.default_rng(2).normal(size=(6, C)), F16)
  if name == "batch_norm":
    f = lambda x, s, b: jaxnorm.batch_norm(x, s, b, epsilon=1e-5)[0]
  else:
    f = lambda x, s, b: jaxnorm.layer_norm(x, s, b, epsilon=1e-5)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(F32) * ct.astype(F32)), (0, 1, 2)))(x, scale, bias)
  f64 = [jnp.asarray(_f64(a)) for a in (x, scale, bias)]
  ref = jax.jit(jax.grad(lambda *a: jnp.sum(_textbook(*a, axes) * _f64(ct)), (0, 1, 2)))(*f64)
  for g, r in zip(grads, ref):
    assert g.dtype == F16 and np.all(np.isfinite(_f64(g)))
    scale_ = np.max(np.abs(_f64(r)))
    np.testing.assert_allclose(_f64(g), _f64(r), rtol=2 * eps(F16), atol=4 * eps(F16) * scale_)


def test_float64_stays_float64_and_scan_carries_batch_stats():
  """float64 inputs: float64 output and statistics from init on (flax: float32 at init, float64 after a step)."""
  xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, C)) * 1e-3 + 1.0, F64)
  ours = jnn.BatchNorm(use_running_average=False, momentum=0.7)
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.7, use_fast_variance=False)
  variables = ours.init(jax.random.key(0), xs[0])
  assert variables["batch_stats"]["mean"].dtype == F64 and variables["batch_stats"]["var"].dtype == F64
  with flax_promotion():
    v_theirs = theirs.init(jax.random.key(0), xs[0])
  assert v_theirs["batch_stats"]["mean"].dtype == F32  # flax's choice, documented in BatchNorm

  def step(v, x):
    y, updates = ours.apply(v, x, mutable=["batch_stats"])
    return {**v, **updates}, y

  # lax.scan needs the carried batch_stats to keep their dtype from one step to the next.
  final, ys = jax.lax.scan(step, variables, xs)
  assert ys.dtype == F64 and final["batch_stats"]["var"].dtype == F64
  for x in xs:
    with flax_promotion():
      _, up = theirs.apply(v_theirs, x, mutable=["batch_stats"])
    v_theirs = {**v_theirs, **up}
  assert v_theirs["batch_stats"]["var"].dtype == F64
  # flax's first update scales its float32 initial variance in float32 (0.7 * ones(float32)), so
  # it agrees with the exact statistics only to float32 resolution; ours is float64 throughout.
  for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(v_theirs)):
    np.testing.assert_allclose(a, b, rtol=eps(F32), atol=1e-16)
  # The float64 reference: an EMA of the exact batch statistics, at float64 resolution.
  mean, var = np.zeros(C), np.ones(C)
  for x in _f64(xs):
    mean, var = 0.7 * mean + 0.3 * x.mean(0), 0.7 * var + 0.3 * x.var(0)
  np.testing.assert_allclose(final["batch_stats"]["mean"], mean, rtol=64 * eps(F64))
  np.testing.assert_allclose(final["batch_stats"]["var"], var, rtol=1e4 * eps(F64))
