"""`SpectralNorm`: a drop-in for `flax.linen.SpectralNorm` on `jaxnorm.spectral_norm`."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxnorm import _validation
from flax.typing import Dtype

import jaxnorm
from jaxnorm.linen._weight_norm import map_params


class SpectralNorm(nn.Module):
  r"""Spectral normalization of a wrapped layer's parameters, a drop-in for `flax.linen.SpectralNorm`.

  Every parameter `w` of `layer_instance` with two or more dimensions is
  replaced, when the layer runs, by :math:`w / \sigma`, :math:`\sigma` the
  largest singular value of `w` viewed as `(prod(shape[:-1]), shape[-1])`,
  estimated by `n_steps` power-iteration steps from a stored vector `u`
  (Miyato et al., 2018; see `jaxnorm.spectral_norm`). `u` (shape `(1, N)`)
  and the last :math:`\sigma` (shape `()`) live in `collection_name`
  (``batch_stats``) as ``'<layer name>/<path>/u'`` and ``'.../sigma'``, and are
  written back when ``update_stats=True`` (pass ``mutable=['batch_stats']``).
  `u` and `v` are constants in the gradient. Scalars and vectors are left
  unchanged, as is everything when ``n_steps < 1``.

  Attributes, call arguments, defaults, variable names and output dtypes are
  flax's, so a flax checkpoint loads unchanged. Differences: the wrapped
  layer's stored parameters are never overwritten by their normalized values
  (flax stores `w / sigma` as the layer's kernel at init, and again on every
  ``apply(..., mutable=True)``); only the ``params`` collection is
  normalized; the power iteration runs in at least float32; and the updated
  `u` and `sigma` keep the dtype they were created with (flax stores them in
  the promoted dtype, which can change the state's dtype after one step).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.ones((2, 3))
    >>> sn = jnn.SpectralNorm(nn.Dense(4))
    >>> variables = sn.init(jax.random.key(0), x, update_stats=False)
    >>> jax.tree_util.tree_map(jnp.shape, variables["batch_stats"])
    {'layer_instance/kernel/sigma': (), 'layer_instance/kernel/u': (1, 4)}
    >>> y, updates = sn.apply(variables, x, update_stats=True, mutable=["batch_stats"])

  Attributes:
    layer_instance: the module whose parameters are normalized.
    n_steps: power-iteration steps per call.
    epsilon: added to squared norms in the power iteration.
    dtype: dtype of the normalized parameters (default: inferred, as flax).
    param_dtype: dtype of `u` and `sigma`.
    error_on_non_matrix: raise for parameters of more than two dimensions
      instead of flattening their leading dimensions.
    collection_name: the collection holding `u` and `sigma`.
  """

  layer_instance: nn.Module
  n_steps: int = 1
  epsilon: float = 1e-12
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  error_on_non_matrix: bool = False
  collection_name: str = "batch_stats"

  @nn.compact
  def __call__(self, *args, update_stats: bool, **kwargs):
    """Runs `layer_instance(*args, **kwargs)` with its parameters spectrally normalized.

    Args:
      *args: passed to the wrapped layer.
      **kwargs: passed to the wrapped layer.
      update_stats: store the refined `u` and the new `sigma`.

    Returns:
      The wrapped layer's output.
    """
    return map_params(self, functools.partial(self._normalize, update_stats=update_stats), *args, **kwargs)

  def _normalize(self, path, value, *, update_stats: bool):
    value = jnp.asarray(value)
    if value.ndim <= 1 or self.n_steps < 1:
      return value
    if value.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(
          f"SpectralNorm(error_on_non_matrix=True): parameter "
          f"{jax.tree_util.keystr(path, simple=True, separator='/')!r} is {value.ndim}-D."
      )
    name = self.layer_instance.name + "/" + "/".join(key.key for key in path)
    u_name, sigma_name = name + "/u", name + "/sigma"
    u_var = self.variable(
        self.collection_name,
        u_name,
        jax.random.normal,
        None if self.has_variable(self.collection_name, u_name) else self.make_rng("params"),
        (1, value.shape[-1]),
        self.param_dtype,
    )
    sigma_var = self.variable(self.collection_name, sigma_name, jnp.ones, (), self.param_dtype)
    w_sn, u, sigma = jaxnorm.spectral_norm(
        value,
        u_var.value,
        n_steps=self.n_steps,
        epsilon=self.epsilon,
        dtype=_validation.promoted_dtype(value, u_var.value, dtype=self.dtype),
    )
    if update_stats:
      u_var.value = u
      sigma_var.value = sigma.astype(sigma_var.value.dtype)
    return w_sn
