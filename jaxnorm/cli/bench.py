"""The benchmark behind `jaxnorm bench`: time, memory traffic and residuals of jaxnorm against the alternatives.

Cases: layer norm and RMS norm on transformer activations ``(8192, 1024)`` and
``(4096, 4096)``, in float32 and bfloat16; batch norm and group norm (32
groups) on channels-last images ``(64, 32, 32, 128)`` and ``(16, 32, 32, 256)``
in float32. Each case is measured in two modes:

* ``fwd``: ``y = op(x, scale, bias)``.
* ``fwd_bwd``: the gradient of ``sum(op(x, scale, bias) * ct)`` with respect
  to `x`, `scale` and `bias`; the cotangent `ct` is an argument so that XLA
  cannot fold it. This program returns ``(dx, dscale, dbias)``; it never
  writes `y`.

Implementations, all in this process:

* ``jaxnorm``: the public functions (`jaxnorm.layer_norm`, ...), with their
  hand-derived VJP.
* ``flax``: the flax.linen layer with its defaults (``use_fast_variance=True``).
* ``flax_exact``: the same layer with ``use_fast_variance=False`` (two-pass
  variance). flax's RMSNorm has no mean to subtract, so for RMS norm both flax
  rows run the same computation.
* ``plain_jnp``: the textbook formula in `jax.numpy` (statistics in float32,
  two-pass mean and variance, output cast back to the input dtype),
  differentiated by plain autodiff.
* ``torch``: PyTorch on the CPU, `torch.nn.functional` (``layer_norm``,
  ``rms_norm``, ``batch_norm(training=True)``, ``group_norm``) on the same
  values, images in ``channels_last`` memory format (the NHWC bytes); forward
  under ``no_grad``, forward+backward with ``torch.autograd.grad``;
  ``torch.set_num_threads`` set to the CPU count. Skipped, with a note, when
  torch is not importable.

Parameters have the dtype of `x` (bfloat16 cases are bfloat16 throughout,
so that flax's dtype promotion also returns bfloat16). Epsilon is each op's
jaxnorm default everywhere (1e-5 for batch norm, else 1e-6), which is also
flax's.

Time: every implementation and mode, plus a copy of `x`, takes turns run by
run after warm-up (`jaxnorm.cli._timing.interleaved_samples`), with a 10 ms pause
before each timed call so that the previous implementation's worker threads
(XLA's, torch's OpenMP threads) are idle and do not steal the 2 cores of a
small machine; the median and the quartiles and range of the runs are
reported. Before timing, each implementation's `y` and `dx` are compared with
jaxnorm's (``diff_vs_jaxnorm``), so that the programs timed compute the same
function.

Deterministic measures, for the JAX implementations:

* ``bytes_accessed``: XLA's cost analysis of the compiled program
  (``jit(f).lower(...).compile().cost_analysis()["bytes accessed"]``), an
  estimate of the memory traffic of every HLO op summed.
* ``temp_bytes``: the compiled program's temporary buffers
  (``.memory_analysis().temp_size_in_bytes``).
* ``residual_bytes``: the arrays `jax.vjp` keeps for the backward (the
  leaves of its VJP closure, each distinct array counted once, traced with
  `jax.eval_shape`, so nothing runs). For torch, the tensors autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once).
* ``compile_s``: wall time of tracing, lowering and compiling.

The floor: the bytes a program must move at least, divided by the copy
bandwidth measured in the same interleaved loop on an array of the size and
dtype of `x` (a jitted ``x * a``, `a` a scalar argument, moving ``2 |x|``
bytes). ``fwd`` must read `x` and the parameters and write `y`:
``2 |x| + |params|``. ``fwd_bwd`` must read `x`, `ct` and the parameters and
write `dx` and the parameter gradients: ``3 |x| + 2 |params|`` (`y` is not an
output of that program; a training step, whose forward also writes `y`, would
move one more ``|x|``). The floor is a lower bound, not always attainable:
batch norm's statistics span the whole batch, so a backward that cannot keep
`x` in cache has to read it more than once.

This module is a user of the public API: it imports `jaxnorm`'s public names,
flax, optionally torch, and the timing helpers it shares with `jaxnorm check`
(`jaxnorm.cli._timing`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from jaxnorm import _validation
from jaxnorm.cli import _timing

SCHEMA = "jaxnorm-bench/1"
IMPLEMENTATIONS = ("jaxnorm", "flax", "flax_exact", "plain_jnp", "torch")
JAX_IMPLEMENTATIONS = IMPLEMENTATIONS[:-1]
LABELS = {
    "jaxnorm": "jaxnorm",
    "flax": "flax.linen (defaults)",
    "flax_exact": "flax.linen use_fast_variance=False",
    "plain_jnp": "plain jnp + autodiff",
    "torch": "torch CPU",
}
SHORT = {"jaxnorm": "jn", "flax": "flax", "flax_exact": "flax-x", "plain_jnp": "jnp", "torch": "torch"}
MODES = ("fwd", "fwd_bwd")
# Ratios reported per case and mode: jaxnorm's median time over each of these.
RATIO_BASES = ("flax", "flax_exact", "plain_jnp", "torch", "floor")
# The order of the ratio columns in the table: what a reader asks first.
RATIO_ORDER = ("flax", "torch", "floor", "flax_exact", "plain_jnp")
NUM_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes and repeat counts of one run."""

  rows: tuple[tuple[int, int], ...]
  images: tuple[tuple[int, int, int, int], ...]
  warmup: int
  repeats: int
  pause: float  # seconds between timed calls, see `_timing.interleaved_samples`


FULL = Sizes(
    rows=((8192, 1024), (4096, 4096)),
    images=((64, 32, 32, 128), (16, 32, 32, 256)),
    warmup=2,
    repeats=12,
    pause=0.01,
)
# One tiny shape per op and dtype: every op, dtype, implementation and mode, in seconds.
QUICK = Sizes(rows=((64, 128),), images=((4, 4, 4, 64),), warmup=1, repeats=3, pause=0.001)


@dataclasses.dataclass(frozen=True)
class Case:
  """One op on one shape and dtype."""

  op: str
  shape: tuple[int, ...]
  dtype: str

  @property
  def name(self) -> str:
    dt = {"float32": "f32", "bfloat16": "bf16"}[self.dtype]
    return f"{self.op}/{dt}/{'x'.join(str(d) for d in self.shape)}"


def cases(sizes: Sizes) -> list[Case]:
  """Every case of a run, in order."""
  out = []
  for op in ("layer_norm", "rms_norm"):
    for dtype in ("float32", "bfloat16"):
      out += [Case(op, shape, dtype) for shape in sizes.rows]
  for op in ("batch_norm", "group_norm"):
    out += [Case(op, shape, "float32") for shape in sizes.images]
  return out


def select(all_cases: Sequence[Case], patterns: str | None) -> list[Case]:
  """The cases whose name contains one of the comma-separated `patterns` (shell wildcards allowed).

  >>> [c.name for c in select(cases(FULL), "rms_norm/bf16")]
  ['rms_norm/bf16/8192x1024', 'rms_norm/bf16/4096x4096']
  """
  if not patterns:
    return list(all_cases)
  pats = [p.strip() for p in patterns.split(",") if p.strip()]
  chosen = [c for c in all_cases if any(fnmatch.fnmatchcase(c.name, f"*{p}*") for p in pats)]
  if not chosen:
    names = ", ".join(c.name for c in all_cases)
    raise ValueError(f"--cases {patterns!r} matches no case; the cases are: {names}")
  return chosen


# ----------------------------------------------------------------------------
# the implementations of each op


def _plain(x, scale, bias, axes, centered, epsilon):
  """The textbook formula: float32 statistics, two passes, plain autodiff."""
  acc = _validation.accumulation_dtype(x.dtype)
  x32 = x.astype(acc)
  if centered:
    d = x32 - jnp.mean(x32, axes, keepdims=True)
  else:
    d = x32
  y = d * jax.lax.rsqrt(jnp.mean(d * d, axes, keepdims=True) + epsilon) * _validation.to_rank(scale, x.ndim).astype(acc)
  if bias is not None:
    y = y + _validation.to_rank(bias, x.ndim).astype(acc)
  return y.astype(x.dtype)


def _plain_group(x, scale, bias, epsilon):
  """The textbook group norm: x viewed as (N, ..., G, C // G), statistics over all but N and G."""
  c = x.shape[-1]
  g = x.reshape(*x.shape[:-1], NUM_GROUPS, c // NUM_GROUPS)
  axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
  acc = _validation.accumulation_dtype(x.dtype)
  d = g.astype(acc)
  d = d - jnp.mean(d, axes, keepdims=True)
  y = d * jax.lax.rsqrt(jnp.mean(d * d, axes, keepdims=True) + epsilon)
  scale, bias = (_validation.to_rank(p, x.ndim).astype(acc) for p in (scale, bias))
  return (y.reshape(x.shape) * scale + bias).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Op:
  """How each implementation computes one normalization, as ``f(x, *params)``."""

  params: tuple[str, ...]
  epsilon: float
  jaxnorm: Callable[..., jax.Array]
  flax: Callable[[bool], tuple[nn.Module, bool]]  # exact -> (module, needs batch_stats)
  plain: Callable[..., jax.Array]
  torch: Callable[..., Any]  # (F, x, *params) -> y, on torch tensors
  channels_last_images: bool


def _ops() -> dict[str, Op]:
  return {
      "layer_norm": Op(
          ("scale", "bias"),
          1e-6,
          lambda x, s, b: jaxnorm.layer_norm(x, s, b),
          lambda exact: (nn.LayerNorm(use_fast_variance=not exact), False),
          lambda x, s, b: _plain(x, s, b, (-1,), True, 1e-6),
          lambda F, x, s, b: F.layer_norm(x, (x.shape[-1],), s, b, 1e-6),
          False,
      ),
      "rms_norm": Op(
          ("scale",),
          1e-6,
          lambda x, s: jaxnorm.rms_norm(x, s),
          lambda exact: (nn.RMSNorm(use_fast_variance=not exact), False),
          lambda x, s: _plain(x, s, None, (-1,), False, 1e-6),
          lambda F, x, s: F.rms_norm(x, (x.shape[-1],), s, 1e-6),
          False,
      ),
      "batch_norm": Op(
          ("scale", "bias"),
          1e-5,
          lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
          lambda exact: (nn.BatchNorm(use_running_average=False, use_fast_variance=not exact), True),
          lambda x, s, b: _plain(x, s, b, (0, 1, 2), True, 1e-5),
          lambda F, x, s, b: F.batch_norm(x, None, None, s, b, training=True, eps=1e-5),
          True,
      ),
      "group_norm": Op(
          ("scale", "bias"),
          1e-6,
          lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=NUM_GROUPS),
          lambda exact: (nn.GroupNorm(num_groups=NUM_GROUPS, use_fast_variance=not exact), False),
          lambda x, s, b: _plain_group(x, s, b, 1e-6),
          lambda F, x, s, b: F.group_norm(x, NUM_GROUPS, s, b, 1e-6),
          True,
      ),
  }


def jax_applies(op: str, x: jax.Array) -> dict[str, Callable[..., jax.Array]]:
  """``apply(x, *params)`` of each JAX implementation of `op` (`x` sizes flax's batch_stats)."""
  spec = _ops()[op]
  out = {"jaxnorm": spec.jaxnorm, "plain_jnp": spec.plain}
  for name, exact in (("flax", False), ("flax_exact", True)):
    module, needs_stats = spec.flax(exact)
    stats = None
    if needs_stats:
      with jax.numpy_dtype_promotion("standard"):  # flax promotes implicitly (see `_timing.flax_apply`)
        stats = jax.eval_shape(module.init, jax.random.key(0), x)["batch_stats"]
      stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats)
    out[name] = _timing.flax_apply(module, spec.params, stats)
  return {k: out[k] for k in JAX_IMPLEMENTATIONS}


# ----------------------------------------------------------------------------
# deterministic measures


def residual_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Bytes of the arrays `jax.vjp(fn, *args)` keeps for the backward pass.

  The residuals are the array leaves of the VJP closure, traced abstractly
  (`jax.eval_shape`: nothing is computed). An array kept twice, or an input
  kept as it is, counts once.

  >>> import jax.numpy as jnp
  >>> residual_bytes(jnp.sin, jnp.ones(4, jnp.float32))  # cos(x): 4 float32
  16
  """
  found: dict[int, Any] = {}

  def trace(*a):
    _, vjp = jax.vjp(fn, *a)
    for leaf in jax.tree.leaves(vjp):
      if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        found[id(leaf)] = leaf
    # Keep the tracers alive until counted: ids are unique only among live objects.
    return ()

  jax.eval_shape(trace, *args)
  return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in found.values()))


def cost_bytes_accessed(compiled: Any) -> float | None:
  """``bytes accessed`` of XLA's cost analysis of a compiled program (None if XLA gives none)."""
  cost = compiled.cost_analysis()
  # Older jax returned one dict per device program.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  value = (cost or {}).get("bytes accessed")
  return None if value is None else float(value)


def temp_bytes(compiled: Any) -> float | None:
  """Temporary buffer bytes of a compiled program (None if XLA gives no memory analysis)."""
  value = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
  return None if value is None else float(value)


@dataclasses.dataclass
class Compiled:
  """A compiled program and what XLA says about it."""

  call: Callable[..., Any]
  compile_s: float
  bytes_accessed: float | None
  temp_bytes: float | None


def compile_program(fn: Callable[..., Any], *args: Any) -> Compiled:
  """Traces, lowers and compiles ``jit(fn)`` for `args`, timing it; the result is what gets timed."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  return Compiled(compiled, seconds, cost_bytes_accessed(compiled), temp_bytes(compiled))


def _nbytes(*arrays: Any) -> int:
  return int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays))


def floor_bytes(x: Any, params: Sequence[Any]) -> dict[str, int]:
  """The traffic each mode must have at least.

  fwd reads x and the params and writes y: ``2 |x| + |p|``; fwd_bwd reads x,
  ct and the params and writes dx and the parameter gradients:
  ``3 |x| + 2 |p|``.

  >>> import numpy as np
  >>> floor_bytes(np.zeros((4, 8), np.float32), [np.ones(8, np.float32)])
  {'fwd': 288, 'fwd_bwd': 448}
  """
  p = _nbytes(*params)
  return {"fwd": 2 * _nbytes(x) + p, "fwd_bwd": 3 * _nbytes(x) + 2 * p}


# ----------------------------------------------------------------------------
# torch


def _torch() -> tuple[Any, str]:
  """(torch, "") or (None, why it is skipped)."""
  try:
    import torch  # noqa: PLC0415  (optional)
  except Exception as e:  # noqa: BLE001  (any import failure means: no torch rows)
    return None, f"torch not importable ({type(e).__name__}: {e})"
  return torch, ""


def _torch_tensor(torch: Any, a: np.ndarray, dtype: str, images: bool) -> Any:
  t = torch.from_numpy(np.ascontiguousarray(a))
  if dtype == "bfloat16":
    t = t.to(torch.bfloat16)
  if images:
    # (N, H, W, C) bytes seen as (N, C, H, W) in channels_last format: the same memory, torch's convention.
    t = t.permute(0, t.ndim - 1, *range(1, t.ndim - 1))
  return t


def torch_program(torch: Any, op: str, x: np.ndarray, params: Sequence[np.ndarray], ct: np.ndarray, dtype: str):
  """(fwd thunk, fwd_bwd thunk, residual bytes, (y, dx)) of the torch implementation on the same values.

  `y` and `dx` come back as float32 NumPy arrays in the layout of `x`, for
  the agreement check.
  """
  import torch.nn.functional as F  # noqa: PLC0415, N812

  spec = _ops()[op]
  images = spec.channels_last_images
  xt = _torch_tensor(torch, x, dtype, images)
  pt = [_torch_tensor(torch, p, dtype, False) for p in params]
  ctt = _torch_tensor(torch, ct, dtype, images)
  leaves = [t.detach().requires_grad_(True) for t in (xt, *pt)]

  def fwd():
    with torch.no_grad():
      spec.torch(F, xt, *pt)

  def fwd_bwd():
    y = spec.torch(F, *leaves)
    torch.autograd.grad(y, leaves, ctt)

  saved: dict[tuple[int, int], int] = {}

  def pack(t):
    nbytes = t.numel() * t.element_size()
    saved[(t.untyped_storage().data_ptr(), nbytes)] = nbytes
    return t

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    y = spec.torch(F, *leaves)
  (dx, *_) = torch.autograd.grad(y, leaves, ctt)

  def numpy(t):
    t = t.detach().float()
    if images:
      t = t.permute(0, *range(2, t.ndim), 1)
    return t.contiguous().numpy()

  return fwd, fwd_bwd, int(sum(saved.values())), (numpy(y), numpy(dx))


# ----------------------------------------------------------------------------
# one case


# How far another implementation's y and dx may be from jaxnorm's, relative to
# max |jaxnorm's|: float32 rounding, and bfloat16 rounding of y, ct and dx
# (implementations round intermediates differently).
AGREEMENT_TOL = {"float32": 1e-4, "bfloat16": 5e-2}


def _rel_diff(got: np.ndarray, want: np.ndarray) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or not b > 0:
    return None
  return a / b


def run_case(case: Case, sizes: Sizes, seed: int, torch: Any, torch_note: str) -> dict[str, Any]:
  """Measures every implementation of `case` in both modes; the case's JSON record."""
  spec = _ops()[case.op]
  rng = np.random.default_rng(seed)
  c = case.shape[-1]
  x_np = rng.standard_normal(case.shape).astype(np.float32)
  p_np = [(1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32), (0.1 * rng.standard_normal(c)).astype(np.float32)]
  p_np = p_np[: len(spec.params)]
  ct_np = rng.standard_normal(case.shape).astype(np.float32)
  dtype = jnp.dtype(case.dtype)
  x, ct = jnp.asarray(x_np, dtype), jnp.asarray(ct_np, dtype)
  params = [jnp.asarray(p, dtype) for p in p_np]

  results: dict[str, Any] = {}
  thunks: dict[str, Callable[[], Any]] = {}
  # y and dx of each implementation, to check that all compute the same function.
  outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  for impl, apply in jax_applies(case.op, x).items():
    record: dict[str, Any] = {"available": True, "note": ""}
    progs = {
        "fwd": compile_program(apply, x, *params),
        "fwd_bwd": compile_program(_timing.loss_grad(apply, len(params)), x, *params, ct),
    }
    for mode, prog in progs.items():
      record[mode] = {"compile_s": prog.compile_s, "bytes_accessed": prog.bytes_accessed, "temp_bytes": prog.temp_bytes}
    record["residual_bytes"] = residual_bytes(apply, x, *params)
    results[impl] = record
    thunks[f"{impl}:fwd"] = lambda p=progs["fwd"].call: p(x, *params)
    thunks[f"{impl}:fwd_bwd"] = lambda p=progs["fwd_bwd"].call: p(x, *params, ct)
    y, dx = thunks[f"{impl}:fwd"](), thunks[f"{impl}:fwd_bwd"]()[0]
    outputs[impl] = (np.asarray(y.astype(jnp.float32)), np.asarray(dx.astype(jnp.float32)))

  if torch is not None:
    fwd, fwd_bwd, saved, outputs["torch"] = torch_program(torch, case.op, x_np, p_np, ct_np, case.dtype)
    none = {"compile_s": None, "bytes_accessed": None, "temp_bytes": None}
    results["torch"] = {"available": True, "note": "", "residual_bytes": saved, "fwd": dict(none), "fwd_bwd": dict(none)}
    thunks["torch:fwd"], thunks["torch:fwd_bwd"] = fwd, fwd_bwd
  else:
    results["torch"] = {
        "available": False,
        "note": torch_note,
        "residual_bytes": None,
        "diff_vs_jaxnorm": None,
        "fwd": {},
        "fwd_bwd": {},
    }

  tol = AGREEMENT_TOL[case.dtype]
  for impl, (y, dx) in outputs.items():
    diff = {"y": _rel_diff(y, outputs["jaxnorm"][0]), "dx": _rel_diff(dx, outputs["jaxnorm"][1])}
    results[impl]["diff_vs_jaxnorm"] = {**diff, "tol": tol, "agrees": max(diff.values()) <= tol}

  # The copy that sets the floor, in the same loop: `a` is an argument, so XLA cannot drop `x * 1`.
  copy = compile_program(lambda x, a: x * a, x, jnp.asarray(1.0001, dtype))
  a = jnp.asarray(1.0001, dtype)
  thunks["copy"] = lambda: copy.call(x, a)

  samples = _timing.interleaved_samples(thunks, sizes.warmup, sizes.repeats, sizes.pause)
  spreads = {k: _timing.Spread.of(v) for k, v in samples.items()}
  for key, spread in spreads.items():
    if key == "copy":
      continue
    impl, mode = key.split(":")
    results[impl][mode]["ms"] = dataclasses.asdict(spread)

  x_bytes = _nbytes(x)
  copy_ms = spreads["copy"]
  bandwidth = 2 * x_bytes / (copy_ms.median * 1e-3)
  floors = floor_bytes(x, params)
  floor = {m: {"bytes": floors[m], "ms": 1e3 * floors[m] / bandwidth} for m in MODES}
  ratios = {}
  for mode in MODES:
    jn = results["jaxnorm"][mode]["ms"]["median"]
    bases = {impl: (results[impl][mode].get("ms") or {}).get("median") for impl in RATIO_BASES if impl != "floor"}
    bases["floor"] = floor[mode]["ms"]
    ratios[mode] = {f"jaxnorm/{k}": _ratio(jn, v) for k, v in bases.items()}
  return {
      "name": case.name,
      "op": case.op,
      "shape": list(case.shape),
      "dtype": case.dtype,
      "x_bytes": x_bytes,
      "copy": {"ms": dataclasses.asdict(copy_ms), "bytes_accessed": copy.bytes_accessed, "bandwidth_GBps": bandwidth / 1e9},
      "floor": floor,
      "results": results,
      "ratios": ratios,
  }


# ----------------------------------------------------------------------------
# the run and its report


def run(
    *,
    quick: bool = False,
    patterns: str | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    seed: int = 0,
    progress: TextIO | None = None,
) -> dict[str, Any]:
  """Runs the selected cases and returns the JSON-ready report (see the module docstring)."""
  progress = sys.stderr if progress is None else progress
  sizes = QUICK if quick else FULL
  sizes = dataclasses.replace(
      sizes,
      repeats=sizes.repeats if repeats is None else repeats,
      warmup=sizes.warmup if warmup is None else warmup,
  )
  if sizes.repeats < 1 or sizes.warmup < 0:
    raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {sizes.repeats} and {sizes.warmup}.")
  chosen = select(cases(sizes), patterns)
  torch, torch_note = _torch()
  threads = _timing.cpu_count()
  if torch is not None:
    torch.set_num_threads(threads)
  start = time.perf_counter()
  header = _timing.machine_lines("benchmark")
  if torch is not None:
    header.append(f"torch {torch.__version__} with {torch.get_num_threads()} threads")
  else:
    header.append(f"torch: skipped, {torch_note}")
  records = []
  for i, case in enumerate(chosen):
    print(f"[{i + 1}/{len(chosen)}] {case.name} ...", file=progress, flush=True)
    records.append(run_case(case, sizes, seed + i, torch, torch_note))
  return {
      "schema": SCHEMA,
      "header": header,
      "date": header[0].rsplit(", ", 1)[-1],
      "machine": header[1].removeprefix("machine: "),
      "versions": header[2:],
      "settings": {
          "quick": quick,
          "cases": patterns,
          "warmup": sizes.warmup,
          "repeats": sizes.repeats,
          "seed": seed,
          "threads": threads,
      },
      "implementations": {k: LABELS[k] for k in IMPLEMENTATIONS},
      "modes": list(MODES),
      "cases": records,
      "seconds": time.perf_counter() - start,
  }


def _ms(spread: dict[str, float] | None) -> str:
  if not spread:
    return "-"
  med = spread["median"]
  noise = (spread["q3"] - spread["q1"]) / (2 * med) if med > 0 else float("nan")
  digits = 3 if med < 1 else 2 if med < 10 else 1
  return f"{med:.{digits}f}±{100 * noise:.0f}%"


def _x(value: float | None) -> str:
  return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _mb(value: float | None) -> str:
  if value is None or not math.isfinite(value):
    return "-"
  return f"{value / 2**20:.0f}" if value >= 10 * 2**20 else f"{value / 2**20:.1f}"


def _per(value: float | None, unit: float) -> str:
  return "-" if value is None else _x(value / unit)


def format_report(report: dict[str, Any], width: int | None = None) -> str:
  """The report as aligned plain text: a time table and a memory table, `width` columns at most.

  `width` defaults to the terminal's (`COLUMNS` when set); tables wider than
  that are split, the prose is wrapped.
  """
  width = _timing.terminal_width() if width is None else width

  def prose(*sentences: str) -> list[str]:
    return textwrap.wrap(" ".join(sentences), width=width)

  lines = [*report["header"], ""]
  s = report["settings"]
  lines += prose(
      "Ratios: jaxnorm's median time / the other's (< 1: jaxnorm faster); jn/floor: / the floor.",
      f"Time: median ms ± half the interquartile range, {s['repeats']} interleaved runs after {s['warmup']} warm-up.",
      "fwd: y = op(x, params). fwd_bwd: jit(grad(sum(op(x, params) * ct))) wrt x and params (ct an argument).",
      "floor: bytes the program must move (fwd 2|x|+|p|, fwd_bwd 3|x|+2|p|) / copy bandwidth of x*a in the "
      "same loop.",
  )
  # The ratios first: they are the answer; the times they come from follow (in a second table if too wide).
  rows = []
  for rec in report["cases"]:
    for mode in MODES:
      res = rec["results"]
      r = rec["ratios"][mode]
      rows.append(
          [
              rec["name"],
              mode,
              *(_x(r[f"jaxnorm/{b}"]) for b in RATIO_ORDER),
              *(_ms(res[impl][mode].get("ms")) for impl in IMPLEMENTATIONS),
              f"{rec['floor'][mode]['ms']:.3g}",
          ]
      )
  lines += _timing.table(
      ["case", "mode", *(f"jn/{SHORT.get(b, b)}" for b in RATIO_ORDER), *(SHORT[i] for i in IMPLEMENTATIONS), "floor"],
      rows,
      [False, False] + [True] * (len(IMPLEMENTATIONS) + 1 + len(RATIO_BASES)),
      width=width,
      keep=2,
  )

  lines += [""] + prose(
      "Memory (deterministic; fwd_bwd program unless noted): accessed = XLA cost-analysis bytes accessed / floor bytes;",
      "temp = XLA temporary buffers; residual = bytes jax.vjp (torch: autograd) saves for the backward, / |x|;",
      "compile = trace + lower + compile seconds of fwd_bwd. Columns: " + " / ".join(SHORT[i] for i in IMPLEMENTATIONS) + ".",
  )
  mem_rows = []
  for rec in report["cases"]:
    res = rec["results"]
    fb = {impl: res[impl].get("fwd_bwd", {}) for impl in IMPLEMENTATIONS}
    floor = rec["floor"]["fwd_bwd"]["bytes"]
    fwd_floor = rec["floor"]["fwd"]["bytes"]

    def joined(values, fmt):
      return " / ".join(fmt(v) for v in values)

    mem_rows.append(
        [
            rec["name"],
            _mb(rec["x_bytes"]),
            joined([res[i]["fwd"].get("bytes_accessed") for i in JAX_IMPLEMENTATIONS], lambda v: _per(v, fwd_floor)),
            joined([fb[i].get("bytes_accessed") for i in JAX_IMPLEMENTATIONS], lambda v: _per(v, floor)),
            joined([fb[i].get("temp_bytes") for i in JAX_IMPLEMENTATIONS], _mb),
            joined(
                [res[i]["residual_bytes"] for i in IMPLEMENTATIONS],
                lambda v: _per(v, rec["x_bytes"]),
            ),
            joined([fb[i].get("compile_s") for i in JAX_IMPLEMENTATIONS], lambda v: "-" if v is None else f"{v:.2f}"),
            f"{rec['copy']['bandwidth_GBps']:.1f}",
        ]
    )
  lines += _timing.table(
      [
          "case",
          "|x| MB",
          "fwd accessed/floor",
          "fwd_bwd accessed/floor",
          "fwd_bwd temp MB",
          "residual/|x|",
          "compile s",
          "copy GB/s",
      ],
      mem_rows,
      [False] + [True] * 7,
      width=width,
  )
  lines += ["", *_agreement(report, width)]
  notes = {rec["results"]["torch"]["note"] for rec in report["cases"] if rec["results"]["torch"]["note"]}
  for note in sorted(notes):
    lines.append(f"torch: {note}")
  lines += ["", f"{len(report['cases'])} cases in {report['seconds']:.1f} s"]
  return "\n".join(lines)


def _agreement(report: dict[str, Any], width: int) -> list[str]:
  """One line per implementation: its worst y and dx difference from jaxnorm, and any case over tolerance."""
  lines = textwrap.wrap(
      "Agreement (the timed programs compute the same function): max |other - jaxnorm| / max |jaxnorm| over cases.",
      width=width,
  )
  for impl in IMPLEMENTATIONS[1:]:
    diffs = [(rec["name"], rec["results"][impl]["diff_vs_jaxnorm"]) for rec in report["cases"]]
    diffs = [(name, d) for name, d in diffs if d]
    if not diffs:
      continue
    worst_y = max(d["y"] for _, d in diffs)
    worst_dx = max(d["dx"] for _, d in diffs)
    bad = [name for name, d in diffs if not d["agrees"]]
    verdict = f"DISAGREES on {', '.join(bad)}" if bad else "agrees (tol 1e-4 float32, 5e-2 bfloat16)"
    line = f"  {LABELS[impl]:<34} y {worst_y:.1e}, dx {worst_dx:.1e}: {verdict}"
    lines += textwrap.wrap(line, width=width, initial_indent="", subsequent_indent=" " * 4, drop_whitespace=False)
  return lines


# The plot's words for the modes and the ratios' denominators.
MODE_TITLES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
PLOT_BASES = {
    "flax": "vs flax.linen (defaults)",
    "torch": "vs PyTorch CPU",
    "floor": "vs the floor (memory traffic / copy bandwidth)",
}


def plot(report: dict[str, Any], path: str) -> None:
  """A PNG of jaxnorm's time over flax's, torch's and the floor's, per case; one panel per mode.

  Below 1 jaxnorm is faster than the other implementation; against the floor,
  1 is the best any program can do, so the bar says how far jaxnorm is from it.
  """
  import matplotlib  # noqa: PLC0415  (only the plot needs it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import matplotlib.ticker  # noqa: PLC0415

  recs = report["cases"]
  bases = [b for b in PLOT_BASES if any(r["ratios"][m][f"jaxnorm/{b}"] is not None for r in recs for m in MODES)]
  fig, axes = plt.subplots(
      1, len(MODES), figsize=(13, 1.6 + 0.32 * len(recs) * len(bases)), squeeze=False, sharey=True
  )
  height = 0.8 / len(bases)
  for ax, mode in zip(axes[0], MODES):
    for k, base in enumerate(bases):
      ys, ratios = [], []
      for j, rec in enumerate(recs):
        ratio = rec["ratios"][mode][f"jaxnorm/{base}"]
        if ratio is not None and math.isfinite(ratio):
          ys.append(j - 0.4 + (k + 0.5) * height)
          ratios.append(ratio)
      bars = ax.barh(ys, ratios, height=height, label=PLOT_BASES[base])
      ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    # Plain numbers (0.5, 2), not powers of ten: the ratios span a decade or two at most.
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(range(len(recs)), [r["name"].replace("/", " ") for r in recs], fontsize=8)
    ax.set_xlabel("jaxnorm's time / the other's (log scale; below 1: jaxnorm is faster)")
    ax.set_title(MODE_TITLES[mode])
    ax.grid(axis="x", which="both", alpha=0.3)
  axes[0][0].invert_yaxis()
  # Below the panels, where it hides no bar.
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(bases), fontsize=8)
  fig.suptitle("jaxnorm's time relative to flax.linen, PyTorch and the floor\n" + report["header"][1], fontsize=9)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(report: dict[str, Any], out: str | None, plot_path: str | None) -> None:
  """Writes the JSON report to `out` and the plot to `plot_path` (each skipped when None)."""
  if out:
    with open(out, "w") as f:
      json.dump(report, f, indent=1, allow_nan=True)
      f.write("\n")
  if plot_path:
    plot(report, plot_path)
