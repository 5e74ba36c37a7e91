"""The linen and nnx modules of today's models: zero-centred scale, call-time scale and shift, adaLN-Zero.

References, all independent of jaxnorm: Gemma's RMSNorm as flax's own
``examples/gemma/layers.py`` writes it (reproduced below: an nnx module whose
``scale`` starts at zeros and multiplies by ``1 + scale``), DiT's
``modulate`` over a parameter-free layer norm written in `jax.numpy`, and
flax's own modules followed by ``* (1 + scale) + shift`` (guided-diffusion's
scale-shift group norm, conditional batch norm). Values and gradients are
compared in float64.
"""

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

R = np.random.default_rng(0)
X3 = R.normal(size=(3, 5, 8)) * 2 + 1
X4 = R.normal(size=(4, 3, 3, 8)) + 0.5
C = R.normal(size=(3, 6))
S3, T3 = R.normal(size=(3, 1, 8)) * 0.3, R.normal(size=(3, 1, 8))
S4, T4 = R.normal(size=(4, 1, 1, 8)) * 0.3, R.normal(size=(4, 1, 1, 8))
TOL = dict(atol=1e-10, rtol=1e-10)


class GemmaRMSNorm(nnx.Module):
  """Gemma's RMSNorm as in flax's examples/gemma/layers.py: scale from zeros, x * rsqrt(mean(x^2) + 1e-6) * (1 + scale)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), dim))

  def __call__(self, x):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normed = x * jnp.reciprocal(jnp.sqrt(var + 1e-06))
    return normed * (1 + jnp.expand_dims(self.scale[...], axis=range(x.ndim - 1)))


def test_gemma_rms_norm_same_tree_outputs_and_gradients():
  gemma = GemmaRMSNorm(8, rngs=nnx.Rngs(0))
  ours = jnnx.RMSNorm(8, scale_offset=1.0, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  # The same parameter tree, initialised alike (zeros), so Gemma's checkpoint loads unchanged.
  gemma_state, ours_state = nnx.state(gemma, nnx.Param), nnx.state(ours, nnx.Param)
  assert jax.tree.structure(gemma_state) == jax.tree.structure(ours_state)
  assert float(jnp.abs(ours.scale[...]).max()) == 0.0
  nnx.update(gemma, jax.tree.map(lambda a: jnp.asarray(R.normal(size=a.shape) * 0.1), gemma_state))
  nnx.update(ours, nnx.state(gemma, nnx.Param))  # the checkpoint story
  np.testing.assert_allclose(ours(X3), gemma(X3), **TOL)
  ct = R.normal(size=X3.shape)

  def grads(model):
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * ct)
    return jax.grad(loss, argnums=(0, 1))(params, X3)

  (gp, gx), (rp, rx) = grads(ours), grads(gemma)
  np.testing.assert_allclose(gx, rx, **TOL)
  np.testing.assert_allclose(gp["scale"][...], rp["scale"][...], **TOL)


def test_linen_rms_norm_zero_centred_matches_gemma():
  gamma = R.normal(size=8) * 0.1
  layer = jnn.RMSNorm(scale_offset=1.0, param_dtype=jnp.float64)
  variables = layer.init(jax.random.key(0), X3)
  assert float(jnp.abs(variables["params"]["scale"]).max()) == 0.0
  gemma = GemmaRMSNorm(8, rngs=nnx.Rngs(0))
  gemma.scale[...] = jnp.asarray(gamma)
  np.testing.assert_allclose(layer.apply({"params": {"scale": gamma}}, X3), gemma(X3), **TOL)


def test_explicit_scale_init_wins_over_the_offset_default():
  layer = jnn.LayerNorm(scale_offset=1.0, scale_init=nn.initializers.ones)
  assert float(layer.init(jax.random.key(0), X3)["params"]["scale"].min()) == 1.0
  assert float(jnnx.GroupNorm(8, num_groups=2, scale_offset=0.5, rngs=nnx.Rngs(0)).scale[...].max()) == 0.5
  # Without an offset the default is flax's ones.
  assert float(jnn.GroupNorm(num_groups=2).init(jax.random.key(0), X4)["params"]["scale"].min()) == 1.0


def _random_params(variables):
  return jax.tree.map(lambda a: jnp.asarray(R.normal(size=a.shape) * 0.5 + 1.0), variables)


def modulate(y, s, t):
  return y * jnp.broadcast_to(1 + s, y.shape) + jnp.broadcast_to(t, y.shape)


# name -> (jaxnorm linen module, flax linen module, x, scale, shift, extra apply kwargs)
LINEN = {
    "LayerNorm (B, 1, C)": (jnn.LayerNorm(), nn.LayerNorm(), X3, S3, T3, {}),
    "LayerNorm shift only": (jnn.LayerNorm(), nn.LayerNorm(), X3, None, T3, {}),
    "RMSNorm (B, 1, C)": (jnn.RMSNorm(), nn.RMSNorm(), X3, S3, T3, {}),
    "RMSNorm per head (H, D)": (
        jnn.RMSNorm(), nn.RMSNorm(), X3.reshape(3, 5, 2, 4), S3[0, 0].reshape(2, 4), None, {}),
    "GroupNorm UNet scale-shift": (
        jnn.GroupNorm(num_groups=2, epsilon=1e-5), nn.GroupNorm(num_groups=2, epsilon=1e-5), X4, S4, T4, {}),
    "InstanceNorm (N, 1, 1, C)": (jnn.InstanceNorm(), nn.InstanceNorm(), X4, S4, T4, {}),
    "BatchNorm conditional, training": (
        jnn.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False), X4, S4, T4,
        {"mutable": ["batch_stats"]}),
    "BatchNorm conditional, inference": (
        jnn.BatchNorm(use_running_average=True), nn.BatchNorm(use_running_average=True), X4, S4, T4, {}),
}


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_modulation_matches_flax_composition(name):
  ours, theirs, x, s, t, kwargs = LINEN[name]
  with flax_promotion():
    variables = theirs.init(jax.random.key(0), x)
  variables = _random_params(variables)
  ct = R.normal(size=x.shape)

  def loss(module, variables, x, s, t, call):
    y = call(module, variables, x, s, t)
    y = y[0] if isinstance(y, tuple) else y
    return jnp.sum(y * ct)

  def ours_call(m, v, x, s, t):
    return m.apply(v, x, scale=s, shift=t, **kwargs)

  def theirs_call(m, v, x, s, t):
    with flax_promotion():
      out = m.apply(v, x, **kwargs)
    y = out[0] if kwargs else out
    return modulate(y, 0.0 if s is None else s, 0.0 if t is None else t)

  args = (variables, x, s, t)
  np.testing.assert_allclose(loss(ours, *args, ours_call), loss(theirs, *args, theirs_call), **TOL)
  argnums = (0, 1) + tuple(i for i, a in ((2, s), (3, t)) if a is not None)
  g_ours = jax.grad(lambda *a: loss(ours, *a, ours_call), argnums)(*args)
  g_theirs = jax.grad(lambda *a: loss(theirs, *a, theirs_call), argnums)(*args)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    np.testing.assert_allclose(a, b, atol=1e-9, rtol=1e-9)
  if kwargs:  # training: the same running statistics as flax's
    _, ours_stats = ours.apply(variables, x, scale=s, shift=t, **kwargs)
    with flax_promotion():
      _, their_stats = theirs.apply(variables, x, **kwargs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), ours_stats, their_stats)


NNX = {
    "LayerNorm": (lambda: jnnx.LayerNorm(8, rngs=nnx.Rngs(0)), lambda: nnx.LayerNorm(8, rngs=nnx.Rngs(0)), X3, S3, T3),
    "RMSNorm": (lambda: jnnx.RMSNorm(8, rngs=nnx.Rngs(0)), lambda: nnx.RMSNorm(8, rngs=nnx.Rngs(0)), X3, S3, T3),
    "GroupNorm": (
        lambda: jnnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0)),
        lambda: nnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0)), X4, S4, T4),
    "InstanceNorm": (
        lambda: jnnx.InstanceNorm(8, rngs=nnx.Rngs(0)), lambda: nnx.InstanceNorm(8, rngs=nnx.Rngs(0)), X4, S4, T4),
    "BatchNorm": (lambda: jnnx.BatchNorm(8, rngs=nnx.Rngs(0)), lambda: nnx.BatchNorm(8, rngs=nnx.Rngs(0)), X4, S4, T4),
}


@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_modulation_matches_flax_composition(name):
  make_ours, make_theirs, x, s, t = NNX[name]
  ours, theirs = make_ours(), make_theirs()
  params = _random_params(nnx.state(theirs, nnx.Param))
  nnx.update(theirs, params)
  nnx.update(ours, params)
  ct = R.normal(size=x.shape)

  def grads(model, call):  # nnx's own transform: batch norm updates its running statistics inside
    loss = lambda m, x, s, t: jnp.sum(call(m, x, s, t) * ct)
    return nnx.value_and_grad(loss, argnums=(0, 1, 2, 3))(model, x, s, t)

  (lo, go) = grads(ours, lambda m, x, s, t: m(x, scale=s, shift=t))
  with flax_promotion():
    (lt, gt) = grads(theirs, lambda m, x, s, t: modulate(m(x), s, t))
  np.testing.assert_allclose(lo, lt, **TOL)
  for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gt)):
    np.testing.assert_allclose(a, b, atol=1e-9, rtol=1e-9)
  if name == "BatchNorm":  # the running statistics moved as flax's did, and inference modulates too
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                 nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
    ours.eval(), theirs.eval()
    with flax_promotion():
      y_theirs = theirs(x)
    np.testing.assert_allclose(ours(x, scale=s, shift=t), modulate(y_theirs, s, t), **TOL)


def dit_reference(x, c, kernel, bias, eps=1e-6):
  """DiT's adaLN: c -> SiLU -> Linear -> (shift, scale, gate); modulate(LN(x), shift, scale), in jax.numpy."""
  m = jax.nn.silu(c) @ kernel + bias[None, :]
  shift, scale, gate = jnp.split(m, 3, axis=-1)
  mean = x.mean(-1, keepdims=True)
  ln = (x - mean) / jnp.sqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
  return ln * (1 + scale[:, None]) + shift[:, None], gate[:, None]


def test_adaln_zero_linen_and_nnx_match_dit():
  layer = jnn.AdaLNZero(param_dtype=jnp.float64)
  variables = layer.init(jax.random.key(0), X3, C)
  # Zero-initialised: the gate is 0, so x + gate * f(y) starts as the identity.
  y0, gate0 = layer.apply(variables, X3, C)
  assert float(jnp.abs(gate0).max()) == 0.0
  np.testing.assert_allclose(y0, dit_reference(X3, C, jnp.zeros((6, 24)), jnp.zeros(24))[0], **TOL)
  variables = _random_params(variables)
  w = variables["params"]["modulation"]
  ct_y, ct_g = R.normal(size=X3.shape), R.normal(size=(3, 1, 8))

  def loss(call, p, x, c):
    y, g = call(p, x, c)
    return jnp.sum(y * ct_y) + jnp.sum(g * ct_g)

  ours = lambda p, x, c: layer.apply({"params": {"modulation": p}}, x, c)
  ref = lambda p, x, c: dit_reference(x, c, p["kernel"], p["bias"])
  np.testing.assert_allclose(loss(ours, w, X3, C), loss(ref, w, X3, C), **TOL)
  g_ours = jax.grad(lambda *a: loss(ours, *a), (0, 1, 2))(w, X3, C)
  g_ref = jax.grad(lambda *a: loss(ref, *a), (0, 1, 2))(w, X3, C)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-9, rtol=1e-9)

  module = jnnx.AdaLNZero(8, 6, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  module.modulation.kernel[...], module.modulation.bias[...] = w["kernel"], w["bias"]
  y, g = module(X3, C)
  ry, rg = ref(w, X3, C)
  np.testing.assert_allclose(y, ry, **TOL)
  np.testing.assert_allclose(g, rg, **TOL)


def test_adaln_zero_second_order_under_jit():
  layer = jnn.AdaLNZero(param_dtype=jnp.float64)
  w = _random_params(layer.init(jax.random.key(0), X3[:1], C[:1]))["params"]["modulation"]
  f = lambda c: jnp.sum(jnp.sin(layer.apply({"params": {"modulation": w}}, X3[:1], c)[0]))
  r = lambda c: jnp.sum(jnp.sin(dit_reference(X3[:1], c, w["kernel"], w["bias"])[0]))
  np.testing.assert_allclose(jax.jit(jax.hessian(f))(C[:1]), jax.hessian(r)(C[:1]), atol=1e-8)


def test_modulation_errors_name_the_call_argument():
  layer = jnn.LayerNorm()
  variables = layer.init(jax.random.key(0), X3)
  with pytest.raises(ValueError, match=r"`shift` must have shape \(8,\)"):
    layer.apply(variables, X3, shift=np.ones((2, 1, 8)))
  with pytest.raises(TypeError, match="`scale`"):
    layer.apply(variables, X3, scale=np.ones((3, 1, 8), np.int32))
  # `c`'s shape is checked before the modulation layer sees it: a float64 `c` beside float32
  # parameters (which strict promotion refuses inside flax's Dense) still gets this error.
  with pytest.raises(ValueError, match="`c` must have the leading axes of x"):
    jnnx.AdaLNZero(8, 6, rngs=nnx.Rngs(0))(X3, np.ones((2, 6)))
  with pytest.raises(ValueError, match="`c` must have the leading axes of x"):
    jnn.AdaLNZero().init(jax.random.key(0), X3, np.ones((2, 6)))
  with pytest.raises(ValueError, match="`scale_offset`=1.0 is added to `scale`, but `scale` is None"):
    jnn.RMSNorm(use_scale=False, scale_offset=1.0).init(jax.random.key(0), X3)


def test_modulation_under_strict_settings_jit_and_vmap():
  """float32 throughout, the four strict settings at once, under jit; and vmap over examples."""
  from test_strict_modes import strict

  x = X4.astype(np.float32)
  s, t = S4.astype(np.float32), T4.astype(np.float32)
  cases = {
      "LayerNorm": jnn.LayerNorm(scale_offset=1.0),
      "RMSNorm": jnn.RMSNorm(),
      "GroupNorm": jnn.GroupNorm(num_groups=2),
      "InstanceNorm": jnn.InstanceNorm(),
      "BatchNorm": jnn.BatchNorm(use_running_average=False),
  }
  for name, layer in cases.items():
    variables = layer.init(jax.random.key(0), x)
    with strict():
      loss = jax.jit(lambda x, s, t: jnp.sum(layer.apply(variables, x, scale=s, shift=t, mutable=["batch_stats"])[0]))
      grads = jax.grad(loss, (0, 1, 2))(x, s, t)
    assert all(np.all(np.isfinite(g)) for g in grads), name
  # vmap over examples: a per-example scale and shift of one example each is the batched call.
  f = lambda x, s, t: jaxnorm.layer_norm(x, s, t, scale_offset=1.0)
  np.testing.assert_allclose(jax.vmap(f)(X3, S3[:, 0], T3[:, 0]), f(X3, S3, T3), **TOL)
