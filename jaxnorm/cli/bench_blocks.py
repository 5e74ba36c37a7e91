"""The in-model benchmark behind `jaxnorm blocks`: a training step of the blocks people build, jaxnorm against flax.

Blocks (flax.linen, float32, one jitted training step each: forward,
backward and an optax Adam update of every parameter):

* ``dit``: a DiT block (Peebles & Xie 2023) on ``(B, N, C)`` tokens and a
  ``(B, C)`` conditioning vector: adaLN-Zero before self-attention and before
  the GELU MLP, each branch gated. jaxnorm: `jaxnorm.linen.AdaLNZero`. flax:
  the composition DiT ports write, ``nn.LayerNorm(use_scale=False,
  use_bias=False)(x) * (1 + scale) + shift`` with the same zero-initialised
  ``Dense`` on ``SiLU(c)``.
* ``gemma``: a pre-norm transformer block as Gemma 3 builds it: zero-centred
  RMS norms before attention and MLP, QK-norm per head over ``head_dim``,
  causal attention, gated GELU MLP. jaxnorm: ``jaxnorm.linen.RMSNorm(
  scale_offset=1.0)``. flax: Gemma's RMSNorm as flax's ``examples/gemma``
  writes it (``x * rsqrt(mean(x^2) + eps) * (1 + scale)``, scale from
  zeros).
* ``add_rms_norm``: not a block but the fused residual add of Liger,
  cuDNN-frontend and xformers, ``h = x + r; y = rms_norm(h)`` returning both,
  forward and backward: jaxnorm's own ``rms_norm(x + r)`` (autodiff sees an
  add and jaxnorm's VJP) against the same under one hand-written VJP (what a
  fused kernel's interface is), to see whether fusing buys anything under XLA.

Both implementations of a block have the same parameter tree; the parameters
are drawn at random (not the zero init, under which most gradients vanish),
so that the first step's loss and every gradient are compared. Reported:

* ``loss_diff``, ``grad_rel_diff``: the first step's loss and the largest
  relative difference of any parameter's gradient, against flax;
* ``temp_bytes``: the compiled step's temporary buffers,
  ``memory_analysis().temp_size_in_bytes`` (XLA:CPU here; with ``--target``
  the compile-only program for that GPU or TPU: XLA's buffer assignment, no
  device);
* ``ms``: time per step on this CPU, the median of interleaved runs.

This module is a user of the public API, like `jaxnorm.cli.bench`, whose
compile helpers it shares.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnorm
from jaxnorm import linen as jnn
from jaxnorm.cli import _optimizer, _timing, bench

SCHEMA = "jaxnorm-blocks/1"
IMPLEMENTATIONS = ("jaxnorm", "flax")  # of the blocks; add_rms_norm compares "jaxnorm" with "one_vjp"
BLOCKS = ("dit", "gemma", "add_rms_norm")


@dataclasses.dataclass(frozen=True)
class Sizes:
  batch: int
  tokens: int
  width: int
  heads: int
  rows: int  # add_rms_norm: (rows, 4 width)
  warmup: int
  repeats: int


FULL = Sizes(batch=8, tokens=256, width=256, heads=4, rows=4096, warmup=2, repeats=10)
QUICK = Sizes(batch=2, tokens=8, width=16, heads=2, rows=16, warmup=1, repeats=2)


def _expand(p: jax.Array, ndim: int) -> jax.Array:
  """A per-feature parameter broadcast explicitly to rank `ndim` (rank promotion "raise" allows no less)."""
  return p.reshape((1,) * (ndim - 1) + p.shape)


class FlaxAdaLN(nn.Module):
  """DiT's adaLN as a flax user writes it: ``modulate(LayerNorm(x), shift, scale)`` and a gate, zero-initialised."""

  @nn.compact
  def __call__(self, x, c):
    m = nn.Dense(3 * x.shape[-1], kernel_init=nn.initializers.zeros, name="modulation")(nn.silu(c))
    shift, scale, gate = jnp.split(m[:, None, :], 3, axis=-1)
    y = nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6)(x)
    return y * (1 + scale) + shift, gate


class GemmaRMSNorm(nn.Module):
  """Gemma's RMSNorm as flax's examples/gemma writes it: scale from zeros, ``x̂ * (1 + scale)``."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * (1 + _expand(scale, x.ndim))


def _rms_norm(impl: str, name: str) -> nn.Module:
  return jnn.RMSNorm(scale_offset=1.0, name=name) if impl == "jaxnorm" else GemmaRMSNorm(name=name)


class Attention(nn.Module):
  """Multi-head self-attention; with `impl`, Gemma 3's QK-norm over each head's features."""

  heads: int
  impl: str | None = None
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    qkv = nn.Dense(3 * c, use_bias=False, name="qkv")(x).reshape(b, n, 3, self.heads, c // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.impl is not None:
      q, k = _rms_norm(self.impl, "query_norm")(q), _rms_norm(self.impl, "key_norm")(k)
    a = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal).reshape(b, n, c)
    return nn.Dense(c, use_bias=False, name="out")(a)


class DiTBlock(nn.Module):
  impl: str
  heads: int

  @nn.compact
  def __call__(self, x, c):
    adaln = jnn.AdaLNZero if self.impl == "jaxnorm" else FlaxAdaLN
    h, gate = adaln(name="norm1")(x, c)
    x = x + gate * Attention(self.heads, name="attention")(h)
    h, gate = adaln(name="norm2")(x, c)
    h = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(nn.Dense(4 * x.shape[-1], name="mlp_in")(h)))
    return x + gate * h


class GemmaBlock(nn.Module):
  impl: str
  heads: int

  @nn.compact
  def __call__(self, x, c):
    del c  # unconditional
    x = x + Attention(self.heads, self.impl, causal=True, name="attention")(_rms_norm(self.impl, "pre_attention_norm")(x))
    h = _rms_norm(self.impl, "pre_ffw_norm")(x)
    gate, up = jnp.split(nn.Dense(8 * x.shape[-1], use_bias=False, name="ffw_in")(h), 2, axis=-1)
    return x + nn.Dense(x.shape[-1], use_bias=False, name="ffw_out")(nn.gelu(gate) * up)


def add_rms_norm(x: jax.Array, r: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(rms_norm(x + r), x + r)`` from jaxnorm's own op: autodiff sees the add."""
  h = x + r
  return jaxnorm.rms_norm(h, scale), h


@jax.custom_vjp
def add_rms_norm_one_vjp(x: jax.Array, r: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The same as `add_rms_norm` under one VJP: the interface of a fused kernel."""
  return add_rms_norm(x, r, scale)


def _one_vjp_fwd(x, r, scale):
  h = x + r
  y, vjp = jax.vjp(jaxnorm.rms_norm, h, scale)
  return (y, h), vjp


def _one_vjp_bwd(vjp, cotangents):
  gy, gh = cotangents
  dh, dscale = vjp(gy)
  dh = dh + gh
  return dh, dh, dscale


add_rms_norm_one_vjp.defvjp(_one_vjp_fwd, _one_vjp_bwd)


@dataclasses.dataclass
class Program:
  """One implementation of one block: the jitted step, its arguments, and where its loss and gradients are."""

  step: Callable[..., Any]
  args: tuple[Any, ...]
  loss_and_grads: Callable[[Any], tuple[Any, Any]]  # the step's outputs -> (loss, gradients)


def _perturbed(params: Any, key: jax.Array) -> Any:
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def programs(block: str, sizes: Sizes, seed: int = 0) -> dict[str, Program]:
  """The training step of each implementation of `block`, on the same parameters and batch."""
  key = jax.random.key(seed)
  kx, kc, kt, kp = jax.random.split(key, 4)
  b, n, c = sizes.batch, sizes.tokens, sizes.width
  tx = optax.adam(1e-3)
  out = {}
  if block == "add_rms_norm":
    shape = (sizes.rows, 4 * c)
    x, r, ct_y, ct_h = (jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(kx, 4))
    scale = 1 + 0.1 * jax.random.normal(kc, shape[-1:], jnp.float32)
    for impl, f in (("jaxnorm", add_rms_norm), ("one_vjp", add_rms_norm_one_vjp)):
      def loss(params, x, r, ct_y, ct_h, f=f):
        y, h = f(x, r, params)
        return jnp.sum(y * ct_y) + jnp.sum(h * ct_h)
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      out[impl] = Program(step, (scale, x, r, ct_y, ct_h), lambda outputs: outputs)
    return out
  x = jax.random.normal(kx, (b, n, c), jnp.float32)
  cond = jax.random.normal(kc, (b, c), jnp.float32)
  target = jax.random.normal(kt, (b, n, c), jnp.float32)
  block_cls = {"dit": DiTBlock, "gemma": GemmaBlock}[block]
  params = None
  for impl in IMPLEMENTATIONS:
    model = block_cls(impl, sizes.heads)
    if params is None:  # one draw of the parameters, used by both (their trees are the same)
      params = _perturbed(model.init(kp, x, cond)["params"], kp)

    def loss(params, x, cond, target, model=model):
      return jnp.mean(jnp.square(model.apply({"params": params}, x, cond) - target))

    def step(params, opt_state, x, cond, target, loss=loss):
      value, grads = jax.value_and_grad(loss)(params, x, cond, target)
      params, opt_state = _optimizer.optimizer_step(tx, grads, opt_state, params)
      return params, opt_state, value, grads

    out[impl] = Program(jax.jit(step), (params, tx.init(params), x, cond, target), lambda outputs: outputs[2:])
  return out


def _first_step(progs: dict[str, Program], compiled: dict[str, bench.Compiled]) -> dict[str, float]:
  """Loss and gradient agreement of jaxnorm's first step with the other implementation's."""
  (ours, theirs) = (p.loss_and_grads(compiled[impl].call(*p.args)) for impl, p in progs.items())
  rel = [
      float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
      for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(theirs[1]))
  ]
  return {"loss": float(ours[0]), "loss_diff": abs(float(ours[0]) - float(theirs[0])), "grad_rel_diff": max(rel)}


def run(*, quick: bool = False, blocks: tuple[str, ...] = BLOCKS, repeats: int | None = None, seed: int = 0,
        progress: Any = None) -> dict[str, Any]:
  """Measures every block on this CPU; the JSON-ready report."""
  progress = sys.stderr if progress is None else progress
  sizes = QUICK if quick else FULL
  repeats = sizes.repeats if repeats is None else repeats
  start = time.perf_counter()
  header = _timing.machine_lines("in-model benchmark (one training step per block)")
  records = []
  for block in blocks:
    print(f"{block} ...", file=progress, flush=True)
    progs = programs(block, sizes, seed)
    # Compiled once: the first step, the memory analysis and the timed runs use the same executable.
    compiled = {impl: bench.compile_program(p.step, *p.args) for impl, p in progs.items()}
    record: dict[str, Any] = {"block": block, **_first_step(progs, compiled), "results": {}}
    for impl, c in compiled.items():
      record["results"][impl] = {"temp_bytes": c.temp_bytes, "compile_s": c.compile_s}
    samples = _timing.interleaved_samples(
        {impl: (lambda c=compiled[impl], p=p: c.call(*p.args)) for impl, p in progs.items()},
        sizes.warmup,
        repeats,
        pause=0.01,
    )
    for impl, s in samples.items():
      record["results"][impl]["ms"] = 1e3 * statistics.median(s)
    records.append(record)
  return {
      "schema": SCHEMA,
      "header": header,
      "sizes": dataclasses.asdict(sizes) | {"repeats": repeats},
      "blocks": records,
      "seconds": time.perf_counter() - start,
  }


def run_target(target: str, *, quick: bool = False, blocks: tuple[str, ...] = BLOCKS, progress: Any = None) -> dict[str, Any]:
  """Compiles every block's training step for `target` without the device; XLA's temporaries, kernels, bytes or cycles."""
  from jaxnorm.cli import bench_targets  # noqa: PLC0415

  progress = sys.stderr if progress is None else progress
  sizes = QUICK if quick else FULL
  sharding = bench_targets.device_sharding(target)
  records = []
  for block in blocks:
    print(f"{block} for {target} ...", file=progress, flush=True)
    record: dict[str, Any] = {"block": block, "results": {}}
    for impl, p in programs(block, sizes).items():
      args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), p.args)
      x_size = max(a.size for a in jax.tree.leaves(p.args))  # the activations
      record["results"][impl] = bench_targets.measure(target, p.step, list(args), x_size)
    records.append(record)
  header = _timing.machine_lines(f"in-model benchmark compiled for {target}")
  header.append(f"target: {target}; nothing runs: XLA's buffer assignment and cost model")
  return {"schema": SCHEMA, "target": target, "header": header, "sizes": dataclasses.asdict(sizes), "blocks": records}


def _pair(a: float | None, b: float | None, scale: float = 1.0, digits: int = 1) -> str:
  """``a / b (a/b x)``, in units of `scale`."""
  if a is None or b is None:
    return "-"
  ratio = f" ({a / b:.2f}x)" if b else ""
  return f"{a / scale:.{digits}f} / {b / scale:.{digits}f}{ratio}"


def format_report(report: dict[str, Any]) -> str:
  """The report as a plain-text table: jaxnorm's figure / the other implementation's (their ratio)."""
  target = report.get("target")
  if target is None:
    lines = [*report["header"], ""]
    head = ["block", "temp MB", "ms/step", "loss diff", "grad rel diff"]
  else:
    lines = [*report["header"], ""]
    cost = "Mcycles" if target.startswith("tpu") else "MB accessed"
    head = ["block", "temp MB", "kernels", cost]
  lines.append("Cells: jaxnorm / the other implementation (ratio).")
  rows = []
  for rec in report["blocks"]:
    (_, jn), (other, fx) = rec["results"].items()
    row = [f"{rec['block']} (vs {other})", _pair(jn["temp_bytes"], fx["temp_bytes"], 1e6)]
    if target is None:
      row += [_pair(jn["ms"], fx["ms"], 1.0, 2), f"{rec['loss_diff']:.1e}", f"{rec['grad_rel_diff']:.1e}"]
    else:
      key = "mcycles" if target.startswith("tpu") else "bytes_accessed"
      row += [f"{jn['kernels']} / {fx['kernels']}", _pair(jn[key], fx[key], 1.0 if key == "mcycles" else 1e6, 2)]
    rows.append(row)
  lines += _timing.table(head, rows, [False] + [True] * (len(head) - 1))
  return "\n".join(lines)
