"""The backward from the output (``saved="output"``): values, gradients, limits and what the program keeps.

With ``saved="output"`` the forward keeps `y` (the array it returns) instead
of `x`, and the backward recovers x-hat as ``(y - bias) / (scale_offset +
scale)``. Checked here against float64 autodiff of the textbook formulas and
against the default mode; the memory claim is read from the compiled
program's buffer assignment (`memory_analysis`) of a Dense -> norm chain.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxnorm
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from test_strict_modes import strict

IMG = (3, 4, 4, 8)  # N, H, W, C
EPS = 1e-5


def _reference(op, x, scale, bias, mask=None):
  """The textbook float64 formula of `op`, by autodiff (masked statistics over `mask`)."""
  axes = {"layer": (-1,), "rms": (-1,), "batch": (0, 1, 2), "instance": (1, 2), "group": (1, 2, 4)}[op]
  shape = x.shape
  mask = None if mask is None else jnp.broadcast_to(mask, shape)
  if op == "group":
    x = x.reshape(*shape[:-1], 4, shape[-1] // 4)
    mask = None if mask is None else mask.reshape(x.shape)
  xm = x if mask is None else jnp.where(mask, x, 0.0)
  n = float(np.prod([x.shape[a] for a in axes])) if mask is None else jnp.sum(mask, axes, keepdims=True, dtype=x.dtype)
  mean = 0.0 if op == "rms" else jnp.sum(xm, axes, keepdims=True) / n
  dev = x - mean
  var = jnp.sum(jnp.where(mask, dev, 0.0) ** 2 if mask is not None else dev**2, axes, keepdims=True) / n
  y = (dev / jnp.sqrt(var + EPS)).reshape(shape) * jnp.broadcast_to(scale, shape)
  return y if bias is None else y + jnp.broadcast_to(bias, shape)


def _op(op, x, scale, bias, **kw):
  if op == "layer":
    return jaxnorm.layer_norm(x, scale, bias, epsilon=EPS, **kw)
  if op == "rms":
    return jaxnorm.rms_norm(x, scale, epsilon=EPS, **kw)
  if op == "batch":
    return jaxnorm.batch_norm(x, scale, bias, epsilon=EPS, **kw)[0]
  if op == "instance":
    return jaxnorm.instance_norm(x, scale, bias, epsilon=EPS, **kw)
  return jaxnorm.group_norm(x, scale, bias, num_groups=4, epsilon=EPS, **kw)


OPS = ["layer", "rms", "batch", "instance", "group"]
_rng = np.random.default_rng(0)
X = _rng.normal(size=IMG) * 2.0 + 1.5
CT = _rng.normal(size=IMG)
PER_FEATURE = (_rng.uniform(0.5, 1.5, IMG[-1]) * np.sign(_rng.normal(size=IMG[-1])), _rng.normal(size=IMG[-1]))
# Call time, per example: conditional batch norm, FiLM, a UNet's scale-shift norm, adaLN.
PER_EXAMPLE = (_rng.uniform(0.5, 1.5, (IMG[0], 1, 1, IMG[-1])), _rng.normal(size=(IMG[0], 1, 1, IMG[-1])))


def _vjp(f, *args):
  y, pullback = jax.vjp(f, *args)
  return y, pullback(jnp.asarray(CT, y.dtype))


@functools.partial(jax.jit, static_argnums=3)
def _grads_all(x, scale, bias, ops):
  out = {}
  for op in ops:
    b = None if op == "rms" else bias
    for saved in ("input", "output"):
      out[op, saved] = _vjp(lambda x, s, b, op=op, saved=saved: _op(op, x, s, b, saved=saved), x, scale, b)
    f64 = lambda a: None if a is None else a.astype(jnp.float64)
    out[op, "ref"] = _vjp(lambda x, s, b, op=op: _reference(op, x, s, b), f64(x), f64(scale), f64(b))
  return out


def _max_rel(a, b):
  return max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("params", ["per_feature", "per_example"])
def test_float32_values_and_gradients_match_float64_and_the_default(params):
  scale, bias = PER_FEATURE if params == "per_feature" else PER_EXAMPLE
  # Per example: the kernel's two backward layouts (parameters constant over some reduced axes, or none).
  ops = tuple(OPS) if params == "per_feature" else ("batch", "layer")
  out = _grads_all(jnp.float32(X), jnp.float32(scale), jnp.float32(bias), ops)
  for op in ops:
    (y, g), (y_in, g_in), (y_ref, g_ref) = out[op, "output"], out[op, "input"], out[op, "ref"]
    assert y.dtype == jnp.float32 and jax.tree.map(lambda a: a.dtype, g) == jax.tree.map(lambda a: a.dtype, g_in)
    np.testing.assert_array_equal(y, y_in)  # the same forward
    g64 = jax.tree.map(lambda a: a.astype(jnp.float64), g)
    assert _max_rel(g64, g_ref) < 2e-6, (op, params, _max_rel(g64, g_ref))
    assert _max_rel(g, g_in) < 2e-6, (op, params)


@pytest.mark.parametrize("op", ["layer", "batch"])
def test_second_order_in_float64(op):
  scale, bias = PER_FEATURE
  f = lambda x, s, b: _op(op, x, s, b, saved="output")
  check_grads(f, (X[:2, :2], scale, bias), order=2, modes=["rev"])


@pytest.mark.parametrize("op", OPS)
def test_masked_out_nan_and_inf_never_leak(op):
  # Per example, the last two features are out; over the batch and space, the last column of every image.
  per_example = op in ("layer", "rms")
  mask = (np.arange(IMG[-1]) < 6) if per_example else np.broadcast_to(np.arange(IMG[2]) < 3, IMG[:3])[..., None]
  bad = (..., slice(6, 8)) if per_example else (slice(None), slice(None), 3, slice(0, 2))
  x = X.copy()
  x[bad] = np.where(np.arange(IMG[-1] - 6) % 2, np.inf, np.nan) if per_example else np.array([np.nan, np.inf])
  scale, bias = PER_FEATURE
  b = None if op == "rms" else bias
  y, g = _vjp(lambda x, s, b: _op(op, x, s, b, where=mask, saved="output"), x, scale, b)
  y_in, g_in = _vjp(lambda x, s, b: _op(op, x, s, b, where=mask), x, scale, b)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((y, g)))
  np.testing.assert_allclose(y, y_in, rtol=1e-12, atol=1e-12)
  assert _max_rel(g, g_in) < 1e-12
  assert float(jnp.max(jnp.abs(g[0][bad]))) == 0.0  # non-finite inputs get zero gradient
  # The parameters' gradients against the float64 formula with masked statistics.
  clean = np.where(np.isfinite(x), x, 0.0)  # what the kernel reads
  _, g_ref = _vjp(lambda s, b: _reference(op, jnp.asarray(clean), s, b, mask), scale, b)
  assert _max_rel(g[1:], g_ref) < 1e-12


def test_scale_offset_and_no_parameters():
  x = jnp.asarray(X)
  gamma = jnp.asarray(PER_FEATURE[0]) - 1.0
  for op in ["layer", "rms", "instance", "group"]:
    for saved in ("input", "output"):
      args = (x, gamma, None)
      y, g = _vjp(lambda x, s, op=op, saved=saved: _op(op, x, s, None, scale_offset=1.0, saved=saved), *args[:2])
      if saved == "input":
        ref = (y, g)
    assert _max_rel((y, g), ref) < 1e-12, op
    y, g = _vjp(lambda x, op=op: _op(op, x, None, None, saved="output"), x)
    y_in, g_in = _vjp(lambda x, op=op: _op(op, x, None, None), x)
    assert _max_rel(g, g_in) < 1e-12, op


def test_a_multiplier_near_zero_is_clamped_and_its_scale_still_learns():
  """A scale of 0 (torchvision's zero_init_residual) cannot be divided by: the forward uses ±epsilon there.

  d(scale) stays sum(g x-hat), as without the clamp, so a scale
  initialised at 0 gets the gradient that moves it; x and the bias get the
  exact gradient of the clamped forward.
  """
  scale = np.array([0.0, -0.0, 1e-9, -1e-9, 0.5, -2.0, EPS, 3.0])
  clamped = np.array([EPS, EPS, EPS, -EPS, 0.5, -2.0, EPS, 3.0])
  bias = PER_FEATURE[1]
  for op in ["batch", "layer", "group"]:
    y, (dx, ds, db) = _vjp(lambda x, s, b, op=op: _op(op, x, s, b, saved="output"), X, scale, bias)
    y_c, (dx_c, ds_c, db_c) = _vjp(lambda x, s, b, op=op: _op(op, x, s, b), X, clamped, bias)
    _, (_, ds_in, _) = _vjp(lambda x, s, b, op=op: _op(op, x, s, b), X, scale, bias)
    np.testing.assert_allclose(y, y_c, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, dx_c, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(db, db_c, rtol=1e-12)
    # The x-hat recovered from y = 1e-5 x-hat + bias keeps about 1e-11 of float64's 1e-16.
    np.testing.assert_allclose(ds, ds_in, rtol=1e-6, atol=1e-9)
    assert float(jnp.min(jnp.abs(ds[:2]))) > 1e-3, op  # the zero scales get a gradient


def test_bfloat16_and_float32_gradient_error_against_float64():
  """x-hat from a bfloat16 `y` carries bfloat16's rounding: the gradients stay within a few bfloat16 ulps."""
  scale, bias = PER_FEATURE
  _, g_ref = _vjp(lambda x, s, b: _reference("layer", x, s, b), X, scale, bias)
  errors = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    for saved in ("input", "output"):
      args = [jnp.asarray(a, dtype) for a in (X, scale, bias)]
      _, g = _vjp(lambda x, s, b, saved=saved: jaxnorm.layer_norm(x, s, b, epsilon=EPS, saved=saved), *args)
      errors[dtype, saved] = _max_rel([a.astype(jnp.float64) for a in g], g_ref)
  assert errors[jnp.float32, "output"] < 5e-6
  # bfloat16 has 8 bits: 2^-8 = 3.9e-3. Its input mode rounds x and dx only; output mode rounds y too.
  assert errors[jnp.bfloat16, "input"] < 2e-2
  assert errors[jnp.bfloat16, "output"] < 3e-2


def test_under_vmap_scan_and_checkpoint():
  scale, bias = PER_FEATURE
  x = jnp.asarray(X)

  def layers(x, saved, wrap):
    def body(h, w):
      return wrap(lambda h: jnp.tanh(jaxnorm.layer_norm(h * w, scale, bias, saved=saved)))(h), None
    return jnp.sum(jax.lax.scan(body, x, jnp.linspace(0.5, 1.5, 3))[0] * CT)

  for wrap in (lambda f: f, jax.checkpoint):
    g = jax.grad(layers)(x, "output", wrap)
    np.testing.assert_allclose(g, jax.grad(layers)(x, "input", wrap), rtol=1e-10, atol=1e-12)
  # Batch statistics over a vmapped axis (a per-example model under vmap with an axis_name).
  per_example = jax.vmap(lambda x: jaxnorm.batch_norm(x, scale, bias, axis_name="b", saved="output")[0], axis_name="b")
  g = jax.grad(lambda x: jnp.sum(per_example(x) * CT))(x)
  g_ref = jax.grad(lambda x: jnp.sum(_reference("batch", x, scale, bias) * CT))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def test_strict_settings():
  scale, bias = (jnp.float32(a) for a in PER_FEATURE)
  x = jnp.float32(X)
  mask = jnp.asarray(np.arange(IMG[-1]) < 6)
  with strict():
    for op in OPS:
      b = None if op == "rms" else bias
      f = lambda x, s, b, op=op: jnp.sum(_op(op, x, s, b, where=mask, saved="output") * jnp.float32(CT))
      jax.grad(f, (0, 1, 2))(x, scale, b)


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="`saved` must be one of"):
    jaxnorm.layer_norm(X, saved="x")
  with pytest.raises(ValueError, match="`saved`='output' needs a real input"):
    jaxnorm.layer_norm(X + 1j, saved="output")
  with pytest.raises(ValueError, match="`saved`='output' chooses what the hand-derived VJP keeps"):
    jaxnorm.batch_norm(X, saved="output", custom_vjp=False)
  with pytest.raises(ValueError, match="`saved` must be one of"):
    jnnx.BatchNorm(8, saved=True, rngs=nnx.Rngs(0))


LINEN_MODULES = {
    "LayerNorm": jnn.LayerNorm,
    "RMSNorm": jnn.RMSNorm,
    "GroupNorm": lambda **k: jnn.GroupNorm(num_groups=4, **k),
    "InstanceNorm": jnn.InstanceNorm,
    "BatchNorm": lambda **k: jnn.BatchNorm(use_running_average=False, **k),
}
NNX_MODULES = {
    "LayerNorm": lambda **k: jnnx.LayerNorm(8, **k),
    "RMSNorm": lambda **k: jnnx.RMSNorm(8, **k),
    "GroupNorm": lambda **k: jnnx.GroupNorm(8, num_groups=4, **k),
    "InstanceNorm": lambda **k: jnnx.InstanceNorm(8, **k),
    "BatchNorm": lambda **k: jnnx.BatchNorm(8, **k),
}


@pytest.mark.parametrize("name", sorted(LINEN_MODULES))
def test_modules_take_it(name):
  x = jnp.float32(X)
  shift = jnp.float32(PER_EXAMPLE[1])  # call-time modulation too
  grads = []
  for saved in ("input", "output"):
    module = LINEN_MODULES[name](saved=saved)
    variables = module.init(jax.random.key(0), x)

    def loss(params, x, module=module, variables=variables):
      y, _ = module.apply({**variables, "params": params}, x, shift=shift, mutable=["batch_stats"])
      return jnp.sum(y * jnp.float32(CT))

    grads.append(jax.grad(loss, (0, 1))(variables["params"], x))
    model = NNX_MODULES[name](saved=saved, rngs=nnx.Rngs(0))
    grads.append(nnx.grad(lambda m, x: jnp.sum(m(x, shift=shift) * jnp.float32(CT)), argnums=(0, 1))(model, x)[1])
  assert _max_rel(grads[2], grads[0]) < 2e-6 and _max_rel(grads[3], grads[1]) < 2e-6


def _chain_temp(saved, layers, batch=4096, width=256):
  """Temporary bytes, in activations, of the gradient of x -> [Dense -> layer norm] x layers -> tanh -> sum (CPU)."""

  def loss(params, x):
    for w, s, b in params:
      x = jaxnorm.layer_norm(x @ w, s, b, saved=saved)
    return jnp.sum(jnp.tanh(x))

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = [(f32(width, width), f32(width), f32(width))] * layers
  compiled = jax.jit(jax.grad(loss)).lower(params, f32(batch, width)).compile()
  return compiled.memory_analysis().temp_size_in_bytes / (batch * width * 4)


def test_the_compiled_chain_no_longer_keeps_the_input():
  """Per layer, the default keeps two activations (the norm's x and the next Dense's input y); "output" keeps y only."""
  per_layer = {saved: _chain_temp(saved, 3) - _chain_temp(saved, 2) for saved in ("input", "output")}
  assert per_layer["input"] > 1.9, per_layer
  assert per_layer["output"] < 1.1, per_layer


@pytest.mark.parametrize("slope", [0.01, 0.0])
def test_activated_batch_norm_is_batch_norm_then_leaky_relu(slope):
  """Values and gradients of `activated_batch_norm` equal float64 autodiff of the composition, masked and per example."""
  act = jax.nn.relu if slope == 0 else (lambda y: jax.nn.leaky_relu(y, slope))
  mask = np.broadcast_to(np.arange(IMG[2]) < 3, IMG[:3])[..., None]
  for scale, bias, where in ((*PER_FEATURE, None), (*PER_EXAMPLE, mask)):
    z, g = _vjp(lambda x, s, b: jaxnorm.activated_batch_norm(x, s, b, negative_slope=slope, epsilon=EPS, where=where)[0],
                X, scale, bias)
    z_ref, g_ref = _vjp(lambda x, s, b: act(_reference("batch", x, s, b, where)), X, scale, bias)
    np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
    assert _max_rel(g, g_ref) < 1e-12, (slope, where is None)
  check_grads(lambda x, s, b: jaxnorm.activated_batch_norm(x, s, b, negative_slope=0.2)[0],
              (X[:2, :2], *PER_FEATURE), order=2, modes=["rev"])


def test_activated_modules_are_batch_norm_then_the_activation():
  x = jnp.float32(X)
  ct = jnp.float32(CT)
  act = lambda y: jax.nn.leaky_relu(y, 0.1)
  fused, plain = jnn.ActivatedBatchNorm(negative_slope=0.1), jnn.BatchNorm()
  variables = fused.init(jax.random.key(0), x, use_running_average=False)

  def loss(params, x, module, after):
    z, updates = module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(after(z) * ct), updates

  (g, updates), (g_ref, updates_ref) = (
      jax.grad(loss, (0, 1), has_aux=True)(variables["params"], x, m, a) for m, a in ((fused, lambda z: z), (plain, act))
  )
  assert _max_rel(g, g_ref) < 2e-6 and _max_rel(updates, updates_ref) == 0
  trained = {**variables, **updates}
  np.testing.assert_allclose(fused.apply(trained, x, use_running_average=True), act(plain.apply(trained, x, use_running_average=True)))
  a, b = jnnx.ActivatedBatchNorm(8, negative_slope=0.0, rngs=nnx.Rngs(0)), jnnx.BatchNorm(8, rngs=nnx.Rngs(0))
  g_a = nnx.grad(lambda m, x: jnp.sum(m(x) * ct), argnums=(0, 1))(a, x)
  g_b = nnx.grad(lambda m, x: jnp.sum(jax.nn.relu(m(x)) * ct), argnums=(0, 1))(b, x)
  assert _max_rel(g_a[1], g_b[1]) < 2e-6
  np.testing.assert_array_equal(a.mean[...], b.mean[...])
  a.eval(), b.eval()
  np.testing.assert_array_equal(a(x), jax.nn.relu(b(x)))


def test_activated_errors():
  with pytest.raises(ValueError, match="`negative_slope` must be in"):
    jaxnorm.activated_batch_norm(X, negative_slope=-0.1)
  with pytest.raises(ValueError, match="ActivatedBatchNorm keeps its output"):
    jnnx.ActivatedBatchNorm(8, saved="input", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ActivatedBatchNorm keeps its output"):
    jnn.ActivatedBatchNorm(saved="input").init(jax.random.key(0), X, use_running_average=False)


def test_adaln_zero_takes_it():
  """DiT's AdaLNZero: the same gradients (parameters drawn away from their zero init, so that they are not trivial)."""
  x = jnp.float32(X.reshape(3, 16, 8))
  c = jnp.float32(_rng.normal(size=(3, 5)))
  grads = {}
  for saved in ("input", "output"):
    layer = jnn.AdaLNZero(saved=saved)
    params = jax.tree.map(lambda a: a + 0.1, layer.init(jax.random.key(0), x, c)["params"])
    grads["linen", saved] = jax.grad(
        lambda p, x: _total(layer.apply({"params": p}, x, c)), (0, 1))(params, x)
    model = jnnx.AdaLNZero(8, 5, saved=saved, rngs=nnx.Rngs(0))
    model.modulation.bias[...] = model.modulation.bias[...] + 0.1
    grads["nnx", saved] = nnx.grad(lambda m, x: _total(m(x, c)), argnums=(0, 1))(model, x)[1]
  for api in ("linen", "nnx"):
    assert _max_rel(grads[api, "output"], grads[api, "input"]) < 2e-6, api


def _total(out):
  y, gate = out
  return jnp.sum(y * jnp.float32(CT.reshape(3, 16, 8))) + jnp.sum(gate)


def test_the_gpu_and_tpu_program_at_a_large_mean():
  """The accelerators' branch (one-pass statistics, no division trick), forced on the CPU: at a mean of 1e4 times
  the spread, float32 gradients of saved="output" match float64 autodiff as closely as the default's do."""
  from jaxnorm import _platform

  x = jnp.float32(X * 0.5 + 1e4)
  scale, bias = (jnp.float32(a) for a in PER_FEATURE)
  errors = {}
  with _platform.force("tpu"):
    for op in ("batch", "layer", "group"):
      _, g_ref = _vjp(lambda x, s, b, op=op: _reference(op, x, s, b), *(a.astype(jnp.float64) for a in (x, scale, bias)))
      for saved in ("input", "output"):
        _, g = _vjp(lambda x, s, b, op=op, saved=saved: _op(op, x, s, b, saved=saved), x, scale, bias)
        errors[op, saved] = _max_rel([a.astype(jnp.float64) for a in g], g_ref)
  for op in ("batch", "layer", "group"):
    assert errors[op, "output"] < 2 * errors[op, "input"], errors
