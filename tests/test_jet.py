"""Taylor-mode forward differentiation (`jax.experimental.jet`) through the plain-autodiff path
(``custom_vjp=False``) and through `moments`: the first two coefficients match nested `jax.jvp`, and
finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import jet

import jaxnorm

RNG = np.random.default_rng(0)
X2 = RNG.normal(size=(4, 6)) * 2 + 1
IMG = RNG.normal(size=(2, 3, 3, 4)) + 0.5
MASK2 = np.ones(X2.shape, bool)
MASK2[0, 0] = False

OPS = {
    "layer_norm": (X2, lambda x: jaxnorm.layer_norm(x, custom_vjp=False)),
    "layer_norm_masked": (X2, lambda x: jaxnorm.layer_norm(x, where=MASK2, custom_vjp=False)),
    "rms_norm": (X2, lambda x: jaxnorm.rms_norm(x, custom_vjp=False)),
    "batch_norm": (X2, lambda x: jaxnorm.batch_norm(x, custom_vjp=False)[0]),
    "group_norm": (IMG, lambda x: jaxnorm.group_norm(x, num_groups=2, custom_vjp=False)),
    # moments has no custom VJP: under jet it leaves out its per-platform choice by itself.
    "moments": (X2, lambda x: jaxnorm.moments(x, 1)[1]),
    "moments_masked": (X2, lambda x: jaxnorm.moments(x, 1, where=MASK2)[1]),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("jit", [False, True])
def test_jet_matches_nested_jvp(name, jit):
  x, f = OPS[name]
  v = np.random.default_rng(1).normal(size=x.shape)
  run = jax.jit(lambda x, v: jet.jet(f, (x,), ((v, jnp.zeros_like(v)),))) if jit else (
      lambda x, v: jet.jet(f, (x,), ((v, jnp.zeros_like(v)),)))
  y0, (y1, y2) = run(x, v)
  first = lambda x: jax.jvp(f, (x,), (v,))[1]
  np.testing.assert_allclose(y0, f(x), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(y1, first(x), rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(y2, jax.jvp(first, (x,), (v,))[1], rtol=1e-8, atol=1e-8)
  # And against central finite differences along v.
  h = 1e-4
  fd2 = (f(x + h * v) - 2 * f(x) + f(x - h * v)) / h**2
  np.testing.assert_allclose(y2, fd2, rtol=1e-4, atol=1e-4)
