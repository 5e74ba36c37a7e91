"""spectral_norm and linen.SpectralNorm.

References, never jaxnorm itself:

* NumPy's SVD (float64) for what the power iteration converges to;
* PyTorch's `parametrizations.spectral_norm` in float64 (started from the same
  `u`) for the forward, the updated `u` and the gradient;
* plain autodiff of `w / (v^T K u)` with `u`, `v` from a NumPy power
  iteration held constant (the stop_gradient reference), and Miyato et al.'s
  closed form of that gradient;
* `flax.linen.SpectralNorm` on the same variables, over several training steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import linen as jnn

torch = pytest.importorskip("torch")

F64 = dict(rtol=1e-10, atol=1e-12)


def rng(seed):
  return np.random.default_rng(seed)


def np_power_iteration(k, u, n_steps, eps=1e-12):
  """The paper's iteration for the layer matrix W = K^T, in float64 NumPy: returns (u, v)."""
  unit = lambda a: a / np.sqrt(a @ a + eps)
  for _ in range(n_steps):
    v = unit(k @ u)  # W^T u
    u = unit(k.T @ v)  # W v
  return u, v


def test_sigma_converges_to_the_largest_singular_value():
  r = rng(0)
  w = r.normal(size=(2, 3, 4))  # viewed as (6, 4)
  k = w.reshape(6, 4)
  _, s, vt = np.linalg.svd(k)
  w_sn, u, sigma = jax.jit(lambda w, u: jaxnorm.spectral_norm(w, u, n_steps=300))(w, r.normal(size=4))
  np.testing.assert_allclose(sigma, s[0], rtol=1e-10)
  np.testing.assert_allclose(abs(u @ vt[0]), 1, rtol=1e-10)  # the top right singular vector of K
  np.testing.assert_allclose(np.linalg.svd(np.asarray(w_sn).reshape(6, 4))[1][0], 1, rtol=1e-10)
  np.testing.assert_allclose(w_sn, w / s[0], rtol=1e-10)


def test_repeated_single_steps_equal_many_steps():
  """Feeding u back (one step per training step) is the same iteration as n_steps in one call."""
  r = rng(1)
  w, u0 = r.normal(size=(5, 3)), r.normal(size=(1, 3))
  step = jax.jit(lambda u: jaxnorm.spectral_norm(w, u)[1])
  u = u0
  for _ in range(6):
    u = step(u)
  _, u6, sigma6 = jaxnorm.spectral_norm(w, u0, n_steps=6)
  assert u6.shape == (1, 3)
  np.testing.assert_allclose(u, u6, **F64)
  u_ref, v_ref = np_power_iteration(w, u0[0], 6)
  np.testing.assert_allclose(u6[0], u_ref, **F64)
  np.testing.assert_allclose(sigma6, v_ref @ w @ u_ref, **F64)


@pytest.mark.parametrize("n_steps", [1, 3])
def test_forward_and_gradient_match_torch(n_steps):
  r = rng(2)
  k, u0, ct = r.normal(size=(4, 3)), r.normal(size=3), r.normal(size=(4, 3))
  # torch iterates u <- W v, v <- W^T u from its stored v and takes sigma = u^T W v. Given K itself
  # as W and our u as its v, its (u, v) are our (v, u) at every step and its sigma is ours.
  linear = torch.nn.Linear(3, 4, bias=False).double()
  with torch.no_grad():
    linear.weight.copy_(torch.tensor(k))
  linear = torch.nn.utils.parametrizations.spectral_norm(linear, n_power_iterations=n_steps)
  param = linear.parametrizations.weight
  with torch.no_grad():
    param[0]._v.copy_(torch.tensor(u0 / np.linalg.norm(u0)))
  w_t = linear.weight  # training mode: runs the power iteration from our u
  (w_t * torch.tensor(ct)).sum().backward()

  loss = lambda k: jnp.sum(jaxnorm.spectral_norm(k, u0, n_steps=n_steps)[0] * ct)
  (w_sn, u, _), grad = jax.jit(lambda k: (jaxnorm.spectral_norm(k, u0, n_steps=n_steps), jax.grad(loss)(k)))(k)
  np.testing.assert_allclose(w_sn, w_t.detach().numpy(), **F64)
  np.testing.assert_allclose(u, param[0]._v.numpy(), **F64)
  np.testing.assert_allclose(grad, param.original.grad.numpy(), **F64)


def test_gradient_holds_u_and_v_constant():
  r = rng(3)
  w, u0, ct = r.normal(size=(2, 3, 4)), r.normal(size=4), r.normal(size=(2, 3, 4))
  k = w.reshape(6, 4)
  u, v = np_power_iteration(k, u0, 2)

  def reference(w):  # u and v are constants here: the stop_gradient reference
    return w / (v @ w.reshape(6, 4) @ u)

  loss = lambda f: (lambda w, u0: jnp.sum(f(w, u0) * ct))
  ours = lambda w, u0: jaxnorm.spectral_norm(w, u0, n_steps=2)[0]
  g_w, g_u = jax.jit(jax.grad(loss(ours), (0, 1)))(w, u0)
  g_ref = jax.grad(loss(lambda w, _: reference(w)))(w, u0)
  np.testing.assert_allclose(g_w, g_ref, **F64)
  np.testing.assert_array_equal(g_u, 0)
  sigma = v @ k @ u  # Miyato et al. eq. (12): G / sigma - <G, K> / sigma^2 v u^T
  closed = ct.reshape(6, 4) / sigma - np.sum(ct.reshape(6, 4) * k) / sigma**2 * np.outer(v, u)
  np.testing.assert_allclose(g_w, closed.reshape(w.shape), **F64)
  # Forward mode works too (plain autodiff), and agrees with reverse mode.
  t = r.normal(size=w.shape)
  _, tangent = jax.jvp(lambda w: ours(w, u0), (w,), (t,))
  np.testing.assert_allclose(np.sum(tangent * ct), np.sum(g_w * t), **F64)


def test_vector_zero_and_vmap():
  w = np.array([3.0, 4.0])
  w_sn, u, sigma = jaxnorm.spectral_norm(w, np.array([1.0, 0.0]), n_steps=2)  # a vector is viewed as (1, N)
  np.testing.assert_allclose(sigma, 5, **F64)
  np.testing.assert_allclose(w_sn, w / 5, **F64)
  # A zero weight: sigma = 0, returned unchanged, finite gradient.
  z = jnp.zeros((3, 2), jnp.float32)
  out, g = jax.value_and_grad(lambda z: jnp.sum(jaxnorm.spectral_norm(z, jnp.ones(2, jnp.float32))[0]))(z)
  assert out == 0 and np.all(np.isfinite(g))
  r = rng(4)
  ws, us = r.normal(size=(3, 4, 2)), r.normal(size=(3, 2))
  batched = jax.jit(jax.vmap(lambda w, u: jaxnorm.spectral_norm(w, u, n_steps=2)))(ws, us)
  for i in range(3):
    for a, b in zip(batched, jaxnorm.spectral_norm(ws[i], us[i], n_steps=2)):
      np.testing.assert_allclose(a[i], b, **F64)


def test_dtypes():
  w, u = jnp.ones((3, 2), jnp.bfloat16), jnp.ones((1, 2), jnp.float32)
  w_sn, u_new, sigma = jaxnorm.spectral_norm(w, u)
  assert (w_sn.dtype, u_new.dtype, sigma.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  assert jaxnorm.spectral_norm(w, u, dtype=jnp.float32)[0].dtype == jnp.float32


@pytest.mark.parametrize(
    "w, u, kwargs, error, match",
    [
        (np.ones((3, 2)), np.ones(3), {}, ValueError, "`u` must have shape \\(2,\\) or \\(1, 2\\)"),
        (np.ones((3, 2)), np.ones((2, 1)), {}, ValueError, "`u` must have shape"),
        (np.ones(()), np.ones(1), {}, ValueError, "`w` must have rank >= 1"),
        (np.ones((3, 2), np.int32), np.ones(2), {}, TypeError, "`w` must be a real floating"),
        (np.ones((3, 2)), np.ones(2), dict(n_steps=0), ValueError, "`n_steps` must be >= 1"),
        (np.ones((3, 2)), np.ones(2), dict(n_steps=1.5), TypeError, "`n_steps` must be an int"),
        (np.ones((3, 2)), np.ones(2), dict(epsilon=-1.0), ValueError, "`epsilon` must be > 0"),
    ],
)
def test_errors(w, u, kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxnorm.spectral_norm(w, u, **kwargs)


# ----------------------------------------------------------------------------------------------
# linen.SpectralNorm against flax.linen.SpectralNorm.
# ----------------------------------------------------------------------------------------------


def _net(wrapper, **kwargs):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = wrapper(nn.Conv(3, (2, 2)), n_steps=2, **kwargs)(x, update_stats=train)
      return wrapper(nn.Dense(2), **kwargs)(x.reshape(x.shape[0], -1), update_stats=train)

  return Net()


def test_module_matches_flax_over_training_steps():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 2), jnp.float32)
  theirs, ours = _net(nn.SpectralNorm), _net(jnn.SpectralNorm)
  variables = theirs.init(jax.random.key(1), x, train=False)
  mine = ours.init(jax.random.key(1), x, train=False)
  # Same tree (params, and u / sigma in batch_stats): a flax checkpoint loads unchanged.
  assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), mine) == jax.tree_util.tree_map(
      lambda a: (a.shape, a.dtype), variables
  )

  def step(model, variables):
    def loss(params):
      y, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), (y, updates)

    (_, (y, updates)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return y, updates, grads

  step_t, step_o = jax.jit(lambda v: step(theirs, v)), jax.jit(lambda v: step(ours, v))
  for _ in range(3):
    (y_t, up_t, g_t), (y_o, up_o, g_o) = step_t(variables), step_o(variables)
    np.testing.assert_allclose(y_o, y_t, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((up_o, g_o)), jax.tree_util.tree_leaves((up_t, g_t))):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    params = jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, variables["params"], g_t)
    variables = {"params": params, **up_t}
  # Inference: update_stats=False reads the state and leaves it alone.
  y_t = theirs.apply(variables, x, train=False)
  y_o, state = ours.apply(variables, x, train=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y_o, y_t, rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])


def test_wrapped_parameters_are_never_overwritten():
  x = jnp.ones((2, 3, 3, 2), jnp.float32)
  model = _net(jnn.SpectralNorm)
  variables = model.init(jax.random.key(0), x, train=False)
  variables = {**variables, "params": jax.tree_util.tree_map(lambda p: 3 * p + 1, variables["params"])}
  _, updates = model.apply(variables, x, train=True, mutable=True)  # flax 0.12 writes w / sigma into params here
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates["params"], variables["params"])


def test_module_skips_vectors_and_n_steps_zero_and_errors_on_non_matrix():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 2), jnp.float32)
  conv = nn.Conv(3, (2, 2))
  params = conv.init(jax.random.key(1), x)["params"]
  sn = jnn.SpectralNorm(conv, n_steps=0)
  variables = sn.init(jax.random.key(1), x, update_stats=True)
  assert "batch_stats" not in variables
  np.testing.assert_array_equal(sn.apply({"params": {"layer_instance": params}}, x, update_stats=True), conv.apply({"params": params}, x))
  with pytest.raises(ValueError, match="error_on_non_matrix"):
    jnn.SpectralNorm(conv, error_on_non_matrix=True).init(jax.random.key(1), x, update_stats=False)
  # Only the 4-D kernel gets a u; the bias vector is left as it is.
  variables = jnn.SpectralNorm(conv).init(jax.random.key(1), x, update_stats=False)
  assert sorted(variables["batch_stats"]) == ["layer_instance/kernel/sigma", "layer_instance/kernel/u"]


def test_state_keeps_its_dtype():
  x = jnp.ones((2, 3), jnp.float32)
  sn = jnn.SpectralNorm(nn.Dense(4), param_dtype=jnp.bfloat16)
  variables = sn.init(jax.random.key(0), x, update_stats=False)
  _, updates = sn.apply(variables, x, update_stats=True, mutable=["batch_stats"])
  assert jax.tree_util.tree_map(lambda a: a.dtype, updates) == jax.tree_util.tree_map(
      lambda a: a.dtype, {"batch_stats": variables["batch_stats"]}
  )
