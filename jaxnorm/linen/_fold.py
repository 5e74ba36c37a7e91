r"""`fold_batch_norm`: trained BatchNorm layers folded into the Dense/Conv layers before them, for inference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from jaxnorm import _validation

Path = str | Sequence[str]


def fold_batch_norm(
    variables: Mapping[str, Any],
    pairs: Sequence[tuple[Path, Path]],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
) -> dict[str, Any]:
  r"""Folds inference-mode BatchNorm layers into the preceding Dense or Conv layers.

  A layer computing :math:`h = x K + b` (Dense; a Conv is the same per
  output feature) followed by ``BatchNorm(use_running_average=True)`` with
  running statistics :math:`\bar\mu, \bar\sigma^2` and parameters
  :math:`\gamma, \beta` computes, per output feature,

  .. math::
      s = \frac{\gamma}{\sqrt{\bar\sigma^2 + \epsilon}}, \qquad
      K' = K \, s \ \text{(each output feature's column)}, \qquad
      b' = (b - \bar\mu)\, s + \beta ,

  i.e. :math:`x K' + b' = \gamma\,(x K + b - \bar\mu)/\sqrt{\bar\sigma^2 + \epsilon} + \beta`:
  one layer instead of two, with the same outputs (up to rounding). A layer
  without a bias counts as :math:`b = 0` and gets one; a BatchNorm without
  scale or bias counts as :math:`\gamma = 1` or :math:`\beta = 0`.

  Returns new variables for the *folded model*: the same model with those
  BatchNorm layers removed and ``use_bias=True`` on the layers they followed.
  Apply it in inference mode only: in training, batch statistics would be
  needed where nothing is left to compute them (for fine-tuning with fixed
  statistics use `FrozenBatchNorm` instead).

  Shapes: the layer's ``kernel`` ends in the output features (Dense
  ``(in, out)``, Conv ``(k..., in, out)``, also DenseGeneral's
  ``(in..., features...)``); the BatchNorm's statistics and parameters have
  the shape of those trailing axes (``axis=-1`` for Dense and Conv), and so
  does the layer's ``bias``. Works on variables of `jaxnorm.linen.BatchNorm`
  (either running-statistics convention) and `flax.linen.BatchNorm` alike.
  The arithmetic is done in at least float32 (float64 for float64 variables)
  and each result is cast back to the dtype of the value it replaces.

  Args:
    variables: the trained model's variables, ``{'params': ...,
      'batch_stats': ...}``; not modified.
    pairs: ``(layer, batch_norm)`` paths, each an ``'a/b'`` string or a
      tuple of names into the variable trees, e.g.
      ``[("Conv_0", "BatchNorm_0"), ("block/Dense_0", "block/BatchNorm_0")]``.
    epsilon: the BatchNorms' `epsilon` (BatchNorm's default 1e-5), or a
      mapping from BatchNorm path (``'a/b'``) to epsilon, where paths left
      out get 1e-5.

  Returns:
    New variables: each layer's ``kernel`` and ``bias`` replaced, each
    BatchNorm's entries removed from every collection (containers left
    empty are removed too).

  Raises:
    ValueError: a path names no variables, a BatchNorm lacks running
      statistics, the shapes do not line up, or a layer or BatchNorm appears
      in two pairs.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Net(nn.Module):
    ...   fold: bool = False
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.Dense(3, use_bias=self.fold)(x)
    ...     return x if self.fold else jnn.BatchNorm(use_running_average=True)(x)
    >>> x = jax.random.normal(jax.random.key(0), (5, 4))
    >>> variables = Net().init(jax.random.key(1), x)
    >>> variables["batch_stats"]["BatchNorm_0"]["var"] = jnp.array([0.5, 2.0, 4.0])
    >>> folded = jnn.fold_batch_norm(variables, [("Dense_0", "BatchNorm_0")])
    >>> sorted(folded), sorted(folded["params"]["Dense_0"])
    (['params'], ['bias', 'kernel'])
    >>> bool(jnp.allclose(Net(fold=True).apply(folded, x), Net().apply(variables, x), atol=1e-5))
    True
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"`variables` must be a mapping of collections, got {type(variables).__name__}.")
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
    raise TypeError(f"`pairs` must be a sequence of (layer, batch_norm) paths, got {pairs!r}.")
  out = _copy(variables)
  params = out.get("params", {})
  stats = out.get("batch_stats", {})
  parsed, seen = [], set()
  for pair in pairs:
    if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2):
      raise ValueError(f"`pairs`: each entry must be a (layer, batch_norm) pair of paths, got {pair!r}.")
    parsed.append((_split(pair[0]), _split(pair[1])))
    for path in parsed[-1]:
      if path in seen:
        raise ValueError(f"`pairs`: {'/'.join(path)!r} appears twice; each layer and BatchNorm folds once.")
      seen.add(path)
  for layer_path, bn_path in parsed:
    layer = _node(params, layer_path, "params", "layer")
    bn_stats = _node(stats, bn_path, "batch_stats", "BatchNorm")
    bn_params = _node(params, bn_path, "params", "BatchNorm", required=False) or {}
    kernel = layer.get("kernel")
    if kernel is None:
      raise ValueError(f"`pairs`: the layer {'/'.join(layer_path)!r} has no params 'kernel' (a Dense or Conv?).")
    if "mean" not in bn_stats or "var" not in bn_stats:
      raise ValueError(
          f"`pairs`: batch_stats at {'/'.join(bn_path)!r} hold {sorted(bn_stats)}, not a BatchNorm's 'mean' and 'var'."
      )
    kernel = jnp.asarray(kernel)
    mean, var = jnp.asarray(bn_stats["mean"]), jnp.asarray(bn_stats["var"])
    features = tuple(mean.shape)
    bias = layer.get("bias")
    gamma, beta = bn_params.get("scale"), bn_params.get("bias")
    # Every shape that must equal the BatchNorm's feature shape.
    shapes = {"the kernel's trailing axes": tuple(kernel.shape[max(kernel.ndim - len(features), 0) :])}
    for name, a in (("BatchNorm var", var), ("BatchNorm scale", gamma), ("BatchNorm bias", beta), ("layer bias", bias)):
      if a is not None:
        shapes[name] = tuple(jnp.shape(a))
    if len(features) > kernel.ndim or any(s != features for s in shapes.values()):
      raise ValueError(
          f"`pairs`: BatchNorm {'/'.join(bn_path)!r} must normalize the output features of layer "
          f"{'/'.join(layer_path)!r} (axis=-1 after a Dense or Conv): its mean has shape {features}; found "
          + ", ".join(f"{n} {s}" for n, s in shapes.items())
          + "."
      )
    eps = epsilon.get("/".join(bn_path), 1e-5) if isinstance(epsilon, Mapping) else epsilon
    eps = _validation.positive_epsilon(eps)
    dtypes = [a.dtype for a in (kernel, mean, var, *(jnp.asarray(p) for p in (gamma, beta, bias) if p is not None))]
    acc = _validation.accumulation_dtype(*dtypes)
    s = jnp.reciprocal(jnp.sqrt(var.astype(acc) + eps))
    if gamma is not None:
      s = s * jnp.asarray(gamma, acc)
    b = -mean.astype(acc) if bias is None else jnp.asarray(bias, acc) - mean.astype(acc)
    b = b * s
    if beta is not None:
      b = b + jnp.asarray(beta, acc)
    layer["kernel"] = (kernel.astype(acc) * _validation.to_rank(s, kernel.ndim)).astype(kernel.dtype)
    layer["bias"] = b.astype(kernel.dtype if bias is None else jnp.asarray(bias).dtype)
    for collection in out.values():
      _remove(collection, bn_path)
  return {c: tree for c, tree in out.items() if not (isinstance(tree, Mapping) and not tree)}


def _split(path: Path) -> tuple[str, ...]:
  parts = tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)
  if not parts or not all(isinstance(p, str) for p in parts):
    raise ValueError(f"`pairs`: a path must be a non-empty 'a/b' string or a tuple of names, got {path!r}.")
  return parts


def _copy(tree: Any) -> Any:
  """Nested mappings (dicts, FrozenDicts) as new dicts; leaves shared."""
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  return tree


def _node(tree: Any, path: tuple[str, ...], collection: str, what: str, required: bool = True) -> Any:
  node = tree
  for i, part in enumerate(path):
    if not isinstance(node, dict) or part not in node:
      if not required:
        return None
      have = sorted(node) if isinstance(node, dict) else []
      raise ValueError(
          f"`pairs`: no {what} variables at {collection}/{'/'.join(path)}: "
          f"{collection}/{'/'.join(path[:i]) or '(top level)'} holds {have}."
      )
    node = node[part]
  return node


def _remove(tree: Any, path: tuple[str, ...]) -> None:
  """Deletes `path` from nested dicts, then every container it leaves empty."""
  if not isinstance(tree, dict) or path[0] not in tree:
    return
  if len(path) > 1:
    _remove(tree[path[0]], path[1:])
    if not isinstance(tree[path[0]], dict) or tree[path[0]]:
      return
  del tree[path[0]]
