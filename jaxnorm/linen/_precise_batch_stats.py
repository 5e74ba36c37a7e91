r"""Precise batch statistics (PreciseBN): exact population statistics of every batch-norm layer.

The running averages of a trained model are an exponential moving average of
batch statistics taken while the weights were still moving, and a mean of
batch variances besides. With the weights fixed, a few passes over data give
the exact statistics instead: each layer's input, collected in training mode
over many batches, pooled with Chan's merge of per-batch ``(count, mean, M2)``

.. math::
    n = n_A + n_B, \quad \delta = \mu_B - \mu_A, \quad
    \mu = \mu_A + \delta \tfrac{n_B}{n}, \quad
    M_2 = M_{2,A} + M_{2,B} + \delta^2 \tfrac{n_A n_B}{n},

which is exact for any batch sizes and masks (the variance of the
concatenated data, between-batch differences included), where an average of
per-batch variances misses the spread of the batch means.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm import _moments, _validation
from jaxnorm.linen._batch_norm import BatchNorm
from jaxnorm.linen._batch_renorm import BatchRenorm
from jaxnorm.linen._ghost_batch_norm import GhostBatchNorm
from jaxnorm.linen._weight_norm import MeanOnlyBatchNorm

# The layers whose ``batch_stats`` hold a running mean (and variance) of their input over every axis but `axis`.
BATCH_STATISTICS_LAYERS = (BatchNorm, BatchRenorm, GhostBatchNorm, MeanOnlyBatchNorm, nn.BatchNorm)


def precise_batch_stats(
    model: nn.Module | Callable[[Mapping[str, Any], Any], Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    axis_name: Any = None,
    **apply_kwargs: Any,
) -> dict[str, Any]:
  r"""Recomputes the running statistics of every batch-norm layer as exact population statistics.

  The model runs in *training* mode over `batches` with its parameters fixed
  (as in training, and as fvcore's PreciseBN does: each layer sees inputs
  normalized upstream with batch statistics). For every call of a
  `BatchNorm`, `BatchRenorm`, `GhostBatchNorm`, `MeanOnlyBatchNorm` (jaxnorm)
  or `flax.linen.BatchNorm` layer, the count, mean and sum of squared
  deviations :math:`M_2` of its input over every axis but `axis` (the
  positions its `mask` selects) are merged across all batches and calls with
  Chan's formula, so the result is the mean and variance of the layer's
  input over the concatenation of all batches:

  .. math::
      \bar\mu = \frac{1}{n} \sum_i x_i, \qquad
      \bar\sigma^2 = \frac{M_2}{n} = \frac{1}{n} \sum_i (x_i - \bar\mu)^2

  (:math:`M_2 / (n - 1)`, the unbiased variance, for layers with
  ``convention="torch"``). A layer called several times per batch (shared
  weights) pools all its calls. `GhostBatchNorm` gets the statistics of the
  whole population, not per virtual batch. Features no valid value reached
  keep their running statistics, and so do layers the batches never reach,
  layers with ``track_running_stats=False`` (which have none) and counters
  (``num_batches_tracked``, ``steps``).

  Args:
    model: a linen module, run as ``model.apply(variables, batch,
      mutable=["batch_stats"], **apply_kwargs)``; or a function
      ``apply_fn(variables, batch)`` that runs the model in training mode
      with ``batch_stats`` mutable (e.g. ``lambda v, b: model.apply(v, *b,
      train=True, mutable=["batch_stats"])``, for a batch of several
      arguments). It must not be jitted already (its layers are observed
      while it is traced); this function jits each step itself.
    variables: the model's variables, with ``batch_stats``.
    batches: an iterable of batches, each passed as one argument (any pytree).
    num_batches: use at most this many batches (fvcore's ``num_iters``);
      None: all of them.
    axis_name: the mapped axis name (or tuple of names) that the model's
      layers merge statistics over (their `axis_name`), if any. Each batch is
      then run as the only device of that axis; pass whole (global) batches.
    **apply_kwargs: passed to ``model.apply`` when `model` is a module, e.g.
      ``train=True`` or ``use_running_average=False``: whatever puts the
      model's batch-norm layers in training mode.

  Returns:
    New ``batch_stats``: `variables["batch_stats"]` with the ``mean`` and
    ``var`` of every layer reached replaced, in their stored dtypes. Use as
    ``variables = {**variables, "batch_stats": new}``.

  Raises:
    ValueError: if `variables` has no ``batch_stats``, `batches` is empty, no
      batch-norm layer ran (or only in inference mode, where its input is
      normalized with running statistics upstream: pass the flag that selects
      training mode), or a layer's path is missing from ``batch_stats``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.Dense(4)(x)
    ...     return jnn.BatchNorm(use_running_average=not train)(x)
    >>> batches = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(4)]
    >>> variables = Net().init(jax.random.key(0), batches[0], train=False)
    >>> stats = jnn.precise_batch_stats(Net(), variables, batches, train=True)
    >>> jax.tree_util.tree_map(jnp.shape, stats)
    {'BatchNorm_0': {'mean': (4,), 'var': (4,)}}
  """
  if "batch_stats" not in variables:
    raise ValueError(
        "`variables` has no 'batch_stats' collection: pass the variables `init` returned (params and batch_stats)."
    )
  if isinstance(model, nn.Module):
    if "mutable" in apply_kwargs:
      raise ValueError("`mutable` is set by precise_batch_stats (to ['batch_stats']); do not pass it.")

    def apply_fn(v, batch):
      return model.apply(v, batch, mutable=["batch_stats"], **apply_kwargs)

  elif callable(model):
    if apply_kwargs:
      raise TypeError(
          f"keyword arguments {sorted(apply_kwargs)} are passed to `model.apply` only when `model` is a "
          "linen Module; with an apply function, bind them in the function."
      )
    apply_fn = model
  else:
    raise TypeError(f"`model` must be a flax.linen Module or a function (variables, batch), got {model!r}.")
  if num_batches is not None:
    if not isinstance(num_batches, int) or num_batches < 1:
      raise ValueError(f"`num_batches` must be a positive int or None, got {num_batches!r}.")
    batches = itertools.islice(batches, num_batches)

  layers: dict[str, _Layer] = {}  # filled while the step is traced: static facts about each layer

  def step(v, batch):
    captured: dict[str, list] = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if context.method_name == "__call__" and isinstance(module, BATCH_STATISTICS_LAYERS):
        layer = _Layer.of(module, args, kwargs)
        if layer is not None:
          layers[layer.key] = layer
          captured.setdefault(layer.key, []).append(layer.moments(args, kwargs))
      return out

    with nn.intercept_methods(interceptor):
      apply_fn(v, batch)
    # Several calls of one layer in a batch are pooled here.
    merged = {}
    for key, stats in captured.items():
      acc = stats[0]
      for s in stats[1:]:
        acc = _chan_merge(acc, s)
      merged[key] = acc
    return merged

  if axis_name is not None:
    step = _as_only_device(step, axis_name)
  step = jax.jit(step)
  merge = jax.jit(lambda a, b: {k: _chan_merge(a[k], b[k]) if k in a else b[k] for k in b} | {
      k: a[k] for k in a if k not in b
  })

  total = None
  seen = 0
  for batch in batches:
    per_batch = step(variables, batch)
    total = per_batch if total is None else merge(total, per_batch)
    seen += 1
  if seen == 0:
    raise ValueError("`batches` yielded no batch: precise statistics need at least one.")
  if not total:
    raise ValueError(
        "No batch-norm layer ran in training mode while the model was applied, so there is nothing to "
        "recompute. Pass the flag that puts the model in training mode (e.g. `train=True` or "
        "`use_running_average=False`), and an apply function that is not already jitted."
    )
  return _replace_statistics(variables["batch_stats"], total, layers)


class _Layer:
  """Static facts about one batch-statistics layer call: where its statistics live and how they are kept."""

  def __init__(self, key, path, axis, convention, has_var):
    self.key, self.path, self.axis, self.convention, self.has_var = key, path, axis, convention, has_var

  @staticmethod
  def of(module: nn.Module, args: tuple, kwargs: dict) -> _Layer | None:
    if not getattr(module, "track_running_stats", True):
      return None  # nothing to recompute: the layer keeps no running statistics
    call_flag = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    use_running_average = module.use_running_average if call_flag is None else call_flag
    path = tuple(module.scope.path)
    if use_running_average:
      raise ValueError(
          f"{type(module).__name__} at '{'/'.join(path)}' ran in inference mode (use_running_average=True). "
          "Precise statistics are those of each layer's input in training mode: pass the flag that "
          "selects training mode (e.g. `train=True` or `use_running_average=False`)."
      )
    convention = getattr(module, "convention", "flax")
    return _Layer("/".join(path), path, module.axis, convention, not isinstance(module, MeanOnlyBatchNorm))

  def moments(self, args: tuple, kwargs: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(count, mean, M2) of the layer's input over every axis but `axis`, shaped like the features."""
    x = _validation.floating_input(args[0] if args else kwargs["x"])
    features = _validation.canonical_axes(self.axis, x.ndim, "axis")
    reduced = tuple(a for a in range(x.ndim) if a not in features)
    mask = _validation.broadcast_mask(kwargs.get("mask"), x.shape, "mask")
    # At least float32 (float64 under jax_enable_x64), so that pooling many batches loses nothing.
    acc = _validation.accumulation_dtype(x.dtype, jax.dtypes.canonicalize_dtype(jnp.float64))
    stats = _moments.compute(x.astype(acc), reduced, mask, centered=True)
    count, mean, var = (jnp.squeeze(a, reduced) for a in (stats.count, stats.mean, stats.var))
    return count, mean, var * count


def _chan_merge(a, b):
  """Chan et al.'s exact merge of two (count, mean, M2) summaries; empty summaries are neutral."""
  n_a, mean_a, m2_a = a
  n_b, mean_b, m2_b = b
  n = n_a + n_b
  safe = jnp.maximum(n, 1)
  delta = mean_b - mean_a
  mean = mean_a + delta * (n_b / safe)
  m2 = m2_a + m2_b + jnp.square(delta) * (n_a * n_b / safe)
  return n, mean, m2


def _as_only_device(step, axis_name):
  """Runs `step` as the single device of each mapped axis in `axis_name`, so that its collectives are bound."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  for name in reversed(names):
    step = _vmap_single(step, name)
  return step


def _vmap_single(step, name):
  mapped = jax.vmap(step, in_axes=(None, 0), axis_name=name)

  def run(v, batch):
    out = mapped(v, jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], batch))
    return jax.tree_util.tree_map(lambda a: a[0], out)

  return run


def _replace_statistics(batch_stats: Mapping[str, Any], total: dict, layers: dict) -> dict[str, Any]:
  new = jax.tree_util.tree_map(lambda a: a, _to_dict(batch_stats))
  for key, (count, mean, m2) in total.items():
    layer = layers[key]
    node = new
    for name in layer.path:
      if not isinstance(node, dict) or name not in node:
        raise ValueError(f"The layer at '{key}' has no entry in `variables['batch_stats']`.")
      node = node[name]
    if "mean" not in node:
      raise ValueError(f"The layer at '{key}' has no running mean in `variables['batch_stats']`.")
    valid = count > 0
    node["mean"] = jnp.where(valid, mean.astype(node["mean"].dtype), node["mean"])
    if layer.has_var:
      denominator = count - 1 if layer.convention == "torch" else count
      var = jnp.where(denominator > 0, m2 / jnp.maximum(denominator, 1), 0)
      node["var"] = jnp.where(valid, var.astype(node["var"].dtype), node["var"])
  return new


def _to_dict(tree: Any) -> Any:
  """A plain nested dict copy (FrozenDicts from older flax code included)."""
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree
