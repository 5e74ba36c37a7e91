"""internal_covariate_shift (Santurkar et al. 2018) and layer_assignment.

Reference, never jaxnorm itself: torch float64 autograd on the same weights,
the same batch and the same update: G_i = dL/dW_i at W^(t); G'_i = dL/dW_i
after replacing W_1..W_{i-1} by their updated values; then ||G - G'|| and
the cosine in NumPy. With batch norm the torch network uses
`torch.nn.functional.batch_norm` in training mode.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import linen as jnn
from jaxnorm.analysis import internal_covariate_shift, layer_assignment

torch = pytest.importorskip("torch")


class MLP(nn.Module):
  widths: tuple[int, ...] = (5, 4, 3)
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.Dense(w, name=f"Dense_{i}")(x)
      if i < len(self.widths) - 1:
        if self.batch_norm:
          x = jnn.BatchNorm(use_running_average=False, name=f"BatchNorm_{i}")(x)
        x = jnp.tanh(x)
    return x


def torch_forward(tensors, x, batch_norm, widths):
  h = x
  for i in range(len(widths)):
    h = h @ tensors[f"Dense_{i}/kernel"] + tensors[f"Dense_{i}/bias"]
    if i < len(widths) - 1:
      if batch_norm:
        h = torch.nn.functional.batch_norm(
            h, None, None, tensors[f"BatchNorm_{i}/scale"], tensors[f"BatchNorm_{i}/bias"], training=True, eps=1e-5
        )
      h = torch.tanh(h)
  return h


def f64(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def flat(params):
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def torch_ics(params, updated, x, y, batch_norm, widths, layer_of, measured):
  """(distance, cosine) per layer, in torch float64."""
  old, new = flat(params), flat(updated)
  xt, yt = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))

  def grads(values):
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    loss = torch.mean((torch_forward(tensors, xt, batch_norm, widths) - yt) ** 2)
    loss.backward()
    return {k: t.grad.numpy() for k, t in tensors.items()}

  g_all = grads(old)
  distance, cosine = [], []
  for i in range(len(widths)):
    mixed = {k: (new[k] if layer_of(k) < i else old[k]) for k in old}
    g_i = grads(mixed)
    keys = sorted(k for k in old if layer_of(k) == i and measured(k))
    g = np.concatenate([g_all[k].ravel() for k in keys])
    g2 = np.concatenate([g_i[k].ravel() for k in keys])
    distance.append(np.linalg.norm(g - g2))
    cosine.append(g @ g2 / (np.linalg.norm(g) * np.linalg.norm(g2)))
  return np.array(distance), np.array(cosine)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batch_norm"])
def test_matches_torch(batch_norm):
  widths = (5, 4, 3)
  model = MLP(widths, batch_norm)
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(8, 4)))
  y = jnp.asarray(r.normal(size=(8, 3)))
  params = f64(model.init(jax.random.key(0), x.astype(jnp.float32))["params"])  # init in the layers' float32; f64 casts

  def loss(p):
    out = model.apply({"params": p}, x, mutable=["batch_stats"])[0] if batch_norm else model.apply({"params": p}, x)
    return jnp.mean((out - y) ** 2)

  # A large SGD step (lr 0.5) so that the shift is well above rounding.
  updated = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, jax.grad(loss)(params))
  if batch_norm:
    layers = [(f"Dense_{i}", f"BatchNorm_{i}") for i in range(2)] + ["Dense_2"]
    weights = "kernel"
  else:
    layers, weights = [f"Dense_{i}" for i in range(3)], None
  ics = jax.jit(lambda p, q: internal_covariate_shift(loss, p, q, layers, weights=weights))(params, updated)

  layer_of = lambda k: int(k.split("/")[0].split("_")[1])  # noqa: E731 (Dense_i and BatchNorm_i are layer i)
  measured = (lambda k: k.endswith("kernel")) if batch_norm else (lambda k: True)
  distance, cosine = torch_ics(params, updated, x, y, batch_norm, widths, layer_of, measured)
  assert distance[0] == 0 and float(ics.distance[0]) == 0 and float(ics.cosine[0]) == 1
  assert np.all(distance[1:] > 1e-4)  # the reference really moved
  np.testing.assert_allclose(ics.distance, distance, rtol=1e-9, atol=1e-14)
  np.testing.assert_allclose(ics.cosine, cosine, rtol=1e-9)
  g = flat(jax.grad(loss)(params))
  g_norms = [np.sqrt(sum(np.sum(v**2) for k, v in g.items() if layer_of(k) == i and measured(k))) for i in range(3)]
  np.testing.assert_allclose(ics.grad_norm, g_norms, rtol=1e-10)


def test_no_update_means_no_shift():
  model = MLP()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)))
  params = f64(model.init(jax.random.key(0), x.astype(jnp.float32))["params"])  # init in the layers' float32; f64 casts
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)  # noqa: E731
  ics = internal_covariate_shift(loss, params, params, ["Dense_0", "Dense_1", "Dense_2"])
  np.testing.assert_array_equal(ics.distance, 0)
  np.testing.assert_allclose(ics.cosine, 1, rtol=1e-12)


def test_layer_assignment_uses_whole_keys_and_nested_paths():
  params = {
      "Dense_1": {"kernel": 1.0},
      "Dense_10": {"kernel": 2.0},
      "block": {"Dense_0": {"bias": 3.0, "kernel": 4.0}, "scale": 5.0},
  }
  # Leaves in tree order: Dense_1/kernel, Dense_10/kernel, block/Dense_0/bias, block/Dense_0/kernel, block/scale.
  assert layer_assignment(params, ["Dense_1", "block/Dense_0"]) == [0, None, 1, 1, None]
  assert layer_assignment(params, [("Dense_10", "block/scale"), "Dense_1"]) == [1, 0, None, None, 0]


@pytest.mark.parametrize(
    "layers, kw, error, match",
    [
        (["Dense_0", "Dense_9"], {}, ValueError, "match no parameter"),
        (["Dense_0", "Dense_0/kernel"], {}, ValueError, "several entries"),
        ("Dense_0", {}, TypeError, "sequence"),
        ([3], {}, TypeError, "path string"),
        (["Dense_0"], {"weights": "scale"}, ValueError, "no parameter named"),
    ],
)
def test_bad_layers(layers, kw, error, match):
  params = {"Dense_0": {"bias": jnp.zeros(2), "kernel": jnp.ones((2, 2))}}
  with pytest.raises(error, match=match):
    internal_covariate_shift(lambda p: jnp.sum(p["Dense_0"]["kernel"]), params, params, layers, **kw)


def test_updated_params_must_match():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match="tree structure"):
    internal_covariate_shift(lambda p: 0.0, params, {"Dense_1": {"kernel": jnp.ones((2, 2))}}, ["Dense_0"])
  with pytest.raises(ValueError, match="shape"):
    internal_covariate_shift(lambda p: 0.0, params, {"Dense_0": {"kernel": jnp.ones((2, 3))}}, ["Dense_0"])
