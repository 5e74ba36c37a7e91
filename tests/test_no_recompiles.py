"""No recompiles: every public op and module, called eagerly in a loop with the same shapes, compiles only once.

A compile is counted through JAX's own monitoring event for backend
compilation (`/jax/core/compile/backend_compile_duration`, recorded once per
XLA compilation, cache misses only). The first call of a case may compile
(its programs, and the primitives it runs eagerly); the next calls, with
new values of the same shapes and dtypes, must compile nothing. A function
closed over anew on every call and handed to a control-flow primitive
(`lax.fori_loop`, `lax.scan`) run eagerly is the typical cause of a
recompile per call: its jaxpr is a new cache key each time.

Every name in `jaxnorm.__all__`, `jaxnorm.linen.__all__` (modules) and
`jaxnorm.nnx.__all__` has a case; a new public name without one fails
`test_every_public_name_has_a_case`.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
F32 = np.float32


@contextlib.contextmanager
def count_compiles():
  """Counts XLA compilations inside the block: yields a list that grows by one name per compile."""
  compiles = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs
    if event == _COMPILE_EVENT:
      compiles.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _data(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(F32)


def assert_no_recompiles(step, calls=3):
  """`step(i)` runs call `i` (new values, same shapes); calls after the first must compile nothing."""
  jax.block_until_ready(step(0))
  with count_compiles() as compiles:
    for i in range(1, calls):
      jax.block_until_ready(step(i))
  assert not compiles, f"{len(compiles)} compile(s) after the first call: {compiles}"


# --- The functional API: each case is a function of the call index. --------------------------------------

X = (4, 3)
IMG = (2, 3, 3, 4)  # N, H, W, C
C = IMG[-1]

FUNCTIONAL = {
    "activated_batch_norm": lambda i: jaxnorm.activated_batch_norm(_data(i, *X), jnp.ones(3), jnp.zeros(3)),
    "batch_norm": lambda i: jaxnorm.batch_norm(_data(i, *X), jnp.ones(3), jnp.zeros(3)),
    "batch_renorm": lambda i: jaxnorm.batch_renorm(
        _data(i, *X), jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3), r_max=3.0, d_max=5.0
    ),
    "batch_renorm_schedule": lambda i: jaxnorm.batch_renorm_schedule(jnp.asarray(100 * i)),
    "dyt": lambda i: jaxnorm.dyt(_data(i, *X), 0.5, jnp.ones(3), jnp.zeros(3)),
    "filter_response_norm": lambda i: jaxnorm.filter_response_norm(
        _data(i, *IMG), jnp.ones(C), jnp.zeros(C), jnp.zeros(C)
    ),
    "ghost_batch_norm": lambda i: jaxnorm.ghost_batch_norm(
        _data(i, *X), jnp.ones(3), jnp.zeros(3), virtual_batch_size=2
    ),
    "group_norm": lambda i: jaxnorm.group_norm(_data(i, *IMG), jnp.ones(C), jnp.zeros(C), num_groups=2),
    "instance_norm": lambda i: jaxnorm.instance_norm(_data(i, *IMG), jnp.ones(C), jnp.zeros(C)),
    "layer_norm": lambda i: jaxnorm.layer_norm(_data(i, *X), jnp.ones(3), jnp.zeros(3)),
    "local_response_norm": lambda i: jaxnorm.local_response_norm(_data(i, *IMG), 3),
    "moments": lambda i: jaxnorm.moments(_data(i, *X), 0),
    "normalize": lambda i: jaxnorm.normalize(_data(i, *X), jnp.zeros(3), jnp.ones(3), jnp.ones(3), jnp.zeros(3)),
    "rms_norm": lambda i: jaxnorm.rms_norm(_data(i, *X), jnp.ones(3)),
    "spectral_norm": lambda i: jaxnorm.spectral_norm(_data(i, *X), _data(i + 100, 3)),
    "Standardizer": lambda i: jaxnorm.Standardizer(axis=0).fit(_data(i, *X)).transform(_data(i + 100, *X)),
    "weight_norm": lambda i: jaxnorm.weight_norm(_data(i, *X), jnp.ones(3)),
}

# The same ops under a mask, and their gradients: the paths a training step takes.
MASKED = {
    "batch_norm": lambda x, m: jaxnorm.batch_norm(x, where=m)[0],
    "layer_norm": lambda x, m: jaxnorm.layer_norm(x, where=m),
    "rms_norm": lambda x, m: jaxnorm.rms_norm(x, where=m),
    "moments": lambda x, m: jaxnorm.moments(x, 0, where=m)[1],
}

GRADIENTS = {
    "batch_norm": lambda x: jaxnorm.batch_norm(x)[0],
    "layer_norm": jaxnorm.layer_norm,
    "rms_norm": jaxnorm.rms_norm,
    "spectral_norm": lambda w: jaxnorm.spectral_norm(w, jnp.ones(3))[0],
    "weight_norm": lambda v: jaxnorm.weight_norm(v, jnp.ones(3)),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_op_compiles_once(name):
  assert_no_recompiles(FUNCTIONAL[name])


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_op_compiles_once(name):
  mask = np.ones(X, bool)
  mask[0, 0] = False
  assert_no_recompiles(lambda i: MASKED[name](_data(i, *X), mask))


@pytest.mark.parametrize("name", sorted(GRADIENTS))
def test_gradient_compiles_once(name):
  f = GRADIENTS[name]
  assert_no_recompiles(lambda i: jax.grad(lambda x: jnp.sum(f(x) * jnp.arange(3, dtype=x.dtype)[None]))(_data(i, *X)))


# --- linen modules: init once, then `apply` in a loop (training updates where the module has state). ------

LINEN = {
    "ActivatedBatchNorm": (lambda: jnn.ActivatedBatchNorm(use_running_average=False), X),
    "AdaLNZero": (jnn.AdaLNZero, X),
    "BatchNorm": (lambda: jnn.BatchNorm(use_running_average=False), X),
    "BatchRenorm": (lambda: jnn.BatchRenorm(use_running_average=False), X),
    "DyT": (jnn.DyT, X),
    "FilterResponseNorm": (jnn.FilterResponseNorm, IMG),
    "FrozenBatchNorm": (lambda: jnn.FrozenBatchNorm(use_running_average=True), X),
    "GhostBatchNorm": (lambda: jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=2), X),
    "GroupNorm": (lambda: jnn.GroupNorm(num_groups=2), IMG),
    "InstanceNorm": (jnn.InstanceNorm, IMG),
    "LayerNorm": (jnn.LayerNorm, X),
    "LocalResponseNorm": (lambda: jnn.LocalResponseNorm(size=3), IMG),
    "MeanOnlyBatchNorm": (lambda: jnn.MeanOnlyBatchNorm(use_running_average=False), X),
    "RMSNorm": (jnn.RMSNorm, X),
    "SpectralNorm": (lambda: jnn.SpectralNorm(nn.Dense(2)), X),
    "WeightNorm": (lambda: jnn.WeightNorm(nn.Dense(2)), X),
}
# The conditioning of AdaLNZero, per example of X.
COND = np.linspace(-1.0, 1.0, 8, dtype=F32).reshape(4, 2)
_LINEN_CALL_KWARGS = {"SpectralNorm": {"update_stats": True}, "AdaLNZero": {"c": COND}}
NNX_CALL_KWARGS = {"AdaLNZero": {"c": COND}}


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_module_apply_compiles_once(name):
  make, shape = LINEN[name]
  module, kwargs = make(), _LINEN_CALL_KWARGS.get(name, {})
  variables = module.init(jax.random.key(0), _data(0, *shape), **kwargs)

  def step(i):
    nonlocal variables
    y, updates = module.apply(variables, _data(i, *shape), mutable=["batch_stats"], **kwargs)
    variables = {**variables, **updates}
    return y

  assert_no_recompiles(step)


def test_linen_batch_norm_inference_compiles_once():
  module = jnn.BatchNorm(use_running_average=True)
  variables = module.init(jax.random.key(0), _data(0, *X))
  assert_no_recompiles(lambda i: module.apply(variables, _data(i, *X)))


def test_linen_fold_and_precise_batch_stats_compile_once():
  model = nn.Sequential([nn.Dense(3), jnn.BatchNorm(use_running_average=True)])
  variables = model.init(jax.random.key(0), _data(0, *X))

  def fold(i):
    stats = {"layers_1": {"mean": jnp.asarray(_data(i, 3)), "var": jnp.ones(3) + i}}
    return jnn.fold_batch_norm({**variables, "batch_stats": stats}, [("layers_0", "layers_1")])

  assert_no_recompiles(fold)


def test_precise_batch_stats_compiles_per_call_not_per_batch():
  """It jits its step around the model it is given, once per call (a one-off pass over the data): the count
  of compiles of a call does not grow with the number of batches."""
  bn = jnn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), _data(0, *X))
  run = lambda n: jnn.precise_batch_stats(bn, variables, [_data(i, *X) for i in range(n)])
  jax.block_until_ready(run(2))
  with count_compiles() as two:
    jax.block_until_ready(run(2))
  with count_compiles() as five:
    jax.block_until_ready(run(5))
  assert len(five) == len(two) <= 2, (two, five)


# --- nnx modules: construct once, then call in a loop (training mode, state updated in place). -----------


def _nnx_cases():
  rngs = nnx.Rngs(0)
  return {
      "ActivatedBatchNorm": (lambda: jnnx.ActivatedBatchNorm(3, rngs=rngs), X),
      "AdaLNZero": (lambda: jnnx.AdaLNZero(3, 2, rngs=rngs), X),
      "BatchNorm": (lambda: jnnx.BatchNorm(3, rngs=rngs), X),
      "BatchRenorm": (lambda: jnnx.BatchRenorm(3, rngs=rngs), X),
      "DyT": (lambda: jnnx.DyT(3, rngs=rngs), X),
      "FilterResponseNorm": (lambda: jnnx.FilterResponseNorm(C, rngs=rngs), IMG),
      "GhostBatchNorm": (lambda: jnnx.GhostBatchNorm(3, virtual_batch_size=2, rngs=rngs), X),
      "GroupNorm": (lambda: jnnx.GroupNorm(C, num_groups=2, rngs=rngs), IMG),
      "InstanceNorm": (lambda: jnnx.InstanceNorm(C, rngs=rngs), IMG),
      "LayerNorm": (lambda: jnnx.LayerNorm(3, rngs=rngs), X),
      "LocalResponseNorm": (lambda: jnnx.LocalResponseNorm(3), IMG),
      "MeanOnlyBatchNorm": (lambda: jnnx.MeanOnlyBatchNorm(3, rngs=rngs), X),
      "RMSNorm": (lambda: jnnx.RMSNorm(3, rngs=rngs), X),
      "SpectralNorm": (lambda: jnnx.SpectralNorm(nnx.Linear(3, 2, rngs=rngs), rngs=rngs), X),
      "WeightNorm": (lambda: jnnx.WeightNorm(nnx.Linear(3, 2, rngs=rngs), rngs=rngs), X),
  }


NNX = sorted(_nnx_cases())


@pytest.mark.parametrize("name", NNX)
def test_nnx_module_call_compiles_once(name):
  make, shape = _nnx_cases()[name]
  module, kwargs = make(), NNX_CALL_KWARGS.get(name, {})
  assert_no_recompiles(lambda i: module(_data(i, *shape), **kwargs))


@pytest.mark.parametrize("name", ["BatchNorm", "SpectralNorm"])
def test_nnx_module_eval_compiles_once(name):
  make, shape = _nnx_cases()[name]
  module = make()
  module(_data(0, *shape))
  module.eval()
  assert_no_recompiles(lambda i: module(_data(i, *shape)))


def test_every_public_name_has_a_case():
  assert set(jaxnorm.__all__) == set(FUNCTIONAL)
  linen_modules = {
      n for n in jnn.__all__ if isinstance(getattr(jnn, n), type) and issubclass(getattr(jnn, n), nn.Module)
  }
  assert linen_modules == set(LINEN)
  assert set(jnn.__all__) - linen_modules == {
      "ImmutableBatchStatsError", "MissingBatchStatsError", "fold_batch_norm", "precise_batch_stats"
  }
  assert set(jnnx.__all__) == set(NNX)
