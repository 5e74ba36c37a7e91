"""Cross-device statistics on several (forced host) CPU devices, through `jax.shard_map`.

The vmap tests in test_functional.py exercise `axis_name` within one device;
this module checks the real multi-device path with shard_map's default
`check_vma=True`. JAX fixes the number of host devices when it starts, so the
checks run in one subprocess (started with
`--xla_force_host_platform_device_count=3`) that reports, for every case, the
largest deviation from a single-call reference on the concatenated batch, or
the exception it raised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


DEVICES = 3

SCRIPT = textwrap.dedent(
    """
    import json, traceback
    import numpy as np
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh, PartitionSpec as P
    import jaxnorm

    D, N, C = len(jax.devices()), 4, 2
    mesh = Mesh(np.array(jax.devices()), ("i",))
    r = np.random.default_rng(0)
    x = r.normal(size=(D * N, C)) + np.repeat(np.arange(D) * 3.0, N)[:, None]
    counts = np.array([[1, 3], [2, 1], [4, 2]])[:D]  # unequal valid counts per device
    where = (np.arange(N)[None, :, None] < counts[:, None, :]).reshape(D * N, C)
    s, b = r.normal(size=C), r.normal(size=C)
    ct = r.normal(size=(D * N, C))
    cm, cv = r.normal(size=(D, C)), r.normal(size=(D, C))
    results = {}

    def err(a, b):
        return float(max(np.abs(np.asarray(u) - np.asarray(v)).max() for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))

    def case(fn):
        try:
            results[fn.__name__] = fn()
        except Exception as e:
            results[fn.__name__] = f"{type(e).__name__}: {e}"[:600]
        return fn

    def ref_bn(x, s, b):  # textbook float64 formula on the whole batch; s and b: (C,) or scalars
        mean = jnp.mean(x, 0, where=where, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), 0, where=where, keepdims=True)
        y = (x - mean) / jnp.sqrt(var + 1e-5) * jnp.reshape(s, (1, -1)) + jnp.reshape(b, (1, -1))
        return y, mean[0], var[0]

    def sharded(f, in_specs, out_specs):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    @case
    def forward_unequal_counts():
        f = sharded(lambda x, w: jaxnorm.batch_norm(x, s, b, where=w, axis_name="i"), (P("i"), P("i")), (P("i"), P(), P()))
        return err(f(x, where), ref_bn(x, s, b))

    @case
    def moments_unequal_counts():
        f = sharded(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="i"), (P("i"), P("i")), (P(), P()))
        return err(f(x, where), ref_bn(x, s, b)[1:])

    # grad(loss(shard_map(f))): cotangents on y only; scale and bias are per-device inputs.
    @case
    def grad_y_cotangent():
        f = sharded(lambda x, s, b, w: jaxnorm.batch_norm(x, s, b, where=w, axis_name="i")[0],
                    (P("i"), P("i"), P("i"), P("i")), P("i"))
        tile = lambda a: np.tile(a, D)
        loss = lambda x, s, b: jnp.sum(f(x, s, b, where) * ct)
        g = jax.grad(loss, (0, 1, 2))(x, tile(s), tile(b))
        g_ref = jax.grad(lambda x, s, b: jnp.sum(ref_bn(x, s, b)[0] * ct), (0, 1, 2))(x, s, b)
        return err([g[0], g[1].reshape(D, C).sum(0), g[2].reshape(D, C).sum(0)], g_ref)

    # The same, with scale and bias replicated (P()), as a flax model under shard_map has them.
    @case
    def grad_replicated_scale_bias():
        f = sharded(lambda x, s, b, w: jaxnorm.batch_norm(x, s, b, where=w, axis_name="i")[0],
                    (P("i"), P(), P(), P("i")), P("i"))
        loss = lambda x, s, b: jnp.sum(f(x, s, b, where) * ct)
        g = jax.grad(loss, (0, 1, 2))(x, s, b)
        g_ref = jax.grad(lambda x, s, b: jnp.sum(ref_bn(x, s, b)[0] * ct), (0, 1, 2))(x, s, b)
        return err(g, g_ref)

    # Plain data parallelism, no axis_name: layer_norm with a replicated scale and bias.
    @case
    def grad_layer_norm_replicated_scale_bias():
        f = sharded(lambda x, s, b: jaxnorm.layer_norm(x, s, b), (P("i"), P(), P()), P("i"))
        loss = lambda x, s, b: jnp.sum(f(x, s, b) * ct)
        def loss_ref(x, s, b):
            y = (x - jnp.mean(x, -1, keepdims=True)) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-6)
            return jnp.sum((y * s[None, :] + b[None, :]) * ct)
        return err(jax.grad(loss, (0, 1, 2))(x, s, b), jax.grad(loss_ref, (0, 1, 2))(x, s, b))

    # Cotangents on the returned (replicated) mean and variance too (no affine part, so
    # that only the statistics path is tested).
    @case
    def grad_through_statistics():
        f = sharded(lambda x, w: jaxnorm.batch_norm(x, where=w, axis_name="i"), (P("i"), P("i")), (P("i"), P(), P()))
        def loss(x):
            y, mean, var = f(x, where)
            return jnp.sum(y * ct) + jnp.sum(mean * cm.sum(0)) + jnp.sum(var * cv.sum(0))
        def loss_ref(x):
            y, mean, var = ref_bn(x, 1.0, 0.0)
            return jnp.sum(y * ct) + jnp.sum(mean * cm.sum(0)) + jnp.sum(var * cv.sum(0))
        return err(jax.grad(loss)(x), jax.grad(loss_ref)(x))

    # Data-parallel pattern: each device differentiates its own loss (its share of the cotangents).
    @case
    def grad_inside_shard_map_through_statistics():
        def per_device(x, w, ct, cm, cv):
            def local_loss(x):
                y, mean, var = jaxnorm.batch_norm(x, where=w, axis_name="i")
                return jnp.sum(y * ct) + jnp.sum(mean * cm[0]) + jnp.sum(var * cv[0])
            return jax.grad(local_loss)(x)
        f = sharded(per_device, (P("i"),) * 5, P("i"))
        def loss_ref(x):
            y, mean, var = ref_bn(x, 1.0, 0.0)
            return jnp.sum(y * ct) + jnp.sum(mean * cm.sum(0)) + jnp.sum(var * cv.sum(0))
        return err(f(x, where, ct, cm, cv), jax.grad(loss_ref)(x))

    @case
    def grad_moments():
        f = sharded(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="i"), (P("i"), P("i")), (P(), P()))
        loss = lambda x: jnp.sum(f(x, where)[0] * cm[0]) + jnp.sum(f(x, where)[1] * cv[0])
        loss_ref = lambda x: jnp.sum(ref_bn(x, s, b)[1] * cm[0]) + jnp.sum(ref_bn(x, s, b)[2] * cv[0])
        return err(jax.grad(loss)(x), jax.grad(loss_ref)(x))

    # The backward from the output (saved="output"): the same gradients, masked, replicated parameters.
    @case
    def grad_saved_output_replicated_scale_bias():
        f = sharded(lambda x, s, b, w: jaxnorm.batch_norm(x, s, b, where=w, axis_name="i", saved="output")[0],
                    (P("i"), P(), P(), P("i")), P("i"))
        loss = lambda x, s, b: jnp.sum(f(x, s, b, where) * ct)
        g = jax.grad(loss, (0, 1, 2))(x, s, b)
        g_ref = jax.grad(lambda x, s, b: jnp.sum(ref_bn(x, s, b)[0] * ct), (0, 1, 2))(x, s, b)
        return err(g, g_ref)

    print(json.dumps({"devices": D, "results": results}))
    """
)

CASES = [
    "forward_unequal_counts",
    "moments_unequal_counts",
    "grad_y_cotangent",
    "grad_replicated_scale_bias",
    "grad_layer_norm_replicated_scale_bias",
    "grad_through_statistics",
    "grad_inside_shard_map_through_statistics",
    "grad_moments",
    "grad_saved_output_replicated_scale_bias",
]


@pytest.fixture(scope="module")
def shard_map_results():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == DEVICES
  return report["results"]


@pytest.mark.parametrize("case", CASES)
def test_shard_map_matches_single_call(shard_map_results, case):
  result = shard_map_results[case]
  assert not isinstance(result, str), f"{case} raised {result}"
  assert result < 1e-9, f"{case}: max deviation from the single-call reference {result:.3g}"
