"""Batch renormalization: `jaxnorm.batch_renorm`, `jaxnorm.batch_renorm_schedule`, `jaxnorm.linen.BatchRenorm`.

Every expected value comes from a reference that does not use jaxnorm's code:

* forward values from the paper's formula in float64 NumPy (masked arrays for
  `where=`);
* gradients from plain JAX autodiff of the same formula in float64
  `jax.numpy`, with `stop_gradient` on r and d as the paper prescribes; and,
  where r and d are clipped (so locally constant, and the true derivative
  equals the paper's), finite differences (`check_grads`, order 2);
* r_max = 1, d_max = 0 against batch norm: `jaxnorm.batch_norm` (bit for bit)
  and `flax.linen.BatchNorm(use_fast_variance=False)` (module, running
  statistics included);
* the schedule against `np.interp` through the paper's breakpoints;
* the module's running statistics and step counter against a hand-written
  NumPy training loop;
* cross-device results against one call on the whole batch.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxnorm
from jaxnorm import linen as jnn

EPS = 1e-5
F64 = dict(rtol=1e-10, atol=1e-10)


def rng(seed=0):
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# Independent references: the paper's formula, over axes (0, ..., ndim - 2), features last.
# ----------------------------------------------------------------------------------------------


def np_renorm(x, scale, bias, rm, rv, r_max, d_max, where=None, eps=EPS):
  """float64 NumPy: returns y, batch mean, batch variance, and the unclipped r and d."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  if where is None:
    mean, var = x.mean(axes), x.var(axes)
  else:
    xm = np.ma.masked_array(x, mask=~np.broadcast_to(where, x.shape))
    mean, var = np.asarray(xm.mean(axes)), np.asarray(xm.var(axes))
  sigma_b, sigma = np.sqrt(var + eps), np.sqrt(np.asarray(rv, np.float64) + eps)
  r_raw, d_raw = sigma_b / sigma, (mean - rm) / sigma
  r, d = np.clip(r_raw, 1 / r_max, r_max), np.clip(d_raw, -d_max, d_max)
  with np.errstate(invalid="ignore"):  # NaN at masked-out positions is fine here
    y = ((x - mean) / sigma_b * r + d) * (1 if scale is None else scale) + (0 if bias is None else bias)
  return y, mean, var, r_raw, d_raw


def jnp_renorm(x, scale, bias, rm, rv, r_max, d_max, where=None, eps=EPS, stop=True):
  """The same formula in jax.numpy for plain autodiff; `stop=False` differentiates through r and d too."""
  axes = tuple(range(x.ndim - 1))
  per_feature = lambda a: jnp.reshape(a, (1,) * len(axes) + (-1,))  # (C,) -> (1, ..., 1, C), to broadcast against x
  mean = jnp.mean(x, axes, where=where)
  var = jnp.mean(jnp.square(x - per_feature(mean)), axes, where=where)
  sigma_b, sigma = jnp.sqrt(var + eps), jnp.sqrt(rv + eps)
  r = jnp.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = jnp.clip((mean - rm) / sigma, -d_max, d_max)
  if stop:
    r, d = lax.stop_gradient(r), lax.stop_gradient(d)
  y = (x - per_feature(mean)) / per_feature(sigma_b) * per_feature(r) + per_feature(d)
  return per_feature(scale) * y + per_feature(bias), mean, var


def _loss(f, ct, cm, cv):
  """A scalar with cotangents on all three outputs."""

  def loss(*args):
    y, mean, var = f(*args)
    # y may be bfloat16; the statistics are float32 or float64
    return jnp.sum(y * ct).astype(mean.dtype) + jnp.sum(mean * cm) + jnp.sum(var * cv)

  return loss


# Running statistics placed relative to the batch statistics so that, per feature,
# r = ratio_r (before clipping) and d = ratio_d. Bounds r_max = 2, d_max = 1.
R_MAX, D_MAX = 2.0, 1.0
CLIPPING = {
    # every r and d strictly inside the bounds
    "inactive": ([1.5, 0.8, 0.6], [0.5, -0.9, 0.0]),
    # every r and d well outside (both sides), so r and d are locally constant
    "active": ([10.0, 0.05, 4.0], [3.0, -4.0, -2.5]),
    # some features clipped, some not
    "mixed": ([1.2, 0.1, 3.0], [-0.3, 2.0, 0.9]),
}


def _running_stats(x, clipping, where=None):
  """Running mean and variance that give (unclipped) r and d as listed in CLIPPING for this batch."""
  _, mean, var, _, _ = np_renorm(x, None, None, 0.0, 1.0, 1.0, 0.0, where=where)
  ratio_r, ratio_d = map(np.array, CLIPPING[clipping])
  # sigma_B / sigma = ratio_r, (mu_B - mu) / sigma = ratio_d
  sigma = np.sqrt(var + EPS) / ratio_r
  return mean - ratio_d * sigma, sigma**2 - EPS


def _renorm_case(clipping, seed=0, shape=(5, 2, 3), where=None):
  r = rng(seed)
  x = r.normal(size=shape) * [1.0, 2.0, 0.5] + [0.5, -1.0, 3.0]
  s, b = r.normal(size=3), r.normal(size=3)
  return (x, s, b, *_running_stats(x, clipping, where))


def _assert_clipping(clipping, r_raw, d_raw, margin=1e-3):
  r_in = (r_raw > 1 / R_MAX + margin) & (r_raw < R_MAX - margin)
  d_in = np.abs(d_raw) < D_MAX - margin
  r_out = (r_raw < 1 / R_MAX - margin) | (r_raw > R_MAX + margin)
  d_out = np.abs(d_raw) > D_MAX + margin
  if clipping == "inactive":
    assert r_in.all() and d_in.all()
  elif clipping == "active":
    assert r_out.all() and d_out.all()
  else:
    assert (r_in | r_out).all() and (d_in | d_out).all()
    assert r_in.any() and r_out.any() and d_in.any() and d_out.any()


# ----------------------------------------------------------------------------------------------
# 1. r_max = 1, d_max = 0 is batch norm.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, affine, masked",
    [(jnp.float32, True, False), (jnp.float32, False, True), (jnp.bfloat16, True, True)],
)
def test_plain_bounds_equal_batch_norm(dtype, affine, masked):
  """The forward is batch_norm's bit for bit; so are the gradients op by op (the same kernel with
  scale * 1 and scale * 0 + bias), but under jit XLA fuses the two backward programs differently,
  which moves the x-gradient by up to an ulp of float32 (seen on CPU), hence the tolerance there."""
  r = rng(1)
  x = jnp.asarray(r.normal(size=(6, 4)) * 3 + 2, dtype)
  s, b = (jnp.asarray(r.normal(size=4), jnp.float32) for _ in range(2)) if affine else (None, None)
  # Running statistics far from the batch ones: with r_max = 1, d_max = 0 they must not matter.
  rm, rv = jnp.asarray(r.normal(size=4) * 5, jnp.float32), jnp.asarray(r.random(4) * 9 + 0.1, jnp.float32)
  where = r.random((6, 4)) < 0.7 if masked else None
  ct = jnp.asarray(r.normal(size=(6, 4)), dtype)
  cm, cv = jnp.asarray(r.normal(size=4), jnp.float32), jnp.asarray(r.normal(size=4), jnp.float32)

  def renorm(x, s, b):
    return jaxnorm.batch_renorm(x, s, b, rm, rv, r_max=1.0, d_max=0.0, where=where)

  def bn(x, s, b):
    return jaxnorm.batch_norm(x, s, b, where=where)

  @jax.jit
  def run(x, s, b):
    out = [f(x, s, b) for f in (renorm, bn)]
    grads = [jax.grad(_loss(f, ct, cm, cv), (0, 1, 2))(x, s, b) for f in (renorm, bn)]
    return out, grads

  (out, out_bn), (g, g_bn) = run(x, s, b)
  assert out[0].dtype == x.dtype and out[1].dtype == out[2].dtype == jnp.float32
  for a, a_bn in zip(out, out_bn):
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(a_bn, np.float64))
  ulps = 4 * float(jnp.finfo(dtype).eps)
  for a, a_bn in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_bn)):
    assert a.dtype == a_bn.dtype
    a, a_bn = np.asarray(a, np.float64), np.asarray(a_bn, np.float64)
    np.testing.assert_allclose(a, a_bn, rtol=ulps, atol=ulps * np.abs(a_bn).max())


# ----------------------------------------------------------------------------------------------
# 2. The formula and the paper's gradients, with clipping inactive, active and mixed.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clipping", ["inactive", "active", "mixed"])
def test_forward_and_gradients_match_stop_gradient_reference(clipping):
  x, s, b, rm, rv = _renorm_case(clipping)
  y_ref, mean_ref, var_ref, r_raw, d_raw = np_renorm(x, s, b, rm, rv, R_MAX, D_MAX)
  _assert_clipping(clipping, r_raw, d_raw)
  r = rng(2)
  ct, cm, cv = r.normal(size=x.shape), r.normal(size=3), r.normal(size=3)

  def ours(custom_vjp):
    return lambda x, s, b, rm, rv: jaxnorm.batch_renorm(
        x, s, b, rm, rv, r_max=R_MAX, d_max=D_MAX, custom_vjp=custom_vjp
    )

  def ref(stop):
    return lambda x, s, b, rm, rv: jnp_renorm(x, s, b, rm, rv, R_MAX, D_MAX, stop=stop)

  argnums = (0, 1, 2, 3, 4)

  @jax.jit
  def run(*args):
    grads = {
        name: jax.grad(_loss(f, ct, cm, cv), argnums)(*args)
        for name, f in (("vjp", ours(True)), ("autodiff", ours(False)), ("ref", ref(True)), ("full", ref(False)))
    }
    return ours(True)(*args), grads

  (y, mean, var), grads = run(x, s, b, rm, rv)
  np.testing.assert_allclose(y, y_ref, **F64)
  np.testing.assert_allclose(mean, mean_ref, **F64)
  np.testing.assert_allclose(var, var_ref, **F64)
  for name in ("vjp", "autodiff"):
    for got, want in zip(grads[name], grads["ref"]):
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10, err_msg=name)
  # r and d are constants of the backward pass: no gradient reaches the running statistics.
  assert np.all(np.asarray(grads["vjp"][3]) == 0) and np.all(np.asarray(grads["vjp"][4]) == 0)
  # Differentiating through r and d (not the paper's rule) gives other gradients exactly
  # where they are not clipped; where they are, r and d are locally constant and it agrees.
  full_x = np.asarray(grads["full"][0])
  if clipping == "active":
    np.testing.assert_allclose(full_x, grads["ref"][0], rtol=1e-9, atol=1e-10)
  else:
    assert np.abs(full_x - np.asarray(grads["ref"][0])).max() > 1e-2


@pytest.mark.parametrize("case", ["clipped", "plain-bounds-masked"])
def test_check_grads_second_order(case):
  """Finite differences agree with the paper's gradient only where r and d are locally constant:
  where they are clipped, or for r_max = 1, d_max = 0. Gradients wrt the running statistics are then
  truly zero, so they are checked as well."""
  where = None
  if case == "plain-bounds-masked":
    where = rng(4).random((5, 2, 3)) < 0.7
    where[0] = True
  x, s, b, rm, rv = _renorm_case("active", seed=3, where=where)
  r_max, d_max = (1.0, 0.0) if case == "plain-bounds-masked" else (R_MAX, D_MAX)
  if case == "clipped":
    _assert_clipping("active", *np_renorm(x, s, b, rm, rv, R_MAX, D_MAX)[3:], margin=0.1)
  f = jax.jit(lambda *a: jaxnorm.batch_renorm(*a, r_max=r_max, d_max=d_max, where=where))
  check_grads(f, (x, s, b, rm, rv), order=2, modes=["rev"])


# ----------------------------------------------------------------------------------------------
# 3. Masks, cross-device statistics, traced bounds.
# ----------------------------------------------------------------------------------------------


def test_nonfinite_values_in_masked_positions():
  r = rng(6)
  where = r.random((6, 3)) < 0.6
  where[:2] = True
  x, s, b, rm, rv = _renorm_case("mixed", seed=5, shape=(6, 3), where=where)
  junk = np.array([np.nan, np.inf, -np.inf])
  x_bad = x.copy()
  x_bad[~where] = junk[np.arange((~where).sum()) % 3]
  x_clean = np.where(where, x, 0.0)  # what the masked positions are read as
  ct = r.normal(size=x.shape)
  loss_ours = lambda x, s, b: jnp.sum(jaxnorm.batch_renorm(x, s, b, rm, rv, r_max=R_MAX, d_max=D_MAX, where=where)[0] * ct)
  loss_ref = lambda x, s, b: jnp.sum(jnp_renorm(x, s, b, rm, rv, R_MAX, D_MAX, where=where)[0] * ct)

  @jax.jit
  def run(x_bad, x_clean):
    y = jaxnorm.batch_renorm(x_bad, s, b, rm, rv, r_max=R_MAX, d_max=D_MAX, where=where)
    return y, jax.grad(loss_ours, (0, 1, 2))(x_bad, s, b), jax.grad(loss_ref, (0, 1, 2))(x_clean, s, b)

  (y, mean, var), g, g_ref = run(x_bad, x_clean)
  y_ref, mean_ref, var_ref, r_raw, d_raw = np_renorm(x_clean, s, b, rm, rv, R_MAX, D_MAX, where=where)
  _assert_clipping("mixed", r_raw, d_raw)
  np.testing.assert_allclose(y, y_ref, **F64)  # everywhere: masked positions read as 0
  np.testing.assert_allclose(mean, mean_ref, **F64)
  np.testing.assert_allclose(var, var_ref, **F64)
  assert all(np.all(np.isfinite(a)) for a in g)
  assert np.all(np.asarray(g[0])[~where] == 0)
  np.testing.assert_allclose(np.asarray(g[0])[where], np.asarray(g_ref[0])[where], rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(g[2], g_ref[2], rtol=1e-9, atol=1e-10)


def test_vmap_axis_name_equals_global_batch():
  """Members hold unequal numbers of valid rows; statistics, output and gradients are the global ones."""
  D, N, C = 3, 4, 3
  x, s, b, _, _ = _renorm_case("mixed", seed=7, shape=(D * N, C))
  x = x.reshape(D, N, C) + np.arange(D)[:, None, None]  # members differ in mean
  counts = np.array([[1, 3, 4], [2, 1, 4], [4, 2, 4]])  # (D, C)
  where = np.arange(N)[None, :, None] < counts[:, None, :]
  rm, rv = _running_stats(x.reshape(D * N, C), "mixed", where.reshape(D * N, C))
  ct = rng(8).normal(size=x.shape)

  def member(x, s, b, w, ct):
    y, mean, var = jaxnorm.batch_renorm(x, s, b, rm, rv, r_max=R_MAX, d_max=D_MAX, where=w, axis_name="i")
    return jnp.sum(y * ct), (y, mean, var)

  def global_loss(x, s, b):
    y, _, _ = jnp_renorm(x.reshape(D * N, C), s, b, rm, rv, R_MAX, D_MAX, where=where.reshape(D * N, C))
    return jnp.sum(y * ct.reshape(D * N, C))

  @jax.jit
  def run(x, s, b):
    (_, out), grads = jax.vmap(jax.value_and_grad(member, (0, 1, 2), has_aux=True), (0, None, None, 0, 0), axis_name="i")(
        x, s, b, where, ct
    )
    return out, grads, jax.grad(global_loss, (0, 1, 2))(x, s, b)

  (y, mean, var), (gx, gs, gb), (gx_ref, gs_ref, gb_ref) = run(x, s, b)
  y_ref, mean_ref, var_ref, r_raw, d_raw = np_renorm(
      x.reshape(D * N, C), s, b, rm, rv, R_MAX, D_MAX, where=where.reshape(D * N, C)
  )
  _assert_clipping("mixed", r_raw, d_raw)
  np.testing.assert_allclose(y, y_ref.reshape(D, N, C), **F64)
  np.testing.assert_allclose(mean, np.broadcast_to(mean_ref, (D, C)), **F64)
  np.testing.assert_allclose(var, np.broadcast_to(var_ref, (D, C)), **F64)
  # data-parallel pattern: x-gradients are the global ones, parameter gradients local shares of them
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(gs.sum(0), gs_ref, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(gb.sum(0), gb_ref, rtol=1e-9, atol=1e-10)


def test_traced_bounds_jit_and_vmap():
  """r_max and d_max as traced scalars (as a schedule feeds them): the same as Python numbers."""
  x, s, b, rm, rv = _renorm_case("mixed", seed=9, shape=(6, 3))
  bounds = np.array([[1.0, 0.0], [R_MAX, D_MAX], [3.0, 5.0]])
  f = lambda r_max, d_max: jaxnorm.batch_renorm(x, s, b, rm, rv, r_max=r_max, d_max=d_max)[0]
  traced = jax.jit(jax.vmap(f))(bounds[:, 0], bounds[:, 1])
  for i, (r_max, d_max) in enumerate(bounds):
    np.testing.assert_allclose(traced[i], np_renorm(x, s, b, rm, rv, r_max, d_max)[0], **F64)


def test_training_loop_in_lax_scan_and_forward_mode():
  """Running statistics carried through `lax.scan` (r, d from the previous step's update), gradients
  of the summed loss against the same loop over the reference; and `jax.jvp` with custom_vjp=False."""
  r = rng(15)
  xs = np.stack([r.normal(size=(6, 3)) * (1 + 0.3 * t) + t for t in range(4)])
  s, b = r.normal(size=3), r.normal(size=3)
  cts = r.normal(size=xs.shape)

  def loop(renorm):
    def loss(xs, s, b):
      def step(carry, inputs):
        rm, rv = carry
        x, ct = inputs
        y, mean, var = renorm(x, s, b, rm, rv)
        return (0.7 * rm + 0.3 * mean, 0.7 * rv + 0.3 * var), jnp.sum(y * ct)

      (rm, rv), losses = lax.scan(step, (jnp.zeros(3), jnp.ones(3)), (xs, cts))
      return jnp.sum(losses), (rm, rv)

    return loss

  ours = loop(lambda *a: jaxnorm.batch_renorm(*a, r_max=R_MAX, d_max=D_MAX))
  ref = loop(lambda *a: jnp_renorm(*a, R_MAX, D_MAX))
  tangents = tuple(r.normal(size=np.shape(a)) for a in (xs[0], s, b))
  jvp = lambda f: jax.jvp(lambda x, s, b: f(x, s, b, xs[1].mean(0), xs[1].var(0) * 2)[0], (xs[0], s, b), tangents)

  @jax.jit
  def run(xs, s, b):
    return (
        jax.value_and_grad(ours, (0, 1, 2), has_aux=True)(xs, s, b),
        jax.value_and_grad(ref, (0, 1, 2), has_aux=True)(xs, s, b),
        jvp(lambda *a: jaxnorm.batch_renorm(*a, r_max=R_MAX, d_max=D_MAX, custom_vjp=False)),
        jvp(lambda *a: jnp_renorm(*a, R_MAX, D_MAX)),
    )

  ((loss, stats), grads), ((loss_ref, stats_ref), grads_ref), jvp_ours, jvp_ref = run(xs, s, b)
  for got, want in zip(jax.tree_util.tree_leaves((loss, stats, grads, jvp_ours)), jax.tree_util.tree_leaves((loss_ref, stats_ref, grads_ref, jvp_ref))):
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
  # the bounds were active on the way: some r or d clipped, some not
  rm, rv, clipped = np.zeros(3), np.ones(3), []
  for x in xs:
    _, mean, var, r_raw, d_raw = np_renorm(x, None, None, rm, rv, R_MAX, D_MAX)
    clipped += list((r_raw < 1 / R_MAX) | (r_raw > R_MAX) | (np.abs(d_raw) > D_MAX))
    rm, rv = 0.7 * rm + 0.3 * mean, 0.7 * rv + 0.3 * var
  assert any(clipped) and not all(clipped)


def test_large_mean_offset_float32():
  """|mean| = 1e4 x std in float32: d = (mu_B - mu) / sigma is formed from the two-part batch mean,
  so y keeps float32 precision (rounding the batch mean to float32 first costs about 1e-3 here)."""
  r = rng(16)
  x = jnp.asarray(r.normal(size=(64, 4)) + 1e4, jnp.float32)
  x64 = np.asarray(x, np.float64)
  rm, rv = jnp.asarray(x64.mean(0) + 0.3, jnp.float32), jnp.full(4, 2.0, jnp.float32)
  y = jax.jit(lambda x: jaxnorm.batch_renorm(x, None, None, rm, rv, r_max=3.0, d_max=5.0)[0])(x)
  y_ref = np_renorm(x64, None, None, np.asarray(rm, np.float64), np.asarray(rv, np.float64), 3.0, 5.0)[0]
  assert np.abs(np.asarray(y, np.float64) - y_ref).max() < 1e-5


def test_statistics_are_computed_once_when_compiled():
  """The statistics for r, d and the kernel's are merged by XLA: as many reductions as batch_norm."""
  x = jnp.ones((16, 4), jnp.float32)
  s = jnp.ones(4, jnp.float32)

  def reductions(f):
    return len(re.findall(r" reduce\(", jax.jit(f).lower(x, s).compile().as_text()))

  bn = lambda x, s: jaxnorm.batch_norm(x, s, s)
  br = lambda x, s: jaxnorm.batch_renorm(x, s, s, s, s, r_max=3.0, d_max=5.0)
  grad = lambda f: jax.grad(lambda x, s: jnp.sum(jnp.sin(f(x, s)[0])), (0, 1))
  assert reductions(br) == reductions(bn) > 0
  assert reductions(grad(br)) == reductions(grad(bn))


# ----------------------------------------------------------------------------------------------
# 4. The schedule.
# ----------------------------------------------------------------------------------------------


def test_schedule_matches_paper_breakpoints():
  steps = np.array([0, 1, 4999, 5000, 5001, 10_000, 15_000, 25_000, 30_000, 39_999, 40_000, 10**6])
  r_ref = np.interp(steps, [0, 5000, 40_000], [1, 1, 3])
  d_ref = np.interp(steps, [0, 5000, 25_000], [0, 0, 5])
  r_max, d_max = jax.jit(jaxnorm.batch_renorm_schedule)(jnp.asarray(steps, jnp.int32))
  # computed in float32 from an int32 counter
  assert r_max.dtype == d_max.dtype == jnp.float32
  np.testing.assert_allclose(r_max, r_ref, rtol=1e-7)
  np.testing.assert_allclose(d_max, d_ref, rtol=1e-7, atol=1e-7)
  # spot values by hand: a seventh of the way to 40k, a quarter of the way to 25k
  np.testing.assert_allclose(jaxnorm.batch_renorm_schedule(10_000), (1 + 2 / 7, 1.25), rtol=1e-7)
  # custom breakpoints, float steps, and a zero-length ramp (a jump at the end of warm-up)
  kw = dict(warmup_steps=10, r_max_final=2.0, r_max_steps=30, d_max_final=0.5, d_max_steps=10)
  t = np.array([0.0, 9.0, 10.0, 20.0, 29.5, 50.0])
  r_max, d_max = jaxnorm.batch_renorm_schedule(t, **kw)
  assert r_max.dtype == jnp.float64  # a float64 step keeps float64
  np.testing.assert_allclose(r_max, np.interp(t, [0, 10, 30], [1, 1, 2]), rtol=1e-12)
  np.testing.assert_allclose(d_max, [0, 0, 0.5, 0.5, 0.5, 0.5])


# ----------------------------------------------------------------------------------------------
# 5. The linen module.
# ----------------------------------------------------------------------------------------------


def _batches(n, shape=(8, 3), seed=10, drift=0.5):
  """float32 batches whose statistics drift, so that renorm's r and d move."""
  r = rng(seed)
  return [jnp.asarray(r.normal(size=shape) * (1 + drift * i) + 2 * drift * i, jnp.float32) for i in range(n)]


def test_module_with_plain_bounds_matches_flax_batch_norm():
  """r_max = 1, d_max = 0, or the schedule during warm-up: flax's BatchNorm, running statistics and
  gradients included; a flax checkpoint loads unchanged."""
  xs = _batches(3)
  theirs = nn.BatchNorm(momentum=0.8, use_fast_variance=False)
  variables = theirs.init(jax.random.key(0), xs[0], use_running_average=False)
  variables = {**variables, "params": {"scale": jnp.array([0.5, 2.0, -1.0], jnp.float32), "bias": jnp.array([0.1, 0.2, 0.3], jnp.float32)}}
  plain = jnn.BatchRenorm(momentum=0.8, r_max=1.0, d_max=0.0)
  warming = jnn.BatchRenorm(momentum=0.8, warmup_steps=10)
  # same variable tree (no step counter with fixed bounds): the flax checkpoint is used as is
  own = plain.init(jax.random.key(0), xs[0], use_running_average=False)
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(variables)

  def step(module):
    @jax.jit
    def run(variables, x):
      def loss(params, x):
        y, updates = module.apply(
            {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(y)), (y, updates)

      (_, (y, updates)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], x)
      return y, {**variables, **updates}, grads

    return run

  v = {"theirs": variables, "plain": variables, "warming": {**variables, "batch_stats": {**variables["batch_stats"], "steps": jnp.int32(0)}}}
  modules = {"theirs": theirs, "plain": plain, "warming": warming}
  runs = {k: step(m) for k, m in modules.items()}
  for x in xs:
    out = {k: runs[k](v[k], x) for k in modules}
    for k in ("plain", "warming"):
      y, v[k], grads = out[k]
      np.testing.assert_allclose(y, out["theirs"][0], rtol=1e-5, atol=1e-5)
      for a, a_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(out["theirs"][2])):
        np.testing.assert_allclose(a, a_ref, rtol=1e-4, atol=1e-5)
    v["theirs"] = out["theirs"][1]
    for k in ("plain", "warming"):
      for name in ("mean", "var"):
        np.testing.assert_allclose(v[k]["batch_stats"][name], v["theirs"]["batch_stats"][name], rtol=1e-5, atol=1e-6)
  assert int(v["warming"]["batch_stats"]["steps"]) == len(xs)
  # inference with the running statistics, too
  x = xs[-1] * 2 - 1
  np.testing.assert_allclose(
      plain.apply(v["plain"], x, use_running_average=True),
      theirs.apply(v["theirs"], x, use_running_average=True),
      rtol=1e-5,
      atol=1e-5,
  )


def test_module_running_statistics_and_steps_match_numpy_loop():
  """A short schedule, so that bounds, clipping, r and d all change within a few steps."""
  kw = dict(warmup_steps=1, r_max_final=1.5, r_max_steps=3, d_max_final=0.5, d_max_steps=2)
  module = jnn.BatchRenorm(use_running_average=False, momentum=0.7, epsilon=1e-3, **kw)
  xs = _batches(5, seed=11, drift=0.1)
  variables = module.init(jax.random.key(1), xs[0])
  scale, bias = np.array([0.5, 2.0, -1.0]), np.array([0.1, 0.2, 0.3])
  variables = {**variables, "params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
  run = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))

  # the reference loop, in float64 NumPy
  mu, var_ra, t = np.zeros(3), np.ones(3), 0
  seen = np.zeros((2, 2), int)  # (r, d) x (free, clipped), once both bounds are relaxed
  for x in xs:
    r_max = np.interp(t, [0, 1, 3], [1, 1, 1.5])
    d_max = np.interp(t, [0, 1, 2], [0, 0, 0.5])
    y_ref, mean_b, var_b, r_raw, d_raw = np_renorm(x, scale, bias, mu, var_ra, r_max, d_max, eps=1e-3)
    if t >= 2:
      for i, clipped in enumerate(((r_raw < 1 / r_max) | (r_raw > r_max), np.abs(d_raw) > d_max)):
        seen[i] += [(~clipped).sum(), clipped.sum()]
    mu, var_ra, t = 0.7 * mu + 0.3 * mean_b, 0.7 * var_ra + 0.3 * var_b, t + 1

    y, updates = run(variables, x)
    variables = {**variables, **updates}
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    stats = variables["batch_stats"]
    assert stats["steps"].dtype == jnp.int32 and int(stats["steps"]) == t
    np.testing.assert_allclose(stats["mean"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], var_ra, rtol=1e-5, atol=1e-6)
  assert np.all(seen > 0), seen  # r and d each both clipped and free at some point


def test_module_inference_uses_running_statistics_and_updates_nothing():
  x = _batches(1, shape=(5, 3), seed=12)[0]
  module = jnn.BatchRenorm()
  variables = module.init(jax.random.key(2), x, use_running_average=False)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  stats = {"mean": f32([1.0, -2.0, 0.5]), "var": f32([4.0, 0.25, 1.0]), "steps": jnp.int32(7)}
  params = {"scale": f32([0.5, 2.0, -1.0]), "bias": f32([0.1, 0.2, 0.3])}
  variables = {"params": params, "batch_stats": stats}
  f64 = lambda a: np.asarray(a, np.float64)
  expected = (f64(x) - f64(stats["mean"])) / np.sqrt(f64(stats["var"]) + EPS)
  expected = expected * f64(params["scale"]) + f64(params["bias"])
  y, updates = module.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  y_attr = jnn.BatchRenorm(use_running_average=True).apply(variables, x)
  assert y.dtype == y_attr.dtype == jnp.float32
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_attr, expected, rtol=1e-5, atol=1e-5)
  for name in stats:
    np.testing.assert_array_equal(updates["batch_stats"][name], stats[name])


def test_module_step_counter_rules():
  x = _batches(1, seed=13)[0]
  # the counter exists iff a bound is scheduled; init leaves it (and the running statistics) at rest
  for kwargs, has_steps in (({}, True), (dict(r_max=2.0), True), (dict(r_max=2.0, d_max=1.0), False)):
    module = jnn.BatchRenorm(use_running_average=False, **kwargs)
    stats = module.init(jax.random.key(3), x)["batch_stats"]
    assert ("steps" in stats) == has_steps
    if has_steps:
      assert stats["steps"].dtype == jnp.int32 and int(stats["steps"]) == 0
    np.testing.assert_array_equal(stats["mean"], 0)
    np.testing.assert_array_equal(stats["var"], 1)
  module = jnn.BatchRenorm()
  variables = module.init(jax.random.key(3), x, use_running_average=False)
  # training needs batch_stats mutable, as for flax's BatchNorm (which raises the same error)
  flax_bn = nn.BatchNorm()
  flax_vars = flax_bn.init(jax.random.key(3), x, use_running_average=False)
  with pytest.raises(Exception) as theirs:
    flax_bn.apply(flax_vars, x, use_running_average=False)
  with pytest.raises(type(theirs.value)):
    module.apply(variables, x, use_running_average=False)
  # inference leaves the counter; training advances it by one per call
  _, up = module.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  assert int(up["batch_stats"]["steps"]) == 0
  for expected in (1, 2):
    _, up = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **up}
    assert int(variables["batch_stats"]["steps"]) == expected


def test_module_cross_device_under_vmap_equals_global():
  x = _batches(1, shape=(12, 3), seed=14)[0]
  module = jnn.BatchRenorm(use_running_average=False, axis_name="d", r_max=1.5, d_max=0.5)
  variables = module.init(jax.random.key(4), x)
  # running statistics that make r and d matter
  variables = {**variables, "batch_stats": {"mean": jnp.array([1.0, -1.0, 0.0]), "var": jnp.array([4.0, 0.3, 1.0])}}

  def run(x):
    return module.apply(variables, x, mutable=["batch_stats"])

  y, up = jax.jit(jax.vmap(run, axis_name="d"))(x.reshape(4, 3, 3))
  y_global, up_global = jnn.BatchRenorm(use_running_average=False, r_max=1.5, d_max=0.5).apply(
      variables, x, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(y.reshape(12, 3), y_global, rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(up["batch_stats"][name], np.broadcast_to(up_global["batch_stats"][name], (4, 3)), rtol=1e-5)
  y_ref = np_renorm(x, None, None, np.array([1.0, -1.0, 0.0]), np.array([4.0, 0.3, 1.0]), 1.5, 0.5)[0]
  np.testing.assert_allclose(y_global, y_ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 6. Bad input: a clear error naming the argument, at trace time.
# ----------------------------------------------------------------------------------------------

X = np.ones((4, 3), np.float32)
ONES, ZEROS = np.ones(3, np.float32), np.zeros(3, np.float32)


def _br(x, **kw):
  args = dict(scale=ONES, bias=ZEROS, running_mean=ZEROS, running_var=ONES, r_max=3.0, d_max=5.0)
  args.update(kw)
  return jaxnorm.batch_renorm(x, args.pop("scale"), args.pop("bias"), args.pop("running_mean"), args.pop("running_var"), **args)


BAD = [
    ("r_max < 1", dict(r_max=0.5), ValueError, r"`r_max` must be >= 1"),
    ("r_max nan", dict(r_max=float("nan")), ValueError, r"`r_max`"),
    ("r_max array", dict(r_max=np.array([2.0, 3.0])), TypeError, r"`r_max` must be a real scalar"),
    ("r_max None", dict(r_max=None), TypeError, r"`r_max`"),
    ("d_max < 0", dict(d_max=-1.0), ValueError, r"`d_max` must be >= 0"),
    ("d_max concrete array < 0", dict(d_max=jnp.float32(-1.0)), ValueError, r"`d_max` must be >= 0"),
    ("running_mean shape", dict(running_mean=np.zeros(4, np.float32)), ValueError, r"`running_mean` must have shape \(3,\)"),
    ("running_var shape", dict(running_var=np.ones((1, 3), np.float32)), ValueError, r"`running_var` must have shape \(3,\)"),
    ("running_var None", dict(running_var=None), TypeError, r"`running_var` is required"),
    ("running_mean int", dict(running_mean=np.zeros(3, np.int32)), TypeError, r"`running_mean`"),
    ("scale shape", dict(scale=np.ones(4, np.float32)), ValueError, r"`scale`"),
    ("epsilon", dict(epsilon=0.0), ValueError, r"`epsilon`"),
    ("features cover all", dict(feature_axes=(0, 1)), ValueError, r"`feature_axes`"),
    ("where shape", dict(where=np.ones((2, 3), bool)), ValueError, r"`where`"),
]


@pytest.mark.parametrize("name, kw, error, match", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_at_trace_time(name, kw, error, match):
  with pytest.raises(error, match=match):
    _br(jnp.asarray(X), **kw)
  with pytest.raises(error, match=match):
    jax.eval_shape(lambda x: _br(x, **kw), jax.ShapeDtypeStruct(X.shape, X.dtype))


def test_other_bad_input():
  with pytest.raises(TypeError, match=r"`x`"):
    _br(jnp.ones((4, 3), jnp.int32))
  # a traced r_max cannot be range-checked, but must be a scalar
  with pytest.raises(TypeError, match=r"`r_max` must be a real scalar"):
    jax.jit(lambda r: _br(X, r_max=r))(jnp.ones(2))
  schedule_errors = [
      (dict(warmup_steps=-1), ValueError, r"`warmup_steps` must be >= 0"),
      (dict(warmup_steps=10, r_max_steps=5), ValueError, r"`r_max_steps` must be >= warmup_steps=10"),
      (dict(d_max_steps=100), ValueError, r"`d_max_steps` must be >= warmup_steps=5000"),
      (dict(warmup_steps=2.5), TypeError, r"`warmup_steps` must be a Python int"),
      (dict(r_max_final=0.9), ValueError, r"`r_max_final` must be >= 1"),
      (dict(d_max_final=-0.1), ValueError, r"`d_max_final` must be >= 0"),
  ]
  for kw, error, match in schedule_errors:
    with pytest.raises(error, match=match):
      jaxnorm.batch_renorm_schedule(0, **kw)
  with pytest.raises(TypeError, match=r"`step`"):
    jaxnorm.batch_renorm_schedule(jnp.array(True))
  # the module forwards the same checks
  with pytest.raises(ValueError, match=r"`r_max` must be >= 1"):
    jnn.BatchRenorm(use_running_average=False, r_max=0.5, d_max=0.0).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"`r_max_steps`"):
    jnn.BatchRenorm(use_running_average=False, r_max_steps=10).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"`axis`"):
    jnn.BatchRenorm(use_running_average=False, axis=2).init(jax.random.key(0), X)
