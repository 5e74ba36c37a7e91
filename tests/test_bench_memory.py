"""The activation-memory benchmark (`jaxnorm memory`): its models train alike, and its report reads."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxnorm.cli import bench_memory

SIZES = bench_memory.QUICK


def test_the_implementations_take_the_same_step():
  """Same parameters and batch: saved="output", ActivatedBatchNorm and flax's modules give the gradients of saved="input".

  The CNN only (its batch norms take every implementation); layer norm's
  modes are compared in `test_saved_output.py`.
  """
  model = "resnet"
  grads, losses = {}, {}
  for impl in bench_memory.IMPLEMENTATIONS[model]:
    step, args = bench_memory.step_and_args(model, impl, SIZES, SIZES.batch, remat=impl == "output")
    out = jax.jit(step)(*args)
    losses[impl], grads[impl] = float(out[3]), out[4]
  for impl in bench_memory.IMPLEMENTATIONS[model][1:]:
    assert abs(losses[impl] - losses["input"]) < 1e-5 * max(1.0, abs(losses["input"]))
    assert bench_memory._rel_diff(grads[impl], grads["input"]) < 1e-4, impl


def test_capacity_is_read_from_the_slope():
  """Twice the batch costs more; the largest batch within the budget follows from the slope."""
  step, args = bench_memory.step_and_args("transformer", "output", SIZES, 2, remat=False)
  small = bench_memory._compile(step, args)
  large = bench_memory._compile(*bench_memory.step_and_args("transformer", "output", SIZES, 4, remat=False))
  cap = bench_memory._capacity(small, large, 2)
  assert cap["per_example_bytes"] > 0
  fixed = bench_memory._footprint(small) - 2 * cap["per_example_bytes"]
  assert fixed + cap["max_batch"] * cap["per_example_bytes"] <= bench_memory.BUDGET_BYTES
  assert fixed + (cap["max_batch"] + 1) * cap["per_example_bytes"] > bench_memory.BUDGET_BYTES


@pytest.mark.parametrize("name", ["memory.json", "memory-h100.json"])
def test_the_committed_reports_format(name, monkeypatch):
  monkeypatch.setenv("COLUMNS", "200")  # one table, not split to the terminal's width
  report = json.loads((pathlib.Path(__file__).parents[1] / "benchmarks" / name).read_text())
  assert report["schema"] == bench_memory.SCHEMA
  text = bench_memory.format_report(report)
  rows = [line for line in text.splitlines() if line.startswith(("resnet", "transformer"))]
  assert len(rows) == 2 * sum(len(impls) for impls in bench_memory.IMPLEMENTATIONS.values())
  for row in rows:
    model, impl, temp, to_flax, *rest = row.replace(" remat", "").split()
    assert impl in bench_memory.IMPLEMENTATIONS[model] and float(temp) > 0
    assert (to_flax == "1.00") == (impl == "flax") or np.isclose(float(to_flax), 1.0)
