"""Ghost batch norm (functional and linen) against independent references.

* forward: a textbook float64 NumPy batch norm applied to each virtual batch
  (chunk of `virtual_batch_size` consecutive examples) on its own, `numpy.ma`
  for masks;
* gradients: plain float64 autodiff of a textbook `jax.numpy` batch norm per
  chunk, and finite differences (`check_grads`, order 2, reverse mode, since
  the kernel underneath has a hand-derived VJP);
* `virtual_batch_size == N`: `jaxnorm.batch_norm`; per chunk: `jaxnorm.batch_norm`;
* linen: `flax.linen.BatchNorm` applied to each chunk with the same variables
  (outputs, parameter gradients, and running statistics, which must be the
  mean of flax's per-chunk updates).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm
from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

F64 = dict(rtol=1e-10, atol=1e-10)


def np_batch_norm(x, scale, bias, feature_axes, eps, where=None):
  """Textbook float64 batch norm of one (virtual) batch; statistics over every non-feature axis."""
  x = np.asarray(x, np.float64)
  features = tuple(a % x.ndim for a in np.atleast_1d(feature_axes))
  axes = tuple(a for a in range(x.ndim) if a not in features)
  if where is None:
    mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
  else:
    xm = np.ma.masked_array(x, mask=~np.broadcast_to(where, x.shape))
    mean, var = xm.mean(axes, keepdims=True).filled(), xm.var(axes, keepdims=True).filled()
  bshape = tuple(d if i in features else 1 for i, d in enumerate(x.shape))
  y = (x - mean) / np.sqrt(var + eps)
  if scale is not None:
    y = y * np.reshape(scale, bshape)
  if bias is not None:
    y = y + np.reshape(bias, bshape)
  return y, np.squeeze(mean, axes), np.squeeze(var, axes)


def np_ghost(x, scale, bias, v, feature_axes=-1, eps=1e-5, where=None):
  chunks = [
      np_batch_norm(x[i : i + v], scale, bias, feature_axes, eps, None if where is None else where[i : i + v])
      for i in range(0, x.shape[0], v)
  ]
  return np.concatenate([c[0] for c in chunks]), np.stack([c[1] for c in chunks]), np.stack([c[2] for c in chunks])


def jnp_ghost_loss(x, scale, bias, v, cotangent, eps=1e-5):
  """sum(cotangent * y) for a textbook per-chunk batch norm in jax.numpy (plain autodiff), features last."""
  total = 0.0
  for i in range(0, x.shape[0], v):
    xc = x[i : i + v]
    axes = tuple(range(xc.ndim - 1))
    bshape = (1,) * len(axes) + scale.shape
    y = (xc - xc.mean(axes, keepdims=True)) / jnp.sqrt(xc.var(axes, keepdims=True) + eps) * scale.reshape(bshape)
    y = y + bias.reshape(bshape)
    total = total + jnp.sum(y * cotangent[i : i + v])
  return total


def data(shape, seed=0, offset=0.5, spread=2.0):
  return np.random.default_rng(seed).normal(size=shape) * spread + offset


# ----------------------------------------------------------------------------------------------
# Functional.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, v, feature_axes", [((12, 5), 4, -1), ((8, 3, 2, 4), 2, -1), ((6, 3, 4), 3, (1, 2)), ((6, 4), 2, ())]
)
def test_forward_equals_batch_norm_per_virtual_batch(shape, v, feature_axes):
  r = np.random.default_rng(1)
  x = data(shape)
  pshape = tuple(shape[a] for a in sorted(a % len(shape) for a in np.atleast_1d(feature_axes)))
  scale, bias = r.normal(size=pshape), r.normal(size=pshape)
  y, mean, var = jax.jit(lambda *a: jaxnorm.ghost_batch_norm(*a, virtual_batch_size=v, feature_axes=feature_axes))(
      x, scale, bias
  )
  ref_y, ref_mean, ref_var = np_ghost(x, scale, bias, v, feature_axes)
  assert y.shape == x.shape and mean.shape == var.shape == (shape[0] // v, *pshape)
  np.testing.assert_allclose(y, ref_y, **F64)
  np.testing.assert_allclose(mean, ref_mean, **F64)
  np.testing.assert_allclose(var, ref_var, **F64)
  # The same as jaxnorm.batch_norm called on every chunk.
  bn = jax.jit(lambda *a: jaxnorm.batch_norm(*a, feature_axes=feature_axes))
  per_chunk = [bn(x[i : i + v], scale, bias) for i in range(0, shape[0], v)]
  np.testing.assert_allclose(y, np.concatenate([c[0] for c in per_chunk]), **F64)
  np.testing.assert_allclose(var, np.stack([c[2] for c in per_chunk]), **F64)


def test_whole_batch_is_plain_batch_norm():
  x = data((8, 3, 4), seed=2)
  s, b = np.full(4, 1.5), np.full(4, -0.5)
  y, mean, var = jaxnorm.ghost_batch_norm(x, s, b, virtual_batch_size=8, epsilon=1e-3)
  ref_y, ref_mean, ref_var = jaxnorm.batch_norm(x, s, b, epsilon=1e-3)
  np.testing.assert_allclose(y, ref_y, **F64)
  np.testing.assert_allclose(mean, ref_mean[None], **F64)
  np.testing.assert_allclose(var, ref_var[None], **F64)


def test_virtual_batches_differ_from_the_whole_batch():
  """Chunks with different distributions: ghost statistics really are per chunk."""
  x = np.concatenate([data((4, 3), seed=3, offset=0.0), data((4, 3), seed=4, offset=10.0)])
  y_ghost, _, _ = jaxnorm.ghost_batch_norm(x, virtual_batch_size=4)
  y_whole, _, _ = jaxnorm.batch_norm(x)
  assert np.abs(np.asarray(y_ghost) - np.asarray(y_whole)).max() > 0.5
  # Each chunk is standardized on its own.
  np.testing.assert_allclose(np.asarray(y_ghost).reshape(2, 4, 3).mean(1), 0, atol=1e-12)


def test_masked_statistics_per_virtual_batch():
  r = np.random.default_rng(5)
  x = data((8, 3), seed=5)
  where = r.random((8, 3)) < 0.7
  where[::2] = True  # every chunk keeps valid positions in every feature
  x_bad = np.where(where, x, np.nan)  # masked-out values must not matter
  y, mean, var = jaxnorm.ghost_batch_norm(x_bad, virtual_batch_size=4, where=where)
  ref_y, ref_mean, ref_var = np_ghost(np.where(where, x, 0.0), None, None, 4, where=where)
  np.testing.assert_allclose(mean, ref_mean, **F64)
  np.testing.assert_allclose(var, ref_var, **F64)
  np.testing.assert_allclose(np.asarray(y)[where], ref_y[where], **F64)
  g = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.ghost_batch_norm(x, virtual_batch_size=4, where=where)[0] ** 2)))(
      x_bad
  )
  assert np.all(np.isfinite(g))


def test_gradients_match_autodiff_of_per_chunk_textbook():
  r = np.random.default_rng(6)
  x, scale, bias = data((6, 2, 3), seed=6), r.normal(size=3), r.normal(size=3)
  cotangent = r.normal(size=x.shape)

  def ours(x, scale, bias):
    return jnp.sum(jaxnorm.ghost_batch_norm(x, scale, bias, virtual_batch_size=3)[0] * cotangent)

  got = jax.jit(jax.grad(ours, (0, 1, 2)))(x, scale, bias)
  want = jax.jit(jax.grad(lambda *a: jnp_ghost_loss(*a, 3, cotangent), (0, 1, 2)))(x, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10)


def test_check_grads_second_order_including_statistics():
  r = np.random.default_rng(7)
  x, scale, bias = data((4, 2, 3), seed=7), r.normal(size=3), r.normal(size=3)
  check_grads(
      jax.jit(lambda *a: jaxnorm.ghost_batch_norm(*a, virtual_batch_size=2)), (x, scale, bias), order=2, modes=["rev"]
  )


def test_forward_mode_with_custom_vjp_false():
  x = data((4, 3), seed=8)
  f = lambda x: jaxnorm.ghost_batch_norm(x, virtual_batch_size=2, custom_vjp=False)[0]  # noqa: E731
  np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(x), jax.jit(jax.jacrev(f))(x), rtol=1e-10, atol=1e-12)


def test_jit_vmap_and_float32():
  x = data((3, 8, 2), seed=9).astype(np.float32)
  f = lambda x: jaxnorm.ghost_batch_norm(x, virtual_batch_size=4)  # noqa: E731
  batched = jax.jit(jax.vmap(f))(x)
  for i in range(3):
    y, mean, var = f(x[i])
    assert y.dtype == jnp.float32 and mean.dtype == jnp.float32
    np.testing.assert_allclose(batched[0][i], y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batched[2][i], var, rtol=1e-6)
    ref = np_ghost(x[i], None, None, 4)
    np.testing.assert_allclose(y, ref[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_input_keeps_dtype_statistics_float32():
  x = jnp.asarray(data((8, 4), seed=10), jnp.bfloat16)
  y, mean, var = jaxnorm.ghost_batch_norm(x, virtual_batch_size=4)
  assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32


def test_axis_name_merges_each_virtual_batch_across_devices():
  """Under vmap with axis_name, chunk g of every 'device' forms one virtual batch."""
  x = data((2, 6, 3), seed=11)  # 2 devices x 6 examples, virtual batches of 3 per device
  per_device = lambda xi: jaxnorm.ghost_batch_norm(xi, virtual_batch_size=3, axis_name="d")  # noqa: E731
  y, mean, var = jax.vmap(per_device, axis_name="d")(x)
  for g in range(2):
    union = x[:, 3 * g : 3 * g + 3].reshape(6, 3)
    ref_y, ref_mean, ref_var = np_batch_norm(union, None, None, -1, 1e-5)
    np.testing.assert_allclose(np.asarray(y)[:, 3 * g : 3 * g + 3].reshape(6, 3), ref_y, **F64)
    np.testing.assert_allclose(mean[:, g], np.broadcast_to(ref_mean, (2, 3)), **F64)
    np.testing.assert_allclose(var[:, g], np.broadcast_to(ref_var, (2, 3)), **F64)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(virtual_batch_size=5), ValueError, r"virtual_batch_size.*12 examples"),
        (dict(virtual_batch_size=0), ValueError, "virtual_batch_size"),
        (dict(virtual_batch_size=2.0), TypeError, "virtual_batch_size"),
        (dict(virtual_batch_size=4, feature_axes=0), ValueError, "batch axis"),
        (dict(virtual_batch_size=4, feature_axes=(-2, -1)), ValueError, "batch axis"),
        (dict(virtual_batch_size=4, feature_axes=2), ValueError, "feature_axes"),
        (dict(virtual_batch_size=4, scale=np.ones(3)), ValueError, "scale"),
        (dict(virtual_batch_size=4, epsilon=0.0), ValueError, "epsilon"),
        (dict(virtual_batch_size=4, where=np.ones((3, 4), bool)), ValueError, "where"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxnorm.ghost_batch_norm(np.ones((12, 4)), **kwargs)


def test_integer_input_is_a_type_error():
  with pytest.raises(TypeError, match="floating"):
    jaxnorm.ghost_batch_norm(np.ones((4, 2), np.int32), virtual_batch_size=2)


# ----------------------------------------------------------------------------------------------
# linen.
# ----------------------------------------------------------------------------------------------


def _random_params(variables, seed=3):
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
  return {**variables, "params": params}


def test_linen_matches_flax_batch_norm_per_chunk():
  """Outputs, parameter gradients and running statistics against flax's BatchNorm on each chunk."""
  x = jnp.asarray(data((12, 2, 3), seed=12), jnp.float32)
  v, momentum = 4, 0.8
  ours = jnn.GhostBatchNorm(momentum=momentum, virtual_batch_size=v)
  theirs = nn.BatchNorm(momentum=momentum, use_fast_variance=False)
  variables = theirs.init(jax.random.key(0), x[:v], use_running_average=False)
  shapes = jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(0), x, use_running_average=False))
  assert shapes == jax.tree_util.tree_map(jnp.shape, variables)
  variables = _random_params(variables)
  variables["batch_stats"] = {"mean": jnp.full(3, 0.3, jnp.float32), "var": jnp.full(3, 2.0, jnp.float32)}
  cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)

  def loss_ours(params):
    y, up = ours.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y * cotangent), (y, up)

  def loss_theirs(params):
    ys, ups = [], []
    for i in range(0, 12, v):
      y, up = theirs.apply(
          {**variables, "params": params}, x[i : i + v], use_running_average=False, mutable=["batch_stats"]
      )
      ys.append(y)
      ups.append(up)
    y = jnp.concatenate(ys)
    return jnp.sum(y * cotangent), (y, jax.tree_util.tree_map(lambda *a: jnp.mean(jnp.stack(a), 0), *ups))

  (g_ours, (y_ours, up_ours)) = jax.jit(jax.grad(loss_ours, has_aux=True))(variables["params"])
  (g_theirs, (y_theirs, up_theirs)) = jax.jit(jax.grad(loss_theirs, has_aux=True))(variables["params"])
  assert y_ours.dtype == y_theirs.dtype == jnp.float32
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # flax's EMA applied to every chunk, then averaged == EMA of the averaged chunk statistics.
  for name in ("mean", "var"):
    assert up_ours["batch_stats"][name].dtype == jnp.float32
    np.testing.assert_allclose(up_ours["batch_stats"][name], up_theirs["batch_stats"][name], rtol=1e-5, atol=1e-6)

  # Inference uses the running statistics exactly as flax's BatchNorm does.
  trained = {**variables, **up_ours}
  x_eval = jnp.asarray(data((5, 2, 3), seed=13), jnp.float32)  # any batch size at inference
  y_eval, unchanged = ours.apply(trained, x_eval, use_running_average=True, mutable=["batch_stats"])
  np.testing.assert_allclose(
      y_eval, theirs.apply(trained, x_eval, use_running_average=True), rtol=1e-6, atol=1e-6
  )
  for name in ("mean", "var"):
    np.testing.assert_array_equal(unchanged["batch_stats"][name], trained["batch_stats"][name])


def test_linen_without_virtual_batch_size_is_batch_norm():
  x = jnp.asarray(data((6, 4), seed=14), jnp.float32)
  variables = _random_params(jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x))
  y_ref, up_ref = jax.jit(
      lambda v, x: jnn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  )(variables, x)
  y, up = jax.jit(lambda v, x: jnn.GhostBatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"]))(
      variables, x
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  for name in ("mean", "var"):
    np.testing.assert_allclose(up["batch_stats"][name], up_ref["batch_stats"][name], rtol=1e-6)


def test_linen_init_with_any_dummy_batch_but_apply_checks():
  module = jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=4)
  variables = module.init(jax.random.key(0), jnp.ones((1, 3), jnp.float32))
  assert jax.tree_util.tree_map(jnp.shape, variables) == {
      "params": {"bias": (3,), "scale": (3,)},
      "batch_stats": {"mean": (3,), "var": (3,)},
  }
  with pytest.raises(ValueError, match="virtual_batch_size"):
    module.apply(variables, jnp.ones((6, 3), jnp.float32), mutable=["batch_stats"])
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=0).init(jax.random.key(0), jnp.ones((4, 3)))


def test_linen_mask_and_dtypes():
  x = jnp.asarray(data((8, 3), seed=15), jnp.bfloat16)
  mask = np.random.default_rng(15).random((8, 3)) < 0.7
  mask[::4] = True
  module = jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=4)
  variables = module.init(jax.random.key(0), x)
  y, up = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
  # flax's dtype rule: bf16 input with float32 parameters gives float32; statistics stay float32.
  with flax_promotion():
    y_flax = nn.BatchNorm(use_running_average=False).apply(variables, x[:4], mask=mask[:4], mutable=["batch_stats"])[0]
  assert y.dtype == y_flax.dtype
  assert up["batch_stats"]["mean"].dtype == jnp.float32
  ref_mean = np_ghost(np.asarray(x, np.float64), None, None, 4, where=mask)[1].mean(0)
  np.testing.assert_allclose(up["batch_stats"]["mean"], 0.01 * ref_mean, rtol=1e-4, atol=1e-6)

