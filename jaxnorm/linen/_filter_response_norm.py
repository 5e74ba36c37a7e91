"""`FilterResponseNorm`: filter response normalization with a learned TLU threshold."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

import jaxnorm
from jaxnorm import _validation
from jaxnorm.linen._affine import affine_parameters, output_dtype


class FilterResponseNorm(nn.Module):
  r"""Filter response normalization + TLU (Singh & Krishnan, 2019) for channels-last inputs.

  .. math::
      y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta, \; \tau\Big), \qquad
      \nu^2 = \operatorname{mean}_{\text{spatial}}(x^2)

  per example and channel (see `jaxnorm.filter_response_norm`). Parameters
  ``scale`` (:math:`\gamma`, ones), ``bias`` (:math:`\beta`, zeros) and
  ``tau`` (:math:`\tau`, zeros), each of shape `(C,)`; no running statistics,
  so training and inference agree. `use_tau=False` gives FRN without the TLU.
  The attributes and the output-dtype rule follow the flax normalization
  layers. The paper's learnable-:math:`\epsilon` variant (for 1x1 feature
  maps) is not offered: `epsilon` is a fixed number.

  Example:
    >>> import jax
    >>> from jaxnorm import linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    >>> variables = jnn.FilterResponseNorm().init(jax.random.key(1), x)
    >>> sorted(variables["params"]), variables["params"]["tau"].shape
    (['bias', 'scale', 'tau'], (3,))
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  use_tau: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  tau_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x` of shape `(N, ..., C)`; `mask` selects the positions that enter :math:`\\nu^2`."""
    x = _validation.floating_input(x)
    channels = (x.shape[-1],) if x.ndim else ()
    scale, bias = affine_parameters(self, channels, use_scale=self.use_scale, use_bias=self.use_bias)
    tau = self.param("tau", self.tau_init, channels, self.param_dtype) if self.use_tau else None
    return jaxnorm.filter_response_norm(
        x,
        scale,
        bias,
        tau,
        epsilon=self.epsilon,
        where=_validation.boolean_mask(mask, "mask", x.shape),
        dtype=output_dtype(x, scale, bias, tau, dtype=self.dtype),
    )
