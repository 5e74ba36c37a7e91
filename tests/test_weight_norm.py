"""weight_norm, linen.WeightNorm (with data-dependent init) and linen.MeanOnlyBatchNorm.

References, never jaxnorm itself:

* `torch._weight_norm` in float64 (its fused CPU kernel, with ATen's own
  hand-written backward, when the feature axis is the first or the last;
  torch autograd otherwise) for outputs and gradients;
* finite differences (`check_grads`, order 2) and plain JAX autodiff of the
  same forward (`custom_vjp=False`) and of a textbook formula;
* `flax.linen.WeightNorm` on the same variables;
* float64 NumPy statistics for the data-dependent init and MeanOnlyBatchNorm.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxnorm
from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

torch = pytest.importorskip("torch")

F64 = dict(rtol=1e-10, atol=1e-12)


def rng(seed):
  return np.random.default_rng(seed)


def jnp_weight_norm(v, g, feature_axes):
  """Textbook formula, differentiated by plain autodiff: w = g v / ||v|| (no epsilon)."""
  features = () if feature_axes is None else tuple(a % v.ndim for a in np.atleast_1d(feature_axes))
  reduced = tuple(a for a in range(v.ndim) if a not in features)
  g = g.reshape(tuple(d if i in features else 1 for i, d in enumerate(v.shape)))
  return g * v / jnp.sqrt(jnp.sum(v * v, reduced, keepdims=True))


# ----------------------------------------------------------------------------------------------
# Functional weight_norm.
# ----------------------------------------------------------------------------------------------

# (v shape, feature_axes, torch dim, torch g shape); torch dim -1 means "one norm over everything".
TORCH_CASES = [
    ((3, 4), -1, 1, (1, 4)),  # Dense kernel (in, out): fused kernel, last dim
    ((4, 2, 3), 0, 0, (4, 1, 1)),  # torch's own layout (out, in, k): fused kernel, dim 0
    ((2, 3, 4), 1, 1, (1, 3, 1)),  # a middle axis: torch autograd
    ((3, 4), None, -1, ()),  # whole-tensor norm, scalar g
]


@pytest.mark.parametrize("shape, feature_axes, dim, g_shape", TORCH_CASES)
def test_forward_and_gradients_match_torch(shape, feature_axes, dim, g_shape):
  r = rng(0)
  v = r.normal(size=shape)
  g_t = r.normal(size=g_shape) + 2
  g = g_t.reshape(tuple(n for n in g_shape if n != 1) if g_shape else ())
  ct = r.normal(size=shape)

  vt = torch.tensor(v, requires_grad=True)
  gt = torch.tensor(g_t, requires_grad=True)
  w_t = torch._weight_norm(vt, gt, dim)
  (w_t * torch.tensor(ct)).sum().backward()

  def loss(v, g):
    return jnp.sum(jaxnorm.weight_norm(v, g, feature_axes=feature_axes) * ct)

  w, (dv, dg) = jax.jit(lambda v, g: (jaxnorm.weight_norm(v, g, feature_axes=feature_axes), jax.grad(loss, (0, 1))(v, g)))(v, g)
  np.testing.assert_allclose(w, w_t.detach().numpy(), **F64)
  np.testing.assert_allclose(dv, vt.grad.numpy(), **F64)
  np.testing.assert_allclose(dg, gt.grad.numpy().reshape(g.shape), **F64)


def test_gradients_match_paper_formula_and_textbook_autodiff():
  """Multi-axis features; the paper's grad_v = g/||v|| (I - w w^T/||w||^2) grad_w per feature, by hand."""
  r = rng(1)
  v, g, ct = r.normal(size=(2, 3, 4)), r.normal(size=(2, 4)), r.normal(size=(2, 3, 4))
  loss = lambda f: (lambda v, g: jnp.sum(f(v, g) * ct))
  ours = jax.jit(jax.grad(loss(lambda v, g: jaxnorm.weight_norm(v, g, feature_axes=(0, 2))), (0, 1)))(v, g)
  ref = jax.jit(jax.grad(loss(lambda v, g: jnp_weight_norm(v, g, (0, 2))), (0, 1)))(v, g)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, **F64)
  w = np.asarray(jnp_weight_norm(v, g, (0, 2)))
  for i in range(2):
    for j in range(4):
      vv, ww, gw = v[i, :, j], w[i, :, j], ct[i, :, j]
      projected = g[i, j] / np.linalg.norm(vv) * (np.eye(3) - np.outer(ww, ww) / (ww @ ww)) @ gw
      np.testing.assert_allclose(ours[0][i, :, j], projected, **F64)
      np.testing.assert_allclose(ours[1][i, j], gw @ vv / np.linalg.norm(vv), **F64)


@pytest.mark.parametrize("with_g", [True, False])
def test_check_grads_second_order(with_g):
  r = rng(2)
  v = r.normal(size=(3, 2))
  if with_g:
    check_grads(jax.jit(lambda v, g: jaxnorm.weight_norm(v, g)), (v, r.normal(size=2)), order=2, modes=["rev"])
  else:
    check_grads(jax.jit(lambda v: jaxnorm.weight_norm(v, None)), (v,), order=2, modes=["rev"])


def test_custom_vjp_false_is_the_same_function_and_supports_forward_mode():
  r = rng(3)
  v, g, tv = r.normal(size=(3, 4)), r.normal(size=4), r.normal(size=(3, 4))
  f = lambda v, cv: jaxnorm.weight_norm(v, g, custom_vjp=cv)

  @jax.jit
  def run(v):
    return f(v, True), f(v, False), jax.jacrev(lambda v: f(v, True))(v), jax.jacfwd(lambda v: f(v, False))(v)

  w1, w2, jr, jf = run(v)
  np.testing.assert_array_equal(w1, w2)
  np.testing.assert_allclose(jr, jf, **F64)
  _, tangent = jax.jvp(lambda v: f(v, False), (v,), (tv,))
  np.testing.assert_allclose(tangent, np.tensordot(jr, tv, axes=2), **F64)
  with pytest.raises(TypeError):  # the custom-VJP path has no forward mode: custom_vjp=False is for that
    jax.jvp(lambda v: f(v, True), (v,), (tv,))


def test_vmap_and_scan():
  r = rng(4)
  vs, gs, xs = r.normal(size=(3, 4, 2)), r.normal(size=(3, 2)), r.normal(size=(3, 5, 4))
  batched = jax.jit(jax.vmap(lambda v, g: jaxnorm.weight_norm(v, g)))(vs, gs)
  for i in range(3):
    np.testing.assert_allclose(batched[i], jnp_weight_norm(vs[i], gs[i], -1), **F64)

  def loss(v, g, norm):
    def step(h, x):
      h = jnp.tanh(x @ norm(v, g) + h)
      return h, jnp.sum(h)

    return jnp.sum(lax.scan(step, jnp.zeros((5, 2)), xs)[1])

  ours = jax.jit(jax.grad(lambda v, g: loss(v, g, jaxnorm.weight_norm), (0, 1)))(vs[0], gs[0])
  ref = jax.jit(jax.grad(lambda v, g: loss(v, g, lambda v, g: jnp_weight_norm(v, g, -1)), (0, 1)))(vs[0], gs[0])
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, **F64)


def test_zero_v_gives_finite_output_and_gradients():
  v, g = jnp.zeros((3, 2), jnp.float32), jnp.array([1.0, 2.0], jnp.float32)
  w = jaxnorm.weight_norm(v, g)
  dv, dg = jax.grad(lambda v, g: jnp.sum(jaxnorm.weight_norm(v, g) * jnp.arange(6.0, dtype=jnp.float32).reshape(3, 2)), (0, 1))(v, g)
  assert np.all(w == 0) and np.all(np.isfinite(dv)) and np.all(np.isfinite(dg))
  # The documented convention: ||v|| = sqrt(sum v^2 + eps), so dL/dv = g G / sqrt(eps) and dL/dg = 0.
  np.testing.assert_allclose(dv, np.asarray(g, np.float64) * np.arange(6.0).reshape(3, 2) / np.sqrt(1e-12), rtol=1e-6)
  np.testing.assert_array_equal(dg, 0)


def test_dtypes():
  v, g = jnp.ones((3, 2), jnp.bfloat16), jnp.ones(2, jnp.float32)
  assert jaxnorm.weight_norm(v, g).dtype == jnp.bfloat16
  assert jaxnorm.weight_norm(v, g, dtype=jnp.float32).dtype == jnp.float32
  dv, dg = jax.grad(lambda v, g: jnp.sum(jaxnorm.weight_norm(v, g).astype(jnp.float32)), (0, 1))(v, g)
  assert dv.dtype == jnp.bfloat16 and dg.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(v=np.ones((3, 2)), g=np.ones(3)), ValueError, "`g` must have shape \\(2,\\)"),
        (dict(v=np.ones((3, 2)), g=np.ones((1, 2))), ValueError, "`g` must have shape"),
        (dict(v=np.ones((3, 2), np.int32), g=np.ones(2)), TypeError, "`v` must be a real floating"),
        (dict(v=np.ones((3, 2)), g=np.ones(2, np.int32)), TypeError, "`g` must be a real floating"),
        (dict(v=np.ones((3, 2)), g=np.ones(2), feature_axes=2), ValueError, "`feature_axes`=2 is out of range"),
        (dict(v=np.ones((3, 2)), g=np.ones(2), epsilon=0.0), ValueError, "`epsilon` must be > 0"),
        (dict(v=np.ones((3, 2)), g=np.ones(2), dtype=jnp.int32), TypeError, "`dtype` must be a floating"),
    ],
)
def test_errors(kwargs, error, match):
  v, g = kwargs.pop("v"), kwargs.pop("g")
  with pytest.raises(error, match=match):
    jaxnorm.weight_norm(v, g, **kwargs)


# ----------------------------------------------------------------------------------------------
# linen.WeightNorm against flax.linen.WeightNorm.
# ----------------------------------------------------------------------------------------------


class Bar(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(2)(x)))


class Dense(nn.Dense):
  """flax's Dense, its own computation under the promotion it is written for (`flax_promotion`).

  It mixes a bfloat16 input or kernel with float32 parameters implicitly. A jaxnorm wrapper
  around it computes the normalized kernel before this body runs: jaxnorm stays strict.
  """

  def __call__(self, inputs):
    with flax_promotion():
      return super().__call__(inputs)


def _net(wrapper, make_layer, **kwargs):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = Dense(4)(x)
      return wrapper(make_layer(), **kwargs)(x)

  return Net()


class Family(nn.Module):
  """One network with every wrapper configuration (one compilation instead of one per case)."""

  wrapper: type

  @nn.compact
  def __call__(self, x):
    x = self.wrapper(nn.Conv(3, (2, 2)))(x)  # default: kernels, per output feature
    x = self.wrapper(nn.Conv(2, (2, 2)), use_scale=False, feature_axes=(2, 3))(x)
    x = x.reshape(x.shape[0], -1)
    x = self.wrapper(nn.Dense(3), variable_filter=None, feature_axes=None)(x)  # bias too, one norm each
    return self.wrapper(Bar(), variable_filter={"kernel"}, epsilon=1e-3)(x)  # nested kernels, per path


def test_module_matches_flax():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 2), jnp.float32)
  theirs, ours = Family(nn.WeightNorm), Family(jnn.WeightNorm)
  variables = theirs.init(jax.random.key(1), x)
  # Same tree: a flax checkpoint loads unchanged.
  assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree_util.tree_map(jnp.shape, variables)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  variables = treedef.unflatten([p * 1.5 + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])

  def loss(model, variables):
    y = model.apply(variables, x)
    return jnp.sum(jnp.sin(y)), y

  (_, y_t), g_t = jax.jit(jax.value_and_grad(lambda v: loss(theirs, v), has_aux=True))(variables)
  (_, y_o), g_o = jax.jit(jax.value_and_grad(lambda v: loss(ours, v), has_aux=True))(variables)
  assert y_o.dtype == y_t.dtype
  np.testing.assert_allclose(y_o, y_t, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_o), jax.tree_util.tree_leaves(g_t)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_module_dtypes_match_flax():
  x = jnp.ones((2, 3), jnp.bfloat16)
  for kwargs in (dict(dtype=jnp.bfloat16), dict(param_dtype=jnp.bfloat16)):
    make = lambda: Dense(4, param_dtype=kwargs.get("param_dtype", jnp.float32))
    theirs, ours = _net(nn.WeightNorm, make, **kwargs), _net(jnn.WeightNorm, make, **kwargs)
    with flax_promotion():
      variables = theirs.init(jax.random.key(0), x)
      y_theirs = theirs.apply(variables, x)
    assert ours.apply(variables, x).dtype == y_theirs.dtype
    # Parameters keep their param_dtype. (flax, writing the normalized kernel back at init, stores
    # it in the compute `dtype`: a bfloat16 kernel for dtype=bfloat16.)
    mine = ours.init(jax.random.key(0), x)["params"]
    assert mine["Dense_1"]["kernel"].dtype == kwargs.get("param_dtype", jnp.float32)
    assert mine["WeightNorm_0"]["Dense_1/kernel/scale"].dtype == kwargs.get("param_dtype", jnp.float32)


def test_wrapped_parameters_are_never_overwritten():
  """flax stores the normalized kernel as the layer's kernel at init; jaxnorm keeps the initializer's draw."""
  x = jnp.ones((2, 3), jnp.float32)
  make = lambda: nn.Dense(4, kernel_init=nn.initializers.constant(2.0))
  ours = _net(jnn.WeightNorm, make)
  variables = ours.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["params"]["Dense_1"]["kernel"], 2.0)  # flax 0.12 stores 0.5 here
  _, updates = ours.apply(variables, x, mutable=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates, variables)


def test_wrapped_layer_keeps_its_own_mutable_collections():
  """A wrapped layer with running statistics still updates them (flax 0.12 raises ModifyScopeVariableError)."""

  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))

  x = jax.random.normal(jax.random.key(0), (8, 2), jnp.float32)
  model = jnn.WeightNorm(Inner())
  variables = model.init(jax.random.key(1), x)
  y, updates = model.apply(variables, x, mutable=["batch_stats"])
  # Reference: the plain layer, given the weight-normalized kernel by hand.
  inner = jax.tree_util.tree_map(np.asarray, variables["params"]["layer_instance"])
  kernel = inner["Dense_0"]["kernel"]
  inner["Dense_0"]["kernel"] = kernel / np.linalg.norm(kernel, axis=0)
  y_ref, updates_ref = Inner().apply(
      {"params": inner, "batch_stats": variables["batch_stats"]["layer_instance"]}, x, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      updates["batch_stats"]["layer_instance"],
      updates_ref["batch_stats"],
  )


# ----------------------------------------------------------------------------------------------
# Data-dependent initialization.
# ----------------------------------------------------------------------------------------------


def _np_standardized(y):
  y = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
  return y.mean(0), y.std(0)


@pytest.mark.parametrize(
    "make_layer, shape, kwargs",
    [
        (
            lambda: nn.Dense(6, bias_init=nn.initializers.constant(0.5), param_dtype=jnp.float64),
            (64, 3),
            dict(scale_init=nn.initializers.constant(2.0)),
        ),
        (lambda: nn.Conv(4, (3, 3), param_dtype=jnp.float64), (4, 6, 6, 2), dict()),
    ],
)
def test_data_init_standardizes_the_init_batch(make_layer, shape, kwargs):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float64) * 3 + 5
  layer = jnn.WeightNorm(make_layer(), data_init=True, param_dtype=jnp.float64, **kwargs)
  y_init, variables = layer.init_with_output(jax.random.key(1), x)
  y = layer.apply(variables, x)
  np.testing.assert_allclose(y, y_init, rtol=1e-9, atol=1e-9)  # init's output is what the parameters give
  mean, std = _np_standardized(y)
  np.testing.assert_allclose(mean, 0, atol=1e-9)
  np.testing.assert_allclose(std, 1, rtol=1e-8)
  # The paper's formulas, from t = v.x / ||v|| computed here with g = 1 and no bias.
  kernel = np.asarray(variables["params"]["layer_instance"]["kernel"], np.float64)
  t = make_layer().apply(
      {"params": {"kernel": kernel / np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0), "bias": np.zeros(kernel.shape[-1])}}, x
  )
  t_mean, t_std = _np_standardized(t)
  np.testing.assert_allclose(variables["params"]["layer_instance/kernel/scale"], 1 / t_std, rtol=1e-8)
  np.testing.assert_allclose(variables["params"]["layer_instance"]["bias"], -t_mean / t_std, rtol=1e-8, atol=1e-10)


def test_data_init_is_sequential_through_a_network_and_off_by_default():
  """Each layer sees the already initialized activations of the one before (the paper's procedure)."""
  x = jax.random.normal(jax.random.key(0), (128, 3), jnp.float32) * 4 + 1

  class Net(nn.Module):
    data_init: bool

    @nn.compact
    def __call__(self, x):
      h = jnn.WeightNorm(nn.Dense(8), data_init=self.data_init)(x)
      self.sow("intermediates", "pre1", h)
      h = jnn.WeightNorm(nn.Dense(5), data_init=self.data_init)(nn.relu(h))
      self.sow("intermediates", "pre2", h)
      return h

  variables = Net(True).init(jax.random.key(1), x)
  _, state = Net(True).apply(variables, x, mutable=["intermediates"])
  for name in ("pre1", "pre2"):
    mean, std = _np_standardized(state["intermediates"][name][0])
    np.testing.assert_allclose(mean, 0, atol=1e-5)
    np.testing.assert_allclose(std, 1, rtol=1e-4)
  # Off by default: the initializers' values (g = 1, b = 0) stay.
  params = Net(False).init(jax.random.key(1), x)["params"]
  np.testing.assert_array_equal(params["WeightNorm_1"]["Dense_1/kernel/scale"], 1)
  np.testing.assert_array_equal(params["Dense_1"]["bias"], 0)


def test_data_init_without_bias_sets_unit_variance():
  x = jax.random.normal(jax.random.key(0), (64, 3), jnp.float64) + 2
  layer = jnn.WeightNorm(nn.Dense(4, use_bias=False, param_dtype=jnp.float64), data_init=True, param_dtype=jnp.float64)
  y = layer.apply(layer.init(jax.random.key(1), x), x)
  _, std = _np_standardized(y)
  np.testing.assert_allclose(std, 1, rtol=1e-8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(use_scale=False), "use_scale=True"),
        (dict(variable_filter=None), "exactly one normalized parameter"),
        (dict(feature_axes=0), "last axis"),
    ],
)
def test_data_init_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jnn.WeightNorm(nn.Dense(3), data_init=True, **kwargs).init(jax.random.key(0), jnp.ones((4, 3), jnp.float32))


# ----------------------------------------------------------------------------------------------
# MeanOnlyBatchNorm.
# ----------------------------------------------------------------------------------------------


def test_mean_only_batch_norm_training_running_mean_and_inference():
  r = rng(5)
  x = r.normal(size=(6, 2, 3)) * 2 + 1e4  # a large offset: the output must stay exact
  bn = jnn.MeanOnlyBatchNorm(momentum=0.9)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree_util.tree_map(jnp.shape, variables) == {"batch_stats": {"mean": (3,)}, "params": {"bias": (3,)}}
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0)  # init does not update statistics
  bias = r.normal(size=3).astype(np.float32)  # float32 parameters, so the float32 output below stays float32
  # A float64 running mean (init's is float32, and its dtype is kept), checked to float64 precision below.
  variables = {"batch_stats": {"mean": np.zeros(3)}, "params": {"bias": bias}}
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y, x - x.mean((0, 1)) + bias, rtol=1e-12, atol=1e-9)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * x.mean((0, 1)), rtol=1e-12)
  y_eval = bn.apply({**variables, **updates}, x, use_running_average=True)
  np.testing.assert_allclose(y_eval, x - 0.1 * x.mean((0, 1)) + bias, rtol=1e-12)
  # float32 at a mean of 1e4 times the spread: the output keeps float32 precision.
  x32 = jnp.asarray(x, jnp.float32)
  y32 = bn.apply(variables, x32, use_running_average=False, mutable=["batch_stats"])[0]
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(y32, np.asarray(x32, np.float64) - np.asarray(x32, np.float64).mean((0, 1)) + bias, atol=2e-3)


def test_mean_only_batch_norm_mask_and_gradient():
  r = rng(6)
  x, ct = r.normal(size=(8, 3)), r.normal(size=(8, 3))
  mask = r.random((8, 3)) < 0.6
  mask[0] = True
  x_nan = np.where(mask, x, np.nan)
  bn = jnn.MeanOnlyBatchNorm(use_running_average=False, use_bias=False)
  loss = lambda x: jnp.sum(bn.apply({"batch_stats": {"mean": jnp.zeros(3)}}, x, mask=mask, mutable=["batch_stats"])[0] * (ct * mask))
  y, _ = bn.apply({"batch_stats": {"mean": jnp.zeros(3)}}, x_nan, mask=mask, mutable=["batch_stats"])
  masked_mean = np.ma.masked_array(x, ~mask).mean(0).data
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, x - masked_mean, 0), **F64)
  dx = jax.grad(loss)(x_nan)
  n = mask.sum(0)
  expected = (ct * mask - (ct * mask).sum(0) / n) * mask  # d/dx of sum_valid ct (x - mean_valid)
  np.testing.assert_allclose(dx, expected, **F64)


def test_mean_only_batch_norm_axis_name_takes_the_global_mean():
  r = rng(7)
  x = r.normal(size=(3, 4, 2)) + np.arange(3)[:, None, None]  # 3 "devices" with different means
  bn = jnn.MeanOnlyBatchNorm(use_running_average=False, axis_name="devices")
  variables = bn.init(jax.random.key(0), x[0])
  variables = {**variables, "batch_stats": {"mean": np.zeros(2)}}  # float64, as the reference below
  y, updates = jax.vmap(lambda x: bn.apply(variables, x, mutable=["batch_stats"]), axis_name="devices")(x)
  np.testing.assert_allclose(y.reshape(12, 2), x.reshape(12, 2) - x.reshape(12, 2).mean(0), **F64)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], np.broadcast_to(0.01 * x.reshape(12, 2).mean(0), (3, 2)), **F64)
