"""Zero-centred and call-time (per-example, per-position, per-head) scale and shift, and axis_name on the row norms.

Each case is checked against float64 autodiff of the plain formula, on the
CPU program and on the GPU/TPU one (`_platform.force("tpu")`): values, and
gradients wrt `x`, `scale` and `bias` in the parameters' own shapes.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import _platform

R = np.random.default_rng(0)
X3 = (R.normal(size=(4, 6, 16)) * 3 + 1).astype(np.float32)
P3 = R.normal(size=(4, 1, 16)).astype(np.float32)
X4 = R.normal(size=(8, 4, 4, 6)).astype(np.float32)
P4 = R.normal(size=(8, 1, 1, 6)).astype(np.float32)
Q = R.normal(size=(2, 5, 3, 8)).astype(np.float32)
HEAD = R.normal(size=(3, 8)).astype(np.float32)


def reference(x, s, b, axes, centered, offset, eps, groups=None):
  """The textbook formula in float64 (group norm on a (..., G, C // G) view)."""
  if groups:
    xs = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    red = tuple(axes) + (x.ndim,)
    m = xs.mean(red, keepdims=True)
    v = jnp.square(xs - m).mean(red, keepdims=True)
    xh = ((xs - m) / jnp.sqrt(v + eps)).reshape(x.shape)
  else:
    m = x.mean(axes, keepdims=True) if centered else jnp.zeros((), x.dtype)
    xh = (x - m) / jnp.sqrt(jnp.square(x - m).mean(axes, keepdims=True) + eps)
  y = xh if s is None else xh * jnp.broadcast_to(offset + s, x.shape)
  return y if b is None else y + jnp.broadcast_to(b, x.shape)


CASES = {
    "layer_norm adaLN (B, 1, C)": (
        lambda x, s, b: jaxnorm.layer_norm(x, s, b, scale_offset=1.0),
        lambda x, s, b: reference(x, s, b, (2,), True, 1.0, 1e-6), (X3, P3, 2 * P3)),
    "layer_norm zero-centred (C,)": (
        lambda x, s, b: jaxnorm.layer_norm(x, s, b, scale_offset=1.0),
        lambda x, s, b: reference(x, s, b, (2,), True, 1.0, 1e-6), (X3, P3[0, 0], P3[1, 0])),
    "rms_norm zero-centred (C,)": (
        lambda x, s: jaxnorm.rms_norm(x, s, scale_offset=1.0),
        lambda x, s: reference(x, s, None, (2,), False, 1.0, 1e-6), (X3, P3[0, 0])),
    "rms_norm QK-norm (H, D)": (
        lambda x, s: jaxnorm.rms_norm(x, s),
        lambda x, s: reference(x, s, None, (3,), False, 0.0, 1e-6), (Q, HEAD)),
    "batch_norm conditional (N, 1, 1, C)": (
        lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
        lambda x, s, b: reference(x, s, b, (0, 1, 2), True, 0.0, 1e-5), (X4, P4, 2 * P4)),
    "group_norm UNet scale-shift (N, 1, 1, C)": (
        lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=3, scale_offset=1.0),
        lambda x, s, b: reference(x, s, b, (1, 2), True, 1.0, 1e-6, 3), (X4, P4, 2 * P4)),
    "group_norm per position (1, H, W, C)": (
        lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=3),
        lambda x, s, b: reference(x, s, b, (1, 2), True, 0.0, 1e-6, 3),
        (X4, R.normal(size=(1, 4, 4, 6)).astype(np.float32), P4)),
    "instance_norm (N, 1, 1, C)": (
        lambda x, s, b: jaxnorm.instance_norm(x, s, b, scale_offset=1.0),
        lambda x, s, b: reference(x, s, b, (1, 2), True, 1.0, 1e-6), (X4, P4, 2 * P4)),
}


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_against_float64_autodiff(name, platform):
  f, ref, args = CASES[name]
  with _platform.force(platform) if platform != "cpu" else contextlib.nullcontext():
    y, vjp = jax.vjp(f, *args)
    ct = R.normal(size=y.shape).astype(np.float32)
    grads = vjp(ct)
  args64 = [a.astype(np.float64) for a in args]
  y64, vjp64 = jax.vjp(ref, *args64)
  np.testing.assert_allclose(y, y64, atol=1e-5, rtol=1e-5)
  for g, g64, a in zip(grads, vjp64(ct.astype(np.float64)), args):
    assert g.shape == a.shape
    np.testing.assert_allclose(g, g64, atol=5e-5 * max(1.0, float(np.abs(g64).max())), rtol=1e-4)


def test_offset_added_in_the_accumulation_dtype():
  # bfloat16 cannot hold 1 + 0.01 to 3 digits; the kernel adds the offset in float32.
  x = jnp.asarray(R.normal(size=(2, 64)), jnp.float32)
  s = jnp.full((64,), 0.01, jnp.bfloat16)
  y = jaxnorm.layer_norm(x, s, scale_offset=1.0, dtype=jnp.float32)
  ref = reference(x.astype(jnp.float64), s.astype(jnp.float64), None, (1,), True, 1.0, 1e-6)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_second_order():
  f = lambda x, s: jnp.sum(jnp.sin(jaxnorm.layer_norm(x, s, scale_offset=1.0)))
  r = lambda x, s: jnp.sum(jnp.sin(reference(x, s, None, (2,), True, 1.0, 1e-6)))
  x, s = X3[:2].astype(np.float64), P3[:2].astype(np.float64)
  h = jax.hessian(f, argnums=1)(x, s)
  np.testing.assert_allclose(h, jax.hessian(r, argnums=1)(x, s), atol=1e-8)


def test_axis_name_on_a_split_feature_axis():
  # The hidden axis split in 4 chunks, mapped by vmap: exact against the whole row.
  x, s = X3.astype(np.float64), P3[0, 0].astype(np.float64)
  where = R.random(size=X3.shape) > 0.3

  def split(a):
    return jnp.moveaxis(a.reshape(*a.shape[:-1], 4, a.shape[-1] // 4), -2, 0)

  for op, centered in ((jaxnorm.layer_norm, True), (jaxnorm.rms_norm, False)):
    whole = lambda x, s: op(x, s, where=where)
    parts = jax.vmap(lambda x, s, w: op(x, s, where=w, axis_name="d"), axis_name="d")
    y = parts(split(x), s.reshape(4, 4), split(where))
    np.testing.assert_allclose(y, split(whole(x, s)), atol=1e-12)
    ct = R.normal(size=x.shape)
    gx, gs = jax.vjp(lambda x, s: parts(split(x), s.reshape(4, 4), split(where)), x, s)[1](split(ct))
    rx, rs = jax.vjp(whole, x, s)[1](ct)
    np.testing.assert_allclose(gx, rx, atol=1e-12)
    np.testing.assert_allclose(gs, rs, atol=1e-12)


def test_errors_name_both_readings():
  with pytest.raises(ValueError, match=r"shape \(16,\).*broadcast to its shape \(4, 6, 16\).*got \(5,\)"):
    jaxnorm.layer_norm(X3, jnp.ones(5))
  with pytest.raises(ValueError, match="broadcast to its shape"):
    jaxnorm.group_norm(X4, jnp.ones((8, 2, 1, 6)), num_groups=3)
  with pytest.raises(ValueError, match="`scale` is None"):
    jaxnorm.layer_norm(X3, None, scale_offset=1.0)
  with pytest.raises(TypeError, match="scale_offset"):
    jaxnorm.rms_norm(X3, P3[0, 0], scale_offset="1")
