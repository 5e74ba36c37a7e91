"""Running-statistics conventions of the linen batch-statistics modules against PyTorch and NumPy.

* ``convention="torch"``: `torch.nn.BatchNorm2d` in float64 (NCHW there, NHWC
  here), step by step in train mode and then in eval mode: outputs,
  ``running_mean``, ``running_var``, ``num_batches_tracked``, for momentum 0.1
  (the convention default), an explicit momentum and None (cumulative average);
  masks and a mapped axis against torch on the valid values alone; ghost batch
  norm against a float64 NumPy reference; batch renorm with ``r_max=1,
  d_max=0`` against torch too.
* ``track_running_stats=False``: torch's module of the same setting, and no
  ``batch_stats`` variables at all.
* ``convention="flax"`` stays flax: `flax.linen.BatchNorm` bit for bit.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

torch = pytest.importorskip("torch")

TOL = dict(rtol=1e-10, atol=1e-12)
C = 3


def _batches(steps=3, shape=(4, 2, 3, C), seed=0):
  r = np.random.default_rng(seed)
  return [r.normal(size=shape) * (1 + i) + 2 * i - 1 for i in range(steps)]


def _nchw(x):
  return torch.tensor(np.moveaxis(x, -1, 1))


def _nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def _train(module, variables, x, **call):
  if module.use_running_average is None:
    call["use_running_average"] = False
  y, updates = module.apply(variables, x, mutable=["batch_stats"], **call)
  return np.asarray(y), {**variables, **updates}


def _assert_stats_like_torch(variables, bn_torch):
  stats = variables["batch_stats"]
  np.testing.assert_allclose(stats["mean"], bn_torch.running_mean.numpy(), **TOL)
  np.testing.assert_allclose(stats["var"], bn_torch.running_var.numpy(), **TOL)
  assert stats["num_batches_tracked"].dtype == jnp.int32
  assert int(stats["num_batches_tracked"]) == int(bn_torch.num_batches_tracked)


def _torch_params(variables, bn_torch):
  with torch.no_grad():
    bn_torch.weight.copy_(torch.tensor(np.asarray(variables["params"]["scale"])))
    bn_torch.bias.copy_(torch.tensor(np.asarray(variables["params"]["bias"])))


def _random_params(variables, seed=5):
  r = np.random.default_rng(seed)
  params = {k: jnp.asarray(np.asarray(v, np.float64) + 0.3 * r.normal(size=v.shape)) for k, v in variables["params"].items()}
  return {**variables, "params": params}


@pytest.mark.parametrize("momentum", ["default", 0.3, None])
def test_batch_norm_torch_convention_matches_torch_step_by_step(momentum):
  xs = _batches()
  kwargs = {} if momentum == "default" else {"momentum": momentum}
  ours = jnn.BatchNorm(convention="torch", **kwargs)
  theirs = torch.nn.BatchNorm2d(C, momentum=0.1 if momentum == "default" else momentum, dtype=torch.float64)
  variables = _random_params(ours.init(jax.random.key(0), xs[0], use_running_average=False))
  assert jax.tree_util.tree_map(jnp.shape, variables["batch_stats"]) == {
      "mean": (C,),
      "num_batches_tracked": (),
      "var": (C,),
  }
  _torch_params(variables, theirs)
  theirs.train()
  for x in xs:
    y, variables = _train(ours, variables, x)
    np.testing.assert_allclose(y, _nhwc(theirs(_nchw(x))), **TOL)
    _assert_stats_like_torch(variables, theirs)
  theirs.eval()
  x = _batches(1, seed=1)[0]
  y = ours.apply(variables, x, use_running_average=True)
  np.testing.assert_allclose(y, _nhwc(theirs(_nchw(x))), **TOL)


def test_torch_convention_under_jit_and_momentum_default():
  """The counter and the cumulative average are traced values under jit; unset momentum is 0.1, not flax's 0.99."""
  xs = _batches()
  assert jnn.BatchNorm().momentum == 0.99  # flax's default, as flax.linen.BatchNorm
  for momentum, torch_momentum in [({}, 0.1), ({"momentum": 0.99}, 0.99), ({"momentum": None}, None)]:
    ours = jnn.BatchNorm(use_running_average=False, convention="torch", **momentum)
    theirs = torch.nn.BatchNorm2d(C, momentum=torch_momentum, affine=False, dtype=torch.float64)
    variables = ours.init(jax.random.key(0), xs[0])
    step = jax.jit(lambda v, x: ours.apply(v, x, mutable=["batch_stats"])[1])
    for x in xs:
      variables = {**variables, **step(variables, x)}
      theirs(_nchw(x))
      _assert_stats_like_torch(variables, theirs)


def test_torch_convention_mask_counts_valid_values():
  """With a mask, n in n / (n - 1) is the number of valid values: torch on the valid examples alone."""
  xs = _batches(2, shape=(6, 2, 2, C))
  keep = [np.array([1, 1, 0, 1, 0, 1], bool), np.array([0, 1, 1, 1, 1, 1], bool)]
  ours = jnn.BatchNorm(use_running_average=False, convention="torch", momentum=0.2)
  theirs = torch.nn.BatchNorm2d(C, momentum=0.2, affine=False, dtype=torch.float64)
  variables = ours.init(jax.random.key(0), xs[0])
  for x, k in zip(xs, keep):
    y, variables = _train(ours, variables, x, mask=k[:, None, None, None])
    np.testing.assert_allclose(y[k], _nhwc(theirs(_nchw(x[k]))), **TOL)
    _assert_stats_like_torch(variables, theirs)


@pytest.mark.parametrize("masked", [False, True])
def test_torch_convention_across_devices(masked):
  """With `axis_name`, n counts the valid values of every device: torch on the union of the devices' data."""
  D, N = 3, 4
  x = _batches(1, shape=(D, N, 2, C))[0]
  keep = np.ones((D, N), bool)
  if masked:
    keep[0, 1:] = False  # devices hold different numbers of valid examples
    keep[2, 0] = False
  ours = jnn.BatchNorm(use_running_average=False, convention="torch", axis_name="d")
  variables = ours.init(jax.random.key(0), x[0])

  def step(x, k):
    return ours.apply(variables, x, mask=k[:, None, None], mutable=["batch_stats"])

  y, updates = jax.vmap(step, axis_name="d")(x, keep)
  theirs = torch.nn.BatchNorm2d(C, affine=False, dtype=torch.float64)
  valid = x[keep]  # (n, 2, C): use a 4-D torch input (n, C, 2, 1)
  y_t = _nhwc(theirs(_nchw(valid[:, :, None, :])))[:, :, 0, :]
  np.testing.assert_allclose(np.asarray(y)[keep], y_t, **TOL)
  for d in range(D):  # every device ends with the same running statistics
    _assert_stats_like_torch(jax.tree_util.tree_map(lambda a: a[d], updates), theirs)


def test_track_running_stats_false_matches_torch():
  xs = _batches(2)
  ours = jnn.BatchNorm(track_running_stats=False)
  theirs = torch.nn.BatchNorm2d(C, track_running_stats=False, dtype=torch.float64)
  variables = _random_params(ours.init(jax.random.key(0), xs[0]))
  assert set(variables) == {"params"}  # no batch_stats at all
  _torch_params(variables, theirs)
  for mode in ["train", "eval"]:
    getattr(theirs, mode)()
    for x in xs:
      # Batch statistics in both modes, whatever use_running_average says, and nothing to update.
      y, updates = ours.apply(variables, x, use_running_average=mode == "eval", mutable=["batch_stats"])
      assert updates == {}
      np.testing.assert_allclose(y, _nhwc(theirs(_nchw(x))), **TOL)
  # use_running_average need not be set, and no mutable collection is needed.
  np.testing.assert_allclose(ours.apply(variables, xs[0]), _nhwc(theirs(_nchw(xs[0]))), **TOL)


def test_ghost_batch_norm_torch_convention_against_numpy():
  """Each virtual batch's variance is corrected with its own count before the average."""
  x = _batches(1, shape=(6, 2, C))[0]
  keep = np.array([1, 1, 0, 1, 1, 1], bool)[:, None, None]
  ours = jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=3, convention="torch", momentum=0.25)
  variables = ours.init(jax.random.key(0), x)
  mean, var = np.zeros(C), np.ones(C)
  for step in range(2):
    _, variables = _train(ours, variables, x + step, mask=keep)
    chunks = [(x + step)[g * 3 : (g + 1) * 3][keep[g * 3 : (g + 1) * 3, 0, 0]].reshape(-1, C) for g in range(2)]
    batch_mean = np.mean([c.mean(0) for c in chunks], 0)
    batch_var = np.mean([c.var(0, ddof=1) for c in chunks], 0)
    mean, var = 0.75 * mean + 0.25 * batch_mean, 0.75 * var + 0.25 * batch_var
    np.testing.assert_allclose(variables["batch_stats"]["mean"], mean, **TOL)
    np.testing.assert_allclose(variables["batch_stats"]["var"], var, **TOL)
    assert int(variables["batch_stats"]["num_batches_tracked"]) == step + 1
  variables_nt = jnn.GhostBatchNorm(virtual_batch_size=3, track_running_stats=False).init(jax.random.key(0), x)
  assert set(variables_nt) == {"params"}


def test_batch_renorm_torch_convention_counter_and_plain_bn_limit():
  """r_max=1, d_max=0 is torch's BatchNorm2d; a scheduled bound reads num_batches_tracked (no `steps`)."""
  xs = _batches()
  ours = jnn.BatchRenorm(use_running_average=False, convention="torch", r_max=1.0, d_max=0.0)
  theirs = torch.nn.BatchNorm2d(C, affine=False, dtype=torch.float64)
  variables = ours.init(jax.random.key(0), xs[0])
  for x in xs:
    y, variables = _train(ours, variables, x)
    np.testing.assert_allclose(y, _nhwc(theirs(_nchw(x))), **TOL)
    _assert_stats_like_torch(variables, theirs)
  scheduled = jnn.BatchRenorm(use_running_average=False, convention="torch")
  variables = scheduled.init(jax.random.key(0), xs[0])
  assert set(variables["batch_stats"]) == {"mean", "var", "num_batches_tracked"}
  for x in xs:
    _, variables = _train(scheduled, variables, x)
  assert int(variables["batch_stats"]["num_batches_tracked"]) == len(xs)


def test_flax_convention_is_flax_bit_for_bit():
  xs = _batches()
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False)
  ours = jnn.BatchNorm(use_running_average=False, momentum=0.9, convention="flax")
  with flax_promotion():
    v_theirs = v_ours = theirs.init(jax.random.key(0), xs[0])
  for x in xs:
    with flax_promotion():
      _, v_theirs = _train(theirs, v_theirs, x)
    _, v_ours = _train(ours, v_ours, x)
  assert jax.tree_util.tree_structure(v_ours) == jax.tree_util.tree_structure(v_theirs)
  for a, b in zip(jax.tree_util.tree_leaves(v_ours), jax.tree_util.tree_leaves(v_theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


def test_bad_convention_arguments():
  x = jnp.ones((4, C))
  with pytest.raises(ValueError, match="`convention` must be one of"):
    jnn.BatchNorm(use_running_average=False, convention="pytorch").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='only under convention="torch"'):
    jnn.BatchNorm(use_running_average=False, momentum=None).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\]"):
    jnn.GhostBatchNorm(use_running_average=False, momentum=1.5).init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="`track_running_stats` must be a bool"):
    jnn.BatchNorm(use_running_average=False, track_running_stats="no").init(jax.random.key(0), x)
