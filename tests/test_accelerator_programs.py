"""What XLA:GPU (H100, A100) and XLA:TPU (v5e) make of jaxnorm's programs, compiled without the devices.

`_target_programs.py` compiles, in a subprocess of its own (the compiler
plugins change which backends JAX finds), every benchmark case of the
accelerator goals for each target: jaxnorm, flax.linen (default and exact
variance) and the textbook formula, forward and a training step's gradient
(`bench_targets.train_grad`), and reads
kernels, bytes accessed (GPU) and estimated cycles (TPU) from the optimized
programs (`jaxnorm.cli.bench_targets`). The goals (`bench_targets.goals`): kernels
at most flax default's; GPU bytes at most the least of the three peers; TPU
cycles at most the least of the two exact peers and at most 1.2x flax
default's; on H100, layer and RMS norm forward one kernel reading `x` once.

The few cases that miss are listed in `KNOWN_MISSES` with the reason, read
from the optimized HLO, and a bound they must keep. A control compiles the
private copies with their CPU barriers on every platform and checks that the
goals then fail.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jaxnorm.cli import bench_targets


HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = ("jax_plugins.xla_cuda12", "libtpu")

# The one-pass statistics subtract a pivot read from x (the median of three
# elements of each group): XLA:GPU and XLA:TPU read it in a small kernel of
# its own (three slices of |x| / 1024 to |x| / 8192 bytes) before the fused
# pass over x. Where flax's default program has as many other kernels as
# ours, that is one kernel more.
SHIFT = "one kernel more: the gather of the pivot, slices of 1/1024 of x or less"
# RMS norm's backward is flax's program kernel for kernel; XLA's cost model
# gives ours one per-row vector more (32 KB of 85-168 MB) or 0.1% more TPU
# cycles (one more subtraction per element in the dx kernel).
RMS_TIE = "RMS norm backward: the same kernels as flax, within 0.1% of its cost"
# Layer norm's training step on GPU: flax's kernels, and 0.02% more bytes
# (per-row vectors: the statistics the backward re-reads).
LN_TIE = "layer norm training step: the same kernels as flax, within 0.1% of its bytes"
# On TPU the backward's row sums take x-hat about the one-pass mean element
# by element (exact gradients with a far pivot), which XLA:TPU runs as a
# kernel apart from the sum of the cotangent; with the pivot's gather, two
# kernels more than flax default's, at 1.07x its estimated cycles (flax's
# variance cancels) and 0.65-0.71x the exact peers'.
TPU_LN = "TPU layer norm training step: two kernels more (the pivot, the row sums about the mean), cycles within the goal"
# On CUDA the forward of a layer norm uses the two-pass formula, which H100
# fuses into one Triton kernel reading x once (a goal); A100 has no such
# fusion and gets the exact-variance program, one pass more than flax default.
A100_LN = "A100 layer norm forward: the exact-variance program (the formula that is one kernel on H100)"

# (target, case, mode) -> (why, extra kernels allowed over flax default's, allowed cost over the goal's bound)
KNOWN_MISSES = {
    ("h100", "batch_norm/f32/64x32x32x128", "fwd"): (SHIFT, 1, 1.001),
    ("h100", "group_norm/f32/64x32x32x128", "fwd"): (SHIFT, 1, 1.002),
    ("a100", "batch_norm/f32/64x32x32x128", "fwd"): (SHIFT, 1, 1.001),
    ("a100", "group_norm/f32/64x32x32x128", "fwd"): (SHIFT, 1, 1.002),
    ("h100", "batch_norm/f32/64x32x32x128", "train"): (SHIFT, 1, 1.0),
    ("a100", "batch_norm/f32/64x32x32x128", "train"): (SHIFT, 1, 1.0),
    ("tpu-v5e", "layer_norm/f32/8192x1024", "fwd"): (SHIFT, 1, 1.0),
    ("tpu-v5e", "layer_norm/bf16/8192x1024", "fwd"): (SHIFT, 1, 1.0),
    ("tpu-v5e", "batch_norm/f32/64x32x32x128", "fwd"): (SHIFT, 1, 1.0),
    ("tpu-v5e", "batch_norm/f32/64x32x32x128", "train"): (SHIFT, 1, 1.0),
    ("h100", "layer_norm/f32/8192x1024", "train"): (LN_TIE, 0, 1.001),
    ("a100", "layer_norm/f32/8192x1024", "train"): (LN_TIE, 0, 1.001),
    ("tpu-v5e", "layer_norm/f32/8192x1024", "train"): (TPU_LN, 2, 1.0),
    ("tpu-v5e", "layer_norm/bf16/8192x1024", "train"): (TPU_LN, 2, 1.0),
    ("tpu-v5e", "rms_norm/bf16/8192x1024", "train"): (RMS_TIE, 0, 1.002),
    ("a100", "layer_norm/f32/8192x1024", "fwd"): (A100_LN, 2, 1.34),
    ("a100", "layer_norm/bf16/8192x1024", "fwd"): (A100_LN, 2, 1.34),
}


@pytest.fixture(scope="module")
def programs(tmp_path_factory, worker_id):
  missing = [p for p in PLUGINS if importlib.util.find_spec(p) is None]
  if missing:
    if os.environ.get("CI"):
      pytest.fail(f"CI installs the compilers extra, but {missing} are missing")
    pytest.skip(f"XLA's GPU/TPU compilers not installed ({missing}): pip install '.[compilers]'")
  # Under pytest-xdist this module's tests are spread over the workers: the
  # first one to get here compiles, the others wait for its file (the folder
  # above a worker's temporary folder is the session's, shared by all).
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent
  path = root / "accelerator_programs.json"
  with open(root / "accelerator_programs.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not path.exists():
      _compile_for_targets(path)
  with open(path) as f:
    return json.load(f)


def _compile_for_targets(path):
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
      "JAX_ENABLE_X64": "0",
      # libtpu locks /tmp/libtpu_lockfile against a second process using the
      # TPU; compiling uses none, and another test session may be compiling too.
      "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  }
  # Quiet: about 40 s. The bound only guards against a hang.
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, "_target_programs.py"), str(path) + ".partial"],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  os.replace(str(path) + ".partial", path)


def _goal_cases():
  return [
      (target, name, mode)
      for target in ("h100", "a100", "tpu-v5e")
      for name in (
          "layer_norm/f32/8192x1024",
          "layer_norm/bf16/8192x1024",
          "rms_norm/f32/8192x1024",
          "rms_norm/bf16/8192x1024",
          "batch_norm/f32/64x32x32x128",
          "group_norm/f32/64x32x32x128",
      )
      for mode in bench_targets.MODES
  ]


@pytest.mark.parametrize("target,name,mode", _goal_cases())
def test_goal(programs, target, name, mode):
  record = programs["cases"][f"{target}:{name}"]
  res = record["results"]
  jn, flax = res["jaxnorm"][mode], res["flax"][mode]
  if (target, name, mode) not in KNOWN_MISSES:
    missed = [k for k, ok in record["goals"][mode].items() if not ok]
    assert not missed, f"{target} {name} {mode} misses {missed}: { {i: res[i][mode] for i in res} }"
    return
  why, extra_kernels, slack = KNOWN_MISSES[(target, name, mode)]
  assert jn["kernels"] <= flax["kernels"] + extra_kernels, why
  if bench_targets.is_tpu(target):
    bound = min(min(res[i][mode]["mcycles"] for i in ("flax_exact", "plain_jnp")), 1.2 * flax["mcycles"])
    assert jn["mcycles"] <= slack * bound, why
  else:
    least = min(res[i][mode]["bytes_accessed"] for i in ("flax", "flax_exact", "plain_jnp"))
    assert jn["bytes_accessed"] <= slack * least, why


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_h100_row_norm_forward_is_one_kernel_reading_x_once(programs, op, dtype):
  record = programs["cases"][f"h100:{op}/{dtype}/8192x1024"]
  fwd = record["results"]["jaxnorm"]["fwd"]
  x_bytes = 8192 * 1024 * {"f32": 4, "bf16": 2}[dtype]
  assert fwd["kernels"] == 1 and fwd["triton_kernels"] == 1
  # Read x and write y, plus the parameters.
  assert 2 * x_bytes <= fwd["bytes_accessed"] <= 2.01 * x_bytes


@pytest.mark.parametrize("target", ["h100", "a100", "tpu-v5e"])
def test_no_barrier_in_accelerator_programs(programs, target):
  found = programs["barriers"][target]
  assert found, "no program was read"
  with_barrier = [k for k, v in found.items() if v["lowered"] or v["optimized"]]
  assert not with_barrier, f"{target}: optimization barriers in {with_barrier}"


@pytest.mark.parametrize("target", ["h100", "a100", "tpu-v5e"])
def test_control_the_checks_catch_a_barrier(programs, target):
  # The same layer norm with the CPU's barriers lowered on every platform.
  control = programs["control"][target]
  assert not control["goals"]["fwd"]["kernels"]
  assert not control["goals"]["train"]["kernels"]
  normal = programs["cases"][f"{target}:layer_norm/f32/8192x1024"]["results"]["jaxnorm"]["train"]["kernels"]
  assert control["results"]["jaxnorm"]["train"]["kernels"] > normal


@pytest.mark.parametrize("target", ["h100", "a100", "tpu-v5e"])
def test_one_export_for_every_platform_compiles_to_each_ones_program(programs, target):
  # jax.export with platforms=("cpu", "cuda", "tpu"), compiled for the target:
  # the target's own branch, the same kernels as compiling for it directly.
  direct = programs["cases"][f"{target}:layer_norm/f32/8192x1024"]["results"]["jaxnorm"]
  for mode, got in programs["exported"][target].items():
    assert not got["barrier"], mode
    assert got["kernels"] == direct[mode]["kernels"], (mode, got, direct[mode])


def test_h100_saved_output_frees_one_activation_per_layer(programs):
  """H100's buffer assignment, per layer of Dense -> batch norm -> leaky ReLU: the default keeps 3 activations
  (x, y and the activation's output), saved="output" 2 (y, z), activated_batch_norm 1 (z, which the next Dense keeps)."""
  per_layer = {k: v[1] - v[0] for k, v in programs["saved_output_chain"]["h100"].items()}
  assert per_layer["output"] <= per_layer["input"] - 0.9, per_layer
  assert per_layer["activated"] <= 1.1, per_layer


def test_tpu_compiles_the_backward_from_the_output(programs):
  assert set(programs["saved_output_chain"]["tpu-v5e"]) == {"input", "output", "activated"}
