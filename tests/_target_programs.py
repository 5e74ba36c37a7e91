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


def _saved_output_chain(target, sharding):
  """Temporary bytes, in activations, of the gradient of x -> [Dense -> batch norm -> leaky ReLU] x layers -> tanh -> sum.

  For jaxnorm's default (the backward keeps x), ``saved="output"`` (it keeps
  y) and `activated_batch_norm` (it keeps the activation's output only),
  at 2 and 3 layers: the difference is what one layer keeps. XLA:TPU's
  compile-only memory analysis reports no temporaries: there the programs
  are compiled at 2 layers only, to show that they compile.
  """
  import jaxnorm  # noqa: PLC0415

  rows, width = 4096, 256
  norms = {
      "input": lambda h, s, b: jax.nn.leaky_relu(jaxnorm.batch_norm(h, s, b)[0], 0.01),
      "output": lambda h, s, b: jax.nn.leaky_relu(jaxnorm.batch_norm(h, s, b, saved="output")[0], 0.01),
      "activated": lambda h, s, b: jaxnorm.activated_batch_norm(h, s, b)[0],
  }
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  out = {}
  for name, norm in norms.items():
    def loss(params, x, norm=norm):
      for w, s, b in params:
        x = norm(x @ w, s, b)
      return jnp.sum(jnp.tanh(x))
    out[name] = [
        jax.jit(jax.grad(loss)).lower([(f32(width, width), f32(width), f32(width))] * layers, f32(rows, width))
        .compile().memory_analysis().temp_size_in_bytes / (rows * width * 4)
        for layers in ((2, 3) if target == "h100" else (2,))
    ]
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
  out = {"cases": {}, "barriers": {}, "control": {}, "exported": {}, "saved_output_chain": {}}
  goal_cases = [c for c in bench.cases(bench.FULL) if c.shape in GOAL_SHAPES]
  for target in TARGETS:
    sharding = bench_targets.device_sharding(target)
    for case in goal_cases:
      record = bench_targets.run_case(target, case, sharding)
      record["goals"] = bench_targets.goals(record, target)
      out["cases"][f"{target}:{case.name}"] = record
    out["barriers"][target] = _barrier_texts(target, sharding)
    out["exported"][target] = _exported_for_all(target, sharding)
    if target != "a100":
      out["saved_output_chain"][target] = _saved_output_chain(target, sharding)
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
