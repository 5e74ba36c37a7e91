"""Cross-device statistics across 2 processes: linen `BatchNorm` over a global mesh of 8 CPU devices.

Two worker processes (this file run as a script, see `_worker`) join one JAX
runtime with `jax.distributed.initialize` over loopback (127.0.0.1, a free
port), with gloo as the CPU collectives, each holding 4 host devices. Over
the global mesh of 8 devices each runs, on its half of one global batch
(8 shards of 4 rows, means differing per shard, 0 to 4 valid rows per
shard and feature via `mask=`):

* `jaxnorm.linen.BatchNorm(axis_name="i")` under `jax.shard_map` (its
  statistics cross the process boundary through `psum`), forward and
  gradients with respect to the input and the (replicated) parameters;
* `jaxnorm.linen.BatchNorm()` (no axis_name) under `jax.jit` on the
  batch-sharded global array (XLA inserts the collectives).

Each gathers the global results (`process_allgather`) and prints them as
JSON; the test checks both processes against the same module applied on
one device to the whole batch in this (pytest) process, and that against
`flax.linen.BatchNorm`. The workers are bounded in time (polled until a
deadline, or until one of them fails, then killed) and always reaped. If
this JAX build cannot run CPU collectives across processes, the test fails
with the workers' exit codes and error output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from _flax_reference import flax_promotion
from jaxnorm import linen as jnn

# (Importing JAX starts no backend: each worker still configures it before first use.)
PROCESSES, LOCAL_DEVICES = 2, 4
D, N, C = PROCESSES * LOCAL_DEVICES, 4, 3  # global devices, rows per device, features
MOMENTUM = 0.9
TIMEOUT = 150  # seconds for both workers together


def _problem():
  """The global batch, mask, variables and cotangents, identical in every process."""
  r = np.random.default_rng(0)
  x = r.normal(size=(D * N, C)) + np.repeat(np.arange(D) * 2.0, N)[:, None]
  counts = np.array([[1, 4, 2], [3, 0, 4], [4, 2, 1], [2, 4, 3], [0, 1, 4], [4, 3, 2], [1, 2, 0], [3, 4, 4]])
  mask = (np.arange(N)[None, :, None] < counts[:, None, :]).reshape(D * N, C)
  variables = {
      "params": {"scale": r.normal(size=C), "bias": r.normal(size=C)},
      "batch_stats": {"mean": r.normal(size=C), "var": r.uniform(0.3, 3.0, size=C)},
  }
  cotangents = {"y": r.normal(size=(D * N, C)), "mean": r.normal(size=C), "var": r.normal(size=C)}
  return x, mask, variables, cotangents


def _apply(module, params, batch_stats, x, mask):
  """Training-mode forward: `(y, new batch_stats)`."""
  y, updates = module.apply({"params": params, "batch_stats": batch_stats}, x, mask=mask, mutable=["batch_stats"])
  return y, updates["batch_stats"]


def _statistics_term(stats, ct):
  return jnp.sum(stats["mean"] * ct["mean"]) + jnp.sum(stats["var"] * ct["var"])


def _single_device(module, variables, x, mask, ct):
  """Outputs and gradients (x, params) of sum(y * ct_y) + <new running statistics, ct> on the whole batch."""

  def loss(params, x):
    y, stats = _apply(module, params, variables["batch_stats"], x, mask)
    return jnp.sum(y * ct["y"]) + _statistics_term(stats, ct), {"y": y, "batch_stats": stats}

  (_, out), (g_params, g_x) = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], x)
  return {"out": out, "grads": {"x": g_x, "params": g_params}}


# ---------------------------------------------------------------------------------------------
# The worker: one of the two processes.
# ---------------------------------------------------------------------------------------------


def _worker(process_id: int, port: int) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_enable_x64", True)
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=PROCESSES,
      process_id=process_id,
      coordinator_bind_address=f"127.0.0.1:{port}",
      initialization_timeout=60,  # the pytest side gives up after TIMEOUT anyway
  )
  report = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "devices": len(jax.devices()),
      "local_devices": len(jax.local_devices()),
      "cpu_collectives": jax.config.jax_cpu_collectives_implementation,
  }
  x, mask, variables, ct = _problem()
  mesh = Mesh(np.array(jax.devices()), ("i",))  # all 8 devices, 4 of them in the other process
  rows, replicated = NamedSharding(mesh, P("i")), NamedSharding(mesh, P())

  def global_array(a, sharding):
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  xg, mg, ctg = global_array(x, rows), global_array(mask, rows), jax.tree.map(lambda a: global_array(a, replicated), ct)
  ctg["y"] = global_array(ct["y"], rows)
  var_g = jax.tree.map(lambda a: global_array(a, replicated), variables)

  # 1. shard_map: each device normalizes its own rows; statistics merged by psum over "i".
  module = jnn.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name="i")

  def per_device(params, x, mask, ct, batch_stats):
    y, stats = _apply(module, params, batch_stats, x, mask)
    # The global loss: the y-terms of every device, plus the (replicated) statistics' terms once.
    loss = jax.lax.psum(jnp.sum(y * ct["y"]), "i") + _statistics_term(stats, ct)
    return loss, {"y": y, "batch_stats": stats}

  ct_specs = {"y": P("i"), "mean": P(), "var": P()}
  sharded = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P("i"), P("i"), ct_specs, P()),
      out_specs=(P(), {"y": P("i"), "batch_stats": P()}),
  )

  @jax.jit
  def shard_map_step(params, x, mask, ct, batch_stats):
    run = lambda params, x: sharded(params, x, mask, ct, batch_stats)  # noqa: E731
    (_, out), (g_params, g_x) = jax.value_and_grad(run, (0, 1), has_aux=True)(params, x)
    return {"out": out, "grads": {"x": g_x, "params": g_params}}

  # 2. jit on the sharded global array, no axis_name: XLA partitions the reductions.
  @jax.jit
  def jit_step(params, x, mask, ct, batch_stats):
    plain = jnn.BatchNorm(use_running_average=False, momentum=MOMENTUM)
    return _single_device(plain, {"params": params, "batch_stats": batch_stats}, x, mask, ct)

  for name, step in (("shard_map", shard_map_step), ("jit_named_sharding", jit_step)):
    t = time.perf_counter()
    result = step(var_g["params"], xg, mg, ctg, var_g["batch_stats"])
    gathered = multihost_utils.process_allgather(result, tiled=True)
    report[name] = jax.tree.map(lambda a: np.asarray(a).tolist(), gathered)
    report[name + "_seconds"] = round(time.perf_counter() - t, 2)
  jax.distributed.shutdown()
  print(json.dumps(report))


# ---------------------------------------------------------------------------------------------
# The test: start both workers, wait with a timeout, compare with one device here.
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers() -> list[dict]:
  """Starts the workers, waits for all (or the first failure, or the deadline), kills whatever is left."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={LOCAL_DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  # Output goes to files, not pipes, so that polling cannot deadlock on a full pipe.
  logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(PROCESSES)]
  procs = []
  try:
    for i, (out, err) in enumerate(logs):
      procs.append(subprocess.Popen([sys.executable, __file__, str(i), str(port)], env=env, stdout=out, stderr=err))
    deadline = time.monotonic() + TIMEOUT
    # A worker that fails leaves the other waiting for it in a collective: stop at the first failure.
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
      if time.monotonic() > deadline:
        break
      time.sleep(0.1)
  finally:
    for proc in procs:  # nothing outlives the test, whatever happened above
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  texts = []
  for out, err in logs:
    out.seek(0)
    err.seek(0)
    texts.append((out.read(), err.read()))
    out.close()
    err.close()
  killed = " (killed: timeout, or the other worker failed)"
  failed = [
      f"--- worker {i}: exit code {p.returncode}{killed if p.returncode < 0 else ''}\n{texts[i][1][-4000:]}"
      for i, p in enumerate(procs)
      if p.returncode != 0
  ]
  assert not failed, f"two-process run failed (timeout {TIMEOUT} s)\n" + "\n".join(failed)
  return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in texts]


def test_linen_batch_norm_across_two_processes_equals_single_device():
  reports = _run_workers()
  assert [r["process_index"] for r in reports] == list(range(PROCESSES))
  for r in reports:
    assert (r["process_count"], r["devices"], r["local_devices"], r["cpu_collectives"]) == (
        PROCESSES, D, LOCAL_DEVICES, "gloo"
    ), {k: v for k, v in r.items() if not isinstance(v, dict)}

  # One device, the whole batch: the same module without axis_name, and flax as its independent check.
  x, mask, variables, ct = _problem()

  want = _single_device(jnn.BatchNorm(use_running_average=False, momentum=MOMENTUM), variables, x, mask, ct)
  with flax_promotion():
    flax_result = _single_device(
        nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, use_fast_variance=False), variables, x, mask, ct
    )
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(flax_result)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)

  for r in reports:
    for name in ("shard_map", "jit_named_sharding"):
      got = jax.tree.map(np.asarray, r[name], is_leaf=lambda a: isinstance(a, list))
      assert jax.tree.structure(got) == jax.tree.structure(want), name
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(
            np.asarray(a), b, rtol=1e-10, atol=1e-10,
            err_msg=f"process {r['process_index']}, {name}{jax.tree_util.keystr(path)}",
        )


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]))
