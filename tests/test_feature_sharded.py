"""Norms over a hidden axis split across 8 (forced host) CPU devices: tensor parallelism.

`layer_norm` and `rms_norm` with ``axis_name`` under `jax.shard_map`, the
normalized (last) axis split 8 ways, a mask and per-feature parameters split
with it; and the same ops under `jax.jit` on an array sharded along the
hidden axis, with no ``axis_name`` (XLA's partitioner adds the collectives).
Each is compared in float64 with the op on one device and the whole row:
outputs and the gradients wrt `x`, `scale` and `bias`, which stay per shard.
JAX fixes the device count at start-up, so the cases run in one subprocess
that prints a JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


SCRIPT = textwrap.dedent(
    """
    import json, re
    import numpy as np
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxnorm

    mesh = Mesh(np.array(jax.devices()), ("d",))
    r = np.random.default_rng(0)
    x = r.normal(size=(3, 4, 32)) * 2 + 1
    where = r.random(size=x.shape) > 0.3
    s, b, ct = r.normal(size=32), r.normal(size=32), r.normal(size=x.shape)
    results = {}

    def err(a, b):
        return float(max(np.abs(np.asarray(u) - np.asarray(v)).max() for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))

    for name, op, params in (("layer_norm", jaxnorm.layer_norm, (s, b)), ("rms_norm", jaxnorm.rms_norm, (s,))):
        def whole(x, *p, op=op):
            return op(x, *p, where=where)

        def loss(f):
            return lambda x, *p: jnp.sum(f(x, *p) * ct)

        ref = (whole(x, *params), jax.grad(loss(whole), tuple(range(1 + len(params))))(x, *params))
        spec = P(None, None, "d")
        split = jax.shard_map(
            lambda x, w, *p, op=op: op(x, *p, where=w, axis_name="d"),
            mesh=mesh, in_specs=(spec, spec) + (P("d"),) * len(params), out_specs=spec)
        f = lambda x, *p: split(x, where, *p)
        got = (jax.jit(f)(x, *params), jax.jit(jax.grad(loss(f), tuple(range(1 + len(params)))))(x, *params))
        results[name + "/shard_map"] = err(got, ref)

        # jit on a hidden axis that is sharded, no axis_name: XLA partitions the reductions.
        sharded = NamedSharding(mesh, spec)
        xs = jax.device_put(x, sharded)
        ps = [jax.device_put(p, NamedSharding(mesh, P("d"))) for p in params]
        g = jax.jit(jax.grad(loss(whole), tuple(range(1 + len(params)))))
        got = (jax.jit(whole)(xs, *ps), g(xs, *ps))
        text = jax.jit(whole).lower(xs, *ps).compile().as_text()
        results[name + "/jit"] = {
            "err": err(got, ref),
            "all_reduces": len(re.findall(r"\\ball-reduce(?:-start)?\\(", text)),
            "all_gathers": len(re.findall(r"\\ball-gather(?:-start)?\\(", text)),
            "y_shards": len(got[0].sharding.device_set),
        }
    print(json.dumps({"devices": len(jax.devices()), "results": results}))
    """
)


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  # A guard against hangs, far above the ~20 s this takes on a quiet machine.
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  data = json.loads(proc.stdout.strip().splitlines()[-1])
  assert data["devices"] == 8
  return data["results"]


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_shard_map_over_the_hidden_axis_is_exact(report, op):
  assert report[f"{op}/shard_map"] < 1e-12, report


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_jit_with_a_sharded_hidden_axis(report, op):
  result = report[f"{op}/jit"]
  assert result["err"] < 1e-12, result
  # The statistics were reduced across the shards (not gathered), and y stays sharded.
  assert result["all_reduces"] >= 1 and result["all_gathers"] == 0, result
  assert result["y_shards"] == 8, result
