"""jaxnorm.interop against PyTorch itself (float64): a torch model and its jaxnorm.linen twin agree.

The reference is always torch running its own modules: eval outputs, train
outputs with batch statistics, and the running statistics torch leaves after
one training step, for state converted torch -> jaxnorm and jaxnorm -> torch.
Inputs are NCHW for torch and the same values moved to NHWC for jaxnorm.
"""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import interop

torch = pytest.importorskip("torch")
P = torch.nn.utils.parametrizations

TOL = dict(rtol=1e-10, atol=1e-12)
NAMES = {"conv": "conv", "bn": "bn", "gn": "gn", "fc": "fc", "ln": "ln"}


def _nhwc(x):
  return jnp.asarray(np.moveaxis(x, 1, -1))


def _np(t):
  return t.detach().numpy()


class TorchNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.bn = torch.nn.BatchNorm2d(8, momentum=0.2)
    self.gn = torch.nn.GroupNorm(4, 8)
    self.fc = torch.nn.Linear(8, 6)
    self.ln = torch.nn.LayerNorm(6)

  def forward(self, x):
    h = self.gn(torch.relu(self.bn(self.conv(x))))
    # Pooled before the Linear: a flatten would order features (C, H, W) here and (H, W, C) in the twin.
    return self.ln(self.fc(h.mean((2, 3))))


def _twin(net, convention):
  class Twin(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      def layer(name):
        return interop.linen_from_torch(getattr(net, name), convention=convention, name=name)

      h = layer("bn")(layer("conv")(x), use_running_average=not train)
      h = layer("gn")(nn.relu(h))
      return layer("ln")(layer("fc")(h.mean((1, 2))))

  return Twin()


def _torch_net(seed):
  """A float64 TorchNet with non-trivial affine parameters and running statistics."""
  torch.manual_seed(seed)
  net = TorchNet().double()
  with torch.no_grad():
    for m in (net.bn, net.gn, net.ln):
      m.weight.add_(0.3 * torch.randn_like(m.weight))
      m.bias.add_(0.3 * torch.randn_like(m.bias))
    net.bn.running_mean.normal_()
    net.bn.running_var.uniform_(0.5, 2.0)
    net.bn.num_batches_tracked.fill_(7)
  return net


def _assert_twin_matches(net, variables, convention, x):
  """Eval outputs, train outputs, and the running statistics after one step, against torch on `net`."""
  twin = _twin(net, convention)
  apply = jax.jit(twin.apply, static_argnames=("train", "mutable"))
  net.eval()
  with torch.no_grad():
    y_eval = net(torch.tensor(x))
  np.testing.assert_allclose(apply(variables, _nhwc(x), train=False), _np(y_eval), **TOL)

  old_var = net.bn.running_var.clone()
  with torch.no_grad():
    conv_out = net.conv(torch.tensor(x))
  net.train()
  with torch.no_grad():
    y_train = net(torch.tensor(x))
  y, updates = apply(variables, _nhwc(x), train=True, mutable=("batch_stats",))
  np.testing.assert_allclose(y, _np(y_train), **TOL)
  stats = updates["batch_stats"]["bn"]
  # The mean's update is the same in both conventions (flax momentum = 1 - torch momentum).
  np.testing.assert_allclose(stats["mean"], _np(net.bn.running_mean), **TOL)
  if convention == "torch":
    np.testing.assert_allclose(stats["var"], _np(net.bn.running_var), **TOL)
    assert int(stats["num_batches_tracked"]) == int(net.bn.num_batches_tracked)
  else:
    # flax's convention blends in the *biased* batch variance, which torch's running_var does not.
    biased = conv_out.var((0, 2, 3), unbiased=False)
    np.testing.assert_allclose(stats["var"], _np(0.8 * old_var + 0.2 * biased), **TOL)
    assert not np.allclose(stats["var"], _np(net.bn.running_var), rtol=1e-6)
    assert set(stats) == {"mean", "var"}


@pytest.mark.parametrize("convention", ["torch", "flax"])
def test_model_torch_to_jaxnorm(convention):
  net = _torch_net(0)
  variables = interop.variables_from_torch(net, NAMES, convention=convention)
  x = np.random.default_rng(1).normal(size=(4, 3, 5, 5)) * 2 + 1
  _assert_twin_matches(net, variables, convention, x)


@pytest.mark.parametrize("convention", ["torch", "flax"])
def test_model_jaxnorm_to_torch(convention):
  template = _torch_net(0)
  x = np.random.default_rng(2).normal(size=(4, 3, 5, 5)) * 2 + 1
  # The twin's own variable tree (shapes and dtypes from tracing its init, no compile), filled with
  # non-trivial values drawn by numpy.
  shapes = jax.eval_shape(lambda: _twin(template, convention).init(jax.random.key(0), _nhwc(x), train=False))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  r = np.random.default_rng(3)
  leaves = [
      jnp.zeros((), jnp.int32) if s.dtype == jnp.int32 else jnp.asarray(0.5 + r.uniform(size=s.shape), s.dtype)
      for s in leaves
  ]
  variables = treedef.unflatten(leaves)
  if convention == "torch":
    variables["batch_stats"]["bn"]["num_batches_tracked"] = jnp.int32(11)

  net = _torch_net(5)  # different values, all replaced below
  net.load_state_dict(interop.torch_state_dict(variables, net, NAMES))
  if convention == "torch":
    assert int(net.bn.num_batches_tracked) == 11
  else:
    assert int(net.bn.num_batches_tracked) == 7  # flax's tree has no counter: torch's own is kept
  # Back again: exactly the same variables.
  back = interop.variables_from_torch(net, NAMES, convention=convention)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  _assert_twin_matches(net, variables, convention, x)


SINGLE = [
    (lambda: torch.nn.BatchNorm1d(4, momentum=None), (6, 4), True),
    (lambda: torch.nn.BatchNorm1d(4, affine=False, eps=1e-3), (6, 4, 3), True),
    (lambda: torch.nn.BatchNorm3d(2, track_running_stats=False), (3, 2, 2, 2, 2), True),
    (lambda: torch.nn.InstanceNorm1d(4, affine=True, eps=1e-4), (2, 4, 5), True),
    (lambda: torch.nn.InstanceNorm2d(3), (2, 3, 4, 4), True),
    (lambda: torch.nn.GroupNorm(3, 6, affine=False), (2, 6, 4), True),
    (lambda: torch.nn.LayerNorm((3, 4), bias=False), (2, 3, 4), False),
    (lambda: torch.nn.RMSNorm((3, 4)), (2, 3, 4), False),
    (lambda: torch.nn.RMSNorm(4, eps=1e-3, elementwise_affine=False), (2, 4), False),
    (lambda: torch.nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False), (2, 4, 9), True),
    (lambda: torch.nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 5, 6), True),
    (lambda: torch.nn.Linear(5, 3), (4, 2, 5), False),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("make, shape, channels_first", SINGLE)
def test_single_module_matches_torch(make, shape, channels_first):
  torch.manual_seed(0)
  m = make().double()
  with torch.no_grad():
    for t in m.parameters():
      t.add_(0.3 * torch.randn_like(t))
    if getattr(m, "running_var", None) is not None:
      m.running_mean.normal_()
      m.running_var.uniform_(0.5, 2.0)
  x = np.random.default_rng(0).normal(size=shape) * 2 + 1
  to_jax = _nhwc if channels_first else jnp.asarray
  twin = interop.linen_from_torch(m)
  variables = interop.variables_from_torch(m)
  stateful = isinstance(m, torch.nn.modules.batchnorm._BatchNorm)

  for train in (False, True) if stateful else (False,):
    m.train(train)
    with torch.no_grad():
      y_ref = _np(m(torch.tensor(x)))
    if channels_first:
      y_ref = np.moveaxis(y_ref, 1, -1)
    call = dict(use_running_average=not train) if stateful else {}
    y, updates = twin.apply(variables, to_jax(x), mutable=["batch_stats"], **call)
    np.testing.assert_allclose(y, y_ref, **TOL)
    if train and m.track_running_stats:
      np.testing.assert_allclose(updates["batch_stats"]["var"], _np(m.running_var), **TOL)
      np.testing.assert_allclose(updates["batch_stats"]["mean"], _np(m.running_mean), **TOL)
  # Round trip: the state dict torch had.
  state = interop.torch_state_dict(variables, make().double())
  for key, value in m.state_dict().items():
    if not (train and stateful):  # torch's state moved on by the training step
      assert torch.equal(state[key], value), key


def _wn_sn_modules():
  torch.manual_seed(1)
  return {
      "wn_linear": P.weight_norm(torch.nn.Linear(5, 4)).double(),
      "wn_conv": P.weight_norm(torch.nn.Conv2d(2, 3, 3, padding=1)).double(),
      "wn_linear_dim_none": P.weight_norm(torch.nn.Linear(5, 4, bias=False), dim=None).double(),
  }


@pytest.mark.parametrize("name", ["wn_linear", "wn_conv", "wn_linear_dim_none"])
def test_weight_norm_outputs_and_gradients_match_torch(name):
  m = _wn_sn_modules()[name]
  with torch.no_grad():
    m.parametrizations.weight.original0.mul_(1.7)
  conv = m.weight.ndim == 4
  x = np.random.default_rng(0).normal(size=(2, 2, 4, 4) if conv else (3, 5))
  to_jax = _nhwc if conv else jnp.asarray
  ct = np.random.default_rng(1).normal(size=_np(m(torch.tensor(x))).shape)
  twin = interop.linen_from_torch(m)
  variables = interop.variables_from_torch(m)

  y_t = m(torch.tensor(x))
  (y_t * torch.tensor(ct)).sum().backward()
  ct_jax = to_jax(ct)
  y, grads = jax.value_and_grad(lambda p: jnp.sum(twin.apply({"params": p}, to_jax(x)) * ct_jax))(variables["params"])
  np.testing.assert_allclose(twin.apply(variables, to_jax(x)), to_jax(_np(y_t)), **TOL)
  # The gradients of g and v, moved to torch's layout by the same conversion as the parameters.
  grad_state = interop.torch_state_dict({"params": grads}, m)
  for key, t in m.named_parameters():
    np.testing.assert_allclose(_np(grad_state[key]), _np(t.grad), rtol=1e-9, atol=1e-12, err_msg=key)
  # And back: a fresh torch module loaded from the variables computes the same.
  fresh = _wn_sn_modules()[name]
  fresh.load_state_dict(interop.torch_state_dict(variables, fresh))
  np.testing.assert_allclose(_np(fresh(torch.tensor(x))), _np(y_t), **TOL)


@pytest.mark.parametrize("conv", [False, True])
def test_spectral_norm_matches_torch_once_converged(conv):
  torch.manual_seed(2)
  layer = torch.nn.Conv2d(2, 3, 3) if conv else torch.nn.Linear(5, 4)
  m = P.spectral_norm(layer).double()
  x = np.random.default_rng(0).normal(size=(2, 2, 4, 4) if conv else (3, 5))
  to_jax = _nhwc if conv else jnp.asarray
  from_torch = (lambda y: np.moveaxis(y, 1, -1)) if conv else (lambda y: y)
  # torch's and flax's iterations are half a step apart (see jaxnorm.interop._torch): converge first.
  m.train()
  with torch.no_grad():
    for _ in range(100):
      m(torch.tensor(x))
  twin = interop.linen_from_torch(m)
  assert twin.n_steps == 1 and twin.epsilon == pytest.approx(1e-24)
  variables = interop.variables_from_torch(m)
  w = _np(m.parametrizations.weight.original).reshape(m.weight.shape[0], -1)
  np.testing.assert_allclose(variables["batch_stats"]["layer_instance/kernel/sigma"], np.linalg.svd(w)[1][0], rtol=1e-9)

  m.eval()
  with torch.no_grad():
    y_eval = from_torch(_np(m(torch.tensor(x))))
  np.testing.assert_allclose(twin.apply(variables, to_jax(x), update_stats=False), y_eval, rtol=1e-9, atol=1e-12)
  m.train()
  with torch.no_grad():
    y_train = from_torch(_np(m(torch.tensor(x))))
  y, updates = twin.apply(variables, to_jax(x), update_stats=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_train, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(
      updates["batch_stats"]["layer_instance/kernel/u"][0], _np(m.parametrizations.weight[0]._u), rtol=1e-8, atol=1e-10
  )

  fresh = P.spectral_norm(torch.nn.Conv2d(2, 3, 3) if conv else torch.nn.Linear(5, 4)).double()
  fresh.load_state_dict(interop.torch_state_dict(variables, fresh))
  fresh.eval()
  with torch.no_grad():
    np.testing.assert_allclose(from_torch(_np(fresh(torch.tensor(x)))), y_eval, rtol=1e-9, atol=1e-12)


def test_linen_kwargs_translate_conventions():
  cls, kwargs = interop.linen_kwargs_from_torch(torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.25))
  assert cls.__name__ == "BatchNorm" and kwargs["momentum"] == 0.25 and kwargs["convention"] == "torch"
  assert kwargs["epsilon"] == 1e-3 and kwargs["axis"] == -1
  _, kwargs = interop.linen_kwargs_from_torch(torch.nn.BatchNorm2d(3, momentum=0.25), convention="flax")
  assert kwargs["momentum"] == 0.75 and kwargs["convention"] == "flax"
  layer = interop.linen_from_torch(torch.nn.RMSNorm(4), name="norm")
  assert layer.epsilon == float(np.finfo(np.float32).eps) and layer.name == "norm"
  _, kwargs = interop.linen_kwargs_from_torch(torch.nn.Conv2d(4, 8, (3, 5), stride=2, padding=(1, 2), groups=2))
  assert kwargs["padding"] == [(1, 1), (2, 2)] and kwargs["strides"] == (2, 2)
  assert kwargs["feature_group_count"] == 2 and kwargs["kernel_size"] == (3, 5)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_bad_input_raises_clear_errors():
  with pytest.raises(TypeError, match="does not convert ConvTranspose2d"):
    interop.variables_from_torch(torch.nn.ConvTranspose2d(2, 2, 3))
  with pytest.raises(ValueError, match="track_running_stats=True"):
    interop.linen_from_torch(torch.nn.InstanceNorm2d(3, track_running_stats=True))
  with pytest.raises(ValueError, match="cumulative average"):
    interop.linen_from_torch(torch.nn.BatchNorm1d(3, momentum=None), convention="flax")
  with pytest.raises(ValueError, match="`convention`"):
    interop.variables_from_torch(torch.nn.BatchNorm1d(3), convention="keras")
  with pytest.raises(ValueError, match="padding_mode"):
    interop.linen_from_torch(torch.nn.Conv2d(2, 2, 3, padding_mode="reflect"))
  with pytest.raises(ValueError, match="deprecated hook-based"):
    interop.linen_from_torch(torch.nn.utils.weight_norm(torch.nn.Linear(2, 2)))
  with pytest.raises(ValueError, match="dim=1"):
    interop.linen_from_torch(P.weight_norm(torch.nn.Linear(2, 3), dim=1))
  net = TorchNet()
  with pytest.raises(ValueError, match="no submodule 'bm'"):
    interop.variables_from_torch(net, {"bm": "bn"})
  with pytest.raises(ValueError, match="two torch submodules"):
    interop.variables_from_torch(net, {"gn": "norm", "ln": "norm"})
  variables = interop.variables_from_torch(net, NAMES)
  del variables["params"]["bn"]["scale"]
  with pytest.raises(ValueError, match=r"'bn' \(BatchNorm2d\) at linen path 'bn'.*params/scale"):
    interop.torch_state_dict(variables, net, NAMES)
  variables = interop.variables_from_torch(net, NAMES)
  variables["params"]["fc"]["kernel"] = jnp.zeros((6, 8))
  with pytest.raises(ValueError, match=r"weight: expected shape \(6, 8\) for torch, got \(8, 6\)"):
    interop.torch_state_dict(variables, net, NAMES)


def test_import_does_not_need_torch():
  code = "import sys, jaxnorm; jaxnorm.interop.linen_from_torch; assert 'torch' not in sys.modules"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
