"""Complex inputs, as flax supports them: complex mean, real variance ``mean(|x - mean|^2)``, complex
output, real running variance; gradients of real losses under JAX's convention, checked against flax
(linen and nnx), a complex128 NumPy reference and finite differences."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from _flax_reference import flax_promotion
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 6)) + 1j * RNG.normal(size=(4, 6)) + (2 - 1j)
IMG = RNG.normal(size=(2, 3, 3, 4)) + 1j * RNG.normal(size=(2, 3, 3, 4))
MASK = np.ones(X.shape, bool)
MASK[:, -1] = False
CT = RNG.normal(size=X.shape) + 1j * RNG.normal(size=X.shape)
CT_IMG = RNG.normal(size=IMG.shape) + 1j * RNG.normal(size=IMG.shape)


def np_norm(x, axes, eps, centered=True, where=None):
  """complex128 NumPy reference: flax's formula."""
  w = np.ones(x.shape, bool) if where is None else where
  n = w.sum(axes, keepdims=True)
  mean = np.where(w, x, 0).sum(axes, keepdims=True) / n if centered else 0
  var = (np.abs(np.where(w, x - mean, 0)) ** 2).sum(axes, keepdims=True) / n
  return (x - mean) / np.sqrt(var + eps)


def np_group_norm(x, groups, eps):
  n, *spatial, c = x.shape
  g = x.reshape(n, *spatial, groups, c // groups)
  return np_norm(g, tuple(range(1, len(spatial) + 1)) + (len(spatial) + 2,), eps).reshape(x.shape)


OPS = {
    "layer_norm": (X, CT, lambda x: jaxnorm.layer_norm(x), lambda x: np_norm(x, (1,), 1e-6)),
    "layer_norm_masked": (X, CT, lambda x: jaxnorm.layer_norm(x, where=MASK),
                          lambda x: np_norm(x, (1,), 1e-6, where=MASK)),
    "rms_norm": (X, CT, lambda x: jaxnorm.rms_norm(x), lambda x: np_norm(x, (1,), 1e-6, centered=False)),
    "batch_norm": (X, CT, lambda x: jaxnorm.batch_norm(x)[0], lambda x: np_norm(x, (0,), 1e-5)),
    "group_norm": (IMG, CT_IMG, lambda x: jaxnorm.group_norm(x, num_groups=2), lambda x: np_group_norm(x, 2, 1e-6)),
    "instance_norm": (IMG, CT_IMG, lambda x: jaxnorm.instance_norm(x), lambda x: np_norm(x, (1, 2), 1e-6)),
}


def _loss(f, ct):
  # A real loss of a complex function.
  return lambda x: jnp.sum(jnp.real(f(x) * jnp.conj(ct))) + 0.5 * jnp.sum(jnp.abs(f(x)) ** 2 * jnp.abs(ct))


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_numpy_reference_outputs_and_gradients(name):
  x, ct, op, ref = OPS[name]
  y = op(x)
  assert y.dtype == jnp.complex128
  np.testing.assert_allclose(y, ref(x), rtol=1e-10, atol=1e-10)
  g = jax.grad(_loss(op, ct))(x)
  assert g.dtype == jnp.complex128
  # JAX's convention: for a real L, dL = Re(sum(g * dz)); checked by central differences of the reference.
  ref_loss = lambda x: np.sum(np.real(ref(x) * np.conj(ct))) + 0.5 * np.sum(np.abs(ref(x)) ** 2 * np.abs(ct))
  for seed in range(3):
    r = np.random.default_rng(seed + 10)
    dz = r.normal(size=x.shape) + 1j * r.normal(size=x.shape)
    h = 1e-6
    fd = (ref_loss(x + h * dz) - ref_loss(x - h * dz)) / (2 * h)
    np.testing.assert_allclose(np.real(np.sum(np.asarray(g) * dz)), fd, rtol=1e-6, atol=1e-6)


def test_complex64_in_complex64_out_and_real_statistics():
  x = X.astype(np.complex64)
  y, mean, var = jaxnorm.batch_norm(x, jnp.ones(6, jnp.float32), jnp.zeros(6, jnp.float32))
  assert y.dtype == jnp.complex64 and mean.dtype == jnp.complex64 and var.dtype == jnp.float32
  np.testing.assert_allclose(mean, X.mean(0), rtol=1e-5)
  np.testing.assert_allclose(var, (np.abs(X - X.mean(0)) ** 2).mean(0), rtol=1e-5)
  m, v = jaxnorm.moments(x, 0)
  assert m.dtype == jnp.complex64 and v.dtype == jnp.float32
  np.testing.assert_allclose(v, var, rtol=1e-6)


def test_masked_nan_padding_in_complex_input():
  x = np.where(MASK, X, np.nan + 1j * np.nan)
  y = jaxnorm.layer_norm(x, where=MASK)
  np.testing.assert_allclose(np.asarray(y)[MASK], np_norm(X, (1,), 1e-6, where=MASK)[MASK], rtol=1e-10)
  g = jax.grad(_loss(lambda x: jnp.where(MASK, jaxnorm.layer_norm(x, where=MASK), 0), CT))(x)
  assert np.all(np.isfinite(g))


def test_real_input_is_still_refused_by_real_only_ops():
  with pytest.raises(TypeError, match="real floating-point"):
    jaxnorm.batch_renorm(X, None, None, jnp.zeros(6), jnp.ones(6), r_max=3.0, d_max=5.0)


LINEN = {
    "BatchNorm": (lambda m: m.BatchNorm(use_running_average=False, momentum=0.9), X),
    "LayerNorm": (lambda m: m.LayerNorm(), X),
    "RMSNorm": (lambda m: m.RMSNorm(), X),
    "GroupNorm": (lambda m: m.GroupNorm(num_groups=2), IMG),
    "InstanceNorm": (lambda m: m.InstanceNorm(), IMG),
}


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_modules_match_flax(name):
  make, x = LINEN[name]
  x = x.astype(np.complex64)
  ours, theirs = make(jnn), make(nn)
  with flax_promotion():
    variables = theirs.init(jax.random.key(0), x)

  def run(module, variables, x):
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    return y, updates

  y, updates = run(ours, variables, x)
  with flax_promotion():
    y_ref, updates_ref = run(theirs, variables, x)
  assert y.dtype == jnp.complex64
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), updates, updates_ref)
  if "batch_stats" in updates:
    assert updates["batch_stats"]["var"].dtype == jnp.float32
  loss = lambda module: lambda p, x: jnp.sum(jnp.abs(run(module, {**variables, "params": p}, x)[0] - 1) ** 2)
  g = jax.grad(loss(ours), argnums=(0, 1))(variables["params"], x)
  with flax_promotion():
    g_ref = jax.grad(loss(theirs), argnums=(0, 1))(variables["params"], x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g, g_ref)
  # Inference with the (complex mean, real variance) running statistics.
  if name == "BatchNorm":
    infer = lambda module: module.clone(use_running_average=True).apply({**variables, **updates}, x)
    with flax_promotion():
      y_infer_ref = infer(theirs)
    np.testing.assert_allclose(infer(ours), y_infer_ref, rtol=2e-5, atol=2e-5)


NNX = {
    "BatchNorm": (lambda m: m.BatchNorm(6, use_running_average=False, rngs=nnx.Rngs(0)), X),
    "LayerNorm": (lambda m: m.LayerNorm(6, rngs=nnx.Rngs(0)), X),
    "RMSNorm": (lambda m: m.RMSNorm(6, rngs=nnx.Rngs(0)), X),
    "GroupNorm": (lambda m: m.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)), IMG),
    "InstanceNorm": (lambda m: m.InstanceNorm(4, rngs=nnx.Rngs(0)), IMG),
}


@pytest.mark.parametrize("name", sorted(NNX))
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::numpy.exceptions.ComplexWarning")
def test_nnx_modules_match_flax(name):
  make, x = NNX[name]
  x = jnp.asarray(x.astype(np.complex64))
  ours, theirs = make(jnnx), make(nnx)
  loss = lambda m, x: jnp.sum(jnp.abs(m(x) - 1) ** 2)
  l, g = nnx.value_and_grad(loss)(ours, x)
  with flax_promotion():
    l_ref, g_ref = nnx.value_and_grad(loss)(theirs, x)
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  y = ours(x)
  with flax_promotion():
    y_ref = theirs(x)
  assert y.dtype == jnp.complex64
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
      nnx.state(g, nnx.Param), nnx.state(g_ref, nnx.Param),
  )
  if name == "BatchNorm":
    np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5, atol=1e-6)
