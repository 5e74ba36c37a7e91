"""What every linen normalization module shares: its scale and bias parameters and output dtype."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxnorm import _modulation, _validation


def affine_parameters(
    module: nn.Module, shape: tuple[int, ...], *, use_scale: bool, use_bias: bool, scale_offset: float = 0.0
) -> tuple[jax.Array | None, jax.Array | None]:
  """Declares `scale` and `bias` of `shape` (flax's names, initializers and `param_dtype`).

  A `scale_init` of None (the default of the modules with a `scale_offset`)
  starts the multiplier ``scale_offset + scale`` at 1: ones, or zeros for
  Gemma's zero-centred scale.
  """
  scale_init = _modulation.scale_initializer(module.scale_init, scale_offset)
  scale = module.param("scale", scale_init, shape, module.param_dtype) if use_scale else None
  bias = module.param("bias", module.bias_init, shape, module.param_dtype) if use_bias else None
  return scale, bias


def output_dtype(x: jax.Array, *params: jax.Array | None, dtype: Any) -> Any:
  """flax's rule: `dtype` if given, else the promotion of the input and the parameters."""
  return _validation.promoted_dtype(x, *params, dtype=dtype)
