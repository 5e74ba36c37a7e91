"""flax's modules, run under the dtype promotion they are written for.

The suite runs under ``jax_numpy_dtype_promotion="strict"`` (see
`conftest.py`). flax's normalization and dense layers promote implicitly:
`flax.linen.dtypes.canonicalize_dtype` takes `jnp.result_type` of the input
and the parameters, and `flax.linen.normalization._compute_stats` calls
`jnp.promote_types(dtype, float32)`; with a bfloat16 input, or a float64 input
beside float32 parameters, strict promotion refuses both inside flax. The
drop-in comparisons therefore call flax under `flax_promotion()` and nothing
else: jaxnorm's side of every comparison stays under the strict settings.
Rank promotion stays "raise" for flax too (flax's own CI runs with it).
"""

import contextlib

import jax


@contextlib.contextmanager
def flax_promotion():
  """JAX's standard dtype promotion for the flax calls inside the block (trace time is what counts)."""
  with jax.numpy_dtype_promotion("standard"):
    yield
