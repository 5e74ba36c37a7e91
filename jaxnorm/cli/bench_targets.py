"""Compile-only benchmark targets: what XLA makes of each case for a GPU or TPU that is not attached.

``jaxnorm bench --target h100`` (or ``a100``, ``tpu-v5e``, ``tpu-v4``)
compiles the benchmark's cases (`jaxnorm.cli.bench.cases`) for that device
without the device ("deviceless" compilation: the whole XLA pipeline runs,
nothing executes), in two modes, ``fwd`` and ``train`` (the gradient of a
loss computed from the norm's output, `train_grad`), and reads the
optimized programs:

* ``kernels``: the top-level operations of the optimized entry computation
  that launch work (fusions, custom calls, unfused ops); parameters,
  constants, tuples, bitcasts and TPU's asynchronous copies between memory
  spaces are not kernels.
* ``bytes_accessed`` (GPU): XLA's HloCostAnalysis of the optimized module,
  the same cost model as the CPU benchmark's figure. Not a measurement.
* ``temp_bytes``: the compiled program's temporary buffers.
* ``mcycles`` (TPU): the sum over kernels of XLA:TPU's own cost model
  (``estimated_cycles`` in each kernel's backend config), in millions.
* ``full_size_passes`` (TPU): kernels that read or write an array at least
  as large as `x` in HBM (XLA:TPU moves arrays that fit into VMEM, layout
  ``S(1)``; those passes are on-chip and not counted).

The compiler plugins are separate packages: ``jax-cuda12-plugin`` and
``jax-cuda12-pjrt`` for the GPU targets, ``libtpu`` (``jax[tpu]``) for TPU,
each at exactly the installed jax's version. `require` says what to install
when one is missing. The command sets ``JAX_PLATFORMS=cpu`` (unless already
set) before JAX starts: with the CUDA plugin present, JAX would look for a GPU
at start-up. The shift gather of the one-pass statistics (a slice of `x`)
counts as a full-size pass, since it reads from `x` in HBM. The GPU target configs (`gpu_target_config`, files in ``jaxnorm/cli/gpu_targets/``) carry the values of
XLA's own device descriptions (``xla/tools/hlo_opt/gpu_specs/`` in
openxla/xla): H100 SXM (sm_90, which fuses whole normalizations into one
Triton kernel) and A100 (sm_80).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm.cli import _timing, bench

TARGETS = ("h100", "a100", "tpu-v5e", "tpu-v4")
TPU_TOPOLOGIES = {"tpu-v5e": "v5e:2x2", "tpu-v4": "TPU v4:2x2x1"}
# The forward, and the gradient program of a training step (see `train_grad`).
MODES = ("fwd", "train")
IMPLEMENTATIONS = bench.JAX_IMPLEMENTATIONS

# GpuTargetConfig text protos with the values of XLA's device descriptions
# (xla/tools/hlo_opt/gpu_specs/ in openxla/xla), shipped beside this module.
GPU_TARGET_FILES = {"h100": "h100_sxm.txtpb", "a100": "a100.txtpb"}


def gpu_target_config(target: str) -> str:
  """The GpuTargetConfig text proto of a GPU target."""
  return importlib.resources.files("jaxnorm.cli").joinpath("gpu_targets", GPU_TARGET_FILES[target]).read_text()


# Entry-computation ops that launch no work of their own.
_NOT_KERNELS = frozenset(
    {
        "parameter",
        "constant",
        "tuple",
        "get-tuple-element",
        "bitcast",
        "after-all",
        # XLA:TPU's asynchronous copies and slices between memory spaces (the DMA engines, not a kernel).
        "copy-start",
        "copy-done",
        "slice-start",
        "slice-done",
    }
)
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")


def is_tpu(target: str) -> bool:
  return target.startswith("tpu")


def _missing(module: str) -> bool:
  """Whether `module` cannot be imported; a missing parent package (``jax_plugins``) counts as missing."""
  try:
    return importlib.util.find_spec(module) is None
  except ModuleNotFoundError:
    return True


def require(target: str) -> None:
  """Raises a clear error naming the packages to install when `target`'s compiler plugin is missing."""
  if target not in TARGETS:
    raise ValueError(f"--target {target!r} is not one of {', '.join(TARGETS)}.")
  version = jax.__version__
  if is_tpu(target):
    missing = _missing("libtpu")
    install = f'pip install "jax[tpu]=={version}"'
  else:
    missing = _missing("jax_plugins.xla_cuda12")
    install = f'pip install "jax-cuda12-plugin=={version}" "jax-cuda12-pjrt=={version}"'
  if missing:
    raise RuntimeError(
        f"--target {target} compiles with XLA's {'TPU' if is_tpu(target) else 'CUDA'} compiler, which is not "
        f"installed. Install it at this jax's version ({install}; about 200 MB, no device needed)."
    )


def device_sharding(target: str) -> jax.sharding.NamedSharding:
  """A sharding on one device of `target`'s compile-only topology: arguments placed with it compile for it."""
  from jax.experimental import topologies  # noqa: PLC0415  (needs the plugin at call time only)

  require(target)
  if is_tpu(target):
    topo = topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[target], platform="tpu")
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("d",))
  else:
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=gpu_target_config(target))
    mesh = topologies.make_mesh(topo, (1,), ("d",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _elements(shape: str) -> int:
  return max((int(np.prod([int(d) for d in m.group(2).split(",") if d] or [1])) for m in _ARRAY.finditer(shape)), default=0)


def _in_hbm(shape: str) -> list[int]:
  """Element counts of the arrays in an HLO shape string that live in HBM (not in VMEM, ``S(1)``)."""
  return [
      int(np.prod([int(d) for d in m.group(2).split(",") if d] or [1]))
      for m in _ARRAY.finditer(shape)
      if "S(1)" not in (m.group(3) or "")
  ]


def read_program(compiled: Any, x_size: int) -> dict[str, Any]:
  """Kernels, TPU cycles and full-size passes of a compiled program, from its optimized HLO text."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY ") :]
  entry = entry[: entry.index("\n}")]
  shapes: dict[str, str] = {}
  kernels = triton = passes = 0
  cycles = 0.0
  for line in entry.splitlines()[1:]:
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, operands, rest = m.groups()
    shapes[name] = shape
    if opcode in _NOT_KERNELS:
      continue
    kernels += 1
    triton += "__triton" in rest
    c = re.search(r'"estimated_cycles":"(\d+)"', rest)
    cycles += float(c.group(1)) if c else 0.0
    touched = _in_hbm(shape) + [n for op in re.findall(r"%([\w.-]+)", operands) for n in _in_hbm(shapes.get(op, ""))]
    passes += any(n >= x_size for n in touched)
  return {"kernels": kernels, "triton_kernels": triton, "mcycles": cycles / 1e6, "full_size_passes": passes}


def _gpu_bytes(compiled: Any) -> float | None:
  # The compile-only executable has no cost analysis of its own; XLA's
  # HloCostAnalysis runs on its optimized module through a CPU client.
  from jax._src.lib import _jax  # noqa: PLC0415

  cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, compiled.runtime_executable().hlo_modules()[0])
  value = cost.get("bytes accessed")
  return None if value is None else float(value)


def measure(target: str, fn: Callable[..., Any], args: list[Any], x_size: int) -> dict[str, Any]:
  """Compiles ``jit(fn)`` for `target` on abstract `args` (placed on its sharding) and reads the program."""
  compiled = jax.jit(fn).lower(*args).compile()
  record = read_program(compiled, x_size)
  record["temp_bytes"] = bench.temp_bytes(compiled)
  if is_tpu(target):
    record.pop("triton_kernels")
  else:
    record["bytes_accessed"] = _gpu_bytes(compiled)
    record.pop("mcycles")
    record.pop("full_size_passes")
  return record


def train_grad(apply: Callable[..., jax.Array], n_params: int) -> Callable[..., Any]:
  """The gradient of ``sum(tanh(apply(x, *params)) * w)`` wrt `x` and the params; call as ``f(x, *params, w)``.

  The norm's cotangent is computed from its output, as in a training step,
  where the layers after the norm run between its forward and its backward.
  (The CPU benchmark's ``fwd_bwd`` takes the cotangent as an argument
  instead; compiled for GPU, that lets XLA run the backward's sums in the
  forward's pass over `x`, which no training step can, and which jaxnorm's
  backward, re-centred about the one-pass mean for its precision, does not
  allow either.)
  """

  def loss(x, *rest):
    *params, w = rest
    return jnp.sum(jnp.tanh(apply(x, *params)) * w)

  return jax.jit(jax.grad(loss, argnums=tuple(range(1 + n_params))))


def run_case(target: str, case: bench.Case, sharding: Any) -> dict[str, Any]:
  """Every JAX implementation of `case`, forward and a training step's gradient, compiled for `target`."""
  n_params = len(bench._ops()[case.op].params)
  dtype = jnp.dtype(case.dtype)
  x = jax.ShapeDtypeStruct(case.shape, dtype, sharding=sharding)
  params = [jax.ShapeDtypeStruct(case.shape[-1:], dtype, sharding=sharding) for _ in range(n_params)]
  size = int(np.prod(case.shape))
  results = {}
  for impl, apply in bench.jax_applies(case.op, jnp.zeros(case.shape, dtype)).items():
    results[impl] = {
        "fwd": measure(target, apply, [x, *params], size),
        "train": measure(target, train_grad(apply, n_params), [x, *params, x], size),
    }
  return {"name": case.name, "op": case.op, "shape": list(case.shape), "dtype": case.dtype, "results": results}


def goals(case: dict[str, Any], target: str) -> dict[str, dict[str, Any]]:
  """Per mode, whether jaxnorm meets the accelerator goals on `case` (a `run_case` record).

  * kernels at most flax default's;
  * GPU: bytes accessed at most the least of flax default, flax exact
    variance and the textbook formula; TPU: estimated cycles at most the
    least of flax exact variance and the textbook formula, and at most 1.2x
    flax default's;
  * H100, layer and RMS norm forward: one kernel that reads `x` once and
    writes `y` once (bytes at most ``2 |x|`` plus 1%).
  """
  res = case["results"]
  out = {}
  for mode in MODES:
    jn = res["jaxnorm"][mode]
    checks = {"kernels": jn["kernels"] <= res["flax"][mode]["kernels"]}
    if is_tpu(target):
      exact = min(res[i][mode]["mcycles"] for i in ("flax_exact", "plain_jnp"))
      checks["cycles"] = jn["mcycles"] <= exact and jn["mcycles"] <= 1.2 * res["flax"][mode]["mcycles"]
    else:
      least = min(res[i][mode]["bytes_accessed"] for i in ("flax", "flax_exact", "plain_jnp"))
      checks["bytes"] = jn["bytes_accessed"] <= least
      if target == "h100" and mode == "fwd" and case["op"] in ("layer_norm", "rms_norm"):
        x_bytes = int(np.prod(case["shape"])) * jnp.dtype(case["dtype"]).itemsize
        checks["one_kernel"] = jn["kernels"] == 1 and jn["bytes_accessed"] <= 2.02 * x_bytes
    out[mode] = checks
  return out


def run(target: str, *, quick: bool = False, patterns: str | None = None, progress: Any = None) -> dict[str, Any]:
  """Compiles the selected benchmark cases for `target`; the JSON-ready report."""
  import sys  # noqa: PLC0415
  import time  # noqa: PLC0415

  progress = sys.stderr if progress is None else progress
  sharding = device_sharding(target)
  chosen = bench.select(bench.cases(bench.QUICK if quick else bench.FULL), patterns)
  start = time.perf_counter()
  header = _timing.machine_lines(f"compile-only benchmark for {target}")
  plugin = "libtpu" if is_tpu(target) else "jax-cuda12-plugin"
  header.append(f"target: {target} ({_describe(target)}, {plugin} {_timing._version(plugin)}); nothing runs: figures are XLA's cost model")
  records = []
  for i, case in enumerate(chosen):
    print(f"[{i + 1}/{len(chosen)}] {case.name} for {target} ...", file=progress, flush=True)
    record = run_case(target, case, sharding)
    record["goals"] = goals(record, target)
    records.append(record)
  return {
      "schema": "jaxnorm-bench-target/1",
      "target": target,
      "header": header,
      "date": header[0].rsplit(", ", 1)[-1],
      "versions": header[2:],
      "settings": {"quick": quick, "cases": patterns},
      "implementations": {k: bench.LABELS[k] for k in IMPLEMENTATIONS},
      "modes": list(MODES),
      "cases": records,
      "seconds": time.perf_counter() - start,
  }


def _describe(target: str) -> str:
  if is_tpu(target):
    return f"XLA:TPU, topology {TPU_TOPOLOGIES[target]}, one chip"
  return f"XLA:GPU, {GPU_TARGET_FILES[target]}"


def format_report(report: dict[str, Any]) -> str:
  """The report as a plain-text table: per case and mode, each implementation's figures and the goals."""
  target = report["target"]
  tpu = is_tpu(target)
  lines = [*report["header"], ""]
  if tpu:
    lines.append("Cells: kernels / full-size HBM passes / estimated Mcycles (XLA:TPU's cost model).")
  else:
    lines.append("Cells: kernels / MB accessed (XLA's HloCostAnalysis of the optimized program) / temp MB.")
  lines.append("Goals: kernels <= flax's; " + ("Mcycles <= min(flax-x, jnp) and <= 1.2 flax" if tpu else "MB <= min(flax, flax-x, jnp)") + ".")
  rows = []
  for rec in report["cases"]:
    for mode in MODES:
      cells = []
      for impl in IMPLEMENTATIONS:
        r = rec["results"][impl][mode]
        if tpu:
          cells.append(f"{r['kernels']}/{r['full_size_passes']}/{r['mcycles']:.2f}")
        else:
          cells.append(f"{r['kernels']}/{r['bytes_accessed'] / 1e6:.0f}/{(r['temp_bytes'] or 0) / 1e6:.0f}")
      missed = [k for k, ok in rec["goals"][mode].items() if not ok]
      rows.append([rec["name"], mode, *cells, "met" if not missed else "missed: " + ", ".join(missed)])
  lines += _timing.table(
      ["case", "mode", *(bench.SHORT[i] for i in IMPLEMENTATIONS), "goals"],
      rows,
      [False, False] + [True] * len(IMPLEMENTATIONS) + [False],
  )
  lines += ["", f"{len(report['cases'])} cases in {report['seconds']:.1f} s"]
  return "\n".join(lines)
