"""jaxnorm.linen against flax.linen: same variables, outputs, gradients, running statistics, dtypes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

KEY = jax.random.key(0)


def _data(shape, offset=2.0, spread=3.0, dtype=jnp.float32):
  return (jax.random.normal(KEY, shape, jnp.float32) * spread + offset).astype(dtype)


def _assert_trees_close(a, b, rtol, atol):
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _random_params(variables):
  """Non-trivial scale and bias, so that parameter gradients and the affine part are exercised."""
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
  return {**variables, "params": params}


CASES = [
    ("BatchNorm", dict(use_running_average=False), (12, 3, 5), {}),
    ("BatchNorm", dict(use_running_average=False, axis=(1, 2), momentum=0.9), (12, 3, 5), {}),
    ("BatchNorm", dict(use_running_average=False, use_bias=False, epsilon=1e-3), (12, 5), {}),
    ("BatchNorm", dict(use_running_average=False), (12, 5), {"mask": True}),
    ("LayerNorm", dict(), (4, 3, 6), {}),
    ("LayerNorm", dict(reduction_axes=(1, 2), feature_axes=-1), (4, 3, 6), {}),
    ("LayerNorm", dict(use_scale=False), (4, 6), {"mask": True}),
    ("RMSNorm", dict(), (4, 3, 6), {}),
    ("RMSNorm", dict(reduction_axes=(1, 2), feature_axes=(1, 2)), (4, 3, 6), {"mask": True}),
]


@pytest.mark.parametrize("name, kwargs, shape, call", CASES)
def test_matches_flax(name, kwargs, shape, call):
  x = _data(shape)
  call = dict(call)
  if call.get("mask"):
    call["mask"] = jax.random.bernoulli(jax.random.key(3), 0.7, shape)
  theirs = getattr(nn, name)(**kwargs, use_fast_variance=False)
  ours = getattr(jnn, name)(**kwargs)
  variables = theirs.init(jax.random.key(1), x, **call)
  # The variable trees are the same, so a flax checkpoint loads unchanged.
  assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(1), x, **call)) == jax.tree_util.tree_map(
      jnp.shape, variables
  )
  variables = _random_params(variables)
  cotangent = jax.random.normal(jax.random.key(2), shape, x.dtype)

  def loss(module, params, x):
    y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"], **call)
    return jnp.sum(y * cotangent), (y, updates)

  grads_theirs, (y_theirs, up_theirs) = jax.grad(loss, (1, 2), has_aux=True)(theirs, variables["params"], x)
  grads_ours, (y_ours, up_ours) = jax.grad(loss, (1, 2), has_aux=True)(ours, variables["params"], x)
  assert y_ours.dtype == y_theirs.dtype
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
  _assert_trees_close(grads_ours, grads_theirs, rtol=1e-4, atol=1e-4)
  _assert_trees_close(up_ours, up_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x_dtype, dtype, param_dtype",
    [(jnp.bfloat16, None, jnp.float32), (jnp.float32, jnp.bfloat16, jnp.float32), (jnp.bfloat16, None, jnp.bfloat16)],
)
@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm"])
def test_dtypes_match_flax(name, x_dtype, dtype, param_dtype):
  x = _data((8, 6), dtype=x_dtype)
  kwargs = dict(dtype=dtype, param_dtype=param_dtype)
  if name == "BatchNorm":
    kwargs["use_running_average"] = False
  theirs = getattr(nn, name)(**kwargs, use_fast_variance=False)
  ours = getattr(jnn, name)(**kwargs)
  with flax_promotion():
    variables = theirs.init(jax.random.key(1), x)
  assert jax.tree_util.tree_map(lambda a: a.dtype, ours.init(jax.random.key(1), x)) == jax.tree_util.tree_map(
      lambda a: a.dtype, variables
  )
  with flax_promotion():
    y_theirs, up_theirs = theirs.apply(variables, x, mutable=["batch_stats"])
  y_ours, up_ours = ours.apply(variables, x, mutable=["batch_stats"])
  assert y_ours.dtype == y_theirs.dtype
  # Running statistics never degrade to 16 bits.
  for leaf in jax.tree_util.tree_leaves(up_ours):
    assert leaf.dtype == jnp.float32
  resolution = float(jnp.finfo(y_ours.dtype).eps)
  np.testing.assert_allclose(
      np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32), atol=8 * resolution * 4, rtol=4 * resolution
  )


def test_batch_norm_running_statistics_and_inference_match_flax():
  """Several training steps, then inference with the running averages: call-time and attribute flags."""
  xs = [_data((10, 4), offset=i, spread=1 + i) for i in range(3)]
  theirs = nn.BatchNorm(momentum=0.8, use_fast_variance=False)
  ours = jnn.BatchNorm(momentum=0.8)
  v_theirs = v_ours = theirs.init(jax.random.key(1), xs[0], use_running_average=False)
  for x in xs:
    _, up = theirs.apply(v_theirs, x, use_running_average=False, mutable=["batch_stats"])
    v_theirs = {**v_theirs, **up}
    _, up = ours.apply(v_ours, x, use_running_average=False, mutable=["batch_stats"])
    v_ours = {**v_ours, **up}
  _assert_trees_close(v_ours, v_theirs, rtol=1e-6, atol=1e-6)
  x = _data((5, 4), offset=5.0)
  y_eval = ours.apply(v_ours, x, use_running_average=True)
  np.testing.assert_allclose(y_eval, theirs.apply(v_theirs, x, use_running_average=True), rtol=1e-6, atol=1e-6)
  # The same through the attribute; inference leaves batch_stats untouched.
  y_attr, up = jnn.BatchNorm(use_running_average=True).apply(v_ours, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y_attr, y_eval, rtol=1e-6)
  _assert_trees_close(up["batch_stats"], v_ours["batch_stats"], rtol=0, atol=0)
  # Reference by hand: (x - running mean) / sqrt(running var + eps).
  stats = v_ours["batch_stats"]
  x64, mean64, var64 = (np.asarray(a, np.float64) for a in (x, stats["mean"], stats["var"]))
  np.testing.assert_allclose(y_eval, (x64 - mean64) / np.sqrt(var64 + 1e-5), rtol=1e-5, atol=1e-5)


def test_use_running_average_given_twice_is_an_error_like_flax():
  x = _data((4, 3))
  module = jnn.BatchNorm(use_running_average=True)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="use_running_average"):
    module.apply(variables, x, use_running_average=False)


def test_stable_where_flax_default_is_not():
  x = _data((4, 64), offset=1e4, spread=1.0)
  exact = (np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(-1, keepdims=True)) / np.asarray(
      x, np.float64
  ).std(-1, keepdims=True)
  variables = nn.LayerNorm().init(KEY, x)
  ours = jnn.LayerNorm().apply(variables, x)
  flax_default = nn.LayerNorm().apply(variables, x)
  assert np.abs(np.asarray(ours) - exact).max() < 1e-3
  assert np.abs(np.asarray(flax_default) - exact).max() > 0.1


def test_cross_device_batch_norm_under_vmap_matches_flax_and_global():
  """`axis_name` over a vmapped axis: statistics of the whole batch, running averages included."""
  x = _data((4, 3, 5))  # 4 "devices" holding 3 examples each
  ours, theirs = jnn.BatchNorm(axis_name="d"), nn.BatchNorm(axis_name="d", use_fast_variance=False)
  variables = _random_params(theirs.init(jax.random.key(1), x[0], use_running_average=False))

  def per_device(module):
    def run(xi):
      return module.apply(variables, xi, use_running_average=False, mutable=["batch_stats"])

    return jax.vmap(run, axis_name="d")(x)

  (y_ours, up_ours), (y_theirs, up_theirs) = per_device(ours), per_device(theirs)
  y_global, up_global = jnn.BatchNorm().apply(
      variables, x.reshape(12, 5), use_running_average=False, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(y_ours.reshape(12, 5), y_global, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(up_ours["batch_stats"][name][0], up_global["batch_stats"][name], rtol=1e-5)
    np.testing.assert_allclose(up_ours["batch_stats"][name], up_theirs["batch_stats"][name], rtol=1e-5)


class _MLP(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = self.norm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    return nn.Dense(2)(x)


def test_small_model_trains_like_flax():
  """The same MLP with flax's and jaxnorm's BatchNorm: identical losses while training, and it learns."""
  kx, ky = jax.random.split(jax.random.key(4))
  x = jax.random.normal(kx, (64, 8), jnp.float32)  # the dtype of flax's parameters
  labels = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
  tx = optax.sgd(0.3)

  def train(norm):
    model = _MLP(norm)
    variables = model.init(jax.random.key(5), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state):
      def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

      (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates_p, opt_state = tx.update(grads, opt_state)
      return optax.apply_updates(params, updates_p), updates["batch_stats"], opt_state, loss

    losses = []
    for _ in range(60):
      params, stats, opt_state, loss = step(params, stats, opt_state)
      losses.append(float(loss))
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1).astype(labels.dtype) == labels))
    return np.array(losses), accuracy

  losses_ours, accuracy = train(jnn.BatchNorm)
  losses_theirs, _ = train(lambda **kw: nn.BatchNorm(**kw, use_fast_variance=False))
  np.testing.assert_allclose(losses_ours, losses_theirs, rtol=1e-4)
  assert losses_ours[-1] < 0.5 * losses_ours[0]
  assert accuracy > 0.9


def test_bad_input_names_the_argument():
  with pytest.raises(ValueError, match="reduction_axes"):
    jnn.LayerNorm(reduction_axes=3).init(KEY, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="axis"):
    jnn.BatchNorm(use_running_average=False, axis=2).init(KEY, jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="floating"):
    jnn.RMSNorm().init(KEY, jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="epsilon"):
    jnn.LayerNorm(epsilon=0.0).init(KEY, jnp.ones((2, 3)))
