"""Filter response norm + TLU, local response norm and Dynamic Tanh against independent references.

* FRN: a textbook float64 NumPy formula (`numpy.ma` for masks) for values;
  plain float64 autodiff of the textbook formula in `jax.numpy` for
  gradients; `check_grads` (order 2, reverse mode) because the kernel
  underneath has a hand-derived VJP.
* LRN: `torch.nn.functional.local_response_norm` in float64 (channels moved
  to axis 1), forward and gradients, odd and even window sizes.
* DyT: float64 NumPy for values and the hand-written derivative of
  ``scale * tanh(alpha * x) + bias`` for gradients; `flax.linen.LayerNorm`
  for the drop-in call signature and dtype rule.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import jaxnorm
from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

F64 = dict(rtol=1e-10, atol=1e-10)


def rng(seed):
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# Filter response normalization + TLU.
# ----------------------------------------------------------------------------------------------


def np_frn(x, scale, bias, tau, eps, where=None):
  x = np.asarray(x, np.float64)
  axes = tuple(range(1, x.ndim - 1))
  if where is None:
    nu2 = np.mean(x**2, axis=axes, keepdims=True)
  else:
    xm = np.ma.masked_array(x, mask=~np.broadcast_to(where, x.shape))
    nu2 = (xm**2).mean(axis=axes, keepdims=True).filled()
  y = x / np.sqrt(nu2 + eps)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y if tau is None else np.maximum(y, tau)


def jnp_frn(x, scale, bias, tau, eps):
  nu2 = jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim - 1)), keepdims=True)
  scale, bias, tau = (jnp.broadcast_to(p, x.shape) for p in (scale, bias, tau))
  return jnp.maximum(scale * x / jnp.sqrt(nu2 + eps) + bias, tau)


def frn_args(shape, seed=0):
  r = rng(seed)
  c = shape[-1]
  return r.normal(size=shape) * 2 + 0.3, r.normal(size=c) + 1, r.normal(size=c), r.normal(size=c) * 0.5


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 2), (4, 3)])
def test_frn_forward(shape):
  x, scale, bias, tau = frn_args(shape)
  f = jax.jit(lambda *a: jaxnorm.filter_response_norm(*a, epsilon=1e-3))
  y = f(x, scale, bias, tau)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, np_frn(x, scale, bias, tau, 1e-3), **F64)
  # Without the TLU (and without the affine part) it is the plain normalization.
  y_plain = jaxnorm.filter_response_norm(x, epsilon=1e-3)
  np.testing.assert_allclose(y_plain, np_frn(x, None, None, None, 1e-3), **F64)
  # The TLU really clips: some outputs sit at tau, which plain FRN would not give.
  assert np.any(np.asarray(y) == np.broadcast_to(tau, shape))


def test_frn_masked_spatial_positions():
  x, scale, bias, tau = frn_args((2, 5, 3), seed=1)
  where = rng(1).random((2, 5, 1)) < 0.6
  where[:, 0] = True
  x_bad = np.where(where, x, np.inf)  # padding may hold anything
  y = jaxnorm.filter_response_norm(x_bad, scale, bias, tau, where=where)
  ref = np_frn(np.where(where, x, 0.0), scale, bias, tau, 1e-6, where=where)
  valid = np.broadcast_to(where, x.shape)
  np.testing.assert_allclose(np.asarray(y)[valid], ref[valid], **F64)
  g = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.filter_response_norm(x, scale, bias, tau, where=where) ** 2)))(x_bad)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~valid] == 0)


def test_frn_gradients_match_autodiff_of_textbook():
  args = frn_args((2, 3, 2, 4), seed=2)
  cotangent = rng(3).normal(size=args[0].shape)

  def loss(f):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), (0, 1, 2, 3)))

  got = loss(lambda *a: jaxnorm.filter_response_norm(*a, epsilon=1e-3))(*args)
  want = loss(lambda *a: jnp_frn(*a, 1e-3))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10)


def test_frn_check_grads_second_order():
  f = jax.jit(lambda *a: jaxnorm.filter_response_norm(*a, epsilon=1e-3))
  check_grads(f, frn_args((2, 3, 3), seed=4), order=2, modes=["rev"])


def test_frn_forward_mode_and_vmap():
  x, scale, bias, tau = frn_args((2, 3, 2), seed=5)
  f = lambda x: jaxnorm.filter_response_norm(x, scale, bias, tau, custom_vjp=False)  # noqa: E731
  textbook = lambda x: jnp_frn(x, scale, bias, tau, 1e-6)  # noqa: E731
  np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(x), jax.jit(jax.jacrev(textbook))(x), **F64)
  # vmap over an extra leading axis: every slice on its own.
  xs = np.stack([x, 2 * x + 1])
  batched = jax.vmap(lambda x: jaxnorm.filter_response_norm(x, scale, bias, tau))(xs)
  for i in range(2):
    np.testing.assert_allclose(batched[i], np_frn(xs[i], scale, bias, tau, 1e-6), **F64)


def test_frn_low_precision_dtypes():
  x, scale, bias, tau = frn_args((2, 4, 3), seed=6)
  xb = jnp.asarray(x, jnp.bfloat16)
  y = jaxnorm.filter_response_norm(xb, *(jnp.asarray(p, jnp.float32) for p in (scale, bias, tau)))
  assert y.dtype == jnp.bfloat16
  ref = np_frn(np.asarray(xb, np.float64), scale, bias, tau, 1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.ones(4), {}, ValueError, "rank >= 2"),
        (np.ones((2, 3, 4)), dict(tau=np.zeros(3)), ValueError, "tau"),
        (np.ones((2, 3, 4)), dict(scale=np.ones(3)), ValueError, "scale"),
        (np.ones((2, 3, 4)), dict(epsilon=-1.0), ValueError, "epsilon"),
        (np.ones((2, 3, 4), np.int32), {}, TypeError, "floating"),
    ],
)
def test_frn_bad_input(x, kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxnorm.filter_response_norm(x, **kwargs)


def test_frn_linen():
  x = jnp.asarray(frn_args((2, 4, 4, 3), seed=7)[0], jnp.float32)
  module = jnn.FilterResponseNorm(epsilon=1e-4)
  variables = module.init(jax.random.key(0), x)
  params = variables["params"]
  assert jax.tree_util.tree_map(jnp.shape, params) == {"bias": (3,), "scale": (3,), "tau": (3,)}
  np.testing.assert_array_equal(params["scale"], 1)
  np.testing.assert_array_equal(params["tau"], 0)
  r = rng(8)
  params = {k: jnp.asarray(r.normal(size=3), jnp.float32) for k in params}
  y = module.apply({"params": params}, x)
  assert y.dtype == jnp.float32
  ref = np_frn(np.asarray(x, np.float64), *(np.asarray(params[k], np.float64) for k in ("scale", "bias", "tau")), 1e-4)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # Without the TLU: no tau parameter, FRN alone.
  no_tau = jnn.FilterResponseNorm(use_tau=False, use_bias=False)
  assert sorted(no_tau.init(jax.random.key(0), x)["params"]) == ["scale"]
  # flax's dtype rule: bf16 input and float32 parameters give float32, as flax.linen.LayerNorm does.
  xb = x.astype(jnp.bfloat16)
  with flax_promotion():
    flax_dtype = nn.LayerNorm().apply(nn.LayerNorm().init(jax.random.key(0), xb), xb).dtype
  assert module.apply(variables, xb).dtype == flax_dtype


# ----------------------------------------------------------------------------------------------
# Local response normalization against torch (channels first there, last here).
# ----------------------------------------------------------------------------------------------


def torch_lrn(x, cotangent, size, alpha, beta, k):
  """torch's forward and input gradient in float64, for a channels-last numpy input."""
  xt = torch.tensor(np.moveaxis(x, -1, 1), dtype=torch.float64, requires_grad=True)
  y = torch.nn.functional.local_response_norm(xt, size, alpha=alpha, beta=beta, k=k)
  (y * torch.tensor(np.moveaxis(cotangent, -1, 1))).sum().backward()
  return np.moveaxis(y.detach().numpy(), 1, -1), np.moveaxis(xt.grad.numpy(), 1, -1)


@pytest.mark.parametrize(
    "shape, size, alpha, beta, k",
    [
        ((2, 3, 6), 3, 1e-4, 0.75, 1.0),
        ((2, 3, 6), 4, 0.5, 0.75, 1.0),  # even window: one more channel behind than ahead
        ((2, 2, 3, 7), 2, 1.0, 0.6, 2.0),  # 4-D: torch's avg_pool3d path
        ((2, 3, 4), 9, 2.0, 1.5, 0.5),  # window wider than the channels
        ((1, 2, 5), 1, 0.3, 0.5, 1.0),
    ],
)
def test_lrn_matches_torch(shape, size, alpha, beta, k):
  r = rng(size)
  x, cotangent = r.normal(size=shape) * 2, r.normal(size=shape)
  f = lambda x: jaxnorm.local_response_norm(x, size, alpha=alpha, beta=beta, k=k)  # noqa: E731
  y, vjp = jax.vjp(jax.jit(f), x)
  ref_y, ref_grad = torch_lrn(x, cotangent, size, alpha, beta, k)
  np.testing.assert_allclose(y, ref_y, **F64)
  np.testing.assert_allclose(vjp(cotangent)[0], ref_grad, **F64)


def test_lrn_second_order_forward_mode_vmap_and_float32():
  x = rng(10).normal(size=(2, 2, 5))
  f = lambda x: jaxnorm.local_response_norm(x, 3, alpha=1.0)  # noqa: E731
  # Plain autodiff underneath (no custom VJP): forward mode works too.
  check_grads(jax.jit(f), (x,), order=1, modes=["fwd"])
  np.testing.assert_allclose(jax.vmap(f)(x), f(x), **F64)
  x32 = x.astype(np.float32)
  y32 = jaxnorm.local_response_norm(x32, 4)
  assert y32.dtype == jnp.float32
  ref = torch.nn.functional.local_response_norm(torch.tensor(np.moveaxis(x32, -1, 1)), 4)
  np.testing.assert_allclose(y32, np.moveaxis(ref.numpy(), 1, -1), rtol=1e-6, atol=1e-6)


def test_lrn_linen_matches_torch_module():
  x = rng(11).normal(size=(2, 3, 3, 6)).astype(np.float32)
  ours = jnn.LocalResponseNorm(size=5, alpha=0.1, beta=0.5, k=2.0)
  assert ours.init(jax.random.key(0), x) == {}
  theirs = torch.nn.LocalResponseNorm(5, alpha=0.1, beta=0.5, k=2.0)
  ref = np.moveaxis(theirs(torch.tensor(np.moveaxis(x, -1, 1))).numpy(), 1, -1)
  np.testing.assert_allclose(ours.apply({}, x), ref, rtol=1e-6, atol=1e-6)
  # torch's defaults.
  default = torch.nn.LocalResponseNorm(3)
  assert (jnn.LocalResponseNorm(3).alpha, jnn.LocalResponseNorm(3).beta, jnn.LocalResponseNorm(3).k) == (
      default.alpha,
      default.beta,
      default.k,
  )


@pytest.mark.parametrize(
    "x, size, error, match",
    [
        (np.ones((2, 3)), 0, ValueError, "size"),
        (np.ones((2, 3)), 2.0, TypeError, "size"),
        (np.ones((2, 3), np.int32), 2, TypeError, "floating"),
        (np.float64(1.0), 1, ValueError, "channel"),
    ],
)
def test_lrn_bad_input(x, size, error, match):
  with pytest.raises(error, match=match):
    jaxnorm.local_response_norm(x, size)


# ----------------------------------------------------------------------------------------------
# Dynamic Tanh.
# ----------------------------------------------------------------------------------------------


def test_dyt_forward_and_gradients_against_numpy():
  r = rng(12)
  x, scale, bias, cotangent = r.normal(size=(3, 2, 4)) * 3, r.normal(size=4), r.normal(size=4), r.normal(size=(3, 2, 4))
  alpha = 0.7
  t = np.tanh(alpha * x)
  np.testing.assert_allclose(jaxnorm.dyt(x, alpha, scale, bias), scale * t + bias, **F64)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(jaxnorm.dyt(*a) * cotangent), (0, 1, 2, 3)))(x, alpha, scale, bias)
  sech2 = 1 - t**2
  want = (
      cotangent * scale * alpha * sech2,
      np.sum(cotangent * scale * x * sech2),
      np.sum(cotangent * t, axis=(0, 1)),
      np.sum(cotangent, axis=(0, 1)),
  )
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, **F64)
  check_grads(jax.jit(jaxnorm.dyt), (x, alpha, scale, bias), order=1, modes=["fwd"])


def test_dyt_feature_axes_no_affine_vmap_and_dtypes():
  r = rng(13)
  x, scale = r.normal(size=(2, 3, 4)), r.normal(size=(3, 4))
  np.testing.assert_allclose(jaxnorm.dyt(x, 0.5, scale, feature_axes=(1, 2)), scale * np.tanh(0.5 * x), **F64)
  np.testing.assert_allclose(jaxnorm.dyt(x, jnp.asarray(2.0)), np.tanh(2 * x), **F64)
  alphas = np.array([0.5, 2.0])
  np.testing.assert_allclose(jax.vmap(jaxnorm.dyt)(x, alphas), np.tanh(alphas[:, None, None] * x), **F64)
  xb = jnp.asarray(x, jnp.bfloat16)
  # A Python alpha does not widen the output; the default output dtype is the input's.
  assert jaxnorm.dyt(xb, 0.5).dtype == jnp.bfloat16
  assert jaxnorm.dyt(xb, 0.5, dtype=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.ones(3),), {}, ValueError, "alpha"),
        ((0.5, np.ones(2)), {}, ValueError, "scale"),
        ((0.5, None, np.ones((3, 3))), {}, ValueError, "bias"),
        ((0.5,), dict(feature_axes=3), ValueError, "feature_axes"),
        ((np.array(1),), {}, TypeError, "alpha"),
    ],
)
def test_dyt_bad_input(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxnorm.dyt(np.ones((2, 3)), *args, **kwargs)


class _Block(nn.Module):
  """A pre-norm residual block whose normalization layer is a constructor argument."""

  norm: type

  @nn.compact
  def __call__(self, x, mask):
    h = self.norm()(x, mask=mask)
    return x + nn.Dense(x.shape[-1])(self.norm()(h))


def test_dyt_linen_is_a_layer_norm_drop_in():
  x = jnp.asarray(rng(14).normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.ones((2, 5, 1), bool)
  for norm in (nn.LayerNorm, jnn.DyT):
    variables = jax.jit(_Block(norm).init)(jax.random.key(0), x, mask)
    assert jax.jit(_Block(norm).apply)(variables, x, mask).shape == x.shape
  params = jnn.DyT().init(jax.random.key(0), x)["params"]
  assert jax.tree_util.tree_map(jnp.shape, params) == {"alpha": (), "bias": (8,), "scale": (8,)}
  assert float(params["alpha"]) == 0.5 and jnn.DyT().alpha_init == 0.5
  np.testing.assert_array_equal(params["scale"], 1)
  np.testing.assert_array_equal(params["bias"], 0)
  params = {"alpha": jnp.float32(1.3), "scale": params["scale"] * 2, "bias": params["bias"] + 0.5}
  y = jnn.DyT().apply({"params": params}, x)
  np.testing.assert_allclose(y, 2 * np.tanh(1.3 * np.asarray(x, np.float64)) + 0.5, rtol=1e-6, atol=1e-6)
  # alpha is learned: it gets a gradient.
  g = jax.grad(lambda p: jnp.sum(jnn.DyT().apply({"params": p}, x) ** 2))(params)
  assert float(jnp.abs(g["alpha"])) > 0
  # The dtype rule is flax LayerNorm's.
  xb = x.astype(jnp.bfloat16)
  for kwargs in ({}, dict(param_dtype=jnp.bfloat16)):
    ln = nn.LayerNorm(**kwargs)
    dyt = jnn.DyT(**kwargs)
    with flax_promotion():
      ln_dtype = ln.apply(ln.init(jax.random.key(0), xb), xb).dtype
    assert dyt.apply(dyt.init(jax.random.key(0), xb), xb).dtype == ln_dtype

