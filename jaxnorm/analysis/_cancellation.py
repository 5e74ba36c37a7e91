r"""Catastrophic cancellation of the one-pass variance, measured against `jaxnorm.moments`.

The identity :math:`\mathrm{Var}[x] = E[x^2] - E[x]^2` is exact in real
numbers. In floating point both terms are about :math:`\mu^2` and carry a
rounding error of about :math:`\mu^2 \cdot 2^{-p}` (`p` = 24 significant bits
for float32), so their difference loses everything once
:math:`\mu^2 2^{-p} \gtrsim \sigma^2`, i.e. :math:`|\mu|/\sigma \gtrsim 2^{p/2}`
(about 4e3 in float32): the result is a small multiple of an ulp of
:math:`\mu^2`, often 0 or negative. A variance taken from deviations about
the mean, as `jaxnorm.moments` does, stays accurate to a few ulps of
:math:`\sigma^2` whatever the offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm


def naive_variance(x: Any, axis: int | Sequence[int] | None = None) -> Any:
  r"""The one-pass textbook variance :math:`E[x^2] - E[x]^2`, in the dtype of `x` (what not to do).

  Args:
    x: any floating-point array (NumPy or JAX).
    axis: the axes to reduce (None: all).

  Returns:
    :math:`\mathrm{mean}(x^2) - \mathrm{mean}(x)^2` over `axis`, computed with
    `jax.numpy` in the dtype of `x`.

  Example:
    >>> import numpy as np
    >>> from jaxnorm.analysis import naive_variance
    >>> float(naive_variance(np.array([1., 2., 3., 4.], np.float32)))
    1.25
  """
  x = jnp.asarray(x)
  return jnp.mean(x * x, axis=axis) - jnp.mean(x, axis=axis) ** 2


def variance_cancellation(
    offsets: Sequence[float],
    *,
    size: int = 4096,
    std: float = 1.0,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> dict[str, list[float]]:
  r"""The variance of `size` samples :math:`\mathrm{offset} + \mathrm{std}\cdot z`, three ways, per offset.

  The samples are drawn in float64 (`z` standard normal, NumPy `seed`, the
  same `z` for every offset) and rounded to `dtype`; every estimate sees
  those rounded samples:

  * ``exact``: float64 two-pass variance of the rounded samples (the truth);
  * ``naive``: `naive_variance` in `dtype`;
  * ``jaxnorm``: the variance of `jaxnorm.moments` (accumulated in at least
    float32).

  Args:
    offsets: the means to try, e.g. ``[1, 1e2, 1e4]``.
    size: samples per offset.
    std: their standard deviation.
    dtype: the dtype of the samples (float32, or bfloat16/float16).
    seed: NumPy seed of `z`.

  Returns:
    ``{"offset", "exact", "naive", "jaxnorm"}``, each a list of Python floats,
    one per offset; ``naive_rel_error`` and ``jaxnorm_rel_error``: the
    absolute relative errors ``|estimate - exact| / exact``.

  Example:
    >>> from jaxnorm.analysis import variance_cancellation
    >>> r = variance_cancellation([1e4])
    >>> r["jaxnorm_rel_error"][0] < 1e-3, r["naive_rel_error"][0] > 0.1
    (True, True)
  """
  if size < 2:
    raise ValueError(f"`size` must be at least 2, got {size}.")
  if not std > 0:
    raise ValueError(f"`std` must be > 0, got {std}.")
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating-point dtype, got {dtype}.")
  z = np.random.default_rng(seed).standard_normal(size)
  # Compiled once for all offsets (op by op, every offset would dispatch dozens of small programs).
  naive_fn = jax.jit(naive_variance)
  jaxnorm_fn = jax.jit(lambda x: jaxnorm.moments(x, 0)[1])
  out: dict[str, list[float]] = {k: [] for k in ("offset", "exact", "naive", "jaxnorm")}
  for offset in offsets:
    x = jnp.asarray(offset + std * z, dtype)
    exact = float(np.var(np.asarray(x, np.float64)))
    out["offset"].append(float(offset))
    out["exact"].append(exact)
    out["naive"].append(float(naive_fn(x)))
    out["jaxnorm"].append(float(jaxnorm_fn(x)))
  for k in ("naive", "jaxnorm"):
    out[f"{k}_rel_error"] = [abs(v - e) / e for v, e in zip(out[k], out["exact"])]
  return out
