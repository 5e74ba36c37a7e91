"""Bad values that once passed the checks: each is refused at trace time, by name, or (axis_name lists) accepted.

* non-boolean `where=`/`mask=` (an additive attention mask read as "all valid");
* `epsilon` below the accumulation dtype's smallest normal (flushed to 0, NaN from a constant input);
* `axis_name` as a list (accepted by `lax.psum`, so accepted here too);
* linen running statistics of the wrong shape; `momentum` arrays outside [0, 1]; nnx `momentum`;
* torch modules with buffers of the wrong shape or a NaN `num_batches_tracked`;
* hyperparameters of the wrong type (`"1e-3"`, `True`) that used to be coerced.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

X = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
IMG = np.random.default_rng(1).normal(size=(2, 3, 3, 4)).astype(np.float32)
ADDITIVE = np.where(np.arange(6) < 3, 0.0, -1e9).astype(np.float32) * np.ones((4, 1), np.float32)

# --- Masks must be boolean. ------------------------------------------------------------------------------

MASKED_OPS = {
    "moments": lambda m: jaxnorm.moments(X, 0, where=m),
    "batch_norm": lambda m: jaxnorm.batch_norm(X, where=m),
    "layer_norm": lambda m: jaxnorm.layer_norm(X, where=m),
    "rms_norm": lambda m: jaxnorm.rms_norm(X, where=m),
    "group_norm": lambda m: jaxnorm.group_norm(IMG, num_groups=2, where=np.ones(IMG.shape, m.dtype)),
    "instance_norm": lambda m: jaxnorm.instance_norm(IMG, where=np.ones(IMG.shape, m.dtype)),
    "ghost_batch_norm": lambda m: jaxnorm.ghost_batch_norm(X, virtual_batch_size=2, where=m),
    "batch_renorm": lambda m: jaxnorm.batch_renorm(
        X, None, None, jnp.zeros(6), jnp.ones(6), r_max=3.0, d_max=5.0, where=m
    ),
}


@pytest.mark.parametrize("name", sorted(MASKED_OPS))
@pytest.mark.parametrize("mask", [ADDITIVE, (ADDITIVE == 0).astype(np.int32)], ids=["additive", "int01"])
def test_non_boolean_where_is_a_type_error(name, mask):
  with pytest.raises(TypeError, match=r"`where` must be a boolean array"):
    MASKED_OPS[name](mask)


def test_boolean_where_still_works():
  np.testing.assert_allclose(jaxnorm.layer_norm(X, where=ADDITIVE == 0)[:, :3], jaxnorm.layer_norm(X[:, :3]), atol=1e-5)


def test_non_boolean_mask_of_modules_is_a_type_error():
  ln = jnn.LayerNorm()
  variables = ln.init(jax.random.key(0), X)
  with pytest.raises(TypeError, match=r"`mask` must be a boolean array"):
    ln.apply(variables, X, mask=ADDITIVE)
  bn = jnn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), X)
  with pytest.raises(TypeError, match=r"must be a boolean array"):
    bn.apply(variables, X, mask=ADDITIVE, mutable=["batch_stats"])
  with pytest.raises(TypeError, match=r"must be a boolean array"):
    jnnx.LayerNorm(6, rngs=nnx.Rngs(0))(X, mask=ADDITIVE)


# --- epsilon must stay > 0 in the accumulation dtype. ---------------------------------------------------

EPS_OPS = {
    "layer_norm": lambda e, x: jaxnorm.layer_norm(x, epsilon=e),
    "rms_norm": lambda e, x: jaxnorm.rms_norm(x, epsilon=e),
    "batch_norm": lambda e, x: jaxnorm.batch_norm(x, epsilon=e),
    "normalize": lambda e, x: jaxnorm.normalize(x, jnp.zeros(6, x.dtype), jnp.zeros(6, x.dtype), epsilon=e),
    "weight_norm": lambda e, x: jaxnorm.weight_norm(x, None, epsilon=e),
    "spectral_norm": lambda e, x: jaxnorm.spectral_norm(x, jnp.ones(6, x.dtype), epsilon=e),
    "batch_renorm": lambda e, x: jaxnorm.batch_renorm(
        x, None, None, jnp.zeros(6), jnp.ones(6), r_max=3.0, d_max=5.0, epsilon=e
    ),
}


@pytest.mark.parametrize("name", sorted(EPS_OPS))
@pytest.mark.parametrize("epsilon", [1e-39, 1e-45])
def test_subnormal_epsilon_is_rejected_naming_the_smallest_normal(name, epsilon):
  with pytest.raises(ValueError, match=r"`epsilon`=.* must be >= 1.1754944e-38 \(jnp.finfo\(float32\).tiny\)"):
    EPS_OPS[name](epsilon, jnp.ones((4, 6), jnp.float32))


def test_smallest_normal_epsilon_keeps_a_constant_input_finite():
  tiny = float(jnp.finfo(jnp.float32).tiny)
  y = jaxnorm.layer_norm(jnp.ones((4, 6), jnp.float32), epsilon=tiny)
  assert np.all(np.isfinite(y))


def test_float64_ops_accept_epsilon_below_float32_range():
  """The bound is the accumulation dtype's: float64 statistics keep 1e-39 > 0."""
  x = jnp.ones((4, 6), jnp.float64)
  assert np.all(np.isfinite(jaxnorm.normalize(x, jnp.zeros(6), jnp.zeros(6), epsilon=1e-39)))
  assert np.all(np.isfinite(jaxnorm.weight_norm(x, None, epsilon=1e-300)))


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), 0.0, -1e-5])
def test_non_finite_or_non_positive_epsilon_is_rejected(epsilon):
  with pytest.raises(ValueError, match="`epsilon`"):
    jaxnorm.layer_norm(X, epsilon=epsilon)


# --- axis_name: any sequence of names. ------------------------------------------------------------------

AXIS_NAME_OPS = {
    "moments": lambda x, a: jaxnorm.moments(x, 0, axis_name=a)[1],
    "batch_norm": lambda x, a: jaxnorm.batch_norm(x, axis_name=a)[0],
    "group_norm": lambda x, a: jaxnorm.group_norm(x[None, :, None], num_groups=2, axis_name=a),
    "instance_norm": lambda x, a: jaxnorm.instance_norm(x[None, :, None], axis_name=a),
    "ghost_batch_norm": lambda x, a: jaxnorm.ghost_batch_norm(x, virtual_batch_size=2, axis_name=a)[0],
    "batch_renorm": lambda x, a: jaxnorm.batch_renorm(
        x, None, None, jnp.zeros(6), jnp.ones(6), r_max=3.0, d_max=5.0, axis_name=a
    )[0],
}


@pytest.mark.parametrize("name", sorted(AXIS_NAME_OPS))
def test_axis_name_as_a_list_equals_the_tuple(name):
  x = np.random.default_rng(2).normal(size=(3, 4, 6)).astype(np.float32)
  f = AXIS_NAME_OPS[name]
  as_list = jax.vmap(lambda x: f(x, ["i"]), axis_name="i")(x)
  as_tuple = jax.vmap(lambda x: f(x, ("i",)), axis_name="i")(x)
  as_str = jax.vmap(lambda x: f(x, "i"), axis_name="i")(x)
  np.testing.assert_allclose(as_list, as_tuple)
  np.testing.assert_allclose(as_list, as_str)


def test_linen_batch_norm_with_a_list_axis_name():
  x = np.random.default_rng(3).normal(size=(3, 4, 6)).astype(np.float32)
  bn = jnn.BatchNorm(use_running_average=False, axis_name=["batch"])
  variables = bn.init(jax.random.key(0), x[0])
  apply = lambda x: bn.apply(variables, x, mutable=["batch_stats"])[0]
  y = jax.vmap(apply, axis_name="batch")(x)
  np.testing.assert_allclose(y.reshape(-1, 6).mean(0), 0, atol=1e-5)


# --- Running statistics and momentum. -------------------------------------------------------------------


def test_linen_batch_norm_eval_with_running_statistics_of_another_width_names_both_shapes():
  bn = jnn.BatchNorm(use_running_average=True)
  variables = bn.init(jax.random.key(0), X)
  for name, wrong in (("mean", jnp.zeros(5)), ("var", jnp.ones((2, 3)))):
    stats = {**variables["batch_stats"], name: wrong}
    with pytest.raises(ValueError, match=rf"BatchNorm.*: `batch_stats/{name}` has shape {re.escape(str(tuple(wrong.shape)))}.*expects \(6,\)"):
      bn.apply({**variables, "batch_stats": stats}, X)


def test_linen_torch_convention_counter_of_the_wrong_shape_is_named():
  bn = jnn.BatchNorm(use_running_average=True, convention="torch")
  variables = bn.init(jax.random.key(0), X)
  stats = {**variables["batch_stats"], "num_batches_tracked": jnp.zeros((1,), jnp.int32)}
  with pytest.raises(ValueError, match=r"num_batches_tracked` has shape \(1,\)"):
    bn.apply({**variables, "batch_stats": stats}, X)


def test_linen_mean_only_batch_norm_wrong_stat_shape_is_named():
  m = jnn.MeanOnlyBatchNorm(use_running_average=True)
  variables = m.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"batch_stats/mean` has shape \(5,\)"):
    m.apply({**variables, "batch_stats": {"mean": jnp.zeros(5)}}, X)


@pytest.mark.parametrize("momentum", [jnp.asarray(1.5), jnp.asarray([0.9, -0.1]), np.asarray(2.0), 1.5, -0.1])
@pytest.mark.parametrize("cls", ["BatchNorm", "GhostBatchNorm", "BatchRenorm", "MeanOnlyBatchNorm"])
def test_linen_momentum_outside_unit_interval_is_rejected(cls, momentum):
  kwargs = {"virtual_batch_size": 2} if cls == "GhostBatchNorm" else {}
  module = getattr(jnn, cls)(use_running_average=False, momentum=momentum, **kwargs)
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\]"):
    variables = module.init(jax.random.key(0), X)
    module.apply(variables, X, mutable=["batch_stats"])


@pytest.mark.parametrize("momentum", [1.5, -0.1, jnp.asarray(1.5), float("nan")])
@pytest.mark.parametrize("cls", ["BatchNorm", "GhostBatchNorm", "BatchRenorm", "MeanOnlyBatchNorm"])
def test_nnx_momentum_outside_unit_interval_is_rejected(cls, momentum):
  kwargs = {"virtual_batch_size": 2} if cls == "GhostBatchNorm" else {}
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\]"):
    getattr(jnnx, cls)(6, momentum=momentum, rngs=nnx.Rngs(0), **kwargs)


def test_nnx_momentum_reassigned_after_construction_is_checked_at_the_call():
  bn = jnnx.BatchNorm(6, rngs=nnx.Rngs(0))
  bn.momentum = 2.0
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\]"):
    bn(X)


def test_momentum_array_inside_unit_interval_is_accepted():
  bn = jnn.BatchNorm(use_running_average=False, momentum=jnp.asarray(0.5))
  variables = bn.init(jax.random.key(0), X)
  _, updates = bn.apply(variables, X, mutable=["batch_stats"])
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.5 * X.mean(0), rtol=1e-5)


# --- Arguments of the wrong type are not coerced. -------------------------------------------------------


@pytest.mark.parametrize("epsilon", ["1e-3", True, np.bool_(True), 1e-3 + 0j, [1e-3]])
def test_epsilon_of_the_wrong_type_is_a_type_error(epsilon):
  with pytest.raises(TypeError, match="`epsilon` must be a real number"):
    jaxnorm.layer_norm(X, epsilon=epsilon)
  with pytest.raises(TypeError, match="`epsilon` must be a real number"):
    jnn.LayerNorm(epsilon=epsilon).init(jax.random.key(0), X)


@pytest.mark.parametrize("epsilon", [1e-3, 1, np.float32(1e-3), np.float64(1e-3), np.int64(1), jnp.float32(1e-3)])
def test_epsilon_numbers_are_accepted(epsilon):
  jaxnorm.layer_norm(X, epsilon=epsilon)


@pytest.mark.parametrize("num_groups", [True, "2", 2.0])
def test_num_groups_of_the_wrong_type_is_a_type_error(num_groups):
  with pytest.raises(TypeError, match="`num_groups` must be an int"):
    jaxnorm.group_norm(IMG, num_groups=num_groups)
  with pytest.raises(TypeError, match="`num_groups` must be an int"):
    jnn.GroupNorm(num_groups=num_groups).init(jax.random.key(0), IMG)
  with pytest.raises(TypeError, match="`num_groups` must be an int"):
    jnnx.GroupNorm(4, num_groups=num_groups, rngs=nnx.Rngs(0))


def test_num_groups_numpy_int_is_accepted():
  jaxnorm.group_norm(IMG, num_groups=np.int64(2))


@pytest.mark.parametrize("momentum", ["0.9", True])
def test_momentum_of_the_wrong_type_is_a_type_error(momentum):
  with pytest.raises(TypeError, match="`momentum` must be a real number"):
    jnn.BatchNorm(use_running_average=False, momentum=momentum).init(jax.random.key(0), X)
  with pytest.raises(TypeError, match="`momentum` must be a real number"):
    jnnx.BatchNorm(6, momentum=momentum, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,kwargs", [("virtual_batch_size", {"virtual_batch_size": True})])
def test_other_integer_arguments_reject_bool(name, kwargs):
  with pytest.raises(TypeError, match=f"`{name}` must be an int"):
    jaxnorm.ghost_batch_norm(X, **kwargs)


# --- Interop: torch state checked on the way in. --------------------------------------------------------


def test_torch_buffers_of_the_wrong_shape_are_named():
  torch = pytest.importorskip("torch")
  from jaxnorm import interop

  bn = torch.nn.BatchNorm2d(4)
  bn.running_mean = torch.zeros(5)
  with pytest.raises(ValueError, match=r"'running_mean' has shape \(5,\).*need \(4,\)"):
    interop.variables_from_torch(bn)
  ln = torch.nn.LayerNorm(3)
  ln.weight = torch.nn.Parameter(torch.ones(4))
  model = torch.nn.Sequential(torch.nn.Linear(2, 3), ln)
  with pytest.raises(ValueError, match=r"'weight' has shape \(4,\).*need \(3,\)"):
    interop.variables_from_torch(model, {"0": "dense", "1": "ln"})


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 2.0**40])
def test_torch_num_batches_tracked_that_is_not_a_count_is_named(bad):
  torch = pytest.importorskip("torch")
  from jaxnorm import interop

  bn = torch.nn.BatchNorm1d(3)
  bn.num_batches_tracked = torch.tensor(bad)
  with pytest.raises(ValueError, match="'num_batches_tracked' must be a non-negative integer count"):
    interop.variables_from_torch(bn)
  # Through a state dict too: torch casts a NaN into the int64 buffer as a huge negative number.
  state = torch.nn.BatchNorm1d(3).state_dict()
  state["num_batches_tracked"] = torch.tensor(bad)
  bn = torch.nn.BatchNorm1d(3)
  bn.load_state_dict(state)
  with pytest.raises(ValueError, match="'num_batches_tracked'"):
    interop.variables_from_torch(bn)


def test_torch_fractional_num_batches_tracked_is_named():
  torch = pytest.importorskip("torch")
  from jaxnorm import interop

  bn = torch.nn.BatchNorm1d(3)
  bn.num_batches_tracked = torch.tensor(2.5)
  with pytest.raises(ValueError, match="'num_batches_tracked' must be a non-negative integer count"):
    interop.variables_from_torch(bn)


def test_torch_running_statistics_with_nan_or_negative_variance_are_named():
  torch = pytest.importorskip("torch")
  from jaxnorm import interop

  bn = torch.nn.BatchNorm1d(3)
  bn.running_mean[1] = float("nan")
  with pytest.raises(ValueError, match="'running_mean' holds NaN"):
    interop.variables_from_torch(bn)
  bn = torch.nn.BatchNorm1d(3)
  bn.running_var[0] = -1.0
  with pytest.raises(ValueError, match="'running_var' holds negative"):
    interop.variables_from_torch(bn)


def test_valid_torch_state_still_converts():
  torch = pytest.importorskip("torch")
  from jaxnorm import interop

  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, groups=1), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4))
  model[1].num_batches_tracked += 7
  variables = interop.variables_from_torch(model, {"0": "conv", "1": "bn", "2": "gn"})
  assert int(variables["batch_stats"]["bn"]["num_batches_tracked"]) == 7


@pytest.mark.parametrize(
    "key, bad, match",
    [("num_batches_tracked", np.float32(np.nan), "'num_batches_tracked' must be a non-negative integer count"),
     ("num_batches_tracked", np.float32(2.7), "'num_batches_tracked' must be a non-negative integer count"),
     ("mean", np.array([0.0, np.nan, 0.0], np.float32), "'mean' holds NaN"),
     ("var", np.array([1.0, -1.0, 1.0], np.float32), "'var' holds negative")],
)
def test_bad_running_statistics_are_named_on_the_way_out_to_torch(key, bad, match):
  torch = pytest.importorskip("torch")
  from jaxnorm import interop

  stats = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32), "num_batches_tracked": np.int32(4)}
  stats[key] = bad
  variables = {"params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}, "batch_stats": stats}
  with pytest.raises(ValueError, match=match):
    interop.torch_state_dict(variables, torch.nn.BatchNorm1d(3))
