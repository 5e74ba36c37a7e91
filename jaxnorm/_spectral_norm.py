r"""Spectral normalization (Miyato et al., 2018): a weight divided by its largest singular value.

A weight `w` of shape `(..., N)` is viewed as the matrix
:math:`K = \mathrm{reshape}(w, (M, N))` with :math:`M = \prod` of the leading
dimensions: a Dense kernel `(in, out)` as it is, a conv kernel
`(kh, kw, in, out)` as `(kh*kw*in, out)`. The layer computes :math:`x K`, so in
the paper's notation the layer's matrix is :math:`W = K^\top` (`N x M`), `u`
has `N` entries (one per output feature) and `v` has `M`. One power-iteration
step, with the safe normalization :math:`\hat a = a\,(\lVert a\rVert^2 + \epsilon)^{-1/2}`:

.. math::
    v \leftarrow \widehat{W^\top u} = \widehat{K u}, \qquad
    u \leftarrow \widehat{W v} = \widehat{K^\top v}, \qquad
    \sigma = u^\top W v = v^\top K u, \qquad
    w_{SN} = w / \sigma .

This is flax's `SpectralNorm` arithmetic (same `u` shape and update order),
so the `u` kept in a flax checkpoint continues here unchanged.

Gradient. As in the paper and in PyTorch, `u` and `v` are held constant: the
power iteration runs on `stop_gradient(K)`, and only :math:`\sigma`'s explicit
dependence on `K` is differentiated. With :math:`\partial\sigma/\partial K = v u^\top`
and :math:`G = \partial L/\partial w_{SN}` (viewed as `M x N`):

.. math::
    \frac{\partial L}{\partial K} = \frac{G}{\sigma} - \frac{\langle G, K\rangle}{\sigma^2}\, v u^\top ,

Miyato et al.'s eq. (12). Plain autodiff of the forward produces exactly this
with one extra matrix-vector product and saves only `K`, `u`, `v` and
:math:`\sigma`, so no custom VJP is needed (and forward mode works).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm import _validation


def _unit(a: jax.Array, epsilon: float) -> jax.Array:
  """`a / ||a||` with epsilon inside the root, so a zero vector stays zero (flax's `_l2_normalize`)."""
  return a * lax.rsqrt(jnp.sum(jnp.square(a)) + epsilon)


def spectral_norm(
    w: jax.Array,
    u: jax.Array,
    *,
    n_steps: int = 1,
    epsilon: float = 1e-12,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Divides `w` by an estimate of its largest singular value, refined by power iteration from `u`.

  .. math::
      v = \frac{K u}{\lVert K u\rVert}, \quad
      u = \frac{K^\top v}{\lVert K^\top v\rVert} \quad (\text{n\_steps times}), \qquad
      \sigma = v^\top K u, \qquad
      w_{SN} = \frac{w}{\sigma}

  with :math:`K` = `w` viewed as `(prod(shape[:-1]), shape[-1])` (this is
  Miyato et al.'s :math:`v = W^\top u/\lVert W^\top u\rVert`,
  :math:`u = W v/\lVert W v\rVert`, :math:`\sigma = u^\top W v` for the layer
  matrix :math:`W = K^\top`). Feed the returned `u` back in at the next call:
  one step per training step then tracks the top singular vector as `w`
  changes. `u` and `v` are held constant in the gradient (stop_gradient), as
  in the paper, flax and PyTorch. A zero `w` gives :math:`\sigma = 0` and is
  returned unchanged (no division by zero). The iteration runs in at least
  float32.

  Args:
    w: floating-point weight of rank >= 1, e.g. a Dense kernel `(in, out)` or a
      conv kernel `(kh, kw, in, out)`; a vector is viewed as `(1, N)`.
    u: the current estimate of the top left singular vector of the layer
      matrix, shape `(N,)` with `N = w.shape[-1]`, or `(1, N)` as
      `flax.linen.SpectralNorm` stores it. Need not be normalized; a random
      normal start is customary.
    n_steps: number of power-iteration steps, an int >= 1.
    epsilon: added to squared norms in the normalizations; must be > 0.
    dtype: dtype of `w_sn`; defaults to `w.dtype`.

  Returns:
    `(w_sn, u, sigma)`: `w_sn` shaped like `w`; the updated unit vector `u`, in
    the shape and dtype given; `sigma`, a scalar in the accumulation dtype
    (at least float32). Neither `u` nor `sigma` carries a gradient wrt `u`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> w = jnp.array([[3., 0.], [0., 1.]])
    >>> w_sn, u, sigma = jaxnorm.spectral_norm(w, jnp.array([1., 1.]), n_steps=20)
    >>> round(float(sigma), 4), w_sn.shape
    (3.0, (2, 2))
  """
  w = _validation.floating_input(w, "w")
  u = _validation.floating_input(u, "u")
  if w.ndim < 1:
    raise ValueError("`w` must have rank >= 1 (a vector or a matrix-like weight), got a scalar.")
  n = w.shape[-1]
  if tuple(u.shape) not in ((n,), (1, n)):
    raise ValueError(
        f"`u` must have shape ({n},) or (1, {n}) (w.shape[-1] = {n} entries), got {tuple(u.shape)}."
    )
  if isinstance(n_steps, bool):
    raise TypeError(f"`n_steps` must be an int >= 1, got {n_steps!r}.")
  try:
    n_steps = operator.index(n_steps)
  except TypeError:
    raise TypeError(f"`n_steps` must be an int >= 1, got {n_steps!r}.") from None
  if n_steps < 1:
    raise ValueError(f"`n_steps` must be >= 1, got {n_steps}.")
  out_dtype = _validation.output_dtype(dtype, w.dtype)
  acc = _validation.accumulation_dtype(w.dtype, u.dtype)
  epsilon = _validation.positive_epsilon(epsilon, acc)
  return _run(w, u, n_steps=n_steps, epsilon=epsilon, acc=acc, out_dtype=out_dtype)


# One compiled program per shape and settings. The power-iteration body used to
# be a closure made anew on every call, and an eagerly run `fori_loop` caches
# its program on the body's identity: every eager call compiled again. Here
# the body is a module-level function and everything it depends on is static,
# so an eager call hits the jit cache; under an enclosing jit it is inlined.
@functools.partial(jax.jit, static_argnames=("n_steps", "epsilon", "acc", "out_dtype"))
def _run(w, u, *, n_steps: int, epsilon: float, acc: np.dtype, out_dtype: np.dtype):
  n = w.shape[-1]
  k = w.reshape(-1, n).astype(acc)
  k_const = lax.stop_gradient(k)
  step = functools.partial(_power_step, k_const, epsilon)
  # fori_loop, not a Python loop: compile time stays flat in n_steps.
  u_new, v_new = lax.fori_loop(
      0, n_steps, step, (lax.stop_gradient(u.reshape(n).astype(acc)), jnp.zeros(k.shape[0], acc))
  )
  sigma = v_new @ k @ u_new
  # sigma >= 0; it is 0 only when K u = 0 (e.g. w = 0), where w is returned as is.
  w_sn = k / jnp.where(sigma != 0, sigma, jnp.ones((), acc))
  return w_sn.reshape(w.shape).astype(out_dtype), u_new.reshape(u.shape).astype(u.dtype), sigma


def _power_step(k, epsilon, _, uv):
  """One power-iteration step on the stopped `k`: `v = unit(K u)`, then `u = unit(K^T v)`."""
  u_i, _ = uv
  v_i = _unit(k @ u_i, epsilon)
  return _unit(v_i @ k, epsilon), v_i
