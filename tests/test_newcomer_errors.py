"""The errors a new user meets first say what to do.

Forward mode through a custom VJP, `axis=` for the batch-norm family, a
scalar input, a traced `epsilon`, and jaxnorm's own exception classes (which
must not carry flax's link to a documentation page that has no entry for them).
"""

from __future__ import annotations

import pickle

import chex
import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import linen as jnn

X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
ONES, ZEROS = jnp.ones(4), jnp.zeros(4)

# Every op with a hand-derived VJP, as a function of x alone.
CUSTOM_VJP_OPS = {
    "layer_norm": lambda x, **k: jaxnorm.layer_norm(x, **k),
    "rms_norm": lambda x, **k: jaxnorm.rms_norm(x, **k),
    "batch_norm": lambda x, **k: jaxnorm.batch_norm(x, **k)[0],
    "group_norm": lambda x, **k: jaxnorm.group_norm(x[:, None, :], num_groups=2, **k),
    "instance_norm": lambda x, **k: jaxnorm.instance_norm(jnp.stack([x, 2 * x], 1), **k),
    "batch_renorm": lambda x, **k: jaxnorm.batch_renorm(x, ONES, ZEROS, ZEROS, ONES, r_max=3.0, d_max=5.0, **k)[0],
    "ghost_batch_norm": lambda x, **k: jaxnorm.ghost_batch_norm(x, virtual_batch_size=3, **k)[0],
    "filter_response_norm": lambda x, **k: jaxnorm.filter_response_norm(x[:, None, :], ONES, ZEROS, ZEROS, **k),
    "weight_norm": lambda x, **k: jaxnorm.weight_norm(x, ONES, **k),
}


@pytest.mark.parametrize("op", sorted(CUSTOM_VJP_OPS))
@pytest.mark.parametrize("jit", [False, True])
def test_jvp_through_custom_vjp_names_the_fix(op, jit):
  f = CUSTOM_VJP_OPS[op]
  jvp = lambda x: jax.jvp(f, (x,), (x,))
  with pytest.raises(TypeError, match=r"custom_vjp=False") as info:
    (jax.jit(jvp) if jit else jvp)(X)
  assert "forward-mode" in str(info.value) and "jax.hessian" in str(info.value)
  assert f"jaxnorm.{op}" in str(info.value)
  # The fix the message names works, and agrees with reverse mode.
  _, tangent = jax.jvp(lambda x: f(x, custom_vjp=False), (X,), (X,))
  _, vjp = jax.vjp(f, X)
  w = jnp.cos(tangent)  # a cotangent: <vjp(w), X> must equal <w, jvp(X)>
  np.testing.assert_allclose(jnp.vdot(vjp(w)[0], X), jnp.vdot(w, tangent), rtol=1e-4, atol=1e-4)


def test_other_type_errors_pass_through_untouched():
  with pytest.raises(TypeError, match="real floating-point") as info:
    jaxnorm.layer_norm(jnp.arange(4))
  assert "custom_vjp=False" not in str(info.value)


def test_hessian_passes_through_the_custom_vjp():
  w = jnp.linspace(-1.0, 1.0, 4, dtype=X.dtype)
  loss = lambda custom: lambda v: (jnp.tanh(jaxnorm.layer_norm(v, custom_vjp=custom)) * w).sum()
  chex.assert_trees_all_close(jax.hessian(loss(True))(X[0]), jax.hessian(loss(False))(X[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "op",
    [
        lambda x, **k: jaxnorm.batch_norm(x, **k),
        lambda x, **k: jaxnorm.batch_renorm(
            x, jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3), r_max=3.0, d_max=5.0, **k
        ),
        lambda x, **k: jaxnorm.ghost_batch_norm(x, virtual_batch_size=2, **k),
    ],
    ids=["batch_norm", "batch_renorm", "ghost_batch_norm"],
)
def test_batch_norm_family_takes_axis(op):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 5)), jnp.float32)  # NCL: features on axis 1
  chex.assert_trees_all_close(op(x, axis=1), op(x, feature_axes=1))
  assert op(x, axis=1)[1].shape[-1] == 3
  # Both names at once is ambiguous, even when they agree.
  for feature_axes in (1, -1):
    with pytest.raises(TypeError, match=r"`axis`=1 and `feature_axes`=.* were both"):
      op(x, axis=1, feature_axes=feature_axes)
  with pytest.raises(ValueError, match=r"`axis`=3 is out of range"):
    op(x, axis=3)


def test_feature_axes_default_still_reads_minus_one():
  import inspect

  assert str(inspect.signature(jaxnorm.batch_norm).parameters["feature_axes"]) .endswith("= -1")
  chex.assert_trees_all_close(jaxnorm.batch_norm(X), jaxnorm.batch_norm(X, feature_axes=-1))


@pytest.mark.parametrize(
    "op",
    [jaxnorm.layer_norm, jaxnorm.rms_norm, lambda x: jaxnorm.batch_norm(x), lambda x: jaxnorm.moments(x, -1)],
    ids=["layer_norm", "rms_norm", "batch_norm", "moments"],
)
def test_scalar_input_says_rank_zero(op):
  with pytest.raises(ValueError, match=r"scalar \(rank 0\).*rank at least 1") as info:
    op(jnp.float32(1.0))
  assert "0..-1" not in str(info.value)


def test_traced_epsilon_says_mark_it_static():
  f = lambda x, epsilon: jaxnorm.layer_norm(x, epsilon=epsilon)
  with pytest.raises(TypeError, match=r'static_argnames="epsilon"'):
    jax.jit(f)(X, 1e-3)
  # What the message says to do works.
  chex.assert_trees_all_close(jax.jit(f, static_argnames="epsilon")(X, 1e-3), f(X, 1e-3))
  with pytest.raises((TypeError, ValueError)):
    jaxnorm.layer_norm(X, epsilon="small")


def _raise_immutable():
  bn = jnn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), X)
  bn.apply(variables, X)


def _raise_missing():
  bn = jnn.BatchNorm(use_running_average=True)
  variables = bn.init(jax.random.key(0), X)
  bn.apply({"params": variables["params"]}, X)


@pytest.mark.parametrize(
    "raise_it, cls, flax_cls",
    [
        (_raise_immutable, jnn.ImmutableBatchStatsError, flax.errors.ModifyScopeVariableError),
        (_raise_missing, jnn.MissingBatchStatsError, flax.errors.ScopeCollectionNotFound),
    ],
    ids=["immutable", "missing"],
)
def test_jaxnorm_errors_carry_no_flax_doc_link(raise_it, cls, flax_cls):
  with pytest.raises(cls) as info:
    raise_it()
  message = str(info.value)
  assert "flax.readthedocs.io" not in message and "flax.errors.html" not in message
  assert isinstance(info.value, flax_cls)  # still catchable as flax's error
  # Pickled (e.g. across processes) it stays itself, with the same message.
  back = pickle.loads(pickle.dumps(info.value))
  assert type(back) is cls and str(back) == message


def test_jvp_through_a_module_names_the_module_and_the_way_out():
  from flax import nnx  # noqa: PLC0415

  from jaxnorm import nnx as jnnx  # noqa: PLC0415

  x = jnp.ones((2, 8), jnp.float32)
  module = jnn.LayerNorm()
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=r"jaxnorm\.linen\.LayerNorm: .*reverse mode"):
    jax.jvp(lambda v: module.apply(variables, v), (x,), (x,))
  layer = jnnx.LayerNorm(8, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"jaxnorm\.nnx\.LayerNorm: .*custom_vjp=False"):
    jax.jvp(layer, (x,), (x,))


def test_public_namespace_and_signatures_hold_no_private_names():
  import inspect

  names = dir(jaxnorm)
  assert not [n for n in names if n.startswith("_") and n != "__version__"], names
  assert {"TYPE_CHECKING", "annotations", "importlib"}.isdisjoint(names)
  assert {"layer_norm", "linen", "nnx", "__version__"} <= set(names)
  for name in jaxnorm.__all__:
    obj = getattr(jaxnorm, name)
    params = inspect.signature(obj).parameters if callable(obj) else {}
    assert not [p for p in params if p.startswith("_")], (name, list(params))
