"""`SpectralNorm`: a drop-in for `flax.nnx.SpectralNorm` that leaves the wrapped layer's weights alone."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Dtype
from jax import lax

import jaxnorm
from jaxnorm.nnx import _affine, _param_view
from jaxnorm.nnx._running_stats import TrainEvalSwitch


class SpectralNorm(TrainEvalSwitch, nnx.Module):
  r"""Spectral normalization of a wrapped layer's parameters, a drop-in for `flax.nnx.SpectralNorm`.

  Every parameter `w` of `layer_instance` with two or more dimensions is
  replaced, when the layer runs, by :math:`w / \sigma`, :math:`\sigma` the
  largest singular value of `w` viewed as ``(prod(shape[:-1]), shape[-1])``,
  estimated by `n_steps` power-iteration steps from a stored vector `u`
  (Miyato et al., 2018; `jaxnorm.spectral_norm`, flax's arithmetic, `u` and
  `v` constant in the gradient). State, as flax: ``batch_stats``, a dict of
  `nnx.BatchStat` keyed by the parameter's path plus ``'u'`` (shape
  ``(1, N)``, initialized ``normal(stddev=0.01)`` from ``rngs.params()``) and
  plus ``'sigma'`` (shape ``()``). They are updated when `update_stats` is
  True: by default when the module is in training mode, ``model.train()``
  (``use_running_average=False``), and not after ``model.eval()``; an
  explicit `update_stats` at call time takes precedence. Scalars and vectors
  are left unchanged, as is everything when ``n_steps < 1``.

  Constructor and call arguments, defaults and output dtypes are flax's.
  Differences: the wrapped layer's parameters are never overwritten (flax
  0.12 writes ``w / sigma`` into the layer's kernel on every call, so each
  call divides the weight again); the layer runs on a read-only view of its
  parameters and may take extra keyword arguments; the power iteration runs
  in at least float32, and ``u``/``sigma`` keep their dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> rngs = nnx.Rngs(0)
    >>> layer = jnnx.SpectralNorm(nnx.Linear(4, 5, rngs=rngs), rngs=rngs)
    >>> y = layer(jnp.ones((3, 4)), update_stats=True)
    >>> sorted(layer.batch_stats)
    [('kernel', 'sigma'), ('kernel', 'u')]
  """

  def __init__(
      self,
      layer_instance: nnx.Module,
      *,
      n_steps: int = 1,
      epsilon: float = 1e-12,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      error_on_non_matrix: bool = False,
      update_stats: bool = True,
      rngs: nnx.Rngs,
  ):
    self.layer_instance = layer_instance
    self.n_steps = n_steps
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.error_on_non_matrix = error_on_non_matrix
    # As flax: train()/eval() set use_running_average, which is `not update_stats`.
    self.use_running_average = not update_stats
    batch_stats = {}
    for path, param in _param_view.param_paths(layer_instance):
      if not self._normalized(path, param):
        continue
      key = rngs.params()
      batch_stats[path + ("u",)] = nnx.BatchStat(initializers.normal()(key, (1, param.shape[-1]), param_dtype))
      batch_stats[path + ("sigma",)] = nnx.BatchStat(initializers.ones(key, (), param_dtype))
    self.batch_stats = nnx.data(batch_stats)

  def __call__(self, x: jax.Array, update_stats: bool | None = None, **kwargs) -> Any:
    """``layer_instance(x, **kwargs)`` with its matrix parameters divided by their spectral norm.

    Args:
      x: the wrapped layer's input.
      update_stats: store the refined `u` and the new `sigma`; defaults to
        ``not self.use_running_average`` (training mode).
      **kwargs: passed to the wrapped layer.

    Returns:
      The wrapped layer's output.
    """
    if update_stats is None:
      if self.use_running_average is None:
        raise ValueError(
            "No `update_stats` argument was provided to SpectralNorm: pass it to the call or the "
            "constructor, or switch the model with model.train() / model.eval()."
        )
      update_stats = not self.use_running_average

    def normalize(path, param):
      return self._normalize(path, param, update_stats=bool(update_stats))

    return _param_view.call(self.layer_instance, normalize, x, **kwargs)

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view`` (and described by ``nnx.view_info``).

    Args:
      use_running_average: if True, calls leave `u` and `sigma` as stored
        (``update_stats=False``, inference); if False, every call refines and
        stores them (training); None leaves the mode as it is.
    """
    super().set_view(use_running_average)

  def normalized_params(self) -> nnx.State:
    """The wrapped layer's parameters as the layer sees them (with the stored `u`; nothing is updated)."""
    view = _param_view.view(self.layer_instance, lambda p, v: self._normalize(p, v, update_stats=False))
    return nnx.state(view, nnx.Param)

  def _normalized(self, path: tuple, param: nnx.Param) -> bool:
    if param.ndim <= 1 or self.n_steps < 1:
      return False
    if param.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(
          f"SpectralNorm(error_on_non_matrix=True): the wrapped layer's parameter {path} is "
          f"{param.ndim}-D; spectral normalization is defined on matrices."
      )
    return True

  def _normalize(self, path: tuple, param: nnx.Param, *, update_stats: bool) -> jax.Array | None:
    if not self._normalized(path, param):
      return None
    u_path, sigma_path = path + ("u",), path + ("sigma",)
    if u_path not in self.batch_stats or sigma_path not in self.batch_stats:
      raise RuntimeError(
          f"SpectralNorm has no `u`/`sigma` for the parameter {path} of the wrapped layer: its parameters "
          "must not change after the SpectralNorm is constructed."
      )
    u_var, sigma_var = self.batch_stats[u_path], self.batch_stats[sigma_path]
    w = param[...]
    u = u_var[...]
    w_sn, u_new, sigma = jaxnorm.spectral_norm(
        w, u, n_steps=self.n_steps, epsilon=self.epsilon, dtype=_affine.output_dtype(w, u, dtype=self.dtype)
    )
    if update_stats:
      u_var[...] = u_new
      sigma_var[...] = lax.stop_gradient(sigma).astype(sigma_var[...].dtype)
    return w_sn
