"""The compile-only targets of `jaxnorm bench --target`: the missing-plugin message, the HLO reader, the goals.

The compilation for the targets themselves runs in `test_accelerator_programs.py`.
"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest

from jaxnorm import cli
from jaxnorm.cli import bench_targets


@pytest.mark.parametrize("target,package", [("h100", "jax-cuda12-plugin"), ("tpu-v5e", "jax[tpu]")])
def test_a_missing_plugin_names_what_to_install(monkeypatch, capsys, target, package):
  real = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, "find_spec", lambda name, *a: None if name in ("libtpu", "jax_plugins.xla_cuda12") else real(name, *a)
  )
  with pytest.raises(RuntimeError, match=re.escape(f"{package}=={jax.__version__}")):
    bench_targets.require(target)
  assert cli.main(["bench", "--target", target, "--quick", "--out", "unused.json"]) == 2
  assert f"{package}=={jax.__version__}" in capsys.readouterr().err


def test_unknown_target_is_rejected():
  with pytest.raises(ValueError, match="h100, a100, tpu-v5e, tpu-v4"):
    bench_targets.require("h200")


def test_the_reader_counts_kernels_and_full_size_passes():
  # On the CPU too: a fusion reading x and writing y, then a reduction over y.
  x = jnp.zeros((64, 256), jnp.float32)
  compiled = jax.jit(lambda x: jnp.sum(jnp.sin(x) * 2, 1)).lower(x).compile()
  record = bench_targets.read_program(compiled, x.size)
  assert record["kernels"] >= 1 and record["full_size_passes"] >= 1
  small = jax.jit(lambda v: v + 1).lower(jnp.zeros(8)).compile()
  assert bench_targets.read_program(small, x.size)["full_size_passes"] == 0


def _record(jn, flax, exact, plain, key):
  def r(k, v):
    return {"kernels": k, key: v}

  res = {"jaxnorm": jn, "flax": flax, "flax_exact": exact, "plain_jnp": plain}
  return {
      "op": "batch_norm",
      "shape": [4, 8],
      "dtype": "float32",
      "results": {i: {"fwd": r(*v), "train": r(*v)} for i, v in res.items()},
  }


def test_goals_read_the_issue_bounds():
  gpu = _record((3, 90.0), (3, 100.0), (5, 95.0), (5, 120.0), "bytes_accessed")
  assert bench_targets.goals(gpu, "a100")["fwd"] == {"kernels": True, "bytes": True}
  gpu = _record((4, 96.0), (3, 100.0), (5, 95.0), (5, 120.0), "bytes_accessed")
  assert bench_targets.goals(gpu, "a100")["fwd"] == {"kernels": False, "bytes": False}
  # TPU: at most the exact peers' cycles and 1.2x flax default's.
  tpu = _record((3, 1.1), (3, 1.0), (5, 1.5), (5, 1.4), "mcycles")
  assert bench_targets.goals(tpu, "tpu-v5e")["fwd"]["cycles"]
  tpu = _record((3, 1.3), (3, 1.0), (5, 1.5), (5, 1.4), "mcycles")
  assert not bench_targets.goals(tpu, "tpu-v5e")["fwd"]["cycles"]


def test_no_plugin_package_at_all_names_what_to_install(monkeypatch, capsys):
  # Without any JAX plugin installed, `jax_plugins` itself is missing: find_spec of its submodule raises.
  real = importlib.util.find_spec

  def find_spec(name, *a):
    if name.startswith("jax_plugins"):
      raise ModuleNotFoundError("No module named 'jax_plugins'")
    return real(name, *a)

  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  with pytest.raises(RuntimeError, match="jax-cuda12-plugin"):
    bench_targets.require("h100")
  assert cli.main(["bench", "--target", "h100", "--quick", "--out", "unused.json"]) == 2
  assert "jax-cuda12-plugin" in capsys.readouterr().err
