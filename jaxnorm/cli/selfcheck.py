"""The self-check behind `jaxnorm check`: accuracy against float64 references, speed against flax.linen.

Accuracy: every public op runs on small random float32 inputs; its forward
and its VJP (gradients with respect to `x`, `scale` and `bias` for a random
cotangent) are compared with plain autodiff of the textbook formula evaluated
in float64 on the same values. A stability row repeats layer norm at mean
offset 1e4 and standard deviation 1, where ``E[x^2] - E[x]^2`` in float32
loses the variance entirely; `flax.linen.LayerNorm()` with its default
fast variance is shown beside it for contrast (informational, never a failure).

Speed: forward plus backward (the jitted gradient of ``sum(y * cotangent)``
with respect to `x`, `scale` and `bias`) of jaxnorm and of the flax.linen
layer of the same name, timed alternately after warm-up; the median is
reported.

This module is a user of the public API: it imports only `jaxnorm`'s public
names, flax, and the timing helpers it shares with `jaxnorm bench`
(`jaxnorm.cli._timing`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from jaxnorm.cli import _timing

RTOL = 1e-4
STABILITY_OFFSET = 1e4


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Shapes and repeat counts of one run."""

  accuracy_batch: int
  timing_rows: tuple[int, int]
  timing_images: tuple[int, int, int, int]
  warmup: int
  repeats: int


FULL = Sizes(accuracy_batch=64, timing_rows=(4096, 512), timing_images=(32, 16, 16, 64), warmup=3, repeats=60)
QUICK = Sizes(accuracy_batch=16, timing_rows=(256, 64), timing_images=(8, 4, 4, 16), warmup=1, repeats=3)


@dataclasses.dataclass
class AccuracyRow:
  """One accuracy comparison; `grad_err` is None for forward-only checks."""

  name: str
  shape: tuple[int, ...]
  fwd_err: float
  grad_err: float | None
  worst_rel: float
  rtol: float
  counts: bool = True
  wrong_dtype: str = ""
  note: str = ""

  @property
  def passed(self) -> bool:
    return bool(self.worst_rel <= self.rtol) and not self.wrong_dtype


@dataclasses.dataclass
class TimingRow:
  """Median milliseconds of jaxnorm and of one flax.linen baseline on one shape."""

  op: str
  shape: tuple[int, ...]
  baseline: str
  jaxnorm_ms: float
  flax_ms: float

  @property
  def ratio(self) -> float:
    return self.jaxnorm_ms / self.flax_ms


@dataclasses.dataclass
class Report:
  """Everything `run` measured."""

  header: list[str]
  accuracy: list[AccuracyRow]
  timing: list[TimingRow]
  seconds: float
  sizes: Sizes = FULL

  @property
  def passed(self) -> bool:
    return all(r.passed for r in self.accuracy if r.counts)


# ----------------------------------------------------------------------------
# float64 textbook references (plain jax.numpy, differentiated by autodiff)


def _lead(a, ndim):
  """`a` with leading size-1 axes up to rank `ndim`: the broadcast written out, as rank promotion "raise" asks."""
  return jnp.reshape(a, (1,) * (ndim - jnp.ndim(a)) + jnp.shape(a))


def _ref_moments(x, axes):
  mean = jnp.mean(x, axes, keepdims=True)
  var = jnp.mean((x - mean) ** 2, axes, keepdims=True)
  return jnp.squeeze(mean, axes), jnp.squeeze(var, axes)


def _ref_normalize(x, mean, var, scale, bias, epsilon):
  mean, var, scale, bias = (_lead(a, x.ndim) for a in (mean, var, scale, bias))
  return (x - mean) / jnp.sqrt(var + epsilon) * scale + bias


def _ref_batch_norm(x, scale, bias, epsilon=1e-5):
  axes = tuple(range(x.ndim - 1))
  mean, var = _ref_moments(x, axes)
  return _ref_normalize(x, mean, var, scale, bias, epsilon), mean, var


def _ref_layer_norm(x, scale, bias, axes=(-1,), epsilon=1e-6):
  axes = tuple(a % x.ndim for a in axes)
  mean, var = _ref_moments(x, axes)
  mean, var = jnp.expand_dims(mean, axes), jnp.expand_dims(var, axes)
  return (x - mean) / jnp.sqrt(var + epsilon) * _lead(scale, x.ndim) + _lead(bias, x.ndim)


def _ref_rms_norm(x, scale, epsilon=1e-6):
  return x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + epsilon) * _lead(scale, x.ndim)


# ----------------------------------------------------------------------------
# accuracy


def _compare(got: Sequence[Any], want: Sequence[Any]) -> tuple[float, float]:
  """Max abs error over all pairs, and the worst error relative to max|want| of its pair."""
  err, rel = 0.0, 0.0
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    e = float(np.max(np.abs(g - w))) if g.size else 0.0
    if not np.all(np.isfinite(g)):
      e = float("inf")
    scale = max(float(np.max(np.abs(w))), np.finfo(np.float32).tiny)
    err, rel = max(err, e), max(rel, e / scale)
  return err, rel


def _wrong_dtype(arrays: Sequence[Any]) -> str:
  bad = sorted({str(a.dtype) for a in arrays if a.dtype != jnp.float32})
  return f"got {'/'.join(bad)} for float32 inputs" if bad else ""


def _f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _forward_and_grads(fn: Callable[..., Any]) -> Callable[..., Any]:
  # One jit per function: op-by-op dispatch would compile every primitive apart.
  @jax.jit
  def forward_and_grads(primals, cotangent):
    out, vjp = jax.vjp(fn, *primals)
    return out, vjp(cotangent)

  return forward_and_grads


def _check_vjp(
    name: str,
    fn: Callable[..., Any],
    ref: Callable[..., Any],
    primals: tuple[np.ndarray, ...],
    cotangent: Any,
    rtol: float = RTOL,
    counts: bool = True,
) -> AccuracyRow:
  """Compares forward and VJP of float32 `fn` with those of float64 `ref` at the same values."""
  out, grads = _forward_and_grads(fn)(primals, cotangent)
  out64, grads64 = _forward_and_grads(ref)(_f64(primals), _f64(cotangent))
  flat_out, flat_out64 = jax.tree.leaves(out), jax.tree.leaves(out64)
  fwd_err, fwd_rel = _compare(flat_out, flat_out64)
  grad_err, grad_rel = _compare(grads, grads64)
  wrong = _wrong_dtype(flat_out + list(grads))
  return AccuracyRow(name, primals[0].shape, fwd_err, grad_err, max(fwd_rel, grad_rel), rtol, counts, wrong)


def _check_forward(name, fn, ref, primals) -> AccuracyRow:
  out = jax.tree.leaves(jax.jit(fn)(*primals))
  fwd_err, rel = _compare(out, jax.tree.leaves(jax.jit(ref)(*_f64(primals))))
  return AccuracyRow(name, primals[0].shape, fwd_err, None, rel, RTOL, True, _wrong_dtype(out))


def _normal(rng: np.random.Generator, shape, loc=0.0, scale=1.0) -> np.ndarray:
  return rng.normal(loc, scale, shape).astype(np.float32)


def _features(rng: np.random.Generator, shape) -> np.ndarray:
  """Per-feature offsets and spreads, so that each feature really needs its own statistics."""
  n = shape[-1]
  loc = rng.uniform(-2, 2, n).astype(np.float32)
  spread = rng.uniform(0.5, 3, n).astype(np.float32)
  return (loc + spread * rng.standard_normal(shape)).astype(np.float32)


def accuracy_steps(sizes: Sizes, seed: int) -> list[tuple[str, Callable[[], AccuracyRow]]]:
  """The accuracy checks as (progress label, thunk) pairs, run in order."""
  rng = np.random.default_rng(seed)
  b = sizes.accuracy_batch
  c = 16

  def moments():
    x = _features(rng, (b, c))
    return _check_forward(
        "moments", lambda x: jaxnorm.moments(x, axis=0), lambda x: _ref_moments(x, (0,)), (x,)
    )

  def normalize():
    x = _features(rng, (b // 8, 6, c))
    mean = rng.uniform(-2, 2, c).astype(np.float32)
    var = rng.uniform(0.5, 4, c).astype(np.float32)
    scale, bias = _normal(rng, c, 1.0, 0.5), _normal(rng, c)
    return _check_forward(
        "normalize",
        lambda *a: jaxnorm.normalize(*a, epsilon=1e-5),
        lambda *a: _ref_normalize(*a, epsilon=1e-5),
        (x, mean, var, scale, bias),
    )

  def batch_norm(shape):
    def thunk():
      x = _features(rng, shape)
      scale, bias = _normal(rng, c, 1.0, 0.5), _normal(rng, c)
      # Cotangents on the returned statistics too: they feed running averages
      # and have their own terms in the hand-derived backward.
      ct = (_normal(rng, shape), _normal(rng, c), _normal(rng, c))
      return _check_vjp("batch_norm", jaxnorm.batch_norm, _ref_batch_norm, (x, scale, bias), ct)

    return thunk

  def layer_norm(axis):
    def thunk():
      shape = (b // 8, 6, 32)
      pshape = tuple(shape[a] for a in axis)
      x = _features(rng, shape)
      scale, bias = _normal(rng, pshape, 1.0, 0.5), _normal(rng, pshape)
      name = "layer_norm" if axis == (-1,) else f"layer_norm axis={axis}"
      fn = lambda x, s, b: jaxnorm.layer_norm(x, s, b, axis=axis)  # noqa: E731
      ref = lambda x, s, b: _ref_layer_norm(x, s, b, axis)  # noqa: E731
      return _check_vjp(name, fn, ref, (x, scale, bias), _normal(rng, shape))

    return thunk

  def rms_norm():
    shape = (b // 8, 6, 32)
    x = _features(rng, shape)
    scale = _normal(rng, 32, 1.0, 0.5)
    return _check_vjp("rms_norm", jaxnorm.rms_norm, _ref_rms_norm, (x, scale), _normal(rng, shape))

  return [
      ("moments", moments),
      ("normalize", normalize),
      ("batch_norm (N, C)", batch_norm((b, c))),
      ("batch_norm NHWC", batch_norm((b // 8, 5, 5, c))),
      ("layer_norm", layer_norm((-1,))),
      ("layer_norm over two axes", layer_norm((-2, -1))),
      ("rms_norm", rms_norm),
  ]


def stability_rows(seed: int) -> list[AccuracyRow]:
  """Layer norm at mean offset 1e4, std 1, 64 features: jaxnorm (counted) and flax's default (contrast)."""
  rng = np.random.default_rng(seed + 1)
  shape = (16, 64)
  x = _normal(rng, shape, STABILITY_OFFSET, 1.0)
  scale, bias = _normal(rng, 64, 1.0, 0.5), _normal(rng, 64)
  ct = _normal(rng, shape)
  name = "layer_norm, mean 1e4 std 1"
  rows = [_check_vjp(name, jaxnorm.layer_norm, _ref_layer_norm, (x, scale, bias), ct, RTOL)]

  def flax_default(x, scale, bias):
    return nn.LayerNorm().apply({"params": {"scale": scale, "bias": bias}}, x)

  row = _check_vjp(
      "flax LayerNorm() same input",
      flax_default,
      _ref_layer_norm,
      (x, scale, bias),
      ct,
      RTOL,
      counts=False,
  )
  row.note = "contrast, not counted: use_fast_variance=True by default"
  rows.append(row)
  return rows


# ----------------------------------------------------------------------------
# timing


def timing_steps(sizes: Sizes, seed: int) -> list[tuple[str, Callable[[], list[TimingRow]]]]:
  """The timing runs as (progress label, thunk) pairs."""
  rng = np.random.default_rng(seed + 2)

  def run(op, shape, jaxnorm_apply, baselines, param_names):
    c = shape[-1]
    x = _normal(rng, shape)
    params = [_normal(rng, c, 1.0, 0.5), _normal(rng, c)][: len(param_names)]
    ct = _normal(rng, shape)
    args = [jnp.asarray(a) for a in (x, *params, ct)]
    fns = {"jaxnorm": _timing.loss_grad(jaxnorm_apply, len(params))}
    for label, (module, needs_stats) in baselines.items():
      stats = None
      if needs_stats:
        stats = module.init(jax.random.key(0), args[0])["batch_stats"]
      fns[label] = _timing.loss_grad(_timing.flax_apply(module, param_names, stats), len(params))
    thunks = {k: (lambda f=f: f(*args)) for k, f in fns.items()}
    ms = _timing.median_ms(thunks, sizes.warmup, sizes.repeats)
    return [TimingRow(op, shape, label, ms["jaxnorm"], ms[label]) for label in baselines]

  rows, images = sizes.timing_rows, sizes.timing_images
  return [
      (
          f"batch_norm {images}",
          lambda: run(
              "batch_norm",
              images,
              lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
              {
                  "BatchNorm(use_running_average=False)": (nn.BatchNorm(use_running_average=False), True),
                  "  ... use_fast_variance=False": (
                      nn.BatchNorm(use_running_average=False, use_fast_variance=False),
                      True,
                  ),
              },
              ("scale", "bias"),
          ),
      ),
      (
          f"layer_norm {rows}",
          lambda: run(
              "layer_norm",
              rows,
              jaxnorm.layer_norm,
              {
                  "LayerNorm()": (nn.LayerNorm(), False),
                  "LayerNorm(use_fast_variance=False)": (nn.LayerNorm(use_fast_variance=False), False),
              },
              ("scale", "bias"),
          ),
      ),
      (
          f"rms_norm {rows}",
          # flax's RMSNorm ignores use_fast_variance (no mean to subtract), so
          # one baseline covers both settings.
          lambda: run("rms_norm", rows, jaxnorm.rms_norm, {"RMSNorm()": (nn.RMSNorm(), False)}, ("scale",)),
      ),
  ]


# ----------------------------------------------------------------------------
# report


def machine_header() -> list[str]:
  """Date, machine and library versions, one fact a line."""
  return _timing.machine_lines("self-check")


def format_report(report: Report) -> str:
  """The report as aligned plain text."""
  lines = [*report.header, ""]
  lines += [
      "Accuracy: float32 jaxnorm vs autodiff of the textbook formula in float64 on the same values.",
      f"PASS when every output and gradient has max|err| <= tol x max|reference| (tol {RTOL:g}, also at mean 1e4).",
  ]
  acc_rows = []
  for r in report.accuracy:
    result = ("PASS" if r.passed else "FAIL") if r.counts else ("ok" if r.passed else "bad")
    acc_rows.append(
        [
            r.name,
            _timing.shape_str(r.shape),
            f"{r.fwd_err:.2e}",
            "-" if r.grad_err is None else f"{r.grad_err:.2e}",
            f"{r.worst_rel:.2e}",
            f"{r.rtol:g}",
            result,
            "; ".join(n for n in (r.wrong_dtype, r.note) if n),
        ]
    )
  lines += _timing.table(
      ["check", "shape", "fwd max|err|", "grad max|err|", "worst err/scale", "tol", "result", "note"],
      acc_rows,
      [False, False, True, True, True, True, False, False],
  )
  if report.timing:
    lines += [
        "",
        "Speed: jit(grad(sum(y * cotangent))) wrt x, scale, bias (forward + backward); median ms of "
        f"{report.sizes.repeats} interleaved runs after {report.sizes.warmup} warm-up.",
    ]
    t_rows = [
        [t.op, _timing.shape_str(t.shape), t.baseline, f"{t.jaxnorm_ms:.3f}", f"{t.flax_ms:.3f}", f"{t.ratio:.2f}"]
        for t in report.timing
    ]
    lines += _timing.table(
        ["op", "shape", "flax.linen baseline", "jaxnorm ms", "flax ms", "jaxnorm/flax"],
        t_rows,
        [False, False, False, True, True, True],
    )
  failed = [r.name for r in report.accuracy if r.counts and not r.passed]
  lines.append("")
  if failed:
    lines.append(f"FAILED: {', '.join(failed)}  ({report.seconds:.1f} s)")
  else:
    n = sum(r.counts for r in report.accuracy)
    lines.append(f"All {n} accuracy checks passed  ({report.seconds:.1f} s)")
  return "\n".join(lines)


def run(*, quick: bool = False, timing: bool = True, seed: int = 0, progress: TextIO | None = None) -> Report:
  """Runs every check (and the timings unless `timing` is false) and returns the report.

  Enables float64 process-wide (`jax_enable_x64`) for the references; every
  jaxnorm input is created explicitly as float32, so jaxnorm runs as it would
  for a float32 user. `progress` gets one line per step (default: stderr).
  """
  jax.config.update("jax_enable_x64", True)
  progress = sys.stderr if progress is None else progress
  sizes = QUICK if quick else FULL
  start = time.perf_counter()
  acc = accuracy_steps(sizes, seed)
  tim = timing_steps(sizes, seed) if timing else []
  total = len(acc) + 1 + len(tim)
  step = 0

  def announce(what):
    nonlocal step
    step += 1
    print(f"[{step}/{total}] {what} ...", file=progress, flush=True)

  accuracy: list[AccuracyRow] = []
  for label, thunk in acc:
    announce(f"checking {label}")
    accuracy.append(thunk())
  announce("checking stability at mean offset 1e4")
  accuracy += stability_rows(seed)
  timings: list[TimingRow] = []
  for label, thunk in tim:
    announce(f"timing {label}")
    timings += thunk()
  return Report(machine_header(), accuracy, timings, time.perf_counter() - start, sizes)
