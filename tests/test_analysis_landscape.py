"""landscape_along_gradient: variation of loss, gradient predictiveness, effective beta-smoothness.

References, never jaxnorm itself: closed forms for a quadratic
L = 1/2 theta^T A theta + b^T theta in float64 NumPy (gradient A theta + b,
gradient change eta ||A d||, beta = ||A d|| / ||d||, at most the largest
eigenvalue), and torch float64 autograd of a small tanh network, stepped
along its own gradient (or a given direction) at each step size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm.analysis import DEFAULT_MULTIPLIERS, landscape_along_gradient

torch = pytest.importorskip("torch")


def test_paper_step_sizes():
  # eta in [1/2, 4] x lr, as in Santurkar et al.
  assert DEFAULT_MULTIPLIERS[0] == 0.5 and DEFAULT_MULTIPLIERS[-1] == 4.0
  assert np.all(np.diff(DEFAULT_MULTIPLIERS) > 0)


def test_quadratic_closed_forms():
  r = np.random.default_rng(0)
  q = r.normal(size=(5, 5))
  a = q @ q.T + 0.1 * np.eye(5)
  b = r.normal(size=5)
  theta = r.normal(size=5)
  lr = 0.05

  def loss(p):
    w = jnp.concatenate([p["u"], p["v"].ravel()])  # a tree of two leaves: norms must be global
    return 0.5 * w @ jnp.asarray(a) @ w + jnp.asarray(b) @ w

  params = {"u": jnp.asarray(theta[:2]), "v": jnp.asarray(theta[2:]).reshape(3, 1)}
  probe = jax.jit(lambda p: landscape_along_gradient(loss, p, lr))(params)

  g = a @ theta + b
  etas = lr * np.asarray(DEFAULT_MULTIPLIERS)
  quadratic = lambda w: 0.5 * w @ a @ w + b @ w  # noqa: E731
  np.testing.assert_allclose(probe.step_sizes, etas, rtol=1e-15)
  np.testing.assert_allclose(probe.loss, quadratic(theta), rtol=1e-12)
  np.testing.assert_allclose(probe.losses, [quadratic(theta - e * g) for e in etas], rtol=1e-12)
  np.testing.assert_allclose(probe.gradient_changes, etas * np.linalg.norm(a @ g), rtol=1e-12)
  np.testing.assert_allclose(probe.distances, etas * np.linalg.norm(g), rtol=1e-12)
  np.testing.assert_allclose(probe.gradient_norm, np.linalg.norm(g), rtol=1e-12)
  beta = np.linalg.norm(a @ g) / np.linalg.norm(g)
  np.testing.assert_allclose(probe.beta_smoothness, beta, rtol=1e-12)
  assert beta <= np.linalg.eigvalsh(a).max() * (1 + 1e-12)


def test_given_direction_and_multipliers():
  a = np.diag([1.0, 10.0])
  loss = lambda w: 0.5 * w @ jnp.asarray(a) @ w  # noqa: E731
  w = jnp.array([1.0, 1.0])
  d = jnp.array([0.0, 2.0])  # the stiff eigenvector: beta is its eigenvalue
  probe = landscape_along_gradient(loss, w, 0.1, multipliers=[1.0, 3.0], direction=d)
  np.testing.assert_allclose(probe.step_sizes, [0.1, 0.3], rtol=1e-15)
  np.testing.assert_allclose(probe.losses, [0.5 * (1 + 10 * (1 - 2 * e) ** 2) for e in (0.1, 0.3)], rtol=1e-12)
  np.testing.assert_allclose(probe.beta_smoothness, 10.0, rtol=1e-12)
  zero = landscape_along_gradient(loss, w, 0.1, direction=jnp.zeros(2))
  assert float(zero.beta_smoothness) == 0 and np.all(np.asarray(zero.gradient_changes) == 0)


def torch_probe(params, x, y, lr, multipliers, direction=None):
  names = sorted(params)
  base = {k: torch.tensor(np.asarray(params[k])) for k in names}

  def loss_and_grad(values):
    t = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    out = torch.tanh(torch.tensor(x) @ t["w1"] + t["b1"]) @ t["w2"]
    loss = torch.mean((out - torch.tensor(y)) ** 2)
    loss.backward()
    return loss.item(), np.concatenate([t[k].grad.numpy().ravel() for k in names])

  _, g = loss_and_grad(base)
  if direction is None:
    d = {k: torch.tensor(v) for k, v in zip(names, np.split(g, np.cumsum([base[k].numel() for k in names])[:-1]))}
    d = {k: d[k].reshape(base[k].shape) for k in names}
  else:
    d = {k: torch.tensor(np.asarray(direction[k])) for k in names}
  d_norm = np.sqrt(sum(float(torch.sum(v**2)) for v in d.values()))
  losses, changes = [], []
  for m in multipliers:
    eta = lr * m
    loss_k, g_k = loss_and_grad({k: base[k] - eta * d[k] for k in names})
    losses.append(loss_k)
    changes.append(np.linalg.norm(g_k - g))
  distances = lr * np.asarray(multipliers) * d_norm
  return np.array(losses), np.array(changes), np.max(np.array(changes) / distances)


@pytest.mark.parametrize("with_direction", [False, True], ids=["gradient", "direction"])
def test_matches_torch_on_a_network(with_direction):
  r = np.random.default_rng(1)
  x, y = r.normal(size=(10, 3)), r.normal(size=(10, 2))
  params = {"w1": r.normal(size=(3, 4)), "b1": r.normal(size=4), "w2": r.normal(size=(4, 2))}
  direction = {k: r.normal(size=v.shape) for k, v in params.items()} if with_direction else None

  def loss(p):
    return jnp.mean((jnp.tanh(jnp.asarray(x) @ p["w1"] + p["b1"][None]) @ p["w2"] - jnp.asarray(y)) ** 2)

  params_j = jax.tree_util.tree_map(jnp.asarray, params)
  direction_j = None if direction is None else jax.tree_util.tree_map(jnp.asarray, direction)
  probe = jax.jit(lambda p, d: landscape_along_gradient(loss, p, 0.2, direction=d))(params_j, direction_j)
  losses, changes, beta = torch_probe(params, x, y, 0.2, DEFAULT_MULTIPLIERS, direction)
  np.testing.assert_allclose(probe.losses, losses, rtol=1e-10)
  np.testing.assert_allclose(probe.gradient_changes, changes, rtol=1e-9)
  np.testing.assert_allclose(probe.beta_smoothness, beta, rtol=1e-9)


def test_bad_arguments():
  loss = lambda w: jnp.sum(w**2)  # noqa: E731
  with pytest.raises(ValueError, match="multipliers"):
    landscape_along_gradient(loss, jnp.ones(2), 0.1, multipliers=[])
  with pytest.raises(TypeError, match="floating"):
    landscape_along_gradient(loss, jnp.ones(2, jnp.int32), 0.1)
  with pytest.raises(ValueError, match="tree structure"):
    landscape_along_gradient(loss, jnp.ones(2), 0.1, direction={"w": jnp.ones(2)})
