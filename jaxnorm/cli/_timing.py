"""Wall-time measurement and its reporting, shared by `jaxnorm check` and `jaxnorm bench`.

Both commands time jitted programs of several implementations side by side.
The mechanics live here once: the forward+backward program that is timed
(`loss_grad`), the interleaved timing loop (`interleaved_samples`, whose
thunks take turns so that drift of the machine hits every implementation
alike), the summary of samples (`Spread`), the description of the machine
that a timing is meaningless without (`machine_lines`) and the plain-text
table both commands print (`table`).

This module never imports flax: `flax_apply` only calls `module.apply`.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def loss_grad(apply: Callable[..., jax.Array], n_params: int) -> Callable[..., Any]:
  """jit of the gradient of ``sum(apply(x, *params) * ct)`` with respect to `x` and the params.

  The cotangent `ct` is the last argument, not a constant, so that XLA
  cannot fold it into the program. Call as ``f(x, *params, ct)``.
  """

  def loss(x, *rest):
    *params, ct = rest
    return jnp.sum(apply(x, *params) * ct)

  return jax.jit(jax.grad(loss, argnums=tuple(range(1 + n_params))))


def flax_apply(module: Any, names: Sequence[str], batch_stats: Any = None) -> Callable[..., jax.Array]:
  """``apply(x, *params)`` of a flax.linen normalization layer with the params named `names`.

  With `batch_stats` (training-mode batch norm) the collection is mutable and
  its update is discarded (and dead-code eliminated under jit), as jaxnorm's
  unused batch statistics are. flax's layers promote dtypes implicitly (a
  bfloat16 input to float32 statistics), so they run under JAX's standard
  promotion even where the caller has set ``jax_numpy_dtype_promotion="strict"``.
  """

  def apply(x, *params):
    variables = {"params": dict(zip(names, params))}
    with jax.numpy_dtype_promotion("standard"):
      if batch_stats is None:
        return module.apply(variables, x)
      y, _ = module.apply({**variables, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
    return y

  return apply


def interleaved_samples(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, pause: float = 0.0
) -> dict[str, list[float]]:
  """Wall times in seconds of `repeats` calls of each thunk, after `warmup` calls each.

  The thunks take turns, one call each per round, and the one that goes first
  rotates, so that no implementation always runs on a warm cache or in a
  quiet moment of the machine. Each result is passed to
  `jax.block_until_ready`; a thunk of another library returns None after
  finishing its work. `pause` seconds of sleep before each timed call let the
  worker threads of the previous call (XLA's, or torch's OpenMP threads,
  which spin for a while after their work) go idle, so that one
  implementation's threads do not compete with the next one's on a small
  machine. Python's garbage collector is off while timing.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  keys = list(fns)
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for i in range(repeats):
      order = keys[i % len(keys) :] + keys[: i % len(keys)]
      for k in order:
        if pause:
          time.sleep(pause)
        t0 = time.perf_counter()
        jax.block_until_ready(fns[k]())
        times[k].append(time.perf_counter() - t0)
  finally:
    if gc_was_enabled:
      gc.enable()
  return times


def median_ms(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
  """Median wall time in milliseconds of each thunk, timed by `interleaved_samples`."""
  samples = interleaved_samples(fns, warmup, repeats)
  return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


@dataclasses.dataclass(frozen=True)
class Spread:
  """Median, quartiles and range of timing samples, in milliseconds."""

  median: float
  q1: float
  q3: float
  min: float
  max: float
  n: int

  @classmethod
  def of(cls, seconds: Sequence[float]) -> Spread:
    ms = 1e3 * np.asarray(seconds, np.float64)
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return cls(float(median), float(q1), float(q3), float(ms.min()), float(ms.max()), len(ms))

  @property
  def rel_iqr(self) -> float:
    """Half the interquartile range relative to the median: the typical noise of one run."""
    return (self.q3 - self.q1) / (2 * self.median) if self.median > 0 else float("nan")


def cpu_count() -> int:
  """The number of CPUs this process may run on (its affinity), else `os.cpu_count()`."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _version(dist: str) -> str:
  # From the installed metadata, so that naming flax's version does not import flax.
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def machine_lines(title: str) -> list[str]:
  """`title` with the date, then the machine and the library versions, one fact a line."""
  import jaxnorm  # noqa: PLC0415  (imported here: jaxnorm imports nothing of this module)

  now = datetime.datetime.now().astimezone()
  devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
  # Other work on the machine skews the timings; the load says how much to trust them.
  load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
  return [
      f"jaxnorm {jaxnorm.__version__} {title}, {now:%Y-%m-%d %H:%M:%S %Z}",
      f"machine: {platform.platform()}, {cpu_count()} CPUs{load}, python {platform.python_version()}",
      f"jax {jax.__version__}, flax {_version('flax')}, numpy {np.__version__}; devices: {devices}",
  ]


def terminal_width() -> int:
  """The terminal's width in columns (`COLUMNS` when set; 100 when not a terminal, e.g. in a pipe or a test)."""
  return shutil.get_terminal_size((100, 24)).columns


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[bool],
    width: int | None = None,
    keep: int = 1,
) -> list[str]:
  """Aligned plain-text lines: header, rule, rows; `right[i]` right-aligns column i.

  A table wider than `width` (default: the terminal's) is split into several,
  one below the other, each repeating the first `keep` columns (the row's
  name), so that no line wraps.

  Example:
    >>> print("\\n".join(table(["case", "a", "b"], [["x", "1", "2"]], [False, True, True], width=12)))
    case  a  b
    ----  -  -
    x     1  2
    >>> print("\\n".join(table(["case", "aaaa", "bbbb"], [["x", "1", "2"]], [False, True, True], width=12)))
    case  aaaa
    ----  ----
    x        1
    <BLANKLINE>
    case  bbbb
    ----  ----
    x        2
  """
  width = terminal_width() if width is None else width
  widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
  # Greedy groups of the other columns, each as wide as fits beside the kept ones (at least one column).
  groups: list[list[int]] = []
  used = sum(widths[:keep]) + 2 * max(keep - 1, 0)
  for i in range(keep, len(headers)):
    if groups and used + sum(2 + widths[j] for j in groups[-1]) + 2 + widths[i] <= width:
      groups[-1].append(i)
    else:
      groups.append([i])
  lines: list[str] = []
  for group in groups or [[]]:
    columns = [*range(keep), *group]

    def line(cells, columns=columns):
      out = [cells[i].rjust(widths[i]) if right[i] else cells[i].ljust(widths[i]) for i in columns]
      return "  ".join(out).rstrip()

    if lines:
      lines.append("")
    lines += [line(headers), "  ".join("-" * widths[i] for i in columns), *(line(r) for r in rows)]
  return lines


def shape_str(shape: Sequence[int]) -> str:
  """``(a, b, c)``, also for a one-element shape."""
  return "(" + ", ".join(str(d) for d in shape) + ")"
