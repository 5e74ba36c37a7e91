"""PyTorch parity of the functional core in float64: outputs and gradients (via torch autograd).

Torch is NCHW where jaxnorm's batch_norm here is NHWC (`feature_axes=-1`):
inputs and gradients are transposed between the two.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxnorm

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = dict(rtol=1e-10, atol=1e-12)


def rng(seed):
  return np.random.default_rng(seed)


def torch_grads(fn, arrays, ct):
  """Output of `fn` on float64 torch copies of `arrays`, and the gradients of sum(out * ct)."""
  ts = [None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
  out = fn(*ts)
  (out * torch.tensor(ct, dtype=torch.float64)).sum().backward()
  return out.detach().numpy(), [None if t is None else t.grad.numpy() for t in ts]


def jax_grads(fn, arrays, ct):
  """Output of `fn` and the gradients of sum(out * ct) with respect to the non-None `arrays`."""
  argnums = tuple(i for i, a in enumerate(arrays) if a is not None)
  loss = lambda *a: jnp.sum(fn(*a) * ct)
  y, grads = jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums)(*a)))(*arrays)
  full = [None] * len(arrays)
  for i, g in zip(argnums, grads):
    full[i] = np.asarray(g)
  return np.asarray(y), full


def assert_parity(ours, theirs):
  (y, gs), (y_t, gs_t) = ours, theirs
  np.testing.assert_allclose(y, y_t, **TOL)
  for g, g_t in zip(gs, gs_t):
    assert (g is None) == (g_t is None)
    if g is not None:
      np.testing.assert_allclose(g, g_t, **TOL)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,n_trailing", [((3, 5), 1), ((2, 3, 4), 2)])
def test_layer_norm_matches_torch(shape, n_trailing, affine):
  r = rng(0)
  x = r.normal(size=shape) * 2 + 1
  normalized = shape[-n_trailing:]
  scale = r.normal(size=normalized) if affine else None
  bias = r.normal(size=normalized) if affine else None
  ct = r.normal(size=shape)
  axis = tuple(range(-n_trailing, 0))
  ours = jax_grads(lambda x, s, b: jaxnorm.layer_norm(x, s, b, axis=axis, epsilon=1e-5), [x, scale, bias], ct)
  theirs = torch_grads(lambda x, s, b: F.layer_norm(x, normalized, s, b, eps=1e-5), [x, scale, bias], ct)
  assert_parity(ours, theirs)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("nchw_shape", [(4, 3), (2, 3, 2, 3)])
def test_batch_norm_training_matches_torch(nchw_shape, affine):
  r = rng(1)
  x_nchw = r.normal(size=nchw_shape) * 1.5 - 0.5
  c = nchw_shape[1]
  scale = r.normal(size=c) if affine else None
  bias = r.normal(size=c) if affine else None
  ct_nchw = r.normal(size=nchw_shape)
  to_nhwc = lambda a: np.moveaxis(a, 1, -1)
  to_nchw = lambda a: np.moveaxis(a, -1, 1)

  theirs = torch_grads(
      lambda x, s, b: F.batch_norm(x, None, None, s, b, training=True, eps=1e-5), [x_nchw, scale, bias], ct_nchw
  )
  y, grads = jax_grads(
      lambda x, s, b: jaxnorm.batch_norm(x, s, b, feature_axes=-1, epsilon=1e-5)[0],
      [to_nhwc(x_nchw), scale, bias],
      to_nhwc(ct_nchw),
  )
  assert_parity((to_nchw(y), [to_nchw(grads[0])] + grads[1:]), theirs)

  # The returned batch statistics are torch's: biased variance in the forward, and the
  # unbiased one in torch's running-variance update (momentum 1 exposes the batch value).
  running_mean, running_var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
  F.batch_norm(torch.tensor(x_nchw), running_mean, running_var, training=True, momentum=1.0, eps=1e-5)
  _, mean, var = jaxnorm.batch_norm(to_nhwc(x_nchw), feature_axes=-1)
  n = x_nchw.size // c
  np.testing.assert_allclose(mean, running_mean.numpy(), **TOL)
  np.testing.assert_allclose(var * n / (n - 1), running_var.numpy(), **TOL)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,n_trailing", [((3, 5), 1), ((2, 3, 4), 2)])
def test_rms_norm_matches_torch(shape, n_trailing, affine):
  r = rng(2)
  x = r.normal(size=shape) + 0.3
  normalized = shape[-n_trailing:]
  scale = r.normal(size=normalized) if affine else None
  ct = r.normal(size=shape)
  axis = tuple(range(-n_trailing, 0))
  ours = jax_grads(lambda x, s: jaxnorm.rms_norm(x, s, axis=axis, epsilon=1e-6), [x, scale], ct)
  theirs = torch_grads(lambda x, s: F.rms_norm(x, normalized, s, eps=1e-6), [x, scale], ct)
  assert_parity(ours, theirs)
