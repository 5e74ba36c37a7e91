"""The activation-memory benchmark behind `jaxnorm memory`: what ``saved="output"`` frees in a training step.

Models (flax.linen, float32, one jitted training step each: forward,
backward and an optax Adam update):

* ``resnet``: a ResNet-style CNN on NHWC images: a 3x3 stem, residual blocks
  of Conv -> BatchNorm -> act -> Conv -> BatchNorm, + skip, act, global
  average pooling, a Dense classifier, softmax cross-entropy; act is a leaky
  ReLU of slope 0.01, In-Place ABN's, so that its fused form computes the
  same function.
* ``transformer``: pre-norm transformer blocks (GPT-2 style): ``x +
  Attention(LayerNorm(x))``, ``x + MLP(LayerNorm(x))``, a final LayerNorm,
  a squared-error loss.

Implementations: ``input`` (jaxnorm's linen modules as they are: the
backward keeps each norm's input), ``output`` (the same with
``saved="output"``: it keeps the norm's output, which the next layer keeps
anyway), ``activated`` (resnet only: ``ActivatedBatchNorm`` for each batch
norm followed by the activation, whose backward keeps only the activation's
output; the others with ``saved="output"``), ``flax`` (flax.linen's own
modules). Each model also runs with
``nn.remat`` around every block (``remat``), a common setting. Reported:

* ``temp_bytes``: the compiled step's temporary buffers
  (``memory_analysis().temp_size_in_bytes``, XLA:CPU here; with ``--target``
  the compile-only program for that GPU: XLA's buffer assignment, nothing runs);
* ``per_example_bytes`` and ``max_batch``: the step is compiled (not run) at
  4 and 8 times the batch, where the activations dominate; the growth of its
  temporary plus argument bytes per example, and the largest batch whose
  step fits `BUDGET_BYTES` (temporaries and arguments) on that slope;
* ``ms``: time per step on this CPU, the median of interleaved runs;
* ``grad_rel_diff``: the largest relative difference of any parameter's
  gradient against ``input`` (first step, same parameters and batch).
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
import optax

from jaxnorm import linen as jnn
from jaxnorm.cli import _optimizer, _timing, bench, bench_blocks

SCHEMA = "jaxnorm-memory/1"
IMPLEMENTATIONS = {"resnet": ("input", "output", "activated", "flax"), "transformer": ("input", "output", "flax")}
SLOPE = 0.01
MODELS = ("resnet", "transformer")
BUDGET_BYTES = 16 * 2**30


@dataclasses.dataclass(frozen=True)
class Sizes:
  batch: int  # images or sequences
  image: int  # resnet: image side
  channels: int  # resnet
  res_blocks: int
  tokens: int  # transformer
  width: int
  heads: int
  layers: int
  warmup: int
  repeats: int


FULL = Sizes(batch=16, image=16, channels=64, res_blocks=3, tokens=128, width=256, heads=4, layers=3, warmup=2, repeats=5)
QUICK = Sizes(batch=2, image=4, channels=4, res_blocks=1, tokens=4, width=8, heads=2, layers=1, warmup=1, repeats=1)


def _batch_norm(impl: str) -> nn.Module:
  if impl == "flax":
    return nn.BatchNorm(use_running_average=False)
  return jnn.BatchNorm(use_running_average=False, saved="input" if impl == "input" else "output")


def _batch_norm_act(impl: str, x: jax.Array) -> jax.Array:
  if impl == "activated":
    return jnn.ActivatedBatchNorm(use_running_average=False, negative_slope=SLOPE)(x)
  return nn.leaky_relu(_batch_norm(impl)(x), SLOPE)


def _layer_norm(impl: str) -> nn.Module:
  return nn.LayerNorm() if impl == "flax" else jnn.LayerNorm(saved=impl)


class ResBlock(nn.Module):
  impl: str

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = _batch_norm_act(self.impl, nn.Conv(c, (3, 3), use_bias=False)(x))
    h = _batch_norm(self.impl)(nn.Conv(c, (3, 3), use_bias=False)(h))
    return nn.leaky_relu(x + h, SLOPE)


class ResNet(nn.Module):
  impl: str
  sizes: Sizes
  remat: bool

  @nn.compact
  def __call__(self, x):
    block = nn.remat(ResBlock) if self.remat else ResBlock
    x = _batch_norm_act(self.impl, nn.Conv(self.sizes.channels, (3, 3), use_bias=False)(x))
    for i in range(self.sizes.res_blocks):
      x = block(self.impl, name=f"block{i}")(x)
    return nn.Dense(10)(jnp.mean(x, (1, 2)))


class PreNormBlock(nn.Module):
  impl: str
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + bench_blocks.Attention(self.heads, causal=True, name="attention")(_layer_norm(self.impl)(x))
    h = nn.gelu(nn.Dense(4 * x.shape[-1])(_layer_norm(self.impl)(x)))
    return x + nn.Dense(x.shape[-1])(h)


class Transformer(nn.Module):
  impl: str
  sizes: Sizes
  remat: bool

  @nn.compact
  def __call__(self, x):
    block = nn.remat(PreNormBlock) if self.remat else PreNormBlock
    for i in range(self.sizes.layers):
      x = block(self.impl, self.sizes.heads, name=f"block{i}")(x)
    return _layer_norm(self.impl)(x)


def _data(model: str, sizes: Sizes, batch: int) -> tuple[jax.Array, jax.Array]:
  kx, ky = jax.random.split(jax.random.key(1))
  if model == "resnet":
    x = jax.random.normal(kx, (batch, sizes.image, sizes.image, 3), jnp.float32)
    return x, jax.random.randint(ky, (batch,), 0, 10)
  shape = (batch, sizes.tokens, sizes.width)
  return jax.random.normal(kx, shape, jnp.float32), jax.random.normal(ky, shape, jnp.float32)


def step_and_args(model: str, impl: str, sizes: Sizes, batch: int, remat: bool) -> tuple[Callable[..., Any], tuple]:
  """The training step (params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss, grads)."""
  net = (ResNet if model == "resnet" else Transformer)(impl, sizes, remat)
  x, y = _data(model, sizes, batch)
  variables = net.init(jax.random.key(0), x)
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.adam(1e-3)

  def loss(params, stats, x, y):
    out, updates = net.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    if model == "resnet":
      value = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    else:
      value = jnp.mean(jnp.square(out - y))
    return value, updates.get("batch_stats", {})

  def step(params, stats, opt_state, x, y):
    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x, y)
    params, opt_state = _optimizer.optimizer_step(tx, grads, opt_state, params)
    return params, stats, opt_state, value, grads

  return step, (params, stats, tx.init(params), x, y)


def _footprint(compiled: Any) -> float:
  m = compiled.memory_analysis()
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes)


def _capacity(small: Any, large: Any, batch: int) -> dict[str, Any]:
  """Bytes per example and the largest batch within the budget, from the steps at `batch` and `2 batch`."""
  per_example = (_footprint(large) - _footprint(small)) / batch
  fixed = _footprint(small) - per_example * batch
  max_batch = int((BUDGET_BYTES - fixed) // per_example) if per_example > 0 else None
  return {"per_example_bytes": per_example, "max_batch": max_batch}


def _compile(step: Callable[..., Any], args: tuple, sharding: Any = None) -> Any:
  if sharding is not None:
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
  return jax.jit(step).lower(*args).compile()


def _rel_diff(a: Any, b: Any) -> float:
  return max(
      float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def run(*, quick: bool = False, target: str | None = None, repeats: int | None = None, progress: Any = None) -> dict[str, Any]:
  """Measures every model, with and without remat, on this CPU (or compile-only for `target`); the JSON-ready report."""
  progress = sys.stderr if progress is None else progress
  sizes = QUICK if quick else FULL
  repeats = sizes.repeats if repeats is None else repeats
  sharding = None
  if target is not None:
    from jaxnorm.cli import bench_targets  # noqa: PLC0415

    sharding = bench_targets.device_sharding(target)
  start = time.perf_counter()
  records = []
  for model in MODELS:
    for remat in (False, True):
      print(f"{model}{' remat' if remat else ''} ...", file=progress, flush=True)
      record: dict[str, Any] = {"model": model, "remat": remat, "results": {}}
      calls, outputs = {}, {}
      for impl in IMPLEMENTATIONS[model]:
        step, args = step_and_args(model, impl, sizes, sizes.batch, remat)
        compiled = _compile(step, args, sharding)
        small, large = (_compile(*step_and_args(model, impl, sizes, k * sizes.batch, remat), sharding) for k in (4, 8))
        record["results"][impl] = {"temp_bytes": bench.temp_bytes(compiled), **_capacity(small, large, 4 * sizes.batch)}
        if target is None:
          outputs[impl] = compiled(*args)
          calls[impl] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
      if target is None:
        for impl in IMPLEMENTATIONS[model]:
          record["results"][impl]["grad_rel_diff"] = _rel_diff(outputs[impl][4], outputs["input"][4])
        samples = _timing.interleaved_samples(calls, sizes.warmup, repeats, pause=0.01)
        for impl, s in samples.items():
          record["results"][impl]["ms"] = 1e3 * statistics.median(s)
      records.append(record)
  what = "activation-memory benchmark (one training step per model)"
  header = _timing.machine_lines(what if target is None else f"{what} compiled for {target}")
  if target is not None:
    header.append(f"target: {target}; nothing runs: XLA's buffer assignment")
  return {
      "schema": SCHEMA,
      "target": target,
      "header": header,
      "sizes": dataclasses.asdict(sizes) | {"repeats": repeats, "budget_bytes": BUDGET_BYTES},
      "models": records,
      "seconds": time.perf_counter() - start,
  }


def format_report(report: dict[str, Any]) -> str:
  """The report as a plain-text table, one row per model and setting, ratios against flax."""
  cpu = report["target"] is None
  head = ["model", "impl", "temp MB", "/ flax", "max batch"] + (["ms/step", "/ input", "grad diff"] if cpu else [])
  rows = []
  for rec in report["models"]:
    res = rec["results"]
    for impl, r in res.items():
      row = [f"{rec['model']}{' remat' if rec['remat'] else ''}", impl, f"{r['temp_bytes'] / 1e6:.1f}",
             f"{r['temp_bytes'] / res['flax']['temp_bytes']:.2f}", str(r["max_batch"])]
      if cpu:
        row += [f"{r['ms']:.1f}", f"{r['ms'] / res['input']['ms']:.2f}", f"{r['grad_rel_diff']:.1e}"]
      rows.append(row)
  budget = report["sizes"]["budget_bytes"] / 2**30
  lines = [*report["header"], "", f"max batch: the largest batch whose temporaries and arguments fit {budget:.0f} GiB."]
  lines += _timing.table(head, rows, [False, False] + [True] * (len(head) - 2), keep=2)
  return "\n".join(lines)
