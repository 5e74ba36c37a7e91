"""Compiles jaxnorm and its peers for GPU and TPU targets without the devices; prints the figures as JSON.

Run by `test_accelerator_programs.py` in a subprocess of its own, with
``JAX_PLATFORMS=cpu``: the compiler plugins change which backends JAX finds,
and no other test process should see them. Argument: the JSON path to write.
"""

import json
import sys

import jax
import jax.numpy as jnp

from jaxnorm import _platform
from jaxnorm.cli import _timing, bench, bench_targets

TARGETS = ("h100", "a100", "tpu-v5e")
GOAL_SHAPES = ((8192, 1024), (64, 32, 32, 128))


def _barrier_texts(target, sharding):
  """Whether the lowered and the optimized programs of every jaxnorm case contain a barrier."""
  found = {}
  for case in bench.cases(bench.QUICK):
    n_params = len(bench._ops()[case.op].params)
    dtype = jnp.dtype(case.dtype)
    x = jax.ShapeDtypeStruct(case.shape, dtype, sharding=sharding)
    params = [jax.ShapeDtypeStruct(case.shape[-1:], dtype, sharding=sharding)] * n_params
    apply = bench.jax_applies(case.op, jnp.zeros(case.shape, dtype))["jaxnorm"]
    for mode, lowered in (
        ("fwd", jax.jit(apply).lower(x, *params)),
        ("fwd_bwd", _timing.loss_grad(apply, n_params).lower(x, *params, x)),
    ):
      found[f"{case.name}:{mode}"] = {
          "lowered": "optimization_barrier" in lowered.as_text(),
          "optimized": "opt-barrier" in lowered.compile().as_text(),
      }
  return found


def _exported_for_all(target, sharding):
  """Kernels of layer norm's programs exported once for cpu, cuda and tpu, then compiled for `target`."""
  from jax import export  # noqa: PLC0415

  case = bench.Case("layer_norm", (8192, 1024), "float32")
  apply = bench.jax_applies(case.op, jnp.zeros(case.shape, jnp.float32))["jaxnorm"]
  abstract = [jax.ShapeDtypeStruct(case.shape, jnp.float32), *[jax.ShapeDtypeStruct(case.shape[-1:], jnp.float32)] * 2]
  placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in abstract]
  out = {}
  for mode, fn, args in (
      ("fwd", jax.jit(apply), abstract),
      ("train", bench_targets.train_grad(apply, 2), [*abstract, abstract[0]]),
  ):
    exported = export.export(fn, platforms=("cpu", "cuda", "tpu"))(*args)
    extra = [placed[0]] if mode == "train" else []
    compiled = jax.jit(exported.call).lower(*placed, *extra).compile()
    out[mode] = {
        "barrier": "opt-barrier" in compiled.as_text(),
        "kernels": bench_targets.read_program(compiled, 8192 * 1024)["kernels"],
    }
  return out


def _with_cpu_barriers_everywhere(fn):
  """Runs `fn` with the private copies lowered as on the CPU (with their barriers) on every platform: the control."""
  from jax.interpreters import mlir  # noqa: PLC0415

  rule = mlir.lower_fun(_platform._cpu_copies, multiple_results=True)
  saved = dict(mlir._platform_specific_lowerings["cuda"]), dict(mlir._platform_specific_lowerings["tpu"])
  for platform in ("cuda", "tpu"):
    mlir.register_lowering(_platform._private_copies_p, rule, platform=platform)
  jax.clear_caches()
  try:
    return fn()
  finally:
    for platform, table in zip(("cuda", "tpu"), saved):
      mlir._platform_specific_lowerings[platform].clear()
      mlir._platform_specific_lowerings[platform].update(table)
    jax.clear_caches()


def main(path):
  out = {"cases": {}, "barriers": {}, "control": {}, "exported": {}}
  goal_cases = [c for c in bench.cases(bench.FULL) if c.shape in GOAL_SHAPES]
  for target in TARGETS:
    sharding = bench_targets.device_sharding(target)
    for case in goal_cases:
      record = bench_targets.run_case(target, case, sharding)
      record["goals"] = bench_targets.goals(record, target)
      out["cases"][f"{target}:{case.name}"] = record
    out["barriers"][target] = _barrier_texts(target, sharding)
    out["exported"][target] = _exported_for_all(target, sharding)
    control_case = next(c for c in goal_cases if c.name == "layer_norm/f32/8192x1024")

    def control():
      record = bench_targets.run_case(target, control_case, sharding)
      record["goals"] = bench_targets.goals(record, target)
      return record

    out["control"][target] = _with_cpu_barriers_everywhere(control)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
