"""Each backend gets its own program: the CPU's anti-CSE barriers appear only where the program is lowered for the CPU.

Lowering needs no device and no compiler plugin (`jax.export` with
`platforms=`), so these run in the main test process. The optimized GPU and
TPU programs are read in `test_accelerator_programs.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxnorm

ROWS, IMAGES = (16, 32), (2, 4, 4, 16)
OPS = {
    "layer_norm": (lambda x, s, b: jaxnorm.layer_norm(x, s, b), ROWS),
    "rms_norm": (lambda x, s, b: jaxnorm.rms_norm(x, s), ROWS),
    "batch_norm": (lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0], IMAGES),
    "group_norm": (lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=4), IMAGES),
    "instance_norm": (lambda x, s, b: jaxnorm.instance_norm(x, s, b), IMAGES),
}


def _programs(op):
  apply, shape = OPS[op]
  fwd = jax.jit(apply)
  fwd_bwd = jax.jit(jax.grad(lambda x, s, b: jnp.sum(apply(x, s, b) * jnp.cos(x)), argnums=(0, 1, 2)))
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  p = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
  return {"fwd": fwd, "fwd_bwd": fwd_bwd}, (x, p, p)


@pytest.mark.parametrize("op", sorted(OPS))
def test_barriers_only_in_the_cpu_program(op):
  programs, args = _programs(op)
  for mode, fn in programs.items():
    counts = {
        platform: export.export(fn, platforms=(platform,))(*args).mlir_module().count("optimization_barrier")
        for platform in ("cpu", "cuda", "rocm", "tpu")
    }
    assert counts["cpu"] > 0, (mode, counts)
    assert counts["cuda"] == counts["rocm"] == counts["tpu"] == 0, (mode, counts)


@pytest.mark.parametrize("op", sorted(OPS))
def test_one_export_for_several_platforms(op):
  programs, args = _programs(op)
  rng = np.random.default_rng(0)
  values = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args]
  for mode, fn in programs.items():
    exported = export.export(fn, platforms=("cpu", "cuda", "tpu"))(*args)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    # The CPU's branch keeps its barriers; the artifact runs here like the jitted function.
    assert "optimization_barrier" in exported.mlir_module()
    for got, want in zip(jax.tree.leaves(exported.call(*values)), jax.tree.leaves(fn(*values))):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
