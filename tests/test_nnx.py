"""jaxnorm.nnx: the family for flax.nnx.

References, never jaxnorm.nnx itself:

* `flax.nnx` (``use_fast_variance=False``) where it has the class: the same
  state tree from the same `Rngs`, then outputs, gradients (parameters and
  input) and running statistics over several training steps, and inference;
* the `jaxnorm.linen` twin of every class on the same weights (itself tested
  against flax.linen, torch and float64 autodiff);
* NumPy by hand for inference with running statistics;
* for transformations, the same modules called one by one (`nnx.vmap`,
  `nnx.scan`), the whole batch at once (`axis_name`), and flax.nnx's own
  BatchNorm in a jitted training loop.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnorm
from _flax_reference import flax_promotion
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

KEY = jax.random.key(0)


# NumPy draws, not jax.random: each new shape would compile a threefry kernel (about 0.3 s on CPU).
def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape)


def _data(shape, offset=2.0, spread=3.0, seed=0):
  return jnp.asarray(_normal(shape, seed) * spread + offset, jnp.float32)


def _mask(shape):
  return jnp.asarray(np.random.default_rng(3).random(shape) < 0.7)


def _flat(tree) -> dict:
  """A module's state (or an nnx grads State) as {'a/b': array}."""
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def _linen_flat(tree) -> dict:
  return {
      "/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_close(ours: dict, theirs: dict, rtol, atol, reshape=False):
  assert sorted(ours) == sorted(theirs)
  for name, a in ours.items():
    b = theirs[name]
    a = a.reshape(b.shape) if reshape else a
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


def _randomize(module, seed=7):
  """Non-trivial parameters, so that the affine part and parameter gradients are exercised."""
  for i, (_, p) in enumerate(nnx.to_flat_state(nnx.state(module, nnx.Param))):
    p[...] = p[...] + jnp.asarray(0.3 * _normal(p.shape, seed + i), p.dtype)


def _stepper(**call):
  """A jitted training step: y, gradients wrt the parameters and wrt x; the module's state is updated in place."""

  @nnx.jit
  def step(module, x, cotangent):
    def loss(m, x):
      y = m(x, **call)
      return jnp.sum(y * cotangent), y

    (grads, grad_x), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(module, x)
    return y, grads, grad_x

  def run(module, x, cotangent):
    y, grads, grad_x = step(module, x, cotangent)
    return y, _flat(grads), grad_x

  return run


def _linen_stepper(module, **call):
  """The same for a linen module: also returns the variables with the updated ``batch_stats``."""

  @jax.jit
  def step(variables, x, cotangent):
    def loss(params, x):
      y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"], **call)
      return jnp.sum(y * cotangent), (y, updates)

    (grads, grad_x), (y, updates) = jax.grad(loss, (0, 1), has_aux=True)(variables.get("params", {}), x)
    return y, grads, grad_x, {**variables, **updates}

  return step


# ----------------------------------------------------------------------------------------------
# Against flax.nnx.
# ----------------------------------------------------------------------------------------------

FLAX_CASES = [
    ("BatchNorm", (5,), dict(momentum=0.9), (12, 5), {"mask": True}),
    # flax.nnx's own BatchNorm fails for a tuple `axis` (its EMA adds (C1*C2,) to (C1, C2));
    # ours is tested with one against the linen twin below.
    ("BatchNorm", (5,), dict(axis=1, use_bias=False, epsilon=1e-3), (6, 5, 3), {}),
    ("LayerNorm", (6,), dict(), (4, 3, 6), {}),
    ("LayerNorm", (6,), dict(reduction_axes=(1, 2), feature_axes=-1, use_scale=False), (4, 3, 6), {"mask": True}),
    ("RMSNorm", (18,), dict(reduction_axes=(1, 2), feature_axes=(1, 2)), (4, 3, 6), {"mask": True}),
    ("GroupNorm", (6, 3), dict(), (2, 4, 6), {}),
    ("GroupNorm", (6, None, 2), dict(), (2, 4, 6), {"mask": True}),
    ("InstanceNorm", (12,), dict(feature_axes=(1, -1)), (2, 4, 5, 3), {"mask": True}),
]


@pytest.mark.parametrize("name, args, kwargs, shape, call", FLAX_CASES)
def test_matches_flax_nnx(name, args, kwargs, shape, call):
  theirs = getattr(nnx, name)(*args, **kwargs, use_fast_variance=False, rngs=nnx.Rngs(0))
  ours = getattr(jnnx, name)(*args, **kwargs, rngs=nnx.Rngs(0))
  # The same state tree from the same Rngs: a flax.nnx checkpoint loads unchanged.
  _assert_close(_flat(ours), _flat(theirs), rtol=0, atol=0)
  _randomize(theirs)
  nnx.update(ours, nnx.state(theirs))
  call = dict(call)
  if call.get("mask"):
    call["mask"] = _mask(shape)
  stateful = name == "BatchNorm"
  step_ours, step_theirs = _stepper(**call), _stepper(**call)
  for step in range(3 if stateful else 1):
    x = _data(shape, offset=step, spread=1 + step, seed=step)
    cotangent = _data(shape, 0.0, 1.0, 10 + step)
    y_ours, g_ours, gx_ours = step_ours(ours, x, cotangent)
    y_theirs, g_theirs, gx_theirs = step_theirs(theirs, x, cotangent)
    assert y_ours.dtype == y_theirs.dtype
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_ours, gx_theirs, rtol=1e-4, atol=1e-4)
    _assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-4)
    _assert_close(_flat(ours), _flat(theirs), rtol=1e-5, atol=1e-6)  # running statistics
  if stateful:
    ours.eval(), theirs.eval()
    x = _data(shape, offset=5.0, seed=9)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm"])
def test_dtypes_match_flax_nnx(name):
  for x_dtype, dtype, param_dtype in [(jnp.bfloat16, None, jnp.bfloat16), (jnp.float32, jnp.bfloat16, jnp.float32)]:
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    theirs = getattr(nnx, name)(6, **kwargs, use_fast_variance=False)
    ours = getattr(jnnx, name)(6, **kwargs)
    x = _data((8, 6)).astype(x_dtype)
    y_ours = ours(x)
    with flax_promotion():
      y_theirs = theirs(x)
    assert y_ours.dtype == y_theirs.dtype
    resolution = float(jnp.finfo(y_ours.dtype).eps)
    np.testing.assert_allclose(
        np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32), atol=32 * resolution, rtol=4 * resolution
    )
    # Running statistics stay float32 (flax's storage), whatever the compute dtype.
    for leaf in jax.tree.leaves(nnx.state(ours, nnx.BatchStat)):
      assert leaf.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Against the jaxnorm.linen twins, on the same weights.
# ----------------------------------------------------------------------------------------------

LINEN_CASES = [
    # name, nnx args, shared kwargs, input shape, call kwargs, stateful
    ("BatchNorm", (15,), dict(axis=(1, 2), momentum=0.9), (6, 3, 5), {"mask": True}, True),
    ("BatchRenorm", (5,), dict(r_max=1.5, d_max=0.5, momentum=0.8), (12, 5), {}, True),
    ("BatchRenorm", (5,), dict(warmup_steps=1, r_max_steps=3, d_max_steps=3, momentum=0.8), (12, 5), {}, True),
    ("GhostBatchNorm", (5,), dict(virtual_batch_size=4, momentum=0.9), (12, 5), {"mask": True}, True),
    ("MeanOnlyBatchNorm", (5,), dict(momentum=0.9), (12, 5), {"mask": True}, True),
    ("LayerNorm", (18,), dict(reduction_axes=(1, 2), feature_axes=(1, 2)), (4, 3, 6), {"mask": True}, False),
    ("RMSNorm", (6,), dict(), (4, 6), {}, False),
    ("GroupNorm", (6,), dict(num_groups=3), (2, 4, 6), {"mask": True}, False),
    ("InstanceNorm", (3,), dict(), (2, 4, 3), {}, False),
    ("FilterResponseNorm", (3,), dict(), (2, 4, 4, 3), {"mask": True}, False),
    ("DyT", (8,), dict(alpha_init=0.7), (2, 5, 8), {}, False),
    ("LocalResponseNorm", (3,), dict(alpha=0.1), (2, 4, 6), {}, False),
]


@pytest.mark.parametrize("name, args, kwargs, shape, call, stateful", LINEN_CASES)
def test_matches_linen_twin(name, args, kwargs, shape, call, stateful):
  if name == "LocalResponseNorm":
    ours, twin = jnnx.LocalResponseNorm(*args, **kwargs), jnn.LocalResponseNorm(*args, **kwargs)
  else:
    ours, twin = getattr(jnnx, name)(*args, **kwargs, rngs=nnx.Rngs(0)), getattr(jnn, name)(**kwargs)
  _randomize(ours)
  call = dict(call)
  if call.get("mask"):
    call["mask"] = _mask(shape)
  linen_call = dict(call, use_running_average=False) if stateful else call
  template = twin.init(jax.random.key(1), _data(shape), **linen_call)
  # The same names: fill the twin's variables with ours (flat (num_features,) -> the twin's feature shape).
  ours_by_name = {path[-1]: v[...] for path, v in nnx.to_flat_state(nnx.state(ours))}
  variables = jax.tree_util.tree_map_with_path(
      lambda path, t: ours_by_name[path[-1].key].reshape(t.shape), dict(template)
  )
  step_ours, step_twin = _stepper(**call), _linen_stepper(twin, **linen_call)
  for step in range(3 if stateful else 1):
    x = _data(shape, offset=step, spread=1 + step, seed=step)
    cotangent = _data(shape, 0.0, 1.0, 10 + step)
    y_ours, g_ours, gx_ours = step_ours(ours, x, cotangent)
    y_twin, g_twin, gx_twin, variables = step_twin(variables, x, cotangent)
    assert y_ours.dtype == y_twin.dtype
    np.testing.assert_allclose(y_ours, y_twin, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_ours, gx_twin, rtol=1e-4, atol=1e-4)
    _assert_close(g_ours, _linen_flat(g_twin), rtol=1e-4, atol=1e-4, reshape=True)
    if stateful:
      stats = _flat(nnx.state(ours, nnx.BatchStat))
      _assert_close(stats, _linen_flat(variables["batch_stats"]), rtol=1e-5, atol=1e-6, reshape=True)
  if stateful:
    ours.eval()
    x = _data(shape, offset=4.0, seed=9)
    np.testing.assert_allclose(ours(x), twin.apply(variables, x, use_running_average=True), rtol=1e-5, atol=1e-5)
    if name == "BatchRenorm" and "r_max" not in kwargs:
      assert int(ours.steps[...]) == 3  # the schedule's counter advanced once per training step


def test_batch_norm_inference_by_hand():
  bn = jnnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
  _randomize(bn)
  train = nnx.jit(lambda m, x: m(x))
  for i in range(3):
    train(bn, _data((10, 4), offset=i, seed=i))
  bn.eval()
  x = np.asarray(_data((5, 4), offset=3.0, seed=5), np.float64)
  mean, var, scale, bias = (np.asarray(v[...], np.float64) for v in (bn.mean, bn.var, bn.scale, bn.bias))
  np.testing.assert_allclose(bn(x.astype(np.float32)), (x - mean) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# WeightNorm and SpectralNorm: against flax.nnx (first call), the linen twins, and no overwriting.
# ----------------------------------------------------------------------------------------------


def _wrapped_pair(cls, seed=0):
  """(ours, flax's) around two identical Linear layers with a non-trivial kernel and bias."""
  pair = []
  for module in (getattr(jnnx, cls), getattr(nnx, cls)):
    layer = nnx.Linear(3, 4, rngs=nnx.Rngs(seed))
    _randomize(layer)
    pair.append(module(layer, rngs=nnx.Rngs(seed + 1)))
  return pair


def _common(ours: dict, theirs: dict) -> tuple[dict, dict]:
  keys = sorted(set(ours) & set(theirs))
  return {k: ours[k] for k in keys}, {k: theirs[k] for k in keys}


def test_weight_norm_matches_flax_nnx_and_keeps_the_wrapped_kernel():
  ours, theirs = _wrapped_pair("WeightNorm")
  x, cotangent = _data((5, 3)), _data((5, 4), 0.0, 1.0, 2)
  kernel = ours.layer_instance.kernel[...]
  np.testing.assert_array_equal(kernel, theirs.layer_instance.kernel[...])
  # flax.nnx's lengths are raw arrays, not Params; ours are Params at the same keys.
  assert sorted(theirs.scales) == sorted(ours.scales) == [("kernel",)]
  assert isinstance(ours.scales[("kernel",)], nnx.Param)
  assert sorted(_flat(nnx.state(theirs, nnx.Param))) == ["layer_instance/bias", "layer_instance/kernel"]
  assert "scales/('kernel',)" in _flat(nnx.state(ours, nnx.Param))
  # The first call (flax's is right until it has overwritten the kernel).
  y_ours, g_ours, gx_ours = _stepper()(ours, x, cotangent)
  with flax_promotion():  # flax's scales are float64 here (its scale_init ignores param_dtype)
    y_theirs, g_theirs, gx_theirs = _stepper()(theirs, x, cotangent)
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx_ours, gx_theirs, rtol=1e-5, atol=1e-6)
  _assert_close(*_common(g_ours, g_theirs), rtol=1e-5, atol=1e-6)
  # flax's stored kernel is now the normalized one; ours is still v, also after jitted and eager calls.
  assert not np.allclose(theirs.layer_instance.kernel[...], kernel)
  ours(x)
  nnx.jit(lambda m, x: m(x))(ours, x)
  np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
  w = ours.normalized_params()["kernel"][...]
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-6)
  # A random scale_init and param_dtype are honoured (flax 0.12 passes an RngStream as the key
  # and ignores the dtype).
  linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  random_init = dict(scale_init=nnx.initializers.normal(), param_dtype=jnp.bfloat16)
  random_scales = jnnx.WeightNorm(linear, **random_init, rngs=nnx.Rngs(1)).scales[("kernel",)][...]
  assert random_scales.dtype == jnp.bfloat16 and np.ptp(np.asarray(random_scales, np.float32)) > 0


def test_weight_norm_optimizer_step_trains_v_and_g_and_nothing_else():
  linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  layer = jnnx.WeightNorm(linear, scale_init=nnx.initializers.constant(2.0), rngs=nnx.Rngs(1))
  x, lr = _data((6, 3)), 0.1
  before = _flat(nnx.state(layer, nnx.Param))
  optimizer = nnx.Optimizer(layer, optax.sgd(lr), wrt=nnx.Param)

  @nnx.jit
  def step(layer, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x))))(layer)
    optimizer.update(layer, grads)
    return grads

  grads = _flat(step(layer, optimizer, x))
  after = _flat(nnx.state(layer, nnx.Param))
  assert sorted(grads) == sorted(before) == ["layer_instance/bias", "layer_instance/kernel", "scales/('kernel',)"]
  for name in before:  # every parameter moved by exactly -lr * grad: no other write
    np.testing.assert_allclose(after[name], before[name] - lr * grads[name], rtol=1e-6, atol=1e-7)
  assert np.abs(grads["scales/('kernel',)"]).min() > 0


@pytest.mark.parametrize("feature_axes", [-1, None])
def test_weight_norm_matches_linen_twin(feature_axes):
  ours = jnnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), feature_axes=feature_axes, rngs=nnx.Rngs(1))
  _randomize(ours)
  twin = jnn.WeightNorm(nn.Dense(4), feature_axes=feature_axes)
  x, cotangent = _data((5, 3)), _data((5, 4), 0.0, 1.0, 2)
  layer = ours.layer_instance
  kernel, bias, scale = (v[...] for v in (layer.kernel, layer.bias, ours.scales[("kernel",)]))
  variables = {"params": {"layer_instance": {"kernel": kernel, "bias": bias}, "layer_instance/kernel/scale": scale}}
  assert jax.tree.map(jnp.shape, twin.init(KEY, x)) == jax.tree.map(jnp.shape, variables)
  y_ours, g_ours, gx_ours = _stepper()(ours, x, cotangent)
  y_twin, g_twin, gx_twin, _ = _linen_stepper(twin)(variables, x, cotangent)
  np.testing.assert_allclose(y_ours, y_twin, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx_ours, gx_twin, rtol=1e-5, atol=1e-6)
  g_twin = _linen_flat(g_twin)
  np.testing.assert_allclose(g_ours["scales/('kernel',)"], g_twin["layer_instance/kernel/scale"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_ours["layer_instance/kernel"], g_twin["layer_instance/kernel"], rtol=1e-5, atol=1e-6)


def test_weight_norm_data_init_matches_linen_twin_and_standardizes():
  x = _data((64, 3), offset=2.0, spread=5.0)
  twin = jnn.WeightNorm(nn.Dense(4), data_init=True)
  twin_params = _linen_flat(twin.init(jax.random.key(1), x)["params"])
  # Ours from the twin's starting point: its kernel v (never changed by data init), g = 1, b = 0.
  ours = jnnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  ours.layer_instance.kernel[...] = twin_params["layer_instance/kernel"]
  y = ours.init_from_data(x)
  np.testing.assert_allclose(ours.scales[("kernel",)][...], twin_params["layer_instance/kernel/scale"], rtol=1e-5)
  np.testing.assert_allclose(ours.layer_instance.bias[...], twin_params["layer_instance/bias"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ours.layer_instance.kernel[...], twin_params["layer_instance/kernel"])
  np.testing.assert_allclose(ours(x), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.mean(np.asarray(y, np.float64), 0), 0, atol=1e-5)
  np.testing.assert_allclose(np.std(np.asarray(y, np.float64), 0), 1, rtol=1e-4)


def test_spectral_norm_matches_flax_nnx_on_the_first_call_and_keeps_the_wrapped_kernel():
  ours, theirs = _wrapped_pair("SpectralNorm")
  _assert_close(_flat(ours), _flat(theirs), rtol=0, atol=0)  # same state, same u from the same Rngs
  x, cotangent = _data((5, 3)), _data((5, 4), 0.0, 1.0, 2)
  kernel = ours.layer_instance.kernel[...]
  y_ours, g_ours, gx_ours = _stepper(update_stats=True)(ours, x, cotangent)
  y_theirs, g_theirs, gx_theirs = _stepper(update_stats=True)(theirs, x, cotangent)
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx_ours, gx_theirs, rtol=1e-5, atol=1e-6)
  _assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
  _assert_close(_flat(nnx.state(ours, nnx.BatchStat)), _flat(nnx.state(theirs, nnx.BatchStat)), rtol=1e-6, atol=1e-7)
  # flax: the output was right, but its stored kernel is now w / sigma; ours is untouched.
  assert not np.allclose(theirs.layer_instance.kernel[...], kernel)
  np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
  # Repeated calls keep normalizing the stored weight; sigma approaches its largest singular value.
  run = nnx.jit(lambda m, x: m(x))
  for _ in range(30):
    run(ours, x)
  np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
  top = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)[0]
  np.testing.assert_allclose(ours.batch_stats[("kernel", "sigma")][...], top, rtol=1e-4)
  np.testing.assert_allclose(
      np.linalg.svd(np.asarray(ours.normalized_params()["kernel"][...]), compute_uv=False)[0], 1.0, rtol=1e-4
  )


def test_spectral_norm_matches_linen_twin_over_steps():
  ours = jnnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), n_steps=2, rngs=nnx.Rngs(1))
  _randomize(ours)
  twin = jnn.SpectralNorm(nn.Dense(4), n_steps=2)
  layer, stats = ours.layer_instance, ours.batch_stats
  variables = {
      "params": {"layer_instance": {"kernel": layer.kernel[...], "bias": layer.bias[...]}},
      "batch_stats": {
          "layer_instance/kernel/u": stats[("kernel", "u")][...],
          "layer_instance/kernel/sigma": stats[("kernel", "sigma")][...],
      },
  }
  step_ours, step_twin = _stepper(), _linen_stepper(twin, update_stats=True)  # ours: training mode updates
  for step in range(3):
    x, cotangent = _data((5, 3), seed=step), _data((5, 4), 0.0, 1.0, 10 + step)
    y_ours, g_ours, gx_ours = step_ours(ours, x, cotangent)
    y_twin, g_twin, gx_twin, variables = step_twin(variables, x, cotangent)
    np.testing.assert_allclose(y_ours, y_twin, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx_ours, gx_twin, rtol=1e-5, atol=1e-6)
    g_twin = {"layer_instance/" + k: v for k, v in _linen_flat(g_twin["layer_instance"]).items()}
    _assert_close(g_ours, g_twin, rtol=1e-5, atol=1e-6)
    twin_stats = _linen_flat(variables["batch_stats"])
    np.testing.assert_allclose(stats[("kernel", "u")][...], twin_stats["layer_instance/kernel/u"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats[("kernel", "sigma")][...], twin_stats["layer_instance/kernel/sigma"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# train() / eval() / nnx.view.
# ----------------------------------------------------------------------------------------------


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.sn = jnnx.SpectralNorm(nnx.Linear(4, 4, rngs=rngs), rngs=rngs)
    self.bn = jnnx.BatchNorm(4, rngs=rngs)
    self.brn = jnnx.BatchRenorm(4, r_max=2.0, d_max=1.0, rngs=rngs)
    self.gbn = jnnx.GhostBatchNorm(4, virtual_batch_size=4, rngs=rngs)
    self.mobn = jnnx.MeanOnlyBatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.mobn(self.gbn(self.brn(self.bn(self.dropout(self.sn(x))))))


def test_train_eval_and_view_switch_every_module():
  model = _Block(nnx.Rngs(0))
  x = _data((8, 4))
  run = nnx.jit(lambda m, x: m(x))  # retraced when the mode (a static attribute) changes
  run(model, x)  # training by default, as flax
  stats = _flat(nnx.state(model, nnx.BatchStat))
  model.eval()
  for m in (model.sn, model.bn, model.brn, model.gbn, model.mobn):
    assert m.use_running_average is True
  y_eval = run(model, x)
  _assert_close(_flat(nnx.state(model, nnx.BatchStat)), stats, rtol=0, atol=0)  # nothing moves in eval
  # The eval output by hand: every layer is an affine map with the running statistics (dropout off).
  h = np.asarray(model.sn.normalized_params()["kernel"][...], np.float64)
  h = np.asarray(x, np.float64) @ h + np.asarray(model.sn.layer_instance.bias[...])
  for bn in (model.bn, model.brn, model.gbn):
    mean, var = (np.asarray(v[...], np.float64) for v in (bn.mean, bn.var))
    h = (h - mean) / np.sqrt(var + 1e-5)  # scale 1, bias 0
  h = h - np.asarray(model.mobn.mean[...], np.float64)
  np.testing.assert_allclose(y_eval, h, rtol=1e-5, atol=1e-5)
  # A call-time flag takes precedence over the attribute, as in flax.
  model.bn(x, use_running_average=False)
  assert not np.array_equal(model.bn.mean[...], stats["bn/mean"])
  model.train()
  before = _flat(nnx.state(model, nnx.BatchStat))
  run(model, x)
  after = _flat(nnx.state(model, nnx.BatchStat))
  assert all(not np.array_equal(before[k], after[k]) for k in before)
  # nnx.view: an eval view of the same state; the model itself stays in training mode.
  view = nnx.view(model, use_running_average=True, deterministic=True)
  assert model.bn.use_running_average is False and view.bn.use_running_average is True
  assert "SpectralNorm:\n  use_running_average" in nnx.view_info(model)
  y_view = run(view, x)
  model.eval()
  np.testing.assert_allclose(y_view, run(model, x), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# nnx.jit, nnx.vmap, nnx.scan.
# ----------------------------------------------------------------------------------------------


class _MLP(nnx.Module):
  def __init__(self, norm, rngs):
    self.dense1 = nnx.Linear(8, 16, rngs=rngs)
    self.norm = norm(16, momentum=0.9, rngs=rngs)
    self.dense2 = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.dense2(nnx.relu(self.norm(self.dense1(x))))


def test_jitted_training_matches_flax_nnx_and_learns():
  x = _data((64, 8), 0.0, 1.0, seed=4)
  labels = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)

  def train(norm):
    model = _MLP(norm, nnx.Rngs(5))
    optimizer = nnx.Optimizer(model, optax.sgd(0.3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(40)]
    model.eval()
    accuracy = float(jnp.mean(jnp.argmax(nnx.jit(lambda m: m(x))(model), -1).astype(labels.dtype) == labels))
    return np.array(losses), accuracy, _flat(nnx.state(model, nnx.BatchStat))

  losses, accuracy, stats = train(jnnx.BatchNorm)
  losses_flax, _, stats_flax = train(lambda *a, **k: nnx.BatchNorm(*a, **k, use_fast_variance=False))
  np.testing.assert_allclose(losses, losses_flax, rtol=1e-4)
  _assert_close(stats, stats_flax, rtol=1e-4, atol=1e-5)
  assert losses[-1] < 0.5 * losses[0] and accuracy > 0.9


def _ensemble(n, **kwargs):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return jnnx.BatchNorm(4, **kwargs, rngs=rngs)

  ensemble = create(nnx.Rngs(0))
  _randomize(ensemble)
  return ensemble


def _member(ensemble, i):
  graphdef, state = nnx.split(ensemble)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_vmapped_ensemble_keeps_per_member_statistics():
  """An ensemble of BatchNorms (stacked state, in_axes=0, or StateAxes) under nnx.vmap, against each member alone."""
  ensemble = _ensemble(3, momentum=0.8)
  members = [_member(ensemble, i) for i in range(3)]
  xs = _data((3, 8, 4))
  forward = nnx.vmap(lambda m, x: m(x), in_axes=(nnx.StateAxes({nnx.Param: 0, nnx.BatchStat: 0}), 0))
  for step in range(2):
    ys = forward(ensemble, xs + step)
    for i, member in enumerate(members):
      np.testing.assert_allclose(ys[i], member(xs[i] + step), rtol=1e-5, atol=1e-5)
      _assert_close(_flat(_member(ensemble, i)), _flat(member), rtol=1e-6, atol=1e-6)
  ensemble.eval()
  ys = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(ensemble, xs)
  for i, member in enumerate(members):
    member.eval()
    np.testing.assert_allclose(ys[i], member(xs[i]), rtol=1e-5, atol=1e-5)


def test_vmap_shared_parameters_with_per_member_statistics():
  """StateAxes: one set of parameters broadcast to every member, statistics mapped; gradients sum over members."""
  bn = jnnx.BatchNorm(4, rngs=nnx.Rngs(0))
  _randomize(bn)
  reference = [nnx.clone(bn) for _ in range(3)]
  bn.mean = nnx.BatchStat(jnp.zeros((3, 4), jnp.float32))
  bn.var = nnx.BatchStat(jnp.ones((3, 4), jnp.float32))
  xs = _data((3, 8, 4))
  cotangent = _data((3, 8, 4), 0.0, 1.0, 1)

  def loss(m, xs):
    apply = nnx.vmap(lambda m, x: m(x), in_axes=(nnx.StateAxes({nnx.Param: None, nnx.BatchStat: 0}), 0))
    return jnp.sum(apply(m, xs) * cotangent)

  grads = _flat(nnx.grad(loss)(bn, xs))
  expected = {k: 0.0 for k in grads}
  for i, member in enumerate(reference):
    g = _flat(nnx.grad(lambda m: jnp.sum(m(xs[i]) * cotangent[i]))(member))
    expected = {k: expected[k] + g[k] for k in g}
    np.testing.assert_allclose(bn.mean[...][i], member.mean[...], rtol=1e-6)
    np.testing.assert_allclose(bn.var[...][i], member.var[...], rtol=1e-6)
  _assert_close(grads, expected, rtol=1e-5, atol=1e-5)


def test_vmap_with_axis_name_takes_statistics_over_all_members():
  """A module shared across nnx.vmap (flax#4760's setting) with axis_name: one batch over the mapped axis."""
  bn = jnnx.BatchNorm(4, axis_name="members", rngs=nnx.Rngs(0))
  _randomize(bn)
  whole = nnx.clone(bn)
  whole.axis_name = None
  forward = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="members")
  for step in range(2):  # flax#4760 failed on the second call
    xs = _data((3, 6, 4), offset=step, seed=step)
    ys = forward(bn, xs)
    np.testing.assert_allclose(ys.reshape(18, 4), whole(xs.reshape(18, 4)), rtol=1e-5, atol=1e-5)
    _assert_close(_flat(bn), _flat(whole), rtol=1e-6, atol=1e-6)
    assert bn.mean[...].shape == (4,)


def test_scan_over_layers_updates_each_layers_statistics():
  layers = _ensemble(3, momentum=0.8)
  members = [_member(layers, i) for i in range(3)]

  @nnx.jit
  def forward(layers, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def through(x, layer):
      return jnp.tanh(layer(x))

    return through(x, layers)

  x = _data((8, 4))
  for step in range(2):
    y = forward(layers, x + step)
    h = x + step
    for member in members:
      h = jnp.tanh(member(h))
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
    for i, member in enumerate(members):
      _assert_close(_flat(_member(layers, i)), _flat(member), rtol=1e-5, atol=1e-6)


def test_scan_over_time_with_the_module_in_the_carry():
  bn = jnnx.BatchRenorm(4, r_max=1.5, d_max=0.5, momentum=0.7, rngs=nnx.Rngs(0))
  _randomize(bn)
  reference = nnx.clone(bn)
  xs = _data((5, 8, 4))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(bn, x):
    return bn, bn(x)

  _, ys = run(bn, xs)
  for t in range(5):
    np.testing.assert_allclose(ys[t], reference(xs[t]), rtol=1e-5, atol=1e-5)
  _assert_close(_flat(bn), _flat(reference), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors, examples, packaging.
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
  rngs = nnx.Rngs(0)
  x = jnp.ones((4, 6), jnp.float32)
  with pytest.raises(ValueError, match="use_running_average"):
    jnnx.BatchNorm(6, use_running_average=None, rngs=rngs)(x)
  with pytest.raises(ValueError, match="num_features"):
    jnnx.BatchNorm(5, rngs=rngs)(x)
  with pytest.raises(ValueError, match="num_features"):
    jnnx.LayerNorm(5, rngs=rngs)(x)
  with pytest.raises(ValueError, match="num_features"):
    jnnx.GroupNorm(4, num_groups=2, rngs=rngs)(x)
  with pytest.raises(ValueError, match="group_size"):
    jnnx.GroupNorm(6, num_groups=2, group_size=3, rngs=rngs)
  with pytest.raises(ValueError, match="num_groups"):
    jnnx.GroupNorm(6, num_groups=4, rngs=rngs)
  with pytest.raises(ValueError, match="group_size"):
    jnnx.GroupNorm(6, num_groups=None, group_size=4, rngs=rngs)
  with pytest.raises(ValueError, match="feature_axes"):
    jnnx.InstanceNorm(4, feature_axes=0, rngs=rngs)(x)
  with pytest.raises(ValueError, match="axis"):
    jnnx.BatchNorm(6, axis=2, rngs=rngs)(x)
  with pytest.raises(TypeError, match="floating"):
    jnnx.RMSNorm(6, rngs=rngs)(jnp.ones((4, 6), jnp.int32))
  with pytest.raises(ValueError, match="epsilon"):
    jnnx.LayerNorm(6, epsilon=0.0, rngs=rngs)(x)
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jnnx.GhostBatchNorm(6, virtual_batch_size=3, rngs=rngs)(jnp.ones((4, 6), jnp.float32))
  with pytest.raises(ValueError, match="r_max"):
    jnnx.BatchRenorm(6, r_max=0.5, d_max=1.0, rngs=rngs)(x)
  with pytest.raises(ValueError, match="error_on_non_matrix"):
    jnnx.SpectralNorm(nnx.Conv(2, 3, kernel_size=(3, 3), rngs=rngs), error_on_non_matrix=True, rngs=rngs)
  with pytest.raises(ValueError, match="feature_axes"):
    jnnx.WeightNorm(nnx.Linear(2, 3, rngs=rngs), feature_axes=2, rngs=rngs)
  with pytest.raises(ValueError, match="exactly one"):
    jnnx.WeightNorm(nnx.Linear(2, 3, rngs=rngs), variable_filter=nnx.Param, rngs=rngs).init_from_data(x[:, :2])


def test_lazy_submodule():
  assert jaxnorm.nnx is jnnx
