r"""Internal covariate shift, measured as Santurkar et al. (2018) define it.

For a network of layers :math:`1..k` with weights :math:`W_1..W_k`, a batch
:math:`(x, y)` and one training step from :math:`W^{(t)}` to
:math:`W^{(t+1)}` on that batch, the internal covariate shift of layer
:math:`i` is the change of its gradient caused by the updates of the layers
below it:

.. math::
    G_i = \nabla_{W_i} L\big(W_1^{(t)}, \dots, W_k^{(t)}; x, y\big), \qquad
    G'_i = \nabla_{W_i} L\big(W_1^{(t+1)}, \dots, W_{i-1}^{(t+1)}, W_i^{(t)}, \dots, W_k^{(t)}; x, y\big),

    \mathrm{ICS}_i = \lVert G_i - G'_i \rVert_2, \qquad
    \cos_i = \frac{\langle G_i, G'_i\rangle}{\lVert G_i\rVert\, \lVert G'_i\rVert} .

:math:`G'_i` is what layer :math:`i` would be asked to follow had it waited
for its inputs to settle: if batch norm reduced covariate shift in this
sense, :math:`G'_i` would stay closer to :math:`G_i` (distance small, cosine
near 1) with batch norm than without.

The network is given as a loss over a parameter pytree (flax ``params``)
plus the ordered list of its layers, each one a path prefix into that tree;
the step is given as the updated pytree (from any optimizer), so SGD, Adam
and the rest are measured alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class CovariateShift(NamedTuple):
  r"""What `internal_covariate_shift` returns: per layer, in the order given, arrays of shape `(L,)`.

  ``distance`` :math:`\lVert G_i - G'_i\rVert_2`, ``cosine``
  :math:`\langle G_i, G'_i\rangle / (\lVert G_i\rVert \lVert G'_i\rVert)` and
  ``grad_norm`` :math:`\lVert G_i\rVert_2` (to compare the distance with).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm.analysis import CovariateShift
    >>> ics = CovariateShift(jnp.array([0.0, 0.5]), jnp.array([1.0, 0.9]), jnp.array([2.0, 1.0]))
    >>> (ics.distance / ics.grad_norm).tolist()  # relative shift
    [0.0, 0.5]
  """

  distance: jax.Array
  cosine: jax.Array
  grad_norm: jax.Array


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _prefixes(entry: Any, i: int) -> list[tuple[str, ...]]:
  entries = [entry] if isinstance(entry, str) else list(entry) if isinstance(entry, (tuple, list)) else None
  if not entries or not all(isinstance(e, str) and e for e in entries):
    raise TypeError(
        f"`layers[{i}]` must be a path string such as 'Dense_0' or 'block_1/Dense_0', or a tuple of them; "
        f"got {entry!r}."
    )
  return [tuple(e.strip("/").split("/")) for e in entries]


def layer_assignment(params: Any, layers: Sequence[Any]) -> list[int | None]:
  """For each leaf of `params` (in `jax.tree_util` order), the index of the entry of `layers` it belongs to.

  A leaf belongs to entry `i` when its path (keys joined by ``'/'``) starts
  with one of that entry's prefixes (whole keys: ``'Dense_1'`` does not
  match ``'Dense_10'``); leaves of no entry get None.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxnorm.analysis import layer_assignment
    >>> params = {"Dense_0": {"bias": jnp.zeros(2), "kernel": jnp.zeros((2, 2))}, "scale": jnp.ones(2)}
    >>> layer_assignment(params, ["Dense_0"])
    [0, 0, None]
  """
  if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
    raise TypeError(f"`layers` must be a non-empty sequence of path prefixes, got {layers!r}.")
  prefixes = [_prefixes(entry, i) for i, entry in enumerate(layers)]
  paths = [tuple(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  owners: list[int | None] = []
  used = [False] * len(layers)
  for path in paths:
    hits = [i for i, ps in enumerate(prefixes) if any(path[: len(p)] == p for p in ps)]
    if len(hits) > 1:
      raise ValueError(f"Parameter {'/'.join(path)!r} belongs to several entries of `layers`: {hits}.")
    owners.append(hits[0] if hits else None)
    if hits:
      used[hits[0]] = True
  missing = [layers[i] for i, u in enumerate(used) if not u]
  if missing:
    raise ValueError(
        f"`layers` entries {missing} match no parameter; the parameter paths are {['/'.join(p) for p in paths]}."
    )
  return owners


def internal_covariate_shift(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    updated_params: Any,
    layers: Sequence[Any],
    *,
    weights: str | None = None,
) -> CovariateShift:
  r"""Santurkar et al.'s internal covariate shift of every layer for one training step (module docstring).

  .. math::
      \mathrm{ICS}_i = \lVert G_i - G'_i\rVert_2, \qquad
      G'_i = \nabla_{W_i} L(W_{<i}^{(t+1)}, W_{\ge i}^{(t)}) .

  Costs one gradient of `loss_fn` per layer after the first (layer 1 has no
  layer below it: distance 0, cosine 1). Traceable: wrap the call in
  `jax.jit` (with `loss_fn` built inside), as in the example.

  Args:
    loss_fn: `params -> scalar` loss on one fixed batch (close over the
      batch, and over the ``batch_stats`` of a model with batch norm run in
      training mode, so its statistics are those of this batch).
    params: the parameters :math:`W^{(t)}` before the step.
    updated_params: :math:`W^{(t+1)}`, same tree as `params`, after one
      optimizer step on the same batch.
    layers: the layers from input to output; each entry a path prefix
      (``'Dense_0'``, ``'block_1/Dense_0'``) or a tuple of prefixes (e.g. a
      dense layer and the batch norm after it, ``('Dense_0',
      'BatchNorm_0')``). Parameters of an entry before :math:`i` are the
      updated ones when :math:`G'_i` is taken; parameters of no entry stay
      at :math:`W^{(t)}`.
    weights: if given, :math:`G_i` is the gradient of the leaves of layer
      :math:`i` whose path contains this key (e.g. ``'kernel'``, leaving a
      bias or a batch-norm scale out); else of all its leaves.

  Returns:
    `CovariateShift(distance, cosine, grad_norm)`, each of shape
    `(len(layers),)`, in the loss's dtype.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxnorm.analysis import internal_covariate_shift
    >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(8), nn.tanh, nn.Dense(1)])
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> new = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))
    >>> layers = ["layers_0", "layers_2", "layers_4"]
    >>> ics = jax.jit(lambda p, q: internal_covariate_shift(loss, p, q, layers, weights="kernel"))(params, new)
    >>> ics.distance.shape, float(ics.distance[0]), bool(ics.distance[2] > 0)
    ((3,), 0.0, True)
  """
  if weights is not None and not (isinstance(weights, str) and weights):
    raise TypeError(f"`weights` must be None or a parameter name such as 'kernel', got {weights!r}.")
  owners = layer_assignment(params, layers)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  new_leaves, new_treedef = jax.tree_util.tree_flatten(updated_params)
  if new_treedef != treedef:
    raise ValueError(f"`updated_params` must have the tree structure of `params`; got {new_treedef} and {treedef}.")
  for old, new in zip(leaves, new_leaves):
    if jnp.shape(old) != jnp.shape(new):
      raise ValueError(
          f"`updated_params` leaves must match `params` in shape; got {jnp.shape(new)} and {jnp.shape(old)}."
      )
  paths = [tuple(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  measured = [
      [n for n, owner in enumerate(owners) if owner == i and (weights is None or weights in paths[n])]
      for i in range(len(layers))
  ]
  empty = [layers[i] for i, m in enumerate(measured) if not m]
  if empty:
    raise ValueError(f"`layers` entries {empty} have no parameter named {weights!r} to measure.")

  grad_fn = jax.grad(loss_fn)

  def gradient_of(i, leaf_values):
    g = jax.tree_util.tree_leaves(grad_fn(jax.tree_util.tree_unflatten(treedef, leaf_values)))
    return jnp.concatenate([jnp.ravel(g[n]) for n in measured[i]])

  g_all = jax.tree_util.tree_leaves(grad_fn(params))
  distance, cosine, grad_norm = [], [], []
  for i in range(len(layers)):
    g = jnp.concatenate([jnp.ravel(g_all[n]) for n in measured[i]])
    if i == 0:
      g_shifted = g
    else:
      mixed = [new if owner is not None and owner < i else old for old, new, owner in zip(leaves, new_leaves, owners)]
      g_shifted = gradient_of(i, mixed)
    norm, norm_shifted = jnp.linalg.norm(g), jnp.linalg.norm(g_shifted)
    distance.append(jnp.linalg.norm(g - g_shifted))
    # A zero gradient has no direction: its cosine is reported as 0, never NaN.
    denom = norm * norm_shifted
    cosine.append(jnp.where(denom > 0, jnp.vdot(g, g_shifted) / jnp.where(denom > 0, denom, 1), 0))
    grad_norm.append(norm)
  # Layer 1's G' is G itself: its cosine is exactly 1, not 1 up to rounding.
  cosine[0] = jnp.where(grad_norm[0] > 0, jnp.ones_like(cosine[0]), cosine[0])
  return CovariateShift(jnp.stack(distance), jnp.stack(cosine), jnp.stack(grad_norm))
