r"""The batch-norm backward pass derived by hand, node by node, and the same gradients by autodiff.

Training-mode batch normalization of a batch `x` of shape `(m, C)`, per
feature over the `m` examples (Ioffe & Szegedy, 2015, Algorithm 1):

.. math::
    \mu = \frac1m \sum_i x_i, \quad
    \sigma^2 = \frac1m \sum_i (x_i - \mu)^2, \quad
    \hat x_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad
    y_i = \gamma \hat x_i + \beta .

Given the upstream gradient :math:`g_i = \partial L/\partial y_i`, the chain
rule along the graph :math:`x \to (\mu, \sigma^2) \to \hat x \to y` gives, per
feature (sums over the batch index):

.. math::
    \frac{\partial L}{\partial \gamma} &= \sum_i g_i \hat x_i, \qquad
    \frac{\partial L}{\partial \beta} = \sum_i g_i, \qquad
    \frac{\partial L}{\partial \hat x_i} = g_i \gamma, \\
    \frac{\partial L}{\partial \sigma^2} &= \sum_i \frac{\partial L}{\partial \hat x_i}
        (x_i - \mu) \cdot \Big(-\frac12\Big) (\sigma^2 + \epsilon)^{-3/2}, \\
    \frac{\partial L}{\partial \mu} &= \sum_i \frac{\partial L}{\partial \hat x_i}
        \frac{-1}{\sqrt{\sigma^2 + \epsilon}}
        + \frac{\partial L}{\partial \sigma^2} \frac{\sum_i -2 (x_i - \mu)}{m}, \\
    \frac{\partial L}{\partial x_i} &= \frac{\partial L}{\partial \hat x_i}
        \frac{1}{\sqrt{\sigma^2 + \epsilon}}
        + \frac{\partial L}{\partial \sigma^2} \frac{2 (x_i - \mu)}{m}
        + \frac{\partial L}{\partial \mu} \frac1m .

Here :math:`\partial L/\partial \sigma^2` is the partial derivative with
:math:`x` and :math:`\mu` held fixed, and :math:`\partial L/\partial \mu` counts
both paths from :math:`\mu` to the loss: through :math:`\hat x` directly and
through :math:`\sigma^2`.

`batch_norm_backward_steps` evaluates these lines one by one in NumPy;
`batch_norm_backward_autodiff` gets every one of them from `jax.grad` of the
textbook forward, so that each hand-derived node can be checked, not only the
final `dx`. Two derivations this project grew from go wrong in ways the first
function can reproduce (`typos`, `variance`):

* ``"dmu_gamma_over_mu"``: the first term of :math:`\partial L/\partial \mu`
  written as :math:`-\frac{\gamma}{\mu} \sum_i g_i` where
  :math:`-\frac{\gamma}{\sqrt{\sigma^2+\epsilon}} \sum_i g_i` belongs;
* ``"dxhat_dx_one_over_m"``: the direct term of :math:`\partial L/\partial x_i`
  written as :math:`\frac{\partial L}{\partial \hat x_i} \frac1m` where
  :math:`\frac{1}{\sqrt{\sigma^2+\epsilon}}` belongs;
* ``variance="naive"``: :math:`\sigma^2 = \frac1m\sum_i x_i^2 - \mu^2`, exact in
  real numbers but catastrophically cancelling in floating point once
  :math:`|\mu| \gg \sigma` (see `variance_cancellation`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The two slips of the hand derivations, by the term they get wrong.
SEED_TYPOS = ("dmu_gamma_over_mu", "dxhat_dx_one_over_m")
VARIANCES = ("two_pass", "naive")


class BatchNormBackward(NamedTuple):
  """Every node of the batch-norm graph and the loss gradient at it, as NumPy arrays.

  Forward: `mean`, `var` `(C,)`; `xhat`, `y` `(m, C)`. Backward (gradients of
  the loss): `dgamma`, `dbeta`, `dvar`, `dmu` `(C,)`; `dxhat`, `dx` `(m, C)`.

  Example:
    >>> import numpy as np
    >>> from jaxnorm.analysis import batch_norm_backward_steps
    >>> steps = batch_norm_backward_steps(np.array([[0.], [2.]]), np.ones(1), np.zeros(1), np.ones((2, 1)))
    >>> steps.mean, steps.dbeta, steps.dx.shape
    (array([1.]), array([2.]), (2, 1))
  """

  mean: np.ndarray
  var: np.ndarray
  xhat: np.ndarray
  y: np.ndarray
  dgamma: np.ndarray
  dbeta: np.ndarray
  dxhat: np.ndarray
  dvar: np.ndarray
  dmu: np.ndarray
  dx: np.ndarray


def _check(x: Any, gamma: Any, beta: Any, dy: Any, epsilon: float, module: Any):
  x = module.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"`x` must be a 2-D floating-point array (m, C), got shape {x.shape} and dtype {x.dtype}.")
  c = x.shape[1]
  out = [x]
  for name, a, shape in (("gamma", gamma, (c,)), ("beta", beta, (c,)), ("dy", dy, x.shape)):
    a = module.asarray(a, dtype=x.dtype)
    if a.shape != shape:
      raise ValueError(f"`{name}` must have shape {shape} for `x` of shape {x.shape}, got {a.shape}.")
    out.append(a)
  if not epsilon > 0:
    raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")
  return out


def batch_norm_backward_steps(
    x: Any,
    gamma: Any,
    beta: Any,
    dy: Any,
    *,
    epsilon: float = 1e-5,
    variance: str = "two_pass",
    typos: Collection[str] = (),
) -> BatchNormBackward:
  r"""The batch-norm forward and its hand-derived backward, one formula per line, in NumPy.

  Evaluates the formulas of the module docstring in the dtype of `x` (float32
  input: float32 arithmetic throughout, as a hand-written kernel would do).

  Args:
    x: the batch `(m, C)`; statistics per column.
    gamma, beta: `(C,)`.
    dy: the upstream gradient :math:`\partial L/\partial y`, `(m, C)`.
    epsilon: added to the variance, > 0.
    variance: ``"two_pass"`` (mean of squared deviations) or ``"naive"``
      (:math:`E[x^2] - E[x]^2`).
    typos: any of `SEED_TYPOS`, to reproduce a wrong derivation.

  Returns:
    a `BatchNormBackward` of NumPy arrays in the dtype of `x`.

  Example:
    >>> import numpy as np
    >>> from jaxnorm.analysis import batch_norm_backward_steps
    >>> x = np.array([[1.], [2.], [6.]])
    >>> steps = batch_norm_backward_steps(x, np.ones(1), np.zeros(1), np.array([[1.], [0.], [0.]]))
    >>> steps.mean, steps.var
    (array([3.]), array([4.66666667]))
    >>> bool(abs(steps.dx.sum()) < 1e-12)  # a shift of x cannot change y, so dx sums to 0
    True
  """
  x, gamma, beta, dy = _check(x, gamma, beta, dy, epsilon, np)
  if variance not in VARIANCES:
    raise ValueError(f"`variance` must be one of {VARIANCES}, got {variance!r}.")
  unknown = set(typos) - set(SEED_TYPOS)
  if unknown:
    raise ValueError(f"`typos` must be among {SEED_TYPOS}, got {sorted(unknown)}.")
  m = x.shape[0]
  eps = x.dtype.type(epsilon)

  # forward
  mu = np.mean(x, axis=0)
  if variance == "two_pass":
    var = np.mean((x - mu) ** 2, axis=0)
  else:
    var = np.mean(x**2, axis=0) - mu**2
  inv_std = 1 / np.sqrt(var + eps)
  xhat = (x - mu) * inv_std
  y = gamma * xhat + beta

  # backward, from the output to the input
  dbeta = np.sum(dy, axis=0)
  dgamma = np.sum(dy * xhat, axis=0)
  dxhat = dy * gamma
  dvar = np.sum(dxhat * (x - mu), axis=0) * (-0.5) * (var + eps) ** -1.5
  first = -np.sum(dxhat, axis=0) / (mu if "dmu_gamma_over_mu" in typos else np.sqrt(var + eps))
  dmu = first + dvar * np.sum(-2 * (x - mu), axis=0) / m
  direct = dxhat / m if "dxhat_dx_one_over_m" in typos else dxhat * inv_std
  dx = direct + dvar * 2 * (x - mu) / m + dmu / m
  return BatchNormBackward(mu, var, xhat, y, dgamma, dbeta, dxhat, dvar, dmu, dx)


def batch_norm_backward_autodiff(x: Any, gamma: Any, beta: Any, dy: Any, *, epsilon: float = 1e-5) -> BatchNormBackward:
  r"""Every node's gradient of the loss :math:`L = \sum_i g_i y_i` by `jax.grad` of the textbook forward.

  Each node is made an explicit input of a function and differentiated:
  :math:`\partial L/\partial\hat x` of :math:`\hat x \mapsto L(\gamma\hat x + \beta)`;
  :math:`\partial L/\partial\sigma^2` of :math:`v \mapsto L(x, \mu, v)` (`x`
  and :math:`\mu` fixed); :math:`\partial L/\partial\mu` of
  :math:`u \mapsto L(x, u, \frac1m\sum_i (x_i-u)^2)` (both paths); `dx`,
  `dgamma`, `dbeta` of the whole forward. Computed in the dtype of `x` (use
  float64, with `jax_enable_x64`, for a reference).

  Args:
    x: the batch `(m, C)`.
    gamma, beta: `(C,)`.
    dy: the upstream gradient `(m, C)`.
    epsilon: added to the variance, > 0.

  Returns:
    a `BatchNormBackward` of NumPy arrays.

  Example:
    >>> import numpy as np
    >>> from jaxnorm.analysis import batch_norm_backward_autodiff, batch_norm_backward_steps
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((8, 3)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    >>> auto = batch_norm_backward_autodiff(x, np.ones(3), np.zeros(3), dy)
    >>> hand = batch_norm_backward_steps(x, np.ones(3), np.zeros(3), dy)
    >>> bool(np.allclose(auto.dmu, hand.dmu, atol=1e-5) and np.allclose(auto.dx, hand.dx, atol=1e-5))
    True
  """
  x, gamma, beta, dy = _check(x, gamma, beta, dy, epsilon, jnp)
  return BatchNormBackward(*(np.asarray(a) for a in _autodiff(x, gamma, beta, dy, float(epsilon))))


# One compiled program: run op by op, the many small gradients would each be compiled separately.
@functools.partial(jax.jit, static_argnums=4)
def _autodiff(x, gamma, beta, dy, epsilon):
  def loss_of_y(y):
    return jnp.sum(dy * y)

  def from_stats(x, mu, var, gamma, beta):
    return loss_of_y(gamma[None] * (x - mu[None]) / jnp.sqrt(var + epsilon)[None] + beta[None])

  def variance(x, mu):
    return jnp.mean((x - mu[None]) ** 2, axis=0)

  def full(x, gamma, beta):
    mu = jnp.mean(x, axis=0)
    return from_stats(x, mu, variance(x, mu), gamma, beta)

  mu = jnp.mean(x, axis=0)
  var = variance(x, mu)
  xhat = (x - mu[None]) / jnp.sqrt(var + epsilon)[None]
  dx, dgamma, dbeta = jax.grad(full, argnums=(0, 1, 2))(x, gamma, beta)
  dxhat = jax.grad(lambda xh: loss_of_y(gamma[None] * xh + beta[None]))(xhat)
  dvar = jax.grad(lambda v: from_stats(x, mu, v, gamma, beta))(var)
  dmu = jax.grad(lambda u: from_stats(x, u, variance(x, u), gamma, beta))(mu)
  return (mu, var, xhat, gamma[None] * xhat + beta[None], dgamma, dbeta, dxhat, dvar, dmu, dx)
