"""Every public op and module under JAX's four debugging and strictness settings at once.

`jax_debug_nans` and `jax_debug_infs` (NaN hunting: every eager operation and
every compiled program's outputs are checked), `jax_numpy_dtype_promotion =
"strict"` (no implicit promotion, e.g. of a float32 constant with a bfloat16
array) and `jax_numpy_rank_promotion = "raise"` (no implicit broadcasting of
arrays of different ranks; flax's CI runs with it). Each case runs eagerly,
forward and gradient, with the inputs that broke these settings before: NaN
and inf in masked-out positions, bfloat16/float16 inputs with parameters of
the same dtype, per-channel statistics on NHWC input. A false alarm raises
`FloatingPointError`, an implicit promotion `TypeError` or `ValueError`.

The whole suite runs under the same four settings (`conftest.py`); this
file sets them again around each case so that it checks them on its own too,
and holds the control: an op with a rank-promoting broadcast fails here.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from test_no_recompiles import LINEN, NNX_CALL_KWARGS, _LINEN_CALL_KWARGS, _nnx_cases

X = (4, 6)
IMG = (2, 3, 3, 4)  # N, H, W, C
C = IMG[-1]


@contextlib.contextmanager
def strict():
  """The four settings at once."""
  with (
      jax.debug_nans(True),
      jax.debug_infs(True),
      jax.numpy_dtype_promotion("strict"),
      jax.numpy_rank_promotion("raise"),
  ):
    yield


def _padded(shape, dtype, masked):
  """Data of `shape` and `dtype` with NaN and inf where `masked` (a boolean array of `shape`) is True."""
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  flat = x.reshape(-1)
  bad = np.flatnonzero(masked.reshape(-1))
  flat[bad[::2]] = np.nan
  flat[bad[1::2]] = np.inf
  # Moved to the device outside the checked block: NumPy input is tested separately.
  return jax.device_put(x.astype(dtype))


def _mask(shape, axis):
  """True = valid; the last entry along `axis` of every slice is masked out."""
  m = np.ones(shape, bool)
  index = [slice(None)] * len(shape)
  index[axis] = -1
  m[tuple(index)] = False
  return m


def _params(n, dtype):
  return jnp.ones(n, dtype), jnp.zeros(n, dtype)


# name -> (shape, mask axis or None, op(x, mask, dtype)): masked positions hold NaN and inf.
OPS = {
    "activated_batch_norm": (X, 0, lambda x, m, d: jaxnorm.activated_batch_norm(x, *_params(6, d), where=m)[0]),
    "batch_norm": (X, 0, lambda x, m, d: jaxnorm.batch_norm(x, *_params(6, d), where=m)[0]),
    "batch_renorm": (X, 0, lambda x, m, d: jaxnorm.batch_renorm(
        x, *_params(6, d), jnp.zeros(6, d), jnp.ones(6, d), r_max=3.0, d_max=5.0, where=m)[0]),
    "dyt": (X, None, lambda x, m, d: jaxnorm.dyt(x, 0.5, *_params(6, d))),
    "filter_response_norm": (IMG, None, lambda x, m, d: jaxnorm.filter_response_norm(
        x, *_params(C, d), jnp.zeros(C, d))),
    "ghost_batch_norm": (X, 0, lambda x, m, d: jaxnorm.ghost_batch_norm(
        x, *_params(6, d), virtual_batch_size=2, where=m)[0]),
    "group_norm": (IMG, 1, lambda x, m, d: jaxnorm.group_norm(x, *_params(C, d), num_groups=2, where=m)),
    "instance_norm": (IMG, 1, lambda x, m, d: jaxnorm.instance_norm(x, *_params(C, d), where=m)),
    "layer_norm": (X, 1, lambda x, m, d: jaxnorm.layer_norm(x, *_params(6, d), where=m)),
    "local_response_norm": (IMG, None, lambda x, m, d: jaxnorm.local_response_norm(x, 3)),
    "moments": (X, 0, lambda x, m, d: jaxnorm.moments(x, 0, where=m)[1]),
    # Per-channel running statistics on NHWC input: rank 1 against rank 4.
    "normalize": (IMG, None, lambda x, m, d: jaxnorm.normalize(
        x, jnp.zeros(C, d), jnp.ones(C, d), *_params(C, d))),
    "rms_norm": (X, 1, lambda x, m, d: jaxnorm.rms_norm(x, jnp.ones(6, d), where=m)),
    "spectral_norm": (X, None, lambda x, m, d: jaxnorm.spectral_norm(x, jnp.ones(6, d))[0]),
    # Fitted on padded data, applied to clean data (transform keeps NaN as NaN).
    "Standardizer": (X, 0, lambda x, m, d: jaxnorm.Standardizer(axis=0).fit(x, where=m).transform(jnp.ones_like(x))),
    "weight_norm": (X, None, lambda x, m, d: jaxnorm.weight_norm(x, jnp.ones(6, d))),
}
_NO_GRADIENT = {"Standardizer"}  # fitting is statistics, not a differentiable layer


def test_every_public_op_has_a_case():
  assert set(OPS) == set(jaxnorm.__all__) - {"batch_renorm_schedule"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_under_strict_settings(name, dtype):
  shape, axis, op = OPS[name]
  mask = None if axis is None else _mask(shape, axis)
  x = _padded(shape, dtype, np.zeros(shape, bool) if mask is None else ~mask)
  m = None if mask is None else jnp.asarray(mask)
  valid = np.ones(shape, bool) if mask is None else mask
  with strict():
    y = op(x, m, dtype)
    assert np.all(np.isfinite(np.asarray(y, np.float32)[valid] if y.shape == shape else np.asarray(y, np.float32)))
    if name not in _NO_GRADIENT:
      g = jax.grad(lambda x: jnp.sum(op(x, m, dtype).astype(jnp.float32)))(x)
      assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_numpy_input_with_masked_nan():
  """A NumPy input with NaN padding: converting it is no eager operation that the NaN check sees."""
  mask = _mask(X, 1)
  x = np.where(mask, np.random.default_rng(1).normal(size=X), np.nan).astype(np.float32)
  with strict():
    y = jaxnorm.layer_norm(x, where=mask)
    g = jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x, where=mask)))(x)
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))


def _total(out):
  """The sum of a module's output, or of every output (AdaLNZero returns y and its gate)."""
  return sum(jnp.sum(a) for a in jax.tree.leaves(out))


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_module_under_strict_settings(name):
  make, shape = LINEN[name]
  module, kwargs = make(), dict(_LINEN_CALL_KWARGS.get(name, {}))
  clean = _padded(shape, np.float32, np.zeros(shape, bool))
  variables = module.init(jax.random.key(0), clean, **kwargs)
  masked = name in {"LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm", "MeanOnlyBatchNorm"}
  mask = _mask(shape, 0 if "BatchNorm" in name else 1) if masked else None
  x = _padded(shape, np.float32, ~mask) if masked else clean
  if masked:
    kwargs["mask"] = jnp.asarray(mask)
  with strict():
    loss = lambda x: _total(module.apply(variables, x, mutable=["batch_stats"], **kwargs)[0])
    jax.block_until_ready(jax.value_and_grad(loss)(x))


@pytest.mark.parametrize("name", sorted(_nnx_cases()))
def test_nnx_module_under_strict_settings(name):
  make, shape = _nnx_cases()[name]
  module = make()
  masked = name in {"LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm"}
  mask = _mask(shape, 1 if name != "BatchNorm" else 0) if masked else None
  x = _padded(shape, np.float32, ~mask) if masked else _padded(shape, np.float32, np.zeros(shape, bool))
  kwargs = {"mask": jnp.asarray(mask)} if masked else dict(NNX_CALL_KWARGS.get(name, {}))
  with strict():
    jax.block_until_ready(module(x, **kwargs))
    loss = lambda module, x: _total(module(x, **kwargs))
    jax.block_until_ready(nnx.grad(loss, argnums=(0, 1))(module, x))


def test_linen_layer_norm_masked_gradient():
  """The case of the report: `linen.LayerNorm()(x, mask=...)` with NaN padding, gradient taken eagerly."""
  mask = _mask(X, 1)
  x = _padded(X, np.float32, ~mask)
  module = jnn.LayerNorm()
  variables = module.init(jax.random.key(0), jnp.zeros(X))
  with strict():
    g = jax.grad(lambda x: jnp.sum(module.apply(variables, x, mask=jnp.asarray(mask))))(x)
  np.testing.assert_array_equal(np.asarray(g)[~mask], 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_linen_modules_with_16_bit_params(dtype):
  x = _padded(IMG, dtype, np.zeros(IMG, bool))
  for module in (
      jnn.BatchNorm(use_running_average=False, dtype=dtype, param_dtype=dtype),
      jnn.LayerNorm(dtype=dtype, param_dtype=dtype),
      jnn.RMSNorm(dtype=dtype, param_dtype=dtype),
      jnn.GroupNorm(num_groups=2, dtype=dtype, param_dtype=dtype),
      jnn.FilterResponseNorm(param_dtype=dtype),
  ):
    variables = module.init(jax.random.key(0), x)
    with strict():
      loss = lambda p, x: jnp.sum(module.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0])
      jax.block_until_ready(jax.grad(loss, argnums=(0, 1))(variables["params"], x))


def test_the_suite_runs_under_the_four_settings():
  """Set by conftest.py for this process, and in the environment for the Python subprocesses tests start."""
  assert jax.config.jax_numpy_rank_promotion == "raise"
  assert jax.config.jax_numpy_dtype_promotion == "strict"
  assert jax.config.jax_debug_nans and jax.config.jax_debug_infs
  assert os.environ["JAX_NUMPY_RANK_PROMOTION"] == "raise"
  assert os.environ["JAX_NUMPY_DTYPE_PROMOTION"] == "strict"
  assert os.environ["JAX_DEBUG_NANS"] == os.environ["JAX_DEBUG_INFS"] == "True"


def test_control_an_op_with_a_rank_promoting_broadcast_fails(monkeypatch):
  """`normalize` with its explicit broadcast removed is still right under NumPy's rules, and refused here.

  `_validation.to_rank` gives per-channel statistics of shape (C,) the rank
  of an NHWC input; without it `x - mean` broadcasts implicitly, which users
  running with rank promotion "raise" (as flax's CI does) cannot call.
  """
  x = np.random.default_rng(0).normal(size=IMG)
  mean, var = np.linspace(-1.0, 1.0, C), np.linspace(0.5, 2.0, C)
  want = (x - mean) / np.sqrt(var + 1e-5)
  monkeypatch.setattr(jaxnorm._validation, "to_rank", lambda a, ndim: a)
  with pytest.raises(ValueError, match="jax_numpy_rank_promotion='raise'"):
    jaxnorm.normalize(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(var))
  with jax.numpy_rank_promotion("allow"):
    got = jaxnorm.normalize(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(var))
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_batch_norm_inference_of_a_16_bit_input_in_float32(api):
  """Running statistics, a bfloat16 input and ``dtype=float32``: computed and returned in float32, as flax promotes."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=X), jnp.bfloat16)
  if api == "linen":
    module = jnn.BatchNorm(use_running_average=True, dtype=jnp.float32)
    variables = module.init(jax.random.key(0), x)
    with strict():
      y = module.apply(variables, x)
  else:
    module = jnnx.BatchNorm(X[-1], use_running_average=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with strict():
      y = module(x)
  assert y.dtype == jnp.float32
  # Initial running statistics: mean 0, variance 1.
  np.testing.assert_allclose(y, np.asarray(x, np.float64) / np.sqrt(1 + 1e-5), rtol=1e-6)
