"""What XLA makes of jaxnorm's programs: read from the compiled HLO, not from timings.

The design promise behind the speed of the hand-derived VJP is that the
compiled forward writes nothing full-size but `y`, and the compiled
forward+backward nothing full-size but `dx` (every normalized or centered
input is recomputed inside the fusion that consumes it, never written out and
read back). On XLA:CPU writing fresh memory costs several times more than
reading it, so a full-size temporary is the regression that matters. These
tests compile (never run) each op's programs and count, from the optimized
HLO, the full-size arrays the program computes at top level, and XLA's
temporary buffers; and check that the traffic XLA's cost analysis reports
stays within the passes the design needs.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm.cli import _timing, bench

ROWS = (512, 256)
IMAGES = (4, 8, 8, 64)

# op -> (apply(x, *params), x shape, number of params)
OPS = {
    "layer_norm": (lambda x, s, b: jaxnorm.layer_norm(x, s, b), ROWS, 2),
    "rms_norm": (lambda x, s: jaxnorm.rms_norm(x, s), ROWS, 1),
    "batch_norm": (lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0], IMAGES, 2),
    "group_norm": (lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=8), IMAGES, 2),
    "instance_norm": (lambda x, s, b: jaxnorm.instance_norm(x, s, b), IMAGES, 2),
}

# Traffic the design needs, in units of |x|, for the forward+backward program
# (which returns dx, not y): 3 reads of x for the statistics (the sum, then
# the two sums about that first mean estimate; 1 for RMS norm), 3 for the sums
# of the dx formula (h x-hat reads x and g, h reads g; 2 for RMS norm), 3 for
# dx itself (read x and g, write dx), and 3 for the parameter gradients (g
# x-hat and g, summed over the other axes). Where the parameters are constant
# over each group (batch and instance norm) the dx sums are the parameter
# gradients, which saves those 3.
FWD_BWD_PASSES = {"layer_norm": 12, "rms_norm": 8, "batch_norm": 9, "group_norm": 12, "instance_norm": 9}
# Slack for the per-group statistics, which are not negligible at these small shapes.
SLACK = 0.5


def _full_size_values(compiled, shape) -> list[str]:
  """Names of the top-level HLO values (fusions, ops) of the entry computation that have `shape`."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY ") :]
  dims = ",".join(str(d) for d in shape)
  out = []
  for line in entry.splitlines()[1:]:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* (\S+?)\(", line)
    if m and m.group(2) == dims and m.group(3) not in ("parameter", "bitcast", "tuple", "get-tuple-element"):
      out.append(f"{m.group(1)} ({m.group(3)})")
  return out


def _programs(op: str, dtype):
  apply, shape, n_params = OPS[op]
  x = jnp.zeros(shape, dtype)
  params = [jnp.ones(shape[-1], dtype) for _ in range(n_params)]
  fwd = jax.jit(apply).lower(x, *params).compile()
  fwd_bwd = _timing.loss_grad(apply, n_params).lower(x, *params, x).compile()
  return x, params, fwd, fwd_bwd


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_only_the_output_is_written_full_size(op, dtype):
  dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  x, _, fwd, fwd_bwd = _programs(op, dtype)
  for name, compiled in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
    written = _full_size_values(compiled, x.shape)
    assert len(written) == 1, f"{op} {name} writes {len(written)} full-size arrays: {written}"
    temp = bench.temp_bytes(compiled)
    assert temp is not None and temp < 0.25 * x.nbytes, f"{op} {name}: {temp} temporary bytes for |x| = {x.nbytes}"


@pytest.mark.parametrize("op", sorted(OPS))
def test_traffic_stays_within_the_designed_passes(op):
  x, params, fwd, fwd_bwd = _programs(op, jnp.float32)
  param_bytes = sum(p.nbytes for p in params)
  # Forward: the statistics' passes over x, then read x and write y.
  fwd_passes = 3 if op == "rms_norm" else 5
  for name, compiled, passes in (("fwd", fwd, fwd_passes), ("fwd_bwd", fwd_bwd, FWD_BWD_PASSES[op])):
    accessed = bench.cost_bytes_accessed(compiled)
    assert accessed <= (passes + SLACK) * x.nbytes + 8 * param_bytes, f"{op} {name}: {accessed / x.nbytes:.2f} |x|"


def test_the_counter_sees_a_materialized_intermediate():
  # The checks above can fail: the textbook formula under autodiff keeps x - mean and x-hat.
  def textbook(x, s, b):
    d = x - jnp.mean(x, -1, keepdims=True)
    return d * jax.lax.rsqrt(jnp.mean(d * d, -1, keepdims=True) + 1e-6) * s[None, :] + b[None, :]

  x = jnp.zeros(ROWS, jnp.float32)
  compiled = _timing.loss_grad(textbook, 2).lower(x, jnp.ones(ROWS[-1], jnp.float32), jnp.ones(ROWS[-1], jnp.float32), x).compile()
  assert len(_full_size_values(compiled, ROWS)) > 1
  assert bench.temp_bytes(compiled) >= x.nbytes
  assert np.isfinite(bench.cost_bytes_accessed(compiled))


# At the benchmark's shapes XLA:CPU fuses the backward further than at the
# small shapes above (layer and RMS norm: the dx sums and dx are one pass
# over (x, g); batch and group norm: 9 |x| where the small shapes allow 12).
# Pinned here, since only these shapes show it: a rewrite of dx that split
# them again moved 12 |x| instead of 9, and the small-shape bounds did not
# notice. (op -> x shape, forward passes, forward+backward passes)
BENCHMARK_SHAPES = {
    "layer_norm": ((8192, 1024), 5, 9),
    "rms_norm": ((8192, 1024), 3, 6),
    "batch_norm": ((64, 32, 32, 128), 5, 9),
    "group_norm": ((64, 32, 32, 128), 5, 9),
}


def _passes_at_benchmark_shape(apply, shape, n_params):
  """Bytes accessed by the forward and the forward+backward program, in units of |x| (float32)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = [jax.ShapeDtypeStruct(shape[-1:], jnp.float32)] * n_params
  x_bytes = int(np.prod(shape)) * 4
  fwd = jax.jit(apply).lower(x, *params).compile()
  fwd_bwd = _timing.loss_grad(apply, n_params).lower(x, *params, x).compile()
  return bench.cost_bytes_accessed(fwd) / x_bytes, bench.cost_bytes_accessed(fwd_bwd) / x_bytes


@pytest.mark.parametrize("op", sorted(BENCHMARK_SHAPES))
def test_traffic_at_the_benchmark_shape(op):
  apply, _, n_params = OPS[op]
  shape, fwd_passes, fwd_bwd_passes = BENCHMARK_SHAPES[op]
  fwd, fwd_bwd = _passes_at_benchmark_shape(apply, shape, n_params)
  assert fwd <= fwd_passes + 0.1, f"{op} fwd: {fwd:.2f} |x|"
  assert fwd_bwd <= fwd_bwd_passes + 0.1, f"{op} fwd_bwd: {fwd_bwd:.2f} |x|"


def test_the_benchmark_shape_bounds_catch_one_pass_more():
  # Batch norm with one more read of x (a sum XLA cannot fold away): both bounds fail.
  apply, _, n_params = OPS["batch_norm"]
  shape, fwd_passes, fwd_bwd_passes = BENCHMARK_SHAPES["batch_norm"]
  fwd, fwd_bwd = _passes_at_benchmark_shape(
      lambda x, s, b: apply(x, s, b) + jnp.sum(jnp.sin(x)) * 0, shape, n_params
  )
  assert fwd > fwd_passes + 0.1 and fwd_bwd > fwd_bwd_passes + 0.1, (fwd, fwd_bwd)
