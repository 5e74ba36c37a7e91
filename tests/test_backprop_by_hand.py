"""jaxnorm.analysis: the hand-derived batch-norm backward, node by node, and the seeds' slips.

References, never jaxnorm itself: PyTorch float64 autograd of
`torch.nn.functional.batch_norm` (dx, dgamma, dbeta); central finite
differences in float64 NumPy for the inner nodes (dL/dvar with x and mu fixed,
dL/dmu through both of its paths); NumPy's float64 variance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxnorm.analysis import (
    SEED_TYPOS,
    batch_norm_backward_autodiff,
    batch_norm_backward_steps,
)

EPS = 1e-5


def _data(seed=0, m=12, c=3, offset=0.0):
  rng = np.random.default_rng(seed)
  x = offset + rng.standard_normal((m, c)) * rng.uniform(0.5, 2.0, c)
  gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
  dy = rng.standard_normal((m, c))
  return x, gamma, beta, dy


def _torch_grads(x, gamma, beta, dy):
  xt, gt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, gamma, beta))
  y = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=EPS)
  dx, dg, db = torch.autograd.grad(y, (xt, gt, bt), torch.tensor(dy))
  return y.detach().numpy(), dx.numpy(), dg.numpy(), db.numpy()


def _loss(x, mu, var, gamma, beta, dy):
  return np.sum(dy * (gamma * (x - mu) / np.sqrt(var + EPS) + beta), axis=0)  # per feature


def _central(f, at, h=1e-6):
  return (f(at + h) - f(at - h)) / (2 * h)


@pytest.mark.parametrize("fn", [batch_norm_backward_steps, batch_norm_backward_autodiff])
def test_every_node_matches_independent_references(fn):
  x, gamma, beta, dy = _data()
  got = fn(x, gamma, beta, dy, epsilon=EPS)
  y, dx, dgamma, dbeta = _torch_grads(x, gamma, beta, dy)
  np.testing.assert_allclose(got.mean, x.mean(0), rtol=1e-13)
  np.testing.assert_allclose(got.var, x.var(0), rtol=1e-12)
  np.testing.assert_allclose(got.y, y, rtol=1e-10, atol=1e-12)
  for name, ref in (("dx", dx), ("dgamma", dgamma), ("dbeta", dbeta)):
    np.testing.assert_allclose(getattr(got, name), ref, rtol=1e-9, atol=1e-12, err_msg=name)
  np.testing.assert_allclose(got.dxhat, dy * gamma, rtol=1e-15)
  mu, var = x.mean(0), x.var(0)
  # dL/dvar: x and mu held fixed. dL/dmu: var = mean((x - mu)^2) moves with mu.
  dvar = _central(lambda v: _loss(x, mu, v, gamma, beta, dy), var)
  dmu = _central(lambda u: _loss(x, u, np.mean((x - u) ** 2, 0), gamma, beta, dy), mu)
  np.testing.assert_allclose(got.dvar, dvar, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(got.dmu, dmu, rtol=1e-6, atol=1e-8)


def test_hand_and_autodiff_agree_to_rounding():
  x, gamma, beta, dy = _data(1, m=9, c=4, offset=0.3)
  hand = batch_norm_backward_steps(x, gamma, beta, dy, epsilon=EPS)
  auto = batch_norm_backward_autodiff(x, gamma, beta, dy, epsilon=EPS)
  for name in hand._fields:
    np.testing.assert_allclose(getattr(hand, name), getattr(auto, name), rtol=1e-10, atol=1e-12, err_msg=name)


def test_dmu_typo_breaks_dmu_and_shifts_dx_by_a_constant_per_feature():
  x, gamma, beta, dy = _data(2)
  right = batch_norm_backward_steps(x, gamma, beta, dy, epsilon=EPS)
  wrong = batch_norm_backward_steps(x, gamma, beta, dy, epsilon=EPS, typos=["dmu_gamma_over_mu"])
  for name in ("mean", "var", "y", "dgamma", "dbeta", "dxhat", "dvar"):
    np.testing.assert_array_equal(getattr(wrong, name), getattr(right, name), err_msg=name)
  assert np.max(np.abs(wrong.dmu - right.dmu)) > 0.1 * np.max(np.abs(right.dmu))
  shift = wrong.dx - right.dx  # dmu enters dx only through dmu / m
  np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-12)
  np.testing.assert_allclose(shift[0], (wrong.dmu - right.dmu) / len(x), rtol=1e-10)
  # The correct dx sums to zero over the batch (y ignores a shift of x); the typo's does not.
  assert np.max(np.abs(right.dx.sum(0))) < 1e-12
  assert np.max(np.abs(wrong.dx.sum(0))) > 1e-2


def test_one_over_m_typo_breaks_dx_only():
  x, gamma, beta, dy = _data(3)
  right = batch_norm_backward_steps(x, gamma, beta, dy, epsilon=EPS)
  wrong = batch_norm_backward_steps(x, gamma, beta, dy, epsilon=EPS, typos=["dxhat_dx_one_over_m"])
  np.testing.assert_array_equal(wrong.dmu, right.dmu)
  np.testing.assert_allclose(wrong.dx - right.dx, right.dxhat * (1 / len(x) - 1 / np.sqrt(right.var + EPS)), atol=1e-12)
  assert np.max(np.abs(wrong.dx - right.dx)) > 0.1 * np.max(np.abs(right.dx))


def test_naive_variance_cancels_in_float32_at_mean_1e4():
  x, gamma, beta, dy = _data(4, m=256, c=2, offset=1e4)
  exact = x.astype(np.float32).astype(np.float64).var(0)
  x32, g32, b32, dy32 = (a.astype(np.float32) for a in (x, gamma, beta, dy))
  naive = batch_norm_backward_steps(x32, g32, b32, dy32, variance="naive").var
  two_pass = batch_norm_backward_steps(x32, g32, b32, dy32).var
  assert naive.dtype == np.float32
  np.testing.assert_allclose(two_pass, exact, rtol=1e-4)
  assert np.all(np.abs(naive - exact) > 0.5 * exact), (naive, exact)
  # In float64 at offset 0 the identity holds.
  x, gamma, beta, dy = _data(5)
  np.testing.assert_allclose(batch_norm_backward_steps(x, gamma, beta, dy, variance="naive").var, x.var(0), rtol=1e-12)


def test_bad_arguments_name_the_argument():
  x, gamma, beta, dy = _data()
  with pytest.raises(ValueError, match="`x`"):
    batch_norm_backward_steps(x[0], gamma, beta, dy)
  with pytest.raises(ValueError, match="`gamma`"):
    batch_norm_backward_steps(x, gamma[:2], beta, dy)
  with pytest.raises(ValueError, match="`dy`"):
    batch_norm_backward_autodiff(x, gamma, beta, dy[:3])
  with pytest.raises(ValueError, match="`typos`"):
    batch_norm_backward_steps(x, gamma, beta, dy, typos=["sign"])
  with pytest.raises(ValueError, match="`variance`"):
    batch_norm_backward_steps(x, gamma, beta, dy, variance="welford")
  with pytest.raises(ValueError, match="`epsilon`"):
    batch_norm_backward_steps(x, gamma, beta, dy, epsilon=0.0)
  assert set(SEED_TYPOS) == {"dmu_gamma_over_mu", "dxhat_dx_one_over_m"}
