r"""The loss landscape along the gradient, probed as Santurkar et al. (2018) do.

At parameters :math:`\theta` with gradient :math:`g = \nabla L(\theta)` and
learning rate :math:`\lambda`, the probe walks along the gradient with step
sizes :math:`\eta \in [\tfrac12, 4]\,\lambda` (by default
:math:`\eta_k = \lambda \cdot (0.5, 1, 1.5, \dots, 4)`) and records

* **variation of the loss**: :math:`L(\theta - \eta_k g)` for every
  :math:`k` (the paper plots the band between their min and max);
* **gradient predictiveness**:
  :math:`\lVert \nabla L(\theta - \eta_k g) - \nabla L(\theta)\rVert_2`, how
  far the gradient moves over the step (small = the gradient at
  :math:`\theta` predicts the gradient where the step lands);
* **effective** :math:`\beta` **-smoothness**:
  :math:`\max_k \lVert \nabla L(\theta - \eta_k g) - \nabla L(\theta)\rVert
  / \lVert \eta_k g\rVert`, the largest gradient Lipschitz constant seen
  along the step.

For a quadratic :math:`L = \tfrac12 \theta^\top A \theta + b^\top\theta`
these are exact: the gradient change is :math:`\eta \lVert A g\rVert`, and
:math:`\beta = \lVert A g\rVert / \lVert g\rVert \le \lambda_{\max}(A)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Step sizes as multiples of the learning rate, from 1/2 to 4 (the paper's range).
DEFAULT_MULTIPLIERS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


class LandscapeProbe(NamedTuple):
  r"""What `landscape_along_gradient` measured; the `(K,)` arrays are per step size :math:`\eta_k`.

  The paper's variation of the loss is the band ``losses.min()`` to
  ``losses.max()``; its gradient predictiveness the band of
  ``gradient_changes``; ``beta_smoothness`` is
  ``max(gradient_changes / distances)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm.analysis import landscape_along_gradient
    >>> probe = landscape_along_gradient(lambda w: jnp.sum(w ** 2), jnp.ones(3), 0.1, multipliers=[1, 2])
    >>> probe._fields[:4]
    ('step_sizes', 'losses', 'gradient_changes', 'distances')
    >>> [round(v, 4) for v in probe.losses.tolist()]  # 3 (1 - 2 eta)^2 at eta = 0.1, 0.2
    [1.92, 1.08]
  """

  step_sizes: jax.Array  # (K,) eta_k
  losses: jax.Array  # (K,) L(theta - eta_k d)
  gradient_changes: jax.Array  # (K,) ||grad L(theta - eta_k d) - grad L(theta)||
  distances: jax.Array  # (K,) ||eta_k d||
  loss: jax.Array  # () L(theta)
  gradient_norm: jax.Array  # () ||grad L(theta)||
  beta_smoothness: jax.Array  # () max_k gradient_changes / distances


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree)))


def landscape_along_gradient(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    learning_rate: float | jax.Array,
    *,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    direction: Any = None,
) -> LandscapeProbe:
  r"""Variation of the loss, gradient predictiveness and effective :math:`\beta`-smoothness at `params`.

  With :math:`g = \nabla L(\theta)`, :math:`d` = `direction` (default
  :math:`g`) and :math:`\eta_k` = `learning_rate` :math:`\times` `multipliers[k]`:

  .. math::
      \ell_k = L(\theta - \eta_k d), \qquad
      \Delta_k = \lVert \nabla L(\theta - \eta_k d) - g \rVert_2, \qquad
      \beta = \max_k \frac{\Delta_k}{\lVert \eta_k d\rVert_2} .

  One gradient at :math:`\theta` and one per step size (vectorized with
  `jax.vmap`); norms are global over every leaf of the tree. Traceable: call
  it inside `jax.jit`. A zero direction makes every distance 0; :math:`\beta`
  is then reported as 0.

  Args:
    loss_fn: `params -> scalar` loss on one fixed batch (close over the batch
      and, for batch norm in training mode, over the ``batch_stats``).
    params: :math:`\theta`, any pytree of floating arrays.
    learning_rate: :math:`\lambda`, the scale of the step sizes.
    multipliers: the step sizes in units of `learning_rate`; the paper's
      range :math:`[1/2, 4]` by default.
    direction: the step direction :math:`d`, a tree like `params` (e.g. an
      optimizer's update with its sign flipped); None for the gradient.

  Returns:
    `LandscapeProbe(step_sizes, losses, gradient_changes, distances, loss,
    gradient_norm, beta_smoothness)`; the first four of shape
    `(len(multipliers),)`, the rest scalars.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm.analysis import landscape_along_gradient
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * p["w"] ** 2)  # Hessian diag(1, 4)
    >>> probe = jax.jit(lambda p: landscape_along_gradient(loss, p, 0.1))({"w": jnp.array([0.0, 1.0])})
    >>> probe.losses.shape, round(float(probe.beta_smoothness), 4)  # g is an eigenvector: beta = 4
    ((8,), 4.0)
  """
  multipliers = tuple(float(m) for m in multipliers)
  if not multipliers:
    raise ValueError("`multipliers` must hold at least one step size.")
  leaves = jax.tree_util.tree_leaves(params)
  if not leaves or not all(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in leaves):
    raise TypeError("`params` must be a non-empty pytree of floating-point arrays.")
  loss, grad = jax.value_and_grad(loss_fn)(params)
  if direction is None:
    direction = grad
  elif jax.tree_util.tree_structure(direction) != jax.tree_util.tree_structure(params):
    raise ValueError("`direction` must have the tree structure of `params`.")
  dtype = jnp.result_type(*leaves)
  step_sizes = jnp.asarray(learning_rate, dtype) * jnp.asarray(multipliers, dtype)

  def probe(eta):
    moved = jax.tree_util.tree_map(lambda p, d: p - (eta * d).astype(p.dtype), params, direction)
    loss_k, grad_k = jax.value_and_grad(loss_fn)(moved)
    change = _global_norm(jax.tree_util.tree_map(lambda a, b: a - b, grad_k, grad))
    return loss_k, change

  losses, changes = jax.vmap(probe)(step_sizes)
  distances = jnp.abs(step_sizes) * _global_norm(direction)
  positive = distances > 0
  ratios = jnp.where(positive, changes / jnp.where(positive, distances, 1), 0)
  return LandscapeProbe(step_sizes, losses, changes, distances, loss, _global_norm(grad), jnp.max(ratios))
