"""Tests of the functional core: moments, normalize, batch_norm, layer_norm, rms_norm.

Every expected value comes from an independent reference, never from jaxnorm
itself:

* forward values from a textbook float64 NumPy implementation (`np.mean`,
  `np.var`, and `numpy.ma` masked arrays for `where=`);
* gradients from plain JAX autodiff of a textbook float64 `jax.numpy`
  formula (`jnp.mean`/`jnp.var`, no custom VJP), and from finite differences
  (`jax.test_util.check_grads`);
* cross-device results from the same op applied once to the whole batch.

Shapes are tiny: JAX compile time dominates the runtime of this file.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax
from jax.test_util import check_grads

import jaxnorm

F64 = dict(rtol=1e-10, atol=1e-10)


def rng(seed=0):
  return np.random.default_rng(seed)


def canon(axes, ndim):
  """Sorted non-negative axes (the order in which parameters lay out the axes)."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


def param_bshape(shape, param_axes):
  """Shape to which a parameter laid out along `param_axes` is reshaped to broadcast."""
  return tuple(d if i in param_axes else 1 for i, d in enumerate(shape))


def complement(axes, ndim):
  return tuple(a for a in range(ndim) if a not in axes)


# ----------------------------------------------------------------------------------------------
# Independent references.
# ----------------------------------------------------------------------------------------------


def np_moments(x, axes, where=None, keepdims=False):
  """Textbook float64 mean and biased variance; `where` via numpy masked arrays."""
  x = np.asarray(x, np.float64)
  axes = canon(axes, x.ndim)
  if where is None:
    return x.mean(axes, keepdims=keepdims), x.var(axes, keepdims=keepdims)
  valid = np.broadcast_to(np.asarray(where, bool), x.shape)
  with np.errstate(invalid="ignore", over="ignore"):
    xm = np.ma.masked_array(x, mask=~valid)
    mean = np.ma.filled(xm.mean(axes, keepdims=keepdims), np.nan)
    var = np.ma.filled(xm.var(axes, keepdims=keepdims), np.nan)
  return np.asarray(mean), np.asarray(var)


def np_mean_square(x, axes, where=None):
  x = np.asarray(x, np.float64)
  if where is None:
    return np.mean(x**2, canon(axes, x.ndim), keepdims=True)
  valid = np.broadcast_to(np.asarray(where, bool), x.shape)
  with np.errstate(invalid="ignore", over="ignore"):
    xm = np.ma.masked_array(x, mask=~valid)
    return np.asarray(np.ma.filled((xm**2).mean(canon(axes, x.ndim), keepdims=True), np.nan))


def np_norm(x, scale, bias, axes, eps, *, param_axes, centered=True, where=None):
  """Textbook float64 normalization: (x - mean) / sqrt(var + eps) * scale + bias.

  Returns `(y, mean, var)` with the statistics squeezed over `axes`. Every
  position is normalized with the statistics of the valid ones.
  """
  x = np.asarray(x, np.float64)
  axes = canon(axes, x.ndim)
  if centered:
    mean, var = np_moments(x, axes, where, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
  else:
    var = np_mean_square(x, axes, where)
    mean = np.zeros_like(var)
    y = x / np.sqrt(var + eps)
  shape = param_bshape(x.shape, param_axes)
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(shape)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(shape)
  return y, np.squeeze(mean, axes), np.squeeze(var, axes)


def np_layer_norm(x, scale=None, bias=None, axis=-1, eps=1e-6, where=None):
  axes = canon(axis, np.ndim(x))
  return np_norm(x, scale, bias, axes, eps, param_axes=axes, where=where)[0]


def np_rms_norm(x, scale=None, axis=-1, eps=1e-6, where=None):
  axes = canon(axis, np.ndim(x))
  return np_norm(x, scale, None, axes, eps, param_axes=axes, centered=False, where=where)[0]


def np_batch_norm(x, scale=None, bias=None, feature_axes=-1, eps=1e-5, where=None):
  features = canon(feature_axes, np.ndim(x))
  return np_norm(x, scale, bias, complement(features, np.ndim(x)), eps, param_axes=features, where=where)


def jnp_norm(x, scale, bias, axes, eps, *, param_axes, centered=True, where=None):
  """The textbook formula in float64 jax.numpy, differentiated by plain autodiff."""
  axes = canon(axes, x.ndim)
  if centered:
    mean = jnp.mean(x, axes, keepdims=True, where=where)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True, where=where)
    y = (x - mean) / jnp.sqrt(var + eps)
  else:
    var = jnp.mean(jnp.square(x), axes, keepdims=True, where=where)
    mean = jnp.zeros_like(var)
    y = x / jnp.sqrt(var + eps)
  shape = param_bshape(x.shape, param_axes)
  if scale is not None:
    y = y * jnp.reshape(scale, shape)
  if bias is not None:
    y = y + jnp.reshape(bias, shape)
  return y, jnp.squeeze(mean, axes), jnp.squeeze(var, axes)


def jnp_layer_norm(x, scale=None, bias=None, axis=-1, eps=1e-6, where=None):
  axes = canon(axis, x.ndim)
  return jnp_norm(x, scale, bias, axes, eps, param_axes=axes, where=where)[0]


def jnp_rms_norm(x, scale=None, axis=-1, eps=1e-6, where=None):
  axes = canon(axis, x.ndim)
  return jnp_norm(x, scale, None, axes, eps, param_axes=axes, centered=False, where=where)[0]


def jnp_batch_norm(x, scale=None, bias=None, feature_axes=-1, eps=1e-5, where=None):
  features = canon(feature_axes, x.ndim)
  return jnp_norm(x, scale, bias, complement(features, x.ndim), eps, param_axes=features, where=where)


def random_mask(r, shape, axes, min_valid=1):
  """A random boolean mask with at least `min_valid` valid elements in every group over `axes`."""
  axes = canon(axes, len(shape))
  while True:
    mask = r.random(shape) < 0.6
    if np.all(mask.sum(axes) >= min_valid):
      return mask


# ----------------------------------------------------------------------------------------------
# 1. Forward values against the float64 NumPy reference.
# ----------------------------------------------------------------------------------------------

AXIS_CASES = [((5,), 0), ((3, 4), -1), ((2, 3, 4), (1, 2)), ((2, 3, 4), (0, -1)), ((2, 3, 4), -2), ((2, 3, 2, 3), (-3, 3))]
AFFINE = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("shape,axis", AXIS_CASES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_moments_forward(shape, axis, keepdims):
  x = rng(1).normal(size=shape) * 3 + 1
  mean, var = jaxnorm.moments(x, axis, keepdims=keepdims)
  ref_mean, ref_var = np_moments(x, axis, keepdims=keepdims)
  assert mean.shape == ref_mean.shape and var.shape == ref_var.shape
  np.testing.assert_allclose(mean, ref_mean, **F64)
  np.testing.assert_allclose(var, ref_var, **F64)


@pytest.mark.parametrize("shape,axis", AXIS_CASES[1:4])
def test_moments_forward_masked(shape, axis):
  r = rng(2)
  x = r.normal(size=shape)
  where = random_mask(r, shape, axis)
  mean, var = jaxnorm.moments(x, axis, where=where)
  ref_mean, ref_var = np_moments(x, axis, where)
  np.testing.assert_allclose(mean, ref_mean, **F64)
  np.testing.assert_allclose(var, ref_var, **F64)


def test_moments_mask_broadcasts():
  r = rng(3)
  x = r.normal(size=(4, 5))
  row_valid = np.array([True, False, True, True])[:, None]  # (4, 1) broadcast over columns
  mean, var = jaxnorm.moments(x, 0, where=row_valid)
  np.testing.assert_allclose(mean, x[row_valid[:, 0]].mean(0), **F64)
  np.testing.assert_allclose(var, x[row_valid[:, 0]].var(0), **F64)


@pytest.mark.parametrize("shape,axis", AXIS_CASES)
@pytest.mark.parametrize("affine", AFFINE)
def test_layer_norm_forward(shape, axis, affine):
  r = rng(4)
  x = r.normal(size=shape) * 2 - 1
  pshape = tuple(shape[a] for a in canon(axis, len(shape)))
  scale = r.normal(size=pshape) if affine[0] else None
  bias = r.normal(size=pshape) if affine[1] else None
  y = jaxnorm.layer_norm(x, scale, bias, axis=axis, epsilon=1e-3)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, np_layer_norm(x, scale, bias, axis, 1e-3), **F64)


@pytest.mark.parametrize("shape,axis", AXIS_CASES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_rms_norm_forward(shape, axis, with_scale):
  r = rng(5)
  x = r.normal(size=shape) + 0.5
  pshape = tuple(shape[a] for a in canon(axis, len(shape)))
  scale = r.normal(size=pshape) if with_scale else None
  y = jaxnorm.rms_norm(x, scale, axis=axis, epsilon=1e-3)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, np_rms_norm(x, scale, axis, 1e-3), **F64)


BN_CASES = [((6, 3), -1), ((2, 3, 3, 4), -1), ((3, 4, 5), 0), ((4, 2, 3), (1, -1)), ((2, 3, 4), (-3, 1)), ((5,), ())]


@pytest.mark.parametrize("shape,feature_axes", BN_CASES)
@pytest.mark.parametrize("affine", AFFINE)
def test_batch_norm_forward(shape, feature_axes, affine):
  r = rng(6)
  x = r.normal(size=shape) * 1.5 + 0.3
  pshape = tuple(shape[a] for a in canon(feature_axes, len(shape)))
  scale = r.normal(size=pshape) if affine[0] else None
  bias = r.normal(size=pshape) if affine[1] else None
  y, mean, var = jaxnorm.batch_norm(x, scale, bias, feature_axes=feature_axes)
  ref_y, ref_mean, ref_var = np_batch_norm(x, scale, bias, feature_axes)
  assert y.shape == x.shape and mean.shape == pshape and var.shape == pshape
  np.testing.assert_allclose(y, ref_y, **F64)
  np.testing.assert_allclose(mean, ref_mean, **F64)
  np.testing.assert_allclose(var, ref_var, **F64)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
def test_forward_masked(op):
  """With `where`, statistics come from the valid positions; every position is normalized with them."""
  r = rng(7)
  x = r.normal(size=(5, 4))
  s, b = r.normal(size=4), r.normal(size=4)
  where = random_mask(r, x.shape, 0 if op == "batch_norm" else -1)
  if op == "batch_norm":
    y, mean, var = jaxnorm.batch_norm(x, s, b, where=where)
    ref_y, ref_mean, ref_var = np_batch_norm(x, s, b, where=where)
    unmasked = np_batch_norm(x, s, b)[0]
    np.testing.assert_allclose(mean, ref_mean, **F64)
    np.testing.assert_allclose(var, ref_var, **F64)
  elif op == "layer_norm":
    y = jaxnorm.layer_norm(x, s, b, where=where)
    ref_y, unmasked = np_layer_norm(x, s, b, where=where), np_layer_norm(x, s, b)
  else:
    y = jaxnorm.rms_norm(x, s, where=where)
    ref_y, unmasked = np_rms_norm(x, s, where=where), np_rms_norm(x, s)
  np.testing.assert_allclose(y, ref_y, **F64)
  assert not np.allclose(ref_y, unmasked)  # the mask matters


@pytest.mark.parametrize(
    "mshape,affine", [((4,), (True, True)), ((3, 1), (False, True)), ((2, 3, 4), (True, False)), ((1, 4), (False, False))]
)
def test_normalize_forward(mshape, affine):
  r = rng(8)
  x = r.normal(size=(2, 3, 4))
  mean, var = r.normal(size=mshape), r.random(mshape) + 0.1
  scale = r.normal(size=mshape) if affine[0] else None
  bias = r.normal(size=mshape) if affine[1] else None
  y = jaxnorm.normalize(x, mean, var, scale, bias, epsilon=1e-3)
  ref = (x - mean) / np.sqrt(var + 1e-3)
  ref = ref * (1 if scale is None else scale) + (0 if bias is None else bias)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, ref, **F64)


def test_normalize_keeps_low_precision_dtype_and_computes_in_float32():
  r = rng(9)
  x = jnp.asarray(r.normal(size=(3, 4)) * 100 + 300, jnp.float16)
  mean, var = jnp.float32(300.0), jnp.float32(1e4)
  y = jaxnorm.normalize(x, mean, var, epsilon=1e-5)
  assert y.dtype == jnp.float16
  ref = (np.asarray(x, np.float64) - 300) / np.sqrt(1e4 + 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-3, atol=2e-3)


def test_default_epsilons_match_documentation():
  x = rng(10).normal(size=(4, 3)) * 1e-3  # variance ~1e-6: the epsilon matters
  np.testing.assert_allclose(jaxnorm.layer_norm(x), np_layer_norm(x, eps=1e-6), **F64)
  np.testing.assert_allclose(jaxnorm.rms_norm(x), np_rms_norm(x, eps=1e-6), **F64)
  np.testing.assert_allclose(jaxnorm.batch_norm(x)[0], np_batch_norm(x, eps=1e-5)[0], **F64)
  mean, var = x.mean(0), x.var(0)
  np.testing.assert_allclose(jaxnorm.normalize(x, mean, var), (x - mean) / np.sqrt(var + 1e-5), **F64)


# ----------------------------------------------------------------------------------------------
# 2. Gradients against plain autodiff of the textbook formula, and finite differences.
# ----------------------------------------------------------------------------------------------


def _grad_setup(op, masked, seed=11):
  """(ours, reference, (x, scale, bias)): functions of (x, scale, bias) returning (y, mean, var) or y."""
  r = rng(seed)
  shape, axis = (4, 3, 5), (1, 2)
  x = r.normal(size=shape) * 1.3 + 0.4
  if op == "batch_norm":
    pshape = (3,)
    where = random_mask(r, shape, (0, 2), min_valid=2) if masked else None
    ours = lambda x, s, b: jaxnorm.batch_norm(x, s, b, feature_axes=1, where=where)
    ref = lambda x, s, b: jnp_batch_norm(x, s, b, feature_axes=1, where=where)
  else:
    pshape = (3, 5)
    where = random_mask(r, shape, axis, min_valid=2) if masked else None
    if op == "layer_norm":
      ours = lambda x, s, b: jaxnorm.layer_norm(x, s, b, axis=axis, epsilon=1e-3, where=where)
      ref = lambda x, s, b: jnp_layer_norm(x, s, b, axis, 1e-3, where)
    else:  # rms_norm has no bias: a zero-weight dependence keeps the signature uniform
      ours = lambda x, s, b: jaxnorm.rms_norm(x, s, axis=axis, epsilon=1e-3, where=where) + 0 * jnp.sum(b)
      ref = lambda x, s, b: jnp_rms_norm(x, s, axis, 1e-3, where) + 0 * jnp.sum(b)
  s, b = r.normal(size=pshape), r.normal(size=pshape)
  return ours, ref, (x, s, b)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
def test_vjp_matches_autodiff_of_textbook_formula(op, masked):
  """Gradients wrt x, scale and bias (and, for batch_norm, through the returned mean and var)."""
  ours, ref, args = _grad_setup(op, masked)
  r = rng(111)
  ct, cm, cv = r.normal(size=args[0].shape), r.normal(size=3), r.normal(size=3)

  def loss(f):
    def scalar(*args):
      out = f(*args)
      if isinstance(out, tuple):
        y, mean, var = out
        return jnp.sum(y * ct) + jnp.sum(mean * cm) + jnp.sum(var * cv)
      return jnp.sum(out * ct)

    return scalar

  g_ours, g_ref = jax.jit(lambda *a: (jax.grad(loss(ours), (0, 1, 2))(*a), jax.grad(loss(ref), (0, 1, 2))(*a)))(*args)
  for a, b_ in zip(g_ours, g_ref):
    assert a.shape == b_.shape
    np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-9)
  assert np.abs(g_ref[0]).max() > 1e-3  # a non-trivial gradient


@pytest.mark.parametrize("stat", ["mean", "var"])
def test_batch_norm_gradient_through_returned_statistics(stat):
  """Only the statistic carries a cotangent: the VJP's statistics terms alone, against autodiff."""
  r = rng(12)
  x = r.normal(size=(6, 3)) * 2 + 1
  c = r.normal(size=3)
  idx = {"mean": 1, "var": 2}[stat]
  g, g_ref = jax.jit(
      lambda x: (jax.grad(lambda x: jnp.sum(jaxnorm.batch_norm(x)[idx] * c))(x),
                 jax.grad(lambda x: jnp.sum(jnp_batch_norm(x)[idx] * c))(x))
  )(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)
  analytic = c / 6 if stat == "mean" else 2 * (x - x.mean(0)) / 6 * c
  np.testing.assert_allclose(g, np.broadcast_to(analytic, x.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
def test_check_grads_second_order(op, masked):
  ours, _, args = _grad_setup(op, masked, seed=13)
  check_grads(jax.jit(ours), args, order=2, modes=["rev"])


@pytest.mark.parametrize("masked", [False, True])
def test_moments_gradients(masked):
  r = rng(14)
  x = r.normal(size=(4, 5))
  where = random_mask(r, x.shape, 1, min_valid=2) if masked else None
  cm, cv = r.normal(size=4), r.normal(size=4)
  loss = lambda x: jnp.sum(jaxnorm.moments(x, 1, where=where)[0] * cm) + jnp.sum(jaxnorm.moments(x, 1, where=where)[1] * cv)
  ref = lambda x: jnp.sum(jnp.mean(x, 1, where=where) * cm) + jnp.sum(jnp.var(x, 1, where=where) * cv)
  g, g_ref = jax.jit(lambda x: (jax.grad(loss)(x), jax.grad(ref)(x)))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)
  check_grads(jax.jit(lambda x: jaxnorm.moments(x, 1, where=where)), (x,), order=2, modes=["rev"])


def test_normalize_gradients():
  r = rng(15)
  x, mean, var, s, b = r.normal(size=(3, 4)), r.normal(size=4), r.random(4) + 0.5, r.normal(size=4), r.normal(size=4)
  ct = r.normal(size=(3, 4))
  ours = lambda *a: jnp.sum(jaxnorm.normalize(*a, epsilon=1e-3) * ct)
  ref = lambda x, m, v, s, b: jnp.sum(((x - m[None]) / jnp.sqrt(v[None] + 1e-3) * s[None] + b[None]) * ct)
  args = (x, mean, var, s, b)
  got, want = jax.jit(lambda *a: (jax.grad(ours, range(5))(*a), jax.grad(ref, range(5))(*a)))(*args)
  for a, b_ in zip(got, want):
    np.testing.assert_allclose(a, b_, rtol=1e-10, atol=1e-12)
  check_grads(jax.jit(lambda *a: jaxnorm.normalize(*a)), args, order=2, modes=["rev", "fwd"])


def test_gradient_dtypes_follow_inputs():
  r = rng(16)
  x = jnp.asarray(r.normal(size=(4, 8)), jnp.bfloat16)
  s, b = jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.bfloat16)
  loss = lambda x, s, b: jnp.sum(jaxnorm.layer_norm(x, s, b).astype(jnp.float32) ** 2)
  gx, gs, gb = jax.jit(jax.grad(loss, (0, 1, 2)))(x, s, b)
  assert (gx.dtype, gs.dtype, gb.dtype) == (jnp.bfloat16, jnp.float32, jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# 3. Transformations.
# ----------------------------------------------------------------------------------------------


def test_jit_matches_eager():
  r = rng(17)
  x, s, b = r.normal(size=(3, 4)), r.normal(size=4), r.normal(size=4)
  for f in (
      lambda x: jaxnorm.layer_norm(x, s, b),
      lambda x: jaxnorm.rms_norm(x, s),
      lambda x: jaxnorm.batch_norm(x, s, b),
      lambda x: jaxnorm.moments(x, 0),
  ):
    chex.assert_trees_all_close(jax.jit(f)(x), f(x), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(jax.jit(lambda x: jaxnorm.layer_norm(x, s, b))(x), np_layer_norm(x, s, b), **F64)


def test_vmap():
  r = rng(18)
  x, s, b = r.normal(size=(3, 5, 4)), r.normal(size=4), r.normal(size=4)
  sb, ct = r.normal(size=(3, 4)), r.normal(size=x.shape)

  @jax.jit
  def run(x, sb, ct):
    return dict(
        # layer norm over the last axis commutes with mapping the first
        ln=jax.vmap(lambda x: jaxnorm.layer_norm(x, s, b))(x),
        # per-member parameters
        rms=jax.vmap(lambda x, s: jaxnorm.rms_norm(x, s))(x, sb),
        # batch norm without axis_name: every member keeps its own statistics
        bn=jax.vmap(lambda x: jaxnorm.batch_norm(x, s, b))(x),
        # vmapped gradients
        grad=jax.vmap(jax.grad(lambda x, c: jnp.sum(jaxnorm.layer_norm(x, s, b) * c)))(x, ct),
        grad_ref=jax.grad(lambda x: jnp.sum(jnp_layer_norm(x, s, b) * ct))(x),
    )

  out = run(x, sb, ct)
  np.testing.assert_allclose(out["ln"], np_layer_norm(x, s, b), **F64)
  np.testing.assert_allclose(out["rms"], np.stack([np_rms_norm(x[i], sb[i]) for i in range(3)]), **F64)
  for i in range(3):
    for got, want in zip(out["bn"], np_batch_norm(x[i], s, b)):
      np.testing.assert_allclose(got[i], want, **F64)
  np.testing.assert_allclose(out["grad"], out["grad_ref"], rtol=1e-9, atol=1e-10)


GRAD_OPS = {
    "layer_norm": (lambda x, s: jaxnorm.layer_norm(x, s, epsilon=1e-3), lambda x, s: jnp_layer_norm(x, s, eps=1e-3)),
    "rms_norm": (lambda x, s: jaxnorm.rms_norm(x, s, epsilon=1e-3), lambda x, s: jnp_rms_norm(x, s, eps=1e-3)),
    "batch_norm": (lambda x, s: jaxnorm.batch_norm(x, s, epsilon=1e-3)[0], lambda x, s: jnp_batch_norm(x, s, eps=1e-3)[0]),
}


@pytest.mark.parametrize("op", list(GRAD_OPS))
def test_grad_of_grad(op):
  r = rng(19)
  x, s = r.normal(size=(4, 3)), r.normal(size=3)
  ct = r.normal(size=(4, 3))

  def second(f):
    inner = jax.grad(lambda x, s: jnp.sum(f(x, s) * ct), argnums=(0, 1))
    return jax.grad(lambda x, s: sum(jnp.sum(jnp.sin(g)) for g in inner(x, s)), argnums=(0, 1))

  ours, ref = GRAD_OPS[op]
  got, want = jax.jit(lambda x, s: (second(ours)(x, s), second(ref)(x, s)))(x, s)
  for a, b_ in zip(got, want):
    np.testing.assert_allclose(a, b_, rtol=1e-8, atol=1e-9)


def test_hessians():
  """jacrev(jacrev(f)) through the custom VJP, and jax.hessian (forward-over-reverse)."""
  r = rng(20)
  x = r.normal(size=(2, 4))
  ct = r.normal(size=(2, 4))
  scalar = lambda f: (lambda x: jnp.sum(jnp.tanh(f(x)) * ct))
  ours = scalar(lambda x: jaxnorm.layer_norm(x, epsilon=1e-3))
  autodiff = scalar(lambda x: jaxnorm.layer_norm(x, epsilon=1e-3, custom_vjp=False))
  ref = scalar(lambda x: jnp_layer_norm(x, eps=1e-3))

  @jax.jit
  def run(x):
    return jax.jacrev(jax.jacrev(ours))(x), jax.jacrev(jax.jacrev(ref))(x), jax.hessian(autodiff)(x), jax.hessian(ours)(x)

  rev_rev, want, hess_autodiff, hess_ours = run(x)
  assert rev_rev.shape == (2, 4, 2, 4)
  np.testing.assert_allclose(rev_rev, want, rtol=1e-8, atol=1e-9)
  np.testing.assert_allclose(hess_autodiff, rev_rev, rtol=1e-8, atol=1e-9)
  # jax.hessian of the custom-VJP path: jacfwd differentiates the (jnp) backward rule.
  np.testing.assert_allclose(hess_ours, rev_rev, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
def test_forward_mode_with_custom_vjp_false(op):
  r = rng(21)
  x, s, b = r.normal(size=(4, 3)), r.normal(size=3), r.normal(size=3)
  t = r.normal(size=x.shape)
  f = {
      "layer_norm": lambda x, cv: jaxnorm.layer_norm(x, s, b, custom_vjp=cv),
      "rms_norm": lambda x, cv: jaxnorm.rms_norm(x, s, custom_vjp=cv),
      "batch_norm": lambda x, cv: jaxnorm.batch_norm(x, s, b, custom_vjp=cv),
  }[op]

  @jax.jit
  def run(x, t):
    jac_rev = jax.jacrev(lambda x: f(x, True))(x)
    jac_fwd = jax.jacfwd(lambda x: f(x, False))(x)
    return jac_rev, jac_fwd, jax.jvp(lambda x: f(x, False), (x,), (t,))[1]

  jac_rev, jac_fwd, tangent = run(x, t)
  chex.assert_trees_all_close(jac_fwd, jac_rev, rtol=1e-9, atol=1e-10)
  expected = jax.tree.map(lambda j: np.tensordot(j, t, axes=2), jac_rev)
  chex.assert_trees_all_close(tangent, expected, rtol=1e-9, atol=1e-10)
  # The custom-VJP path has no forward mode of its own: that is what custom_vjp=False is for.
  with pytest.raises(TypeError):
    jax.jit(lambda x, t: jax.jvp(lambda x: f(x, True), (x,), (t,)))(x, t)


def _rnn_loss(params, xs, h0, ct, norm):
  w, u, s, b = params

  def cell(h, x_t):
    h = jnp.tanh(norm(h @ w + x_t @ u, s, b))
    return h, h

  _, hs = lax.scan(cell, h0, xs)
  return jnp.sum(hs * ct)


def test_layer_normed_rnn_in_scan():
  r = rng(22)
  hidden, inp, batch, steps = 3, 2, 2, 4
  params = (r.normal(size=(hidden, hidden)), r.normal(size=(inp, hidden)), r.normal(size=hidden), r.normal(size=hidden))
  xs, h0, ct = r.normal(size=(steps, batch, inp)), r.normal(size=(batch, hidden)), r.normal(size=(steps, batch, hidden))
  norms = {
      "custom": lambda z, s, b: jaxnorm.layer_norm(z, s, b),
      "autodiff": lambda z, s, b: jaxnorm.layer_norm(z, s, b, custom_vjp=False),
      "reference": lambda z, s, b: jnp_layer_norm(z, s, b),
  }
  grad = jax.jit(jax.grad(_rnn_loss, argnums=(0, 2)), static_argnums=4)
  grads = {k: jax.tree.leaves(grad(params, xs, h0, ct, n)) for k, n in norms.items()}
  for a, b_, c in zip(grads["custom"], grads["autodiff"], grads["reference"]):
    np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-10)


def test_checkpoint_remat():
  r = rng(23)
  x, s, b = r.normal(size=(5, 3)), r.normal(size=3), r.normal(size=3)
  cm = r.normal(size=3)

  def f(x, s, b):
    y, mean, var = jaxnorm.batch_norm(x, s, b)
    z = jaxnorm.layer_norm(jnp.sin(y), s, b)
    return jnp.sum(jnp.cos(jaxnorm.rms_norm(z, s))) + jnp.sum(mean * cm)

  def f_ref(x, s, b):
    y, mean, var = jnp_batch_norm(x, s, b)
    z = jnp_layer_norm(jnp.sin(y), s, b)
    return jnp.sum(jnp.cos(jnp_rms_norm(z, s))) + jnp.sum(mean * cm)

  g_ref = jax.grad(f_ref, (0, 1, 2))(x, s, b)
  for policy in (None, jax.checkpoint_policies.nothing_saveable):
    g = jax.jit(jax.grad(jax.checkpoint(f, policy=policy), (0, 1, 2)))(x, s, b)
    for a, b_ in zip(g, g_ref):
      np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# 4. Cross-device statistics through vmap's axis_name.
# ----------------------------------------------------------------------------------------------

D, N, C = 3, 4, 2


def _unequal_mask():
  """Member d holds counts[d] valid rows (per feature), so members hold 1, 2 and 4 valid elements."""
  counts = np.array([[1, 3], [2, 1], [4, 2]])  # (D, C)
  return np.arange(N)[None, :, None] < counts[:, None, :]


def _device_data(seed=24):
  r = rng(seed)
  x = r.normal(size=(D, N, C)) + np.arange(D)[:, None, None] * 3.0  # members differ in mean
  return r, x, r.normal(size=C), r.normal(size=C)


@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_forward_equals_global(masked):
  _, x, s, b = _device_data()
  where = _unequal_mask() if masked else np.ones((D, N, C), bool)

  @jax.jit
  def run(x, where):
    bn = jax.vmap(lambda x, w: jaxnorm.batch_norm(x, s, b, where=w, axis_name="i"), axis_name="i")(x, where)
    mom = jax.vmap(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="i"), axis_name="i")(x, where)
    return bn, mom

  (y, mean, var), (m, v) = run(x, where)
  ref_y, ref_mean, ref_var = np_batch_norm(x.reshape(D * N, C), s, b, where=where.reshape(D * N, C))
  np.testing.assert_allclose(y, ref_y.reshape(D, N, C), **F64)
  for got, want in ((mean, ref_mean), (var, ref_var), (m, ref_mean), (v, ref_var)):
    np.testing.assert_allclose(got, np.broadcast_to(want, (D, C)), **F64)


def test_vmap_axis_name_unequal_counts_naive_merge_differs():
  """The exact merge is not the mean of per-member statistics when members hold unequal counts."""
  _, x, _, _ = _device_data()
  where = _unequal_mask()

  @jax.jit
  def run(x, where):
    exact = jax.vmap(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="i"), axis_name="i")(x, where)
    local = jax.vmap(lambda x, w: jaxnorm.moments(x, 0, where=w))(x, where)
    return exact, local

  (m, v), (local_m, local_v) = run(x, where)
  ref_mean, ref_var = np_moments(x.reshape(D * N, C), 0, where.reshape(D * N, C))
  np.testing.assert_allclose(m[0], ref_mean, **F64)
  np.testing.assert_allclose(v[0], ref_var, **F64)
  # the local statistics are right, and their flax-style mean (pmean) is wrong
  for d in range(D):
    np.testing.assert_allclose(local_m[d], np_moments(x[d], 0, where[d])[0], **F64)
  assert np.abs(np.mean(local_m, 0) - ref_mean).max() > 0.1
  assert np.abs(np.mean(local_v, 0) - ref_var).max() > 0.1


@pytest.mark.parametrize("custom_vjp", [True, False])
@pytest.mark.parametrize("cotangents", ["y", "y+stats"])
@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_gradients_equal_global(masked, cotangents, custom_vjp):
  """Gradients of the sum of per-member losses equal those of one global batch_norm.

  Checked in both orders: `grad(sum(vmap(f)))`, and `vmap(grad(f))` (the
  data-parallel pattern, where each member's x-gradient is the global one and
  its scale/bias gradients are its local share of the global ones). With
  cotangents on the returned statistics, each member's loss weighs its own copy
  of the (global) mean and variance.
  """
  r, x, s, b = _device_data()
  where = _unequal_mask() if masked else np.ones((D, N, C), bool)
  ct = r.normal(size=(D, N, C))
  cm, cv = (r.normal(size=(D, C)), r.normal(size=(D, C))) if cotangents == "y+stats" else (np.zeros((D, C)),) * 2

  def member_loss(x, s, b, w, ct, cm, cv):
    y, mean, var = jaxnorm.batch_norm(x, s, b, where=w, axis_name="i", custom_vjp=custom_vjp)
    return jnp.sum(y * ct) + jnp.sum(mean * cm) + jnp.sum(var * cv)

  def global_loss(x, s, b):
    y, mean, var = jnp_batch_norm(x.reshape(D * N, C), s, b, where=where.reshape(D * N, C))
    return jnp.sum(y * ct.reshape(D * N, C)) + jnp.sum(mean * cm.sum(0)) + jnp.sum(var * cv.sum(0))

  in_axes = (0, None, None, 0, 0, 0, 0)

  @jax.jit
  def run(x, s, b):
    ref = jax.grad(global_loss, (0, 1, 2))(x, s, b)
    outer = jax.grad(
        lambda x, s, b: jnp.sum(jax.vmap(member_loss, in_axes, axis_name="i")(x, s, b, where, ct, cm, cv)), (0, 1, 2)
    )(x, s, b)
    inner = jax.vmap(jax.grad(member_loss, (0, 1, 2)), in_axes, axis_name="i")(x, s, b, where, ct, cm, cv)
    return ref, outer, inner

  (gx_ref, gs_ref, gb_ref), outer, inner = run(x, s, b)
  tol = dict(rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(inner[0], gx_ref, **tol, err_msg="vmap(grad) dx")
  np.testing.assert_allclose(inner[1].sum(0), gs_ref, **tol, err_msg="vmap(grad) dscale")
  np.testing.assert_allclose(inner[2].sum(0), gb_ref, **tol, err_msg="vmap(grad) dbias")
  np.testing.assert_allclose(outer[0], gx_ref, **tol, err_msg="grad(vmap) dx")
  np.testing.assert_allclose(outer[1], gs_ref, **tol, err_msg="grad(vmap) dscale")
  np.testing.assert_allclose(outer[2], gb_ref, **tol, err_msg="grad(vmap) dbias")


@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_moments_gradients(masked):
  r, x, _, _ = _device_data()
  where = _unequal_mask() if masked else np.ones((D, N, C), bool)
  cm, cv = r.normal(size=(D, C)), r.normal(size=(D, C))

  def member(x, w, cm, cv):
    m, v = jaxnorm.moments(x, 0, where=w, axis_name="i")
    return jnp.sum(m * cm) + jnp.sum(v * cv)

  def global_loss(x):
    xx, ww = x.reshape(D * N, C), where.reshape(D * N, C)
    return jnp.sum(jnp.mean(xx, 0, where=ww) * cm.sum(0)) + jnp.sum(jnp.var(xx, 0, where=ww) * cv.sum(0))

  @jax.jit
  def run(x):
    return (
        jax.grad(global_loss)(x),
        jax.grad(lambda x: jnp.sum(jax.vmap(member, axis_name="i")(x, where, cm, cv)))(x),
        jax.vmap(jax.grad(member), axis_name="i")(x, where, cm, cv),
    )

  g_ref, outer, inner = run(x)
  np.testing.assert_allclose(outer, g_ref, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(inner, g_ref, rtol=1e-9, atol=1e-11)


def test_nested_vmap_two_axis_names():
  r = rng(25)
  A, B = 2, 2
  x = r.normal(size=(A, B, N, C)) + np.arange(A * B).reshape(A, B, 1, 1)
  where = r.random((A, B, N, C)) < 0.7
  where[..., 0, :] = True
  s, b = r.normal(size=C), r.normal(size=C)
  ct, cm = r.normal(size=x.shape), r.normal(size=(A, B, C))
  flat = lambda a: a.reshape(A * B * N, C)
  nested = lambda f: jax.vmap(jax.vmap(f, axis_name="j"), axis_name="i")

  def member(x, w, axis_name=("i", "j")):
    return jaxnorm.batch_norm(x, s, b, where=w, axis_name=axis_name)

  def member_loss(x, w, ct, cm):
    y, mean, _ = member(x, w)
    return jnp.sum(y * ct) + jnp.sum(mean * cm)

  def global_loss(x, where, with_mean=True):
    y, mean, _ = jnp_batch_norm(flat(x), s, b, where=flat(where))
    return jnp.sum(y * flat(ct)) + (jnp.sum(mean * cm.sum((0, 1))) if with_mean else 0.0)

  # (`where` is an argument, not a NumPy closure constant: jit(vmap(custom_vjp function))
  # of a vmapped NumPy constant trips an internal JAX assertion.)
  @jax.jit
  def run(x, where):
    return dict(
        both=nested(member)(x, where),
        j_only=nested(lambda x, w: member(x, w, "j")[0])(x, where),
        g_ref=jax.grad(global_loss)(x, where),
        g_inner=nested(jax.grad(member_loss))(x, where, ct, cm),
        g_ref_y=jax.grad(lambda x: global_loss(x, where, False))(x),
        g_outer_y=jax.grad(lambda x: jnp.sum(nested(lambda x, w, c: jnp.sum(member(x, w)[0] * c))(x, where, ct)))(x),
    )

  out = run(x, where)
  y, mean, var = out["both"]
  ref_y, ref_mean, ref_var = np_batch_norm(flat(x), s, b, where=flat(where))
  np.testing.assert_allclose(y, ref_y.reshape(x.shape), **F64)
  np.testing.assert_allclose(mean, np.broadcast_to(ref_mean, (A, B, C)), **F64)
  np.testing.assert_allclose(var, np.broadcast_to(ref_var, (A, B, C)), **F64)
  # Only the inner name: statistics per index of the outer axis.
  for a in range(A):
    want = np_batch_norm(x[a].reshape(B * N, C), s, b, where=where[a].reshape(B * N, C))[0]
    np.testing.assert_allclose(out["j_only"][a], want.reshape(B, N, C), **F64)
  # Gradients: data-parallel pattern (every member's x-gradient is the global one) ...
  np.testing.assert_allclose(out["g_inner"], out["g_ref"], rtol=1e-9, atol=1e-10)
  # ... and grad of the summed, vmapped loss (cotangents on y).
  np.testing.assert_allclose(out["g_outer_y"], out["g_ref_y"], rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# 6. Property tests over shapes, axes and dtypes.
# ----------------------------------------------------------------------------------------------

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]
TOL = {np.dtype(jnp.float64): 1e-9, np.dtype(jnp.float32): 2e-5, np.dtype(jnp.float16): 3e-3, np.dtype(jnp.bfloat16): 2e-2}


@st.composite
def norm_cases(draw, op):
  rank = draw(st.integers(1, 4))
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
  if op == "batch_norm":  # feature axes: a proper subset, possibly empty
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=0, max_size=rank - 1, unique=True))
  else:
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
  axes = tuple(a - rank if draw(st.booleans()) else a for a in axes)  # some negative
  if len(axes) == 1 and draw(st.booleans()):
    axes = axes[0]  # an int
  dtype = draw(st.sampled_from(DTYPES))
  affine = draw(st.booleans())
  seed = draw(st.integers(0, 2**31 - 1))
  return shape, axes, dtype, affine, seed


def _cast(a, dtype):
  """`a` rounded to `dtype`, and its exact float64 value (the reference's input)."""
  a = jnp.asarray(a, dtype)
  return a, np.asarray(a.astype(jnp.float64))


def _check_close(got, ref, dtype):
  tol = TOL[np.dtype(dtype)]
  np.testing.assert_allclose(np.asarray(jnp.asarray(got, jnp.float64)), ref, rtol=tol, atol=tol)


PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@PROPERTY_SETTINGS
@given(case=norm_cases("layer_norm"), rms=st.booleans())
def test_property_layer_and_rms_norm(case, rms):
  shape, axis, dtype, affine, seed = case
  r = rng(seed)
  x, x64 = _cast(r.normal(size=shape) * 2 + 0.5, dtype)
  pshape = tuple(shape[a] for a in canon(axis, len(shape)))
  s, s64 = _cast(r.normal(size=pshape), dtype) if affine else (None, None)
  b, b64 = _cast(r.normal(size=pshape), dtype) if affine else (None, None)
  if rms:
    y = jax.jit(lambda x, s: jaxnorm.rms_norm(x, s, axis=axis, epsilon=1e-3))(x, s)
    ref = np_rms_norm(x64, s64, axis, 1e-3)
  else:
    y = jax.jit(lambda x, s, b: jaxnorm.layer_norm(x, s, b, axis=axis, epsilon=1e-3))(x, s, b)
    ref = np_layer_norm(x64, s64, b64, axis, 1e-3)
  assert y.dtype == dtype and y.shape == shape
  _check_close(y, ref, dtype)


@PROPERTY_SETTINGS
@given(case=norm_cases("batch_norm"))
def test_property_batch_norm(case):
  shape, features, dtype, affine, seed = case
  r = rng(seed)
  x, x64 = _cast(r.normal(size=shape) * 2 + 0.5, dtype)
  pshape = tuple(shape[a] for a in canon(features, len(shape)))
  s, s64 = _cast(r.normal(size=pshape), dtype) if affine else (None, None)
  b, b64 = _cast(r.normal(size=pshape), dtype) if affine else (None, None)
  op = jax.jit(lambda x, s, b: jaxnorm.batch_norm(x, s, b, feature_axes=features, epsilon=1e-3))
  if np.prod(shape) == np.prod(pshape):  # one value per feature: an error, as in PyTorch
    with pytest.raises(ValueError, match="single value per feature"):
      op(x, s, b)
    return
  y, mean, var = op(x, s, b)
  ref_y, ref_mean, ref_var = np_batch_norm(x64, s64, b64, features, 1e-3)
  assert y.dtype == dtype and y.shape == shape
  stat_dtype = np.promote_types(dtype, np.float32)  # NumPy's rule: JAX's strict promotion has no float64/float32 path
  assert mean.dtype == stat_dtype and var.dtype == stat_dtype
  assert mean.shape == pshape and var.shape == pshape
  _check_close(y, ref_y, dtype)
  # statistics at the accuracy of their (>= float32) dtype, whatever the input dtype
  _check_close(mean, ref_mean, stat_dtype)
  _check_close(var, ref_var, stat_dtype)


@PROPERTY_SETTINGS
@given(case=norm_cases("moments"), keepdims=st.booleans())
def test_property_moments(case, keepdims):
  shape, axis, dtype, _, seed = case
  x, x64 = _cast(rng(seed).normal(size=shape) * 3 - 1, dtype)
  mean, var = jax.jit(lambda x: jaxnorm.moments(x, axis, keepdims=keepdims))(x)
  ref_mean, ref_var = np_moments(x64, axis, keepdims=keepdims)
  stat_dtype = np.promote_types(dtype, np.float32)  # NumPy's rule: JAX's strict promotion has no float64/float32 path
  assert mean.dtype == stat_dtype and var.dtype == stat_dtype
  assert mean.shape == ref_mean.shape
  _check_close(mean, ref_mean, stat_dtype)
  _check_close(var, ref_var, stat_dtype)


# ----------------------------------------------------------------------------------------------
# 7. Numerics: large offsets, low precision, non-finite padding, constant input.
# ----------------------------------------------------------------------------------------------


def _offset_data(shape, seed=26):
  x32 = jnp.asarray(1e4 + rng(seed).normal(size=shape), jnp.float32)
  return x32, np.asarray(x32, np.float64)


def test_large_mean_offset_layer_norm_float32():
  x32, x64 = _offset_data((8, 64))
  y = jaxnorm.layer_norm(x32)
  assert y.dtype == jnp.float32
  err = np.abs(np.asarray(y, np.float64) - np_layer_norm(x64)).max()
  assert err < 1e-3

  # flax-style fast variance max(0, E[x^2] - E[x]^2), in float32, is badly wrong here.
  mean = jnp.mean(x32, -1, keepdims=True)
  fast_var = jnp.maximum(0.0, jnp.mean(x32 * x32, -1, keepdims=True) - mean * mean)
  y_fast = (x32 - mean) * lax.rsqrt(fast_var + 1e-6)
  assert np.abs(np.asarray(y_fast, np.float64) - np_layer_norm(x64)).max() > 0.1


def test_large_mean_offset_flax_default_is_the_bad_example():
  linen = pytest.importorskip("flax.linen")
  x32, x64 = _offset_data((8, 64))
  module = linen.LayerNorm()  # use_fast_variance=True by default
  y_flax = module.apply(module.init(jax.random.key(0), x32), x32)
  assert np.abs(np.asarray(y_flax, np.float64) - np_layer_norm(x64)).max() > 0.1


def _textbook(x, scale, bias, axes, eps, centered=True, groups=None):
  """The normalization formula in plain jax.numpy (two-pass), for float64 autodiff references."""
  shape = x.shape
  if groups is not None:  # channels-last group norm: (N, ..., C) viewed as (N, ..., G, C // G)
    x = x.reshape(*shape[:-1], groups, shape[-1] // groups)
  mean = jnp.mean(x, axes, keepdims=True) if centered else 0.0
  d = x - mean
  pshape = (1,) * (len(shape) - 1) + shape[-1:]  # scale and bias lie along the last axis
  y = (d * lax.rsqrt(jnp.mean(d * d, axes, keepdims=True) + eps)).reshape(shape) * scale.reshape(pshape)
  return y if bias is None else y + bias.reshape(pshape)


# op -> (jaxnorm call, textbook call, x shape): the gradients the factored and row-wise
# backward formulas of the kernel give, at a mean 1e4 times the spread.
_OFFSET_GRAD_CASES = {
    "layer_norm": (
        lambda x, s, b: jaxnorm.layer_norm(x, s, b),
        lambda x, s, b: _textbook(x, s, b, -1, 1e-6),
        (16, 64),
    ),
    "rms_norm": (
        lambda x, s, b: jaxnorm.rms_norm(x, s) + b[None],
        lambda x, s, b: _textbook(x, s, b, -1, 1e-6, centered=False),
        (16, 64),
    ),
    "batch_norm": (
        lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
        lambda x, s, b: _textbook(x, s, b, (0, 1, 2), 1e-5),
        (8, 4, 4, 16),
    ),
    "group_norm": (
        lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=4),
        lambda x, s, b: _textbook(x, s, b, (1, 2, 4), 1e-6, groups=4),
        (8, 4, 4, 16),
    ),
    "instance_norm": (
        lambda x, s, b: jaxnorm.instance_norm(x, s, b),
        lambda x, s, b: _textbook(x, s, b, (1, 2), 1e-6),
        (8, 4, 4, 16),
    ),
}


@pytest.mark.parametrize("op", sorted(_OFFSET_GRAD_CASES))
def test_large_mean_offset_gradients_float32(op):
  """dx, dscale and dbias in float32 at |mean| = 1e4 x std stay within 1e-5 of float64 autodiff.

  jaxnorm is at about 1e-7 here; float32 autodiff of the same two-pass textbook
  formula is off by 1e-4 to 5e-3 (it centers with the rounded mean).
  """
  fn, textbook, shape = _OFFSET_GRAD_CASES[op]
  r = rng(31)
  x32 = jnp.asarray(1e4 + r.normal(size=shape), jnp.float32)
  s, b, ct = r.normal(size=shape[-1]), r.normal(size=shape[-1]), r.normal(size=shape)
  args32 = (x32, jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32))
  args64 = (jnp.asarray(x32, jnp.float64), jnp.asarray(s), jnp.asarray(b))
  _, vjp32 = jax.vjp(fn, *args32)
  _, vjp64 = jax.vjp(textbook, *args64)
  for name, got, want in zip(("dx", "dscale", "dbias"), vjp32(jnp.asarray(ct, jnp.float32)), vjp64(jnp.asarray(ct))):
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    assert err < 1e-5, (op, name, err)


def test_large_mean_offset_batch_norm_and_moments_float32():
  x32, x64 = _offset_data((64, 4))
  y, mean, var = jaxnorm.batch_norm(x32)
  ref_y, ref_mean, ref_var = np_batch_norm(x64)
  assert np.abs(np.asarray(y, np.float64) - ref_y).max() < 1e-3
  np.testing.assert_allclose(var, ref_var, rtol=1e-3)
  m, v = jaxnorm.moments(x32, 0)
  np.testing.assert_allclose(v, ref_var, rtol=1e-3)
  np.testing.assert_allclose(m, ref_mean, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
  r = rng(27)
  x, x64 = _cast(r.normal(size=(6, 8)) * 2 + 1, dtype)
  s, s64 = _cast(r.normal(size=8), dtype)
  y, mean, var = jaxnorm.batch_norm(x, s)
  ref_y, ref_mean, ref_var = np_batch_norm(x64, s64)
  assert y.dtype == dtype and mean.dtype == jnp.float32 and var.dtype == jnp.float32
  _check_close(y, ref_y, dtype)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, ref_var, rtol=1e-5, atol=1e-6)
  m, v = jaxnorm.moments(x, -1)
  assert m.dtype == jnp.float32 and v.dtype == jnp.float32
  np.testing.assert_allclose(v, np_moments(x64, -1)[1], rtol=1e-5)
  for got, ref in ((jaxnorm.layer_norm(x, s), np_layer_norm(x64, s64)), (jaxnorm.rms_norm(x, s), np_rms_norm(x64, s64))):
    assert got.dtype == dtype
    _check_close(got, ref, dtype)


def test_float16_squares_overflow():
  """Values ~300: their squares (~9e4) overflow float16 (max 65504); statistics must not."""
  r = rng(28)
  x, x64 = _cast(300 + 20 * r.normal(size=(4, 16)), jnp.float16)
  with np.errstate(over="ignore"):
    assert not np.all(np.isfinite(np.asarray(x) * np.asarray(x)))  # the hazard is real
  for got, ref in (
      (jaxnorm.rms_norm(x), np_rms_norm(x64)),
      (jaxnorm.layer_norm(x), np_layer_norm(x64)),
      (jaxnorm.batch_norm(x.T)[0], np_batch_norm(x64.T)[0]),
  ):
    assert got.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(got, np.float64)))
    _check_close(got, ref, jnp.float16)
  m, v = jaxnorm.moments(x, -1)
  np.testing.assert_allclose(v, np_moments(x64, -1)[1], rtol=1e-4)


def _nonfinite_padding(shape, reduce_axes, seed=29):
  r = rng(seed)
  x = r.normal(size=shape)
  where = random_mask(r, shape, reduce_axes, min_valid=2)
  junk = np.array([np.nan, np.inf, -np.inf])
  x_bad = x.copy()
  x_bad[~where] = junk[np.arange((~where).sum()) % 3]
  return r, x, x_bad, where


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm"])
def test_nonfinite_values_in_masked_positions(op):
  shape = (5, 4)
  reduce_axes = 0 if op == "batch_norm" else -1
  r, x, x_bad, where = _nonfinite_padding(shape, reduce_axes)
  assert not np.all(np.isfinite(x_bad))
  s, b = r.normal(size=4), r.normal(size=4)
  ct = r.normal(size=shape)
  ours = {
      "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b, where=where),
      "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s, where=where) + 0 * b[None],
      "batch_norm": lambda x, s, b: jaxnorm.batch_norm(x, s, b, where=where)[0],
  }[op]
  ref = {
      "layer_norm": lambda x, s, b: jnp_layer_norm(x, s, b, where=where),
      "rms_norm": lambda x, s, b: jnp_rms_norm(x, s, where=where) + 0 * b[None],
      "batch_norm": lambda x, s, b: jnp_batch_norm(x, s, b, where=where)[0],
  }[op]
  np_ref = {
      "layer_norm": lambda: np_layer_norm(x_bad, s, b, where=where),
      "rms_norm": lambda: np_rms_norm(x_bad, s, where=where),
      "batch_norm": lambda: np_batch_norm(x_bad, s, b, where=where)[0],
  }[op]

  # A loss over the valid outputs only: the gradient is the reference one on the valid
  # elements, exactly zero at the padding, and finite everywhere. A loss over every
  # output (padding included) still has finite gradients everywhere.
  valid_loss = lambda f: (lambda x, s, b: jnp.sum(jnp.where(where, f(x, s, b) * ct, 0.0)))

  @jax.jit
  def run(x_bad, x_clean, s, b):
    return (
        ours(x_bad, s, b),
        jax.grad(valid_loss(ours), (0, 1, 2))(x_bad, s, b),
        jax.grad(valid_loss(ref), (0, 1, 2))(x_clean, s, b),
        jax.grad(lambda x, s, b: jnp.sum(ours(x, s, b) * ct), (0, 1, 2))(x_bad, s, b),
    )

  y, g, g_ref, g_all = run(x_bad, np.where(where, x, 0.0), s, b)
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(np.asarray(y)[where], np_ref()[where], **F64)
  for a, b_ in zip(g, g_ref):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-10)
  assert np.all(np.asarray(g[0])[~where] == 0)
  assert all(np.all(np.isfinite(a)) for a in g_all)


def test_nonfinite_values_in_masked_positions_moments():
  r, x, x_bad, where = _nonfinite_padding((5, 4), -1)
  mean, var = jaxnorm.moments(x_bad, -1, where=where)
  ref_mean, ref_var = np_moments(x, -1, where)
  np.testing.assert_allclose(mean, ref_mean, **F64)
  np.testing.assert_allclose(var, ref_var, **F64)
  cm, cv = r.normal(size=5), r.normal(size=5)
  loss = lambda x: jnp.sum(jaxnorm.moments(x, -1, where=where)[0] * cm + jaxnorm.moments(x, -1, where=where)[1] * cv)
  g = jax.jit(jax.grad(loss))(x_bad)
  g_ref = jax.jit(jax.grad(lambda x: jnp.sum(jnp.mean(x, -1, where=where) * cm + jnp.var(x, -1, where=where) * cv)))(x)
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[~where] == 0)
  np.testing.assert_allclose(np.asarray(g)[where], np.asarray(g_ref)[where], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm", "moments"])
def test_constant_input(op):
  """Zero variance (or, for rms_norm, zero input): finite outputs and the reference gradients."""
  r = rng(30)
  x = np.zeros((4, 3)) if op == "rms_norm" else np.full((4, 3), 2.5)
  s, b = r.normal(size=3), r.normal(size=3)
  ct = r.normal(size=(4, 3))
  ours, ref = {
      "layer_norm": (lambda x: jaxnorm.layer_norm(x, s, b), lambda x: jnp_layer_norm(x, s, b)),
      "rms_norm": (lambda x: jaxnorm.rms_norm(x, s), lambda x: jnp_rms_norm(x, s)),
      "batch_norm": (lambda x: jaxnorm.batch_norm(x, s, b), lambda x: jnp_batch_norm(x, s, b)),
      "moments": (lambda x: jaxnorm.moments(x, 0), lambda x: (jnp.mean(x, 0), jnp.var(x, 0))),
  }[op]
  out = ours(x)
  for a, b_ in zip(jax.tree.leaves(out), jax.tree.leaves(ref(x))):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b_, rtol=1e-10, atol=1e-10)

  def scalarize(f):
    return lambda x: sum(jnp.sum(leaf * (ct if leaf.ndim == 2 else ct[0])) for leaf in jax.tree.leaves(f(x)))

  g, g_ref = jax.jit(lambda x: (jax.grad(scalarize(ours))(x), jax.grad(scalarize(ref))(x)))(x)
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm", "moments"])
def test_all_masked_group(op):
  r = rng(31)
  x = r.normal(size=(4, 3))
  where = np.ones((4, 3), bool)
  if op in ("batch_norm",):
    where[:, 1] = False  # feature 1 has no valid element
    x[:, 1] = np.nan
  else:
    where[2] = False  # row 2 has no valid element
    x[2] = np.inf
  s, b = r.normal(size=3), r.normal(size=3)
  f = {
      "layer_norm": lambda x: jaxnorm.layer_norm(x, s, b, where=where),
      "rms_norm": lambda x: jaxnorm.rms_norm(x, s, where=where),
      "batch_norm": lambda x: jaxnorm.batch_norm(x, s, b, where=where),
      "moments": lambda x: jaxnorm.moments(x, -1, where=where),
  }[op]
  out = f(x)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(out))
  g = jax.jit(jax.grad(lambda x: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(f(x)))))(x)
  assert np.all(np.isfinite(g))
  if op in ("moments", "batch_norm"):  # documented: an empty group has mean 0 and variance 0
    mean, var = out if op == "moments" else out[1:]
    empty = 2 if op == "moments" else 1
    assert mean[empty] == 0 and var[empty] == 0
    others = [i for i in range(mean.shape[0]) if i != empty]
    ref_mean, ref_var = np_moments(np.where(where, x, 0.0), -1 if op == "moments" else 0, where)
    np.testing.assert_allclose(np.asarray(mean)[others], ref_mean[others], **F64)
    np.testing.assert_allclose(np.asarray(var)[others], ref_var[others], **F64)


# ----------------------------------------------------------------------------------------------
# 8. Bad input is rejected at trace time with a message naming the argument.
# ----------------------------------------------------------------------------------------------

# The messages name arguments in backticks (`axis`); matching on that form also
# makes sure the error is ours, not one raised deeper down by jax.numpy.

X2 = np.ones((3, 4))
X3 = np.ones((2, 3, 4))
BAD_INPUT = [
    # axis out of range
    ("layer_norm axis=2", lambda x: jaxnorm.layer_norm(x, axis=2), X2, ValueError, r"`axis`"),
    ("rms_norm axis=-3", lambda x: jaxnorm.rms_norm(x, axis=-3), X2, ValueError, r"`axis`"),
    ("moments axis=(0, 2)", lambda x: jaxnorm.moments(x, (0, 2)), X2, ValueError, r"`axis`"),
    ("batch_norm feature_axes=3", lambda x: jaxnorm.batch_norm(x, feature_axes=3), X3, ValueError, r"`feature_axes`"),
    # repeated axes
    ("layer_norm axis=(1, -1)", lambda x: jaxnorm.layer_norm(x, axis=(1, -1)), X2, ValueError, r"`axis`"),
    ("moments axis=(0, 0)", lambda x: jaxnorm.moments(x, (0, 0)), X2, ValueError, r"`axis`"),
    ("batch_norm features (1, -2)", lambda x: jaxnorm.batch_norm(x, feature_axes=(1, -2)), X3, ValueError, r"`feature_axes`"),
    # non-integer axis
    ("layer_norm axis=1.0", lambda x: jaxnorm.layer_norm(x, axis=1.0), X2, TypeError, r"`axis`"),
    # scale / bias of the wrong shape (including shapes that would broadcast)
    ("layer_norm scale (3,)", lambda x: jaxnorm.layer_norm(x, np.ones(3)), X2, ValueError, r"`scale`"),
    ("layer_norm scale (1,)", lambda x: jaxnorm.layer_norm(x, np.ones(1)), X2, ValueError, r"`scale`"),
    ("layer_norm bias (4, 1)", lambda x: jaxnorm.layer_norm(x, None, np.ones((4, 1))), X2, ValueError, r"`bias`"),
    ("layer_norm scale transposed", lambda x: jaxnorm.layer_norm(x, np.ones((4, 3)), axis=(1, 2)), X3, ValueError, r"`scale`"),
    ("rms_norm scale (5,)", lambda x: jaxnorm.rms_norm(x, np.ones(5)), X2, ValueError, r"`scale`"),
    ("batch_norm scale (3,)", lambda x: jaxnorm.batch_norm(x, np.ones(3)), X2, ValueError, r"`scale`"),
    ("batch_norm bias (2, 4)", lambda x: jaxnorm.batch_norm(x, None, np.ones((2, 4))), X2, ValueError, r"`bias`"),
    ("batch_norm integer scale", lambda x: jaxnorm.batch_norm(x, np.ones(4, np.int32)), X2, TypeError, r"`scale`"),
    ("normalize mean (5,)", lambda x: jaxnorm.normalize(x, np.ones(5), np.ones(4)), X2, ValueError, r"`mean`"),
    ("normalize var grows x", lambda x: jaxnorm.normalize(x, np.ones(4), np.ones((2, 3, 4))), X2, ValueError, r"`var`"),
    ("normalize scale (3,)", lambda x: jaxnorm.normalize(x, np.ones(4), np.ones(4), np.ones(3)), X2, ValueError, r"`scale`"),
    # integer x
    ("layer_norm int x", lambda x: jaxnorm.layer_norm(x.astype(jnp.int32)), X2, TypeError, r"`x`"),
    ("rms_norm int x", lambda x: jaxnorm.rms_norm(x.astype(jnp.int32)), X2, TypeError, r"`x`"),
    ("batch_norm int x", lambda x: jaxnorm.batch_norm(x.astype(jnp.int32)), X2, TypeError, r"`x`"),
    ("moments int x", lambda x: jaxnorm.moments(x.astype(jnp.int32), 0), X2, TypeError, r"`x`"),
    ("normalize int x", lambda x: jaxnorm.normalize(x.astype(jnp.int32), 0.0, 1.0), X2, TypeError, r"`x`"),
    ("layer_norm bool x", lambda x: jaxnorm.layer_norm(x > 0), X2, TypeError, r"`x`"),
    # epsilon <= 0
    ("layer_norm epsilon=0", lambda x: jaxnorm.layer_norm(x, epsilon=0.0), X2, ValueError, r"`epsilon`"),
    ("rms_norm epsilon<0", lambda x: jaxnorm.rms_norm(x, epsilon=-1e-6), X2, ValueError, r"`epsilon`"),
    ("batch_norm epsilon=0", lambda x: jaxnorm.batch_norm(x, epsilon=0), X2, ValueError, r"`epsilon`"),
    ("normalize epsilon<0", lambda x: jaxnorm.normalize(x, 0.0, 1.0, epsilon=-1.0), X2, ValueError, r"`epsilon`"),
    ("layer_norm epsilon=nan", lambda x: jaxnorm.layer_norm(x, epsilon=float("nan")), X2, ValueError, r"`epsilon`"),
    # mask not broadcasting to x
    ("layer_norm where (3,)", lambda x: jaxnorm.layer_norm(x, where=np.ones(3, bool)), X2, ValueError, r"`where`"),
    ("batch_norm where (2, 4)", lambda x: jaxnorm.batch_norm(x, where=np.ones((2, 4), bool)), X2, ValueError, r"`where`"),
    ("moments where grows x", lambda x: jaxnorm.moments(x, 0, where=np.ones((2, 3, 4), bool)), X2, ValueError, r"`where`"),
    ("rms_norm where (4, 3)", lambda x: jaxnorm.rms_norm(x, where=np.ones((4, 3), bool)), X2, ValueError, r"`where`"),
    # batch norm needs a batch axis
    ("batch_norm all features", lambda x: jaxnorm.batch_norm(x, feature_axes=(0, 1)), X2, ValueError, r"`feature_axes`"),
    ("batch_norm rank-1 features", lambda x: jaxnorm.batch_norm(x[0], feature_axes=0), X2, ValueError, r"`feature_axes`"),
]


@pytest.mark.parametrize("name,f,x,error,match", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_at_trace_time(name, f, x, error, match):
  with pytest.raises(error, match=match):
    f(jnp.asarray(x))
  with pytest.raises(error, match=match):  # while tracing, before anything is compiled or run
    jax.eval_shape(f, jax.ShapeDtypeStruct(x.shape, x.dtype))


def test_traced_epsilon_raises():
  with pytest.raises(TypeError, match=r"`epsilon`"):
    jax.jit(lambda x, eps: jaxnorm.layer_norm(x, epsilon=eps))(X2, 1e-5)


def test_jit_traces_once_per_shape_and_dtype():
  # Eager calls jit each kernel op with the Spec static: new values of the same
  # shape must reuse the compiled program, not retrace.
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x):
    return jaxnorm.layer_norm(x), jaxnorm.batch_norm(x)[0]

  x = jnp.arange(12.0).reshape(3, 4)
  for k in range(3):
    f(x + k)
