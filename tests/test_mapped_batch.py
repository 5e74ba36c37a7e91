"""Batch norm whose batch is only the mapped axis: a per-example model (each example of rank 1) under
`jax.vmap`, `flax.linen.vmap` or `flax.nnx.vmap` with `axis_name` normalizes over the mapped axis, as flax
does, with running statistics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32) * 2 + 1
TOL = dict(rtol=1e-5, atol=1e-5)


def test_functional_under_jax_vmap():
  y, mean, var = jax.vmap(lambda x: jaxnorm.batch_norm(x, axis_name="b"), axis_name="b")(X)
  np.testing.assert_allclose(y, (X - X.mean(0)) / np.sqrt(X.var(0) + 1e-5), **TOL)
  np.testing.assert_allclose(mean[0], X.mean(0), **TOL)
  np.testing.assert_allclose(var[0], X.var(0), **TOL)
  g = jax.grad(lambda x: jnp.sum(jax.vmap(lambda e: jaxnorm.batch_norm(e, axis_name="b")[0], axis_name="b")(x) ** 3))
  g_ref = jax.grad(lambda x: jnp.sum(jaxnorm.batch_norm(x)[0] ** 3))
  np.testing.assert_allclose(g(X), g_ref(X), rtol=1e-4, atol=1e-4)


def test_rank_one_without_axis_name_still_raises():
  with pytest.raises(ValueError, match="covers every axis"):
    jaxnorm.batch_norm(X[0])


def test_linen_module_under_jax_vmap():
  make = {"flax": nn.BatchNorm, "jaxnorm": jnn.BatchNorm}
  results = {}
  for name, cls in make.items():
    module = cls(use_running_average=False, axis_name="batch", momentum=0.9)
    variables = module.init(jax.random.key(0), X[0])  # init with one example, no mapped axis
    step = jax.vmap(lambda x: module.apply(variables, x, mutable=["batch_stats"]), axis_name="batch")
    y, updates = step(X)
    results[name] = (y, jax.tree.map(lambda a: a[0], updates))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), results["jaxnorm"], results["flax"])


def test_linen_module_under_nn_vmap():
  def model(cls):
    return nn.vmap(
        cls,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(use_running_average=False, axis_name="batch", momentum=0.9)

  results = {}
  for name, cls in {"flax": nn.BatchNorm, "jaxnorm": jnn.BatchNorm}.items():
    module = model(cls)
    variables = module.init(jax.random.key(0), X)
    y, updates = module.apply(variables, X, mutable=["batch_stats"])
    y2, updates = module.apply({**variables, **updates}, X * 2, mutable=["batch_stats"])
    results[name] = (variables, y, y2, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), results["jaxnorm"], results["flax"])


def test_nnx_module_under_nnx_vmap():
  results = {}
  for name, cls in {"flax": nnx.BatchNorm, "jaxnorm": jnnx.BatchNorm}.items():
    module = cls(3, use_running_average=False, axis_name="batch", momentum=0.9, rngs=nnx.Rngs(0))
    step = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), out_axes=0, axis_name="batch")
    y = step(module, X)
    y2 = step(module, X * 2)
    results[name] = (y, y2, module.mean[...], module.var[...])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), results["jaxnorm"], results["flax"])
