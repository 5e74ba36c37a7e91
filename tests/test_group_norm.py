"""group_norm / instance_norm and linen GroupNorm / InstanceNorm.

References, none of them jaxnorm itself:

* PyTorch float64 (`F.group_norm`, `F.instance_norm`, autograd), NCHW, with
  inputs and gradients transposed to and from jaxnorm's channels-last layout;
* `flax.linen.GroupNorm` / `InstanceNorm` (``use_fast_variance=False``) on the
  same variables: outputs, gradients, variable trees, dtypes and errors;
* the textbook formula in float64 `jax.numpy` differentiated by plain autodiff
  (masks, NaN padding, vmap, scan), and finite differences (`check_grads`);
* the identities of the paper: G = 1 is layer norm over (H, W, C), G = C is
  instance norm.

Shapes are tiny: JAX compile time dominates the runtime of this file.
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
F = torch.nn.functional

F64 = dict(rtol=1e-10, atol=1e-12)


def rng(seed):
  return np.random.default_rng(seed)


def jnp_group_norm(x, scale=None, bias=None, num_groups=1, eps=1e-6, where=None):
  """The textbook formula in float64 jax.numpy (plain autodiff): statistics per example and group."""
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
  wg = None if where is None else jnp.broadcast_to(where, x.shape).reshape(xg.shape)
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(xg, axes, keepdims=True, where=wg)
  var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True, where=wg)
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
  if scale is not None:
    y = y * jnp.broadcast_to(scale, x.shape)
  if bias is not None:
    y = y + jnp.broadcast_to(bias, x.shape)
  return y


def jnp_instance_norm(x, scale=None, bias=None, eps=1e-6, where=None):
  return jnp_group_norm(x, scale, bias, x.shape[-1], eps, where)


def random_mask(r, shape, min_valid=2):
  """A mask with at least `min_valid` valid elements per example and channel (hence per group)."""
  while True:
    mask = r.random(shape) < 0.6
    if np.all(mask.sum(tuple(range(1, len(shape) - 1))) >= min_valid):
      return mask


# ----------------------------------------------------------------------------------------------
# PyTorch parity, float64, forward and backward.
# ----------------------------------------------------------------------------------------------


def _torch_vs_ours(torch_fn, our_fn, x_nchw, scale, bias, seed):
  ct_nchw = rng(seed).normal(size=x_nchw.shape)
  ts = [None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x_nchw, scale, bias)]
  out = torch_fn(*ts)
  (out * torch.tensor(ct_nchw)).sum().backward()

  to_nhwc, to_nchw = (lambda a: np.moveaxis(a, 1, -1)), (lambda a: np.moveaxis(a, -1, 1))
  argnums = tuple(i for i, a in enumerate((x_nchw, scale, bias)) if a is not None)
  loss = lambda *a: jnp.sum(our_fn(*a) * to_nhwc(ct_nchw))
  y, grads = jax.jit(lambda *a: (our_fn(*a), jax.grad(loss, argnums)(*a)))(to_nhwc(x_nchw), scale, bias)

  np.testing.assert_allclose(to_nchw(np.asarray(y)), out.detach().numpy(), **F64)
  theirs = [t.grad.numpy() for t in ts if t is not None]
  np.testing.assert_allclose(to_nchw(np.asarray(grads[0])), theirs[0], **F64)
  for g, g_t in zip(grads[1:], theirs[1:]):
    np.testing.assert_allclose(g, g_t, **F64)
  assert np.abs(theirs[0]).max() > 1e-3  # a non-trivial gradient


@pytest.mark.parametrize(
    "nchw_shape, groups, affine", [((2, 6, 3, 2), 3, True), ((3, 6), 2, False), ((2, 4, 5), 1, True)]
)
def test_group_norm_matches_torch(nchw_shape, groups, affine):
  r = rng(0)
  x = r.normal(size=nchw_shape) * 1.7 + 0.6
  c = nchw_shape[1]
  s, b = (r.normal(size=c), r.normal(size=c)) if affine else (None, None)
  _torch_vs_ours(
      lambda x, s, b: F.group_norm(x, groups, s, b, eps=1e-5),
      lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=groups, epsilon=1e-5),
      x,
      s,
      b,
      seed=1,
  )


@pytest.mark.parametrize("nchw_shape, affine", [((2, 3, 4, 2), True), ((2, 3, 5), False)])
def test_instance_norm_matches_torch(nchw_shape, affine):
  r = rng(2)
  x = r.normal(size=nchw_shape) * 0.8 - 1.2
  c = nchw_shape[1]
  s, b = (r.normal(size=c), r.normal(size=c)) if affine else (None, None)
  _torch_vs_ours(
      lambda x, s, b: F.instance_norm(x, weight=s, bias=b, use_input_stats=True, eps=1e-5),
      lambda x, s, b: jaxnorm.instance_norm(x, s, b, epsilon=1e-5),
      x,
      s,
      b,
      seed=3,
  )


# ----------------------------------------------------------------------------------------------
# Gradients: finite differences (second order) and autodiff of the textbook formula.
# ----------------------------------------------------------------------------------------------

SHAPE = (2, 3, 2, 4)


def _grad_case(op, masked, seed):
  r = rng(seed)
  x = r.normal(size=SHAPE) * 1.3 + 0.4
  s, b = r.normal(size=4), r.normal(size=4)
  where = random_mask(r, SHAPE) if masked else None
  if op == "group_norm":
    ours = lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=2, epsilon=1e-3, where=where)
    ref = lambda x, s, b: jnp_group_norm(x, s, b, 2, 1e-3, where)
  else:
    ours = lambda x, s, b: jaxnorm.instance_norm(x, s, b, epsilon=1e-3, where=where)
    ref = lambda x, s, b: jnp_instance_norm(x, s, b, 1e-3, where)
  return ours, ref, (x, s, b), where


@pytest.mark.parametrize("op, masked", [("group_norm", False), ("group_norm", True), ("instance_norm", True)])
def test_gradients_match_autodiff_and_finite_differences(op, masked):
  ours, ref, args, _ = _grad_case(op, masked, seed=4)
  ct = rng(5).normal(size=SHAPE)
  loss = lambda f: (lambda *a: jnp.sum(f(*a) * ct))
  y, y_ref, g, g_ref = jax.jit(
      lambda *a: (ours(*a), ref(*a), jax.grad(loss(ours), (0, 1, 2))(*a), jax.grad(loss(ref), (0, 1, 2))(*a))
  )(*args)
  np.testing.assert_allclose(y, y_ref, **F64)
  for a, b_ in zip(g, g_ref):
    assert a.shape == b_.shape
    np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-10)
  check_grads(jax.jit(ours), args, order=2, modes=["rev"])


def test_forward_mode_with_custom_vjp_false():
  x = rng(6).normal(size=(2, 3, 4))
  f = lambda x, cv: jaxnorm.group_norm(x, num_groups=2, custom_vjp=cv)
  jac_rev, jac_fwd = jax.jit(lambda x: (jax.jacrev(lambda x: f(x, True))(x), jax.jacfwd(lambda x: f(x, False))(x)))(x)
  np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Transformations.
# ----------------------------------------------------------------------------------------------


def test_jit_vmap_and_scan():
  r = rng(7)
  x, ct = r.normal(size=(3,) + SHAPE), r.normal(size=(3,) + SHAPE)
  s, b = r.normal(size=4), r.normal(size=4)
  gn = lambda x: jaxnorm.group_norm(x, s, b, num_groups=2)
  gn_ref = lambda x: jnp_group_norm(x, s, b, 2)

  @jax.jit
  def run(x, ct):
    # Group norm is per example, so mapping a leading axis is the same as merging it into the batch.
    merged = gn(x.reshape((-1,) + SHAPE[1:])).reshape(x.shape)
    mapped = jax.vmap(gn)(x)
    inst = jax.vmap(lambda x: jaxnorm.instance_norm(x, s, b))(x)
    grad = jax.vmap(jax.grad(lambda x, c: jnp.sum(gn(x) * c)))(x, ct)
    grad_ref = jax.grad(lambda x: jnp.sum(jax.vmap(gn_ref)(x) * ct))(x)

    def scan_loss(norm):  # a group-normalized recurrence over the leading axis
      def step(h, xt):
        h = jnp.tanh(norm(h + xt))
        return h, h

      return lambda x: jnp.sum(lax.scan(step, jnp.zeros(SHAPE), x)[1] * ct)

    scan_grads = jax.grad(scan_loss(gn))(x), jax.grad(scan_loss(gn_ref))(x)
    return merged, mapped, inst, grad, grad_ref, scan_grads

  merged, mapped, inst, grad, grad_ref, (scan_g, scan_g_ref) = run(x, ct)
  np.testing.assert_allclose(mapped, merged, **F64)
  np.testing.assert_allclose(mapped, np.stack([jnp_group_norm(xi, s, b, 2) for xi in x]), **F64)
  np.testing.assert_allclose(inst, np.stack([jnp_instance_norm(xi, s, b) for xi in x]), **F64)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(scan_g, scan_g_ref, rtol=1e-9, atol=1e-10)


def test_axis_name_splits_spatial_positions_across_devices():
  """Each of 2 vmapped "devices" holds half the rows of every image: the statistics are the global ones."""
  r = rng(8)
  x, ct = r.normal(size=SHAPE), r.normal(size=SHAPE)
  s, b = r.normal(size=4), r.normal(size=4)
  where = random_mask(r, SHAPE)
  # H = 3 is padded to 4 to split evenly; the padded row is masked out, so the devices hold
  # unequal numbers of valid elements (where averaging per-device statistics would be wrong).
  split = lambda a: np.stack(np.split(np.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0))), 2, 1))
  xs, ws, cts = split(x), split(where), split(ct)

  ops = {
      "group": (
          lambda x, w: jaxnorm.group_norm(x, s, b, num_groups=2, where=w, axis_name="d"),
          lambda x: jnp_group_norm(x, s, b, 2, where=where),
      ),
      "instance": (
          lambda x, w: jaxnorm.instance_norm(x, s, b, where=w, axis_name="d"),
          lambda x: jnp_instance_norm(x, s, b, where=where),
      ),
  }

  @jax.jit
  def run(xs, ws, x):
    # `ws` is an argument: jax 0.10.2 asserts "non-canonical constant" when vmap under jit
    # maps a closed-over NumPy array into any custom_vjp function.
    out = {}
    for name, (op, ref) in ops.items():
      split_loss = lambda xs: jnp.sum(jax.vmap(op, axis_name="d")(xs, ws) * cts)
      out[name] = (jax.vmap(op, axis_name="d")(xs, ws), jax.grad(split_loss)(xs), ref(x),
                   jax.grad(lambda x: jnp.sum(ref(x) * ct))(x))
    return out

  unsplit = lambda a: np.concatenate(list(a), 1)[:, :3]
  for y, g, y_ref, g_ref in run(xs, ws, x).values():
    np.testing.assert_allclose(unsplit(y), y_ref, **F64)
    np.testing.assert_allclose(unsplit(g), g_ref, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Masks with NaN/inf padding; constant input.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
def test_nonfinite_values_in_masked_positions(op):
  ours, ref, (x, s, b), where = _grad_case(op, masked=True, seed=9)
  x_bad = x.copy()
  junk = np.array([np.nan, np.inf, -np.inf])
  x_bad[~where] = junk[np.arange((~where).sum()) % 3]
  x_clean = np.where(where, x, 0.0)
  ct = rng(10).normal(size=SHAPE)
  valid_loss = lambda f: (lambda x, s, b: jnp.sum(jnp.where(where, f(x, s, b) * ct, 0.0)))

  @jax.jit
  def run(x_bad, x_clean, s, b):
    return (
        ours(x_bad, s, b),
        ref(x_clean, s, b),
        jax.grad(valid_loss(ours), (0, 1, 2))(x_bad, s, b),
        jax.grad(valid_loss(ref), (0, 1, 2))(x_clean, s, b),
        jax.grad(lambda *a: jnp.sum(ours(*a) * ct), (0, 1, 2))(x_bad, s, b),
    )

  y, y_ref, g, g_ref, g_all = run(x_bad, x_clean, s, b)
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(np.asarray(y)[where], np.asarray(y_ref)[where], **F64)
  for a, b_ in zip(g, g_ref):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-10)
  assert np.all(np.asarray(g[0])[~where] == 0)
  assert all(np.all(np.isfinite(a)) for a in g_all)


def test_constant_input_is_finite():
  x = np.full(SHAPE, 3.0)
  s, b = rng(11).normal(size=4), rng(12).normal(size=4)
  cases = [
      (lambda x: jaxnorm.group_norm(x, s, b, num_groups=2), lambda x: jnp_group_norm(x, s, b, 2)),
      (lambda x: jaxnorm.instance_norm(x, s, b), lambda x: jnp_instance_norm(x, s, b)),
  ]
  grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))
  for f, ref in cases:
    y, g, g_ref = jax.jit(lambda x: (f(x), grad(f)(x), grad(ref)(x)))(x)
    np.testing.assert_allclose(y, np.broadcast_to(b, SHAPE), **F64)  # x - mean = 0 exactly
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-9)


def test_large_mean_offset_float32():
  x = np.asarray(rng(13).normal(size=(2, 4, 4, 8)) + 1e4, np.float32)
  exact = np.asarray(jnp_group_norm(jnp.asarray(x, jnp.float64), num_groups=4))
  y = jaxnorm.group_norm(jnp.asarray(x, jnp.float32), num_groups=4)
  assert y.dtype == jnp.float32
  assert np.abs(np.asarray(y, np.float64) - exact).max() < 1e-3


# ----------------------------------------------------------------------------------------------
# The paper's identities: G = 1 is layer norm over (H, W, C), G = C is instance norm.
# ----------------------------------------------------------------------------------------------


def test_one_group_is_layer_norm_and_c_groups_is_instance_norm():
  r = rng(14)
  x = r.normal(size=SHAPE) * 2 + 1
  s, b = r.normal(size=4), r.normal(size=4)
  hwc = SHAPE[1:]
  one, layer, c_groups, instance = jax.jit(
      lambda x: (
          jaxnorm.group_norm(x, s, b, num_groups=1),
          jaxnorm.layer_norm(x, np.broadcast_to(s, hwc), np.broadcast_to(b, hwc), axis=(1, 2, 3)),
          jaxnorm.group_norm(x, s, b, num_groups=4),
          jaxnorm.instance_norm(x, s, b),
      )
  )(x)
  np.testing.assert_allclose(one, layer, **F64)
  np.testing.assert_allclose(c_groups, instance, **F64)

  # The same identities for the linen modules, on the same variables.
  variables = {"params": {"scale": s, "bias": b}}
  ln_variables = {"params": {"scale": np.broadcast_to(s, hwc), "bias": np.broadcast_to(b, hwc)}}
  one, layer, size_one, instance = jax.jit(
      lambda x: (
          jnn.GroupNorm(num_groups=1).apply(variables, x),
          jnn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3)).apply(ln_variables, x),
          jnn.GroupNorm(num_groups=None, group_size=1).apply(variables, x),
          jnn.InstanceNorm().apply(variables, x),
      )
  )(x)
  np.testing.assert_allclose(one, layer, **F64)
  np.testing.assert_allclose(size_one, instance, **F64)


# ----------------------------------------------------------------------------------------------
# linen: same variables, outputs, gradients and dtypes as flax.linen.
# ----------------------------------------------------------------------------------------------


def _data(shape, dtype=jnp.float32, seed=0):
  return (jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 3 + 2).astype(dtype)


def _random_params(variables):
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return {"params": treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])}


LINEN_CASES = [
    ("GroupNorm", dict(num_groups=2), (2, 3, 4, 6), False),
    ("GroupNorm", dict(num_groups=None, group_size=3), (2, 3, 4, 6), True),
    ("GroupNorm", dict(num_groups=3, reduction_axes=(0, 2, 3), use_bias=False), (2, 3, 4, 6), False),
    ("GroupNorm", dict(num_groups=1, use_scale=False), (4, 6), True),
    ("GroupNorm", dict(num_groups=3, epsilon=1e-3), (6,), False),  # flax accepts an unbatched vector
    ("InstanceNorm", dict(), (2, 3, 4, 6), False),
    ("InstanceNorm", dict(feature_axes=(1, -1), use_scale=False), (2, 3, 4, 6), True),
    ("InstanceNorm", dict(), (4, 6), False),  # no spatial axis: flax returns the bias, so do we
]


@pytest.mark.parametrize("name, kwargs, shape, masked", LINEN_CASES)
def test_linen_matches_flax(name, kwargs, shape, masked):
  x = _data(shape)
  call = {"mask": jax.random.bernoulli(jax.random.key(3), 0.7, shape)} if masked else {}
  theirs = getattr(nn, name)(**kwargs, use_fast_variance=False)
  ours = getattr(jnn, name)(**kwargs)
  variables = theirs.init(jax.random.key(1), x, **call)
  # The same variable tree (names, shapes, dtypes), so a flax checkpoint loads unchanged.
  spec = lambda v: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v)
  assert spec(ours.init(jax.random.key(1), x, **call)) == spec(variables)
  variables = _random_params(variables)
  ct = jax.random.normal(jax.random.key(2), shape, x.dtype)

  def grads(module, params, x):
    def loss(params, x):
      y = module.apply({"params": params}, x, **call)
      return jnp.sum(y * ct), y

    return jax.grad(loss, (0, 1), has_aux=True)(params, x)

  # One compilation for both (compile time dominates these tiny shapes).
  (g_theirs, y_theirs), (g_ours, y_ours) = jax.jit(lambda p, x: (grads(theirs, p, x), grads(ours, p, x)))(
      variables["params"], x
  )
  assert y_ours.dtype == y_theirs.dtype == jnp.float32
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
  for a, b_ in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
    assert a.dtype == b_.dtype
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "x_dtype, dtype, param_dtype",
    [(jnp.bfloat16, None, jnp.float32), (jnp.float32, jnp.bfloat16, jnp.float32), (jnp.bfloat16, None, jnp.bfloat16)],
)
def test_linen_dtypes_match_flax(x_dtype, dtype, param_dtype):
  x = _data((2, 3, 3, 4), dtype=x_dtype)
  for name, extra in (("GroupNorm", dict(num_groups=2)), ("InstanceNorm", {})):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, **extra)
    theirs, ours = getattr(nn, name)(**kwargs, use_fast_variance=False), getattr(jnn, name)(**kwargs)
    with flax_promotion():
      variables = theirs.init(jax.random.key(1), x)
    dtypes = lambda v: jax.tree_util.tree_map(lambda a: a.dtype, v)
    assert dtypes(ours.init(jax.random.key(1), x)) == dtypes(variables)
    with flax_promotion():
      y_theirs = theirs.apply(variables, x)
    y_ours = ours.apply(variables, x)
    assert y_ours.dtype == y_theirs.dtype
    eps = float(jnp.finfo(y_ours.dtype).eps)
    np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32), atol=32 * eps, rtol=4 * eps)


def test_linen_axis_name_matches_flax():
  x = _data((2, 2, 3, 3, 4))  # 2 "devices", each with 2 examples of 3x3x4
  for ours, theirs in (
      (jnn.GroupNorm(num_groups=2, axis_name="d"), nn.GroupNorm(num_groups=2, axis_name="d", use_fast_variance=False)),
      (jnn.InstanceNorm(axis_name="d"), nn.InstanceNorm(axis_name="d", use_fast_variance=False)),
  ):
    variables = _random_params(nn.GroupNorm(num_groups=2).init(jax.random.key(1), x[0]))  # both: params (4,)
    run = lambda m: jax.jit(jax.vmap(lambda xi: m.apply(variables, xi), axis_name="d"))(x)
    np.testing.assert_allclose(run(ours), run(theirs), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors at trace time, naming the argument.
# ----------------------------------------------------------------------------------------------

X4 = jnp.ones((2, 3, 3, 6))
BAD_FUNCTIONAL = [
    ("num_groups does not divide C", lambda: jaxnorm.group_norm(X4, num_groups=4), ValueError, r"`num_groups`=4 does not divide .* C=6"),
    ("num_groups=0", lambda: jaxnorm.group_norm(X4, num_groups=0), ValueError, r"`num_groups` must be >= 1"),
    ("num_groups=-2", lambda: jaxnorm.group_norm(X4, num_groups=-2), ValueError, r"`num_groups` must be >= 1"),
    ("num_groups=None", lambda: jaxnorm.group_norm(X4, num_groups=None), TypeError, r"`num_groups` must be an int"),
    ("num_groups=2.0", lambda: jaxnorm.group_norm(X4, num_groups=2.0), TypeError, r"`num_groups` must be an int"),
    ("group_norm rank 1", lambda: jaxnorm.group_norm(jnp.ones(6), num_groups=2), ValueError, r"group_norm .*at least 2"),
    ("instance_norm rank 2", lambda: jaxnorm.instance_norm(jnp.ones((2, 6))), ValueError, r"instance_norm .*at least 3"),
    ("instance_norm one position", lambda: jaxnorm.instance_norm(jnp.ones((2, 1, 1, 6))), ValueError, r"more than one spatial"),
    ("group_norm scale (5,)", lambda: jaxnorm.group_norm(X4, jnp.ones(5), num_groups=2), ValueError, r"`scale` must have shape \(6,\)"),
    ("group_norm scale grouped", lambda: jaxnorm.group_norm(X4, jnp.ones((2, 3)), num_groups=2), ValueError, r"`scale`"),
    ("group_norm bias (1,)", lambda: jaxnorm.group_norm(X4, None, jnp.ones(1), num_groups=2), ValueError, r"`bias`"),
    ("instance_norm scale (3,)", lambda: jaxnorm.instance_norm(X4, jnp.ones(3)), ValueError, r"`scale`"),
    ("instance_norm bias (4, 6)", lambda: jaxnorm.instance_norm(X4, None, jnp.ones((4, 6))), ValueError, r"`bias`"),
    ("group_norm int x", lambda: jaxnorm.group_norm(X4.astype(jnp.int32), num_groups=2), TypeError, r"`x`"),
    ("instance_norm int x", lambda: jaxnorm.instance_norm(X4.astype(jnp.int32)), TypeError, r"`x`"),
    ("group_norm epsilon=0", lambda: jaxnorm.group_norm(X4, num_groups=2, epsilon=0.0), ValueError, r"`epsilon`"),
    ("instance_norm epsilon<0", lambda: jaxnorm.instance_norm(X4, epsilon=-1.0), ValueError, r"`epsilon`"),
    ("group_norm where (2, 3)", lambda: jaxnorm.group_norm(X4, num_groups=2, where=jnp.ones((2, 3), bool)), ValueError, r"`where`"),
    ("instance_norm where grows x", lambda: jaxnorm.instance_norm(X4, where=jnp.ones((2,) + X4.shape, bool)), ValueError, r"`where`"),
]


@pytest.mark.parametrize("name, f, error, match", BAD_FUNCTIONAL, ids=[c[0] for c in BAD_FUNCTIONAL])
def test_functional_bad_input(name, f, error, match):
  with pytest.raises(error, match=match):
    f()
  with pytest.raises(error, match=match):  # at trace time, before anything runs
    jax.eval_shape(f)


BAD_LINEN = [
    ("both num_groups and group_size", "GroupNorm", dict(num_groups=2, group_size=3), X4, r"`num_groups` or `group_size`"),
    ("neither", "GroupNorm", dict(num_groups=None), X4, r"`num_groups` or `group_size`"),
    ("group_size does not divide", "GroupNorm", dict(num_groups=None, group_size=4), X4, r"group size"),
    ("num_groups does not divide", "GroupNorm", dict(num_groups=4), X4, r"`num_groups`=4 does not divide"),
    ("default 32 groups, 6 channels", "GroupNorm", dict(), X4, r"`num_groups`=32 does not divide"),
    ("num_groups=0", "GroupNorm", dict(num_groups=0), X4, r"`num_groups`"),
    ("reduction_axes without C", "GroupNorm", dict(num_groups=2, reduction_axes=(1, 2)), X4, r"`reduction_axes`.*final"),
    ("batch axis as feature", "InstanceNorm", dict(feature_axes=(0, -1)), X4, r"`feature_axes`.*batch"),
]


@pytest.mark.parametrize("name, cls, kwargs, x, match", BAD_LINEN, ids=[c[0] for c in BAD_LINEN])
def test_linen_bad_input_like_flax(name, cls, kwargs, x, match):
  with pytest.raises(ValueError):  # flax refuses it too: a drop-in fails where flax fails
    getattr(nn, cls)(**kwargs).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=match):
    getattr(jnn, cls)(**kwargs).init(jax.random.key(0), x)


def test_linen_bad_input_names_the_argument():
  with pytest.raises(ValueError, match="`reduction_axes`"):
    jnn.GroupNorm(num_groups=2, reduction_axes=(1, 4)).init(jax.random.key(0), X4)
  with pytest.raises(ValueError, match="`group_size` must be >= 1"):
    jnn.GroupNorm(num_groups=None, group_size=0).init(jax.random.key(0), X4)
  with pytest.raises(TypeError, match="floating"):
    jnn.InstanceNorm().init(jax.random.key(0), X4.astype(jnp.int32))
  with pytest.raises(ValueError, match="epsilon"):
    jnn.GroupNorm(num_groups=2, epsilon=0.0).init(jax.random.key(0), X4)
