r"""Santurkar et al. (2018)'s "noisy batch norm": random, time-varying shifts of the activations' distribution.

The experiment asks whether batch norm helps by keeping each layer's input
distribution stable (less "internal covariate shift"). It adds, right after
each normalization layer and afresh at every training step, a random affine
distortion that makes the distribution unstable again. Per unit (feature)
:math:`j`, once per call,

.. math::
    \mu_j \sim U(-n_\mu, n_\mu), \qquad \sigma_j \sim U(1, n_\sigma),

and per sample :math:`i` and unit :math:`j`

.. math::
    m_{ij} \sim U(\mu_j - r_\mu, \mu_j + r_\mu), \qquad
    s_{ij} \sim \mathcal N(\sigma_j, r_\sigma^2), \qquad
    a_{ij} \leftarrow s_{ij}\, a_{ij} + m_{ij} .

The paper's values are the defaults: :math:`n_\mu = 0.5`,
:math:`n_\sigma = 1.25`, :math:`r_\mu = r_\sigma = 0.1`
(:math:`r_\sigma` is the standard deviation of :math:`s_{ij}`). The noise is
a constant of the backward pass: the gradient flows through
:math:`s_{ij} a_{ij}` only.

For inputs of higher rank (e.g. NHWC feature maps) the unit is the feature
axis (the channel) and the sample is the batch axis; one draw of
:math:`(s_{ij}, m_{ij})` is shared by every other position (every pixel of
channel :math:`j` of image :math:`i`), as a convolution shares its weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# The paper's values (Santurkar et al. 2018, Section 2.1).
PAPER_NOISE = {"n_mu": 0.5, "n_sigma": 1.25, "r_mu": 0.1, "r_sigma": 0.1}


class Noise(NamedTuple):
  r"""One draw of the noisy-BN distortion, from `sample_noise`: ``a -> scale * a + shift``.

  ``scale`` :math:`s_{ij}` and ``shift`` :math:`m_{ij}` broadcast to the
  activations; ``unit_scale`` :math:`\sigma_j` and ``unit_shift``
  :math:`\mu_j` have one entry per unit.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm.analysis import sample_noise
    >>> noise = sample_noise(jax.random.key(0), (4, 3))
    >>> a = jnp.ones((4, 3))
    >>> (noise.scale * a + noise.shift).shape, bool(jnp.all((noise.unit_scale >= 1) & (noise.unit_scale <= 1.25)))
    ((4, 3), True)
  """

  scale: jax.Array  # s_ij
  shift: jax.Array  # m_ij
  unit_scale: jax.Array  # sigma_j, shaped like the feature axis
  unit_shift: jax.Array  # mu_j, shaped like the feature axis


def _axis(axis: Any, ndim: int, name: str) -> int:
  if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim <= axis < ndim:
    raise ValueError(f"`{name}` must be an int in [-{ndim}, {ndim}) for an input of rank {ndim}, got {axis!r}.")
  return axis % ndim


def _check_parameters(n_mu: float, n_sigma: float, r_mu: float, r_sigma: float) -> None:
  if not n_mu >= 0:
    raise ValueError(f"`n_mu` must be >= 0 (mu_j ~ U(-n_mu, n_mu)), got {n_mu!r}.")
  if not n_sigma >= 1:
    raise ValueError(f"`n_sigma` must be >= 1 (sigma_j ~ U(1, n_sigma)), got {n_sigma!r}.")
  if not r_mu >= 0:
    raise ValueError(f"`r_mu` must be >= 0 (the half-width of m_ij around mu_j), got {r_mu!r}.")
  if not r_sigma >= 0:
    raise ValueError(f"`r_sigma` must be >= 0 (the standard deviation of s_ij), got {r_sigma!r}.")


def sample_noise(
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    sample_axis: int = 0,
    feature_axis: int = -1,
    dtype: Any = jnp.float32,
) -> Noise:
  r"""Draws the noisy-BN distortion for activations of shape `shape` (see the module docstring).

  .. math::
      \mu_j \sim U(-n_\mu, n_\mu),\ \sigma_j \sim U(1, n_\sigma),\quad
      m_{ij} \sim U(\mu_j - r_\mu, \mu_j + r_\mu),\ s_{ij} \sim \mathcal N(\sigma_j, r_\sigma^2).

  Args:
    key: a PRNG key; draw a fresh one at every training step.
    shape: the activations' shape, e.g. `(N, C)` or `(N, H, W, C)`.
    n_mu, n_sigma, r_mu, r_sigma: the paper's noise levels (defaults: its values).
    sample_axis: the axis of the samples :math:`i`.
    feature_axis: the axis of the units :math:`j`.
    dtype: floating dtype of the draw.

  Returns:
    `Noise(scale, shift, unit_scale, unit_shift)`: :math:`s, m` of shape
    `shape` with 1 on every axis but `sample_axis` and `feature_axis`;
    :math:`\sigma_j, \mu_j` of shape `(shape[feature_axis],)`.

  Example:
    >>> import jax
    >>> from jaxnorm.analysis import sample_noise
    >>> noise = sample_noise(jax.random.key(0), (8, 5, 5, 3))
    >>> noise.scale.shape, noise.shift.shape, noise.unit_scale.shape
    ((8, 1, 1, 3), (8, 1, 1, 3), (3,))
  """
  _check_parameters(n_mu, n_sigma, r_mu, r_sigma)
  shape = tuple(int(d) for d in shape)
  ndim = len(shape)
  i = _axis(sample_axis, ndim, "sample_axis")
  j = _axis(feature_axis, ndim, "feature_axis")
  if i == j:
    raise ValueError(f"`sample_axis` and `feature_axis` must differ, both are axis {i} of shape {shape}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype}.")
  units = shape[j]
  noise_shape = tuple(d if a in (i, j) else 1 for a, d in enumerate(shape))
  unit_shape = tuple(units if a == j else 1 for a in range(ndim))
  k_mu, k_sigma, k_m, k_s = jax.random.split(key, 4)
  mu = jax.random.uniform(k_mu, (units,), dtype, -n_mu, n_mu)
  sigma = jax.random.uniform(k_sigma, (units,), dtype, 1.0, n_sigma)
  shift = mu.reshape(unit_shape) + jax.random.uniform(k_m, noise_shape, dtype, -r_mu, r_mu)
  scale = sigma.reshape(unit_shape) + r_sigma * jax.random.normal(k_s, noise_shape, dtype)
  return Noise(scale, shift, sigma, mu)


def inject_noise(
    key: jax.Array,
    a: jax.Array,
    *,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    sample_axis: int = 0,
    feature_axis: int = -1,
) -> jax.Array:
  r"""Santurkar et al.'s noisy-BN distortion of activations `a`: :math:`a_{ij} \leftarrow s_{ij} a_{ij} + m_{ij}`.

  The noise is drawn by `sample_noise` with the same arguments (the paper's
  values by default) and is a constant of the backward pass.

  Args:
    key: a PRNG key; a fresh one at every training step makes the distortion time-varying.
    a: floating activations, e.g. the output of a batch norm layer, `(N, C)` or `(N, ..., C)`.
    n_mu, n_sigma, r_mu, r_sigma: the noise levels.
    sample_axis, feature_axis: the axes of the samples and of the units.

  Returns:
    The distorted activations, shaped and typed like `a`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm.analysis import inject_noise
    >>> y = inject_noise(jax.random.key(0), jnp.zeros((4, 3)))  # zeros come out as the shifts m_ij
    >>> bool(jnp.all(jnp.abs(y) <= 0.5 + 0.1))
    True
  """
  a = jnp.asarray(a)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"`a` must be a floating-point array, got dtype {a.dtype}.")
  noise = sample_noise(
      key,
      a.shape,
      n_mu=n_mu,
      n_sigma=n_sigma,
      r_mu=r_mu,
      r_sigma=r_sigma,
      sample_axis=sample_axis,
      feature_axis=feature_axis,
      dtype=a.dtype,
  )
  return noise.scale * a + noise.shift


class NoiseInjection(nn.Module):
  r"""Noisy-BN distortion as a linen layer: put it right after a normalization layer.

  In training (``deterministic=False``) it returns `inject_noise(key, x, ...)`
  with a key from the rng stream `rng_collection` (default ``'noise'``, so
  pass ``rngs={'noise': key}`` to `apply`, a fresh key at every step); with
  ``deterministic=True`` (evaluation) it returns `x` unchanged, like
  `flax.linen.Dropout`. No parameters, no state.

  .. math::
      a_{ij} \leftarrow s_{ij}\, a_{ij} + m_{ij},\quad
      m_{ij} \sim U(\mu_j \pm r_\mu),\ s_{ij} \sim \mathcal N(\sigma_j, r_\sigma^2),\
      \mu_j \sim U(-n_\mu, n_\mu),\ \sigma_j \sim U(1, n_\sigma).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm.analysis import NoiseInjection
    >>> layer = NoiseInjection()
    >>> x = jnp.ones((4, 3))
    >>> y = layer.apply({}, x, deterministic=False, rngs={"noise": jax.random.key(0)})
    >>> bool(jnp.any(y != x)), bool(jnp.all(layer.apply({}, x, deterministic=True) == x))
    (True, True)

  Attributes:
    n_mu, n_sigma, r_mu, r_sigma: the noise levels (defaults: the paper's).
    deterministic: if True, the identity; may be given at call time instead.
    sample_axis, feature_axis: the axes of the samples and of the units.
    rng_collection: the rng stream the noise is drawn from.
  """

  n_mu: float = 0.5
  n_sigma: float = 1.25
  r_mu: float = 0.1
  r_sigma: float = 0.1
  deterministic: bool | None = None
  sample_axis: int = 0
  feature_axis: int = -1
  rng_collection: str = "noise"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """Distorts `x` (training) or returns it unchanged (``deterministic=True``)."""
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    _check_parameters(self.n_mu, self.n_sigma, self.r_mu, self.r_sigma)
    if deterministic:
      return x
    return inject_noise(
        self.make_rng(self.rng_collection),
        x,
        n_mu=self.n_mu,
        n_sigma=self.n_sigma,
        r_mu=self.r_mu,
        r_sigma=self.r_sigma,
        sample_axis=self.sample_axis,
        feature_axis=self.feature_axis,
    )
