"""`jaxnorm tour`: one deep, narrow CNN trained on scikit-learn's digits once per normalization, side by side.

The setting is chosen so that normalization matters: a network deeper than
the task needs, trained with a learning rate that is large for it and small
batches. A shallow CNN reaches 99% on digits with any normalization or none,
and then the comparison shows nothing.

The data: scikit-learn's bundled handwritten digits (1797 grayscale 8x8
images, 10 classes; no download), pixels scaled to [0, 1], split 75/25 into
training and test sets, stratified by class. Training images are shifted by
a random pixel or none along each axis (augmentation; the same shifts in
every run).

The model, identical in every run but for its normalization layers: six 3x3
convolutions (16, 16, 32, 32, 64 and 64 channels; stride 2 where the width
grows), each followed by the normalization and a ReLU, then global average
pooling and a Dense layer to the 10 logits. flax's default initialization
(LeCun normal, which halves the signal's variance at every ReLU), so that
without normalization the signal fades with depth. The normalizations, all
from `jaxnorm.linen`:

* ``none``: convolutions with biases, nothing else;
* ``batch norm``: `BatchNorm` (momentum 0.9) after each convolution;
* ``batch renorm``: `BatchRenorm` with the paper's warm-up schedule scaled to
  the run's length (plain batch norm for the first 1/8 of the steps, then
  ``r_max`` relaxed to 3 by the end and ``d_max`` to 5 by 5/8 of it);
* ``group norm``: `GroupNorm` with 4 groups;
* ``layer norm``: `LayerNorm` over each example's height, width and channels,
  with a scale and bias per channel;
* ``weight norm``: each convolution wrapped in `WeightNorm`, with the
  paper's data-dependent initialization on the first training batch.

Every run uses the same seed, hence the same batches in the same order, and
the same optimizer and budget (SGD with Nesterov momentum 0.9, learning rate
0.1 with a cosine decay, 1500 steps of 16 images; softmax cross-entropy). The
batch-statistics layers are run with ``use_running_average=False`` in
training and ``True`` on the test set. The report: the test error at the end,
the mean training loss over the last evaluation interval, the wall time per
training step after compilation (the training loop dispatches one jitted step
at a time, as a user's loop would), and the compile time of the step; plus a
PNG of the training loss and the test error along the way, both on log scales.

`--quick` trains a two-convolution model for 30 steps: it checks that the
program runs, in seconds (most of them compiling six models), and shows
nothing about normalization.

This module is a user of the public API (it imports `jaxnorm.linen`, flax,
optax, scikit-learn, rich and matplotlib, the last three only when run).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import linen as jnn
from jaxnorm.cli import _optimizer

NORMS = ("none", "batch norm", "batch renorm", "group norm", "layer norm", "weight norm")


@dataclasses.dataclass(frozen=True)
class Config:
  """How long and how each model is trained."""

  steps: int
  batch_size: int = 16
  learning_rate: float = 0.1
  eval_every: int = 50
  widths: tuple[int, ...] = (16, 16, 32, 32, 64, 64)
  seed: int = 0


FULL = Config(steps=1500)
# Seconds, not a comparison: two small convolutions (little to compile) and one evaluation at the end.
QUICK = Config(steps=30, eval_every=30, widths=(8, 16))


class DigitsCNN(nn.Module):
  """The tour's CNN: ``len(widths)`` conv + `norm` + ReLU blocks, global average pooling, Dense(10).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = DigitsCNN(norm="group norm", widths=(8, 8))
    >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False)
    >>> model.apply(variables, jnp.zeros((2, 8, 8, 1)), train=False).shape
    (2, 10)
  """

  norm: str
  widths: Sequence[int] = (16, 16, 32, 32, 64, 64)
  steps: int = 1000  # the run's length, for batch renorm's schedule

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.norm not in NORMS:
      raise ValueError(f"`norm` must be one of {NORMS}, got {self.norm!r}.")
    for i, width in enumerate(self.widths):
      # Downsampled where the width grows, so that deep stacks keep a spatial extent on 8x8 images.
      strides = (2, 2) if i > 0 and width > self.widths[i - 1] else (1, 1)
      # A bias before a layer that subtracts a mean (or adds its own bias) is redundant.
      conv = nn.Conv(width, (3, 3), strides=strides, use_bias=self.norm in ("none", "weight norm"))
      if self.norm == "none":
        x = conv(x)
      elif self.norm == "batch norm":
        x = jnn.BatchNorm(use_running_average=not train, momentum=0.9)(conv(x))
      elif self.norm == "batch renorm":
        x = jnn.BatchRenorm(
            use_running_average=not train,
            momentum=0.9,
            warmup_steps=self.steps // 8,
            r_max_steps=self.steps,
            d_max_steps=self.steps * 5 // 8,
        )(conv(x))
      elif self.norm == "group norm":
        x = jnn.GroupNorm(num_groups=4)(conv(x))
      elif self.norm == "layer norm":
        x = jnn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1)(conv(x))
      else:
        x = jnn.WeightNorm(conv, data_init=True)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x.mean((1, 2)))


@dataclasses.dataclass
class Run:
  """One model's training: the curves and the summary numbers."""

  norm: str
  steps: list[int]  # evaluation points (training steps taken)
  train_loss: list[float]  # mean training loss over the interval ending there
  test_accuracy: list[float]
  ms_per_step: float
  compile_s: float

  @property
  def final_accuracy(self) -> float:
    return self.test_accuracy[-1]

  @property
  def final_error(self) -> float:
    return 1 - self.test_accuracy[-1]

  @property
  def final_loss(self) -> float:
    return self.train_loss[-1]


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's digits as NHWC float32 images in [0, 1]: ``(x_train, y_train, x_test, y_test)``."""
  from sklearn.datasets import load_digits as sk_load_digits  # noqa: PLC0415  (only the tour needs it)
  from sklearn.model_selection import train_test_split  # noqa: PLC0415

  digits = sk_load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
  return x_train, y_train, x_test, y_test


def _batches(n: int, batch_size: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`steps` index batches (shuffled epochs, each epoch's incomplete tail dropped) and their shifts.

  Returns ``(idx, shifts)`` of shapes ``(steps, batch_size)`` and
  ``(steps, batch_size, 2)``: each example's translation in pixels, in
  {-1, 0, 1} along height and width (data augmentation). Drawn by numpy, so
  that every run sees the same batches.
  """
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  epochs = -(-steps // per_epoch)
  idx = np.concatenate([rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)])
  return idx.reshape(-1, batch_size)[:steps], rng.integers(-1, 2, size=(steps, batch_size, 2), dtype=np.int32)


def _translate(images: jax.Array, shifts: jax.Array) -> jax.Array:
  """Each NHWC image moved by its ``(dy, dx)`` in {-1, 0, 1}, zeros (the background) filling in."""
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))

  def crop(image, shift):
    return jax.lax.dynamic_slice(image, (1 - shift[0], 1 - shift[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, shifts)


def train_one(
    norm: str,
    config: Config,
    data: tuple[np.ndarray, ...],
    on_progress: Callable[[int, float | None], None] = lambda steps, loss: None,
) -> Run:
  """Trains `DigitsCNN(norm)` for `config.steps` steps; returns its `Run`.

  `on_progress(steps_done, loss)` is called after each step (loss None) and
  after each evaluation (the interval's mean training loss).
  """
  x_train, y_train, x_test, y_test = data
  model = DigitsCNN(norm=norm, widths=config.widths, steps=config.steps)
  batches, shifts = _batches(len(x_train), config.batch_size, config.steps, config.seed)
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  # Weight norm's data-dependent init sees the first training batch; the other models ignore the values.
  # The "rbg" generator: XLA compiles the default threefry's init program 5-10x slower on CPU.
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.key(config.seed, impl="rbg"), x_train[batches[0]], train=False
  )
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
  opt = optax.sgd(schedule, momentum=0.9, nesterov=True)
  opt_state = opt.init(params)

  def loss_fn(params, batch_stats, idx, shift):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        _translate(x_train[idx], shift),
        train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()
    return loss, updates.get("batch_stats", {})

  @jax.jit
  def step(params, batch_stats, opt_state, idx, shift):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, idx, shift)
    params, opt_state = _optimizer.optimizer_step(opt, grads, opt_state, params)
    return params, batch_stats, opt_state, loss

  @jax.jit
  def accuracy(params, batch_stats):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x_test, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  run = Run(norm, [], [], [], 0.0, 0.0)
  start = time.perf_counter()
  params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batches[0], shifts[0])
  jax.block_until_ready(loss)
  run.compile_s = time.perf_counter() - start  # tracing, compiling and the first step
  losses, timed = [loss], 0.0
  on_progress(1, None)
  interval_start = time.perf_counter()
  for i in range(1, config.steps):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batches[i], shifts[i])
    losses.append(loss)
    on_progress(i + 1, None)
    if (i + 1) % config.eval_every == 0 or i + 1 == config.steps:
      # Steps are dispatched asynchronously: the interval is timed up to its last result, the evaluation not.
      jax.block_until_ready(loss)
      timed += time.perf_counter() - interval_start
      mean_loss = float(np.mean(jax.device_get(losses)))
      run.steps.append(i + 1)
      run.train_loss.append(mean_loss)
      run.test_accuracy.append(float(accuracy(params, batch_stats)))
      losses = []
      on_progress(i + 1, mean_loss)
      interval_start = time.perf_counter()
  run.ms_per_step = 1e3 * timed / max(config.steps - 1, 1)
  return run


def make_config(*, quick: bool = False, steps: int | None = None, seed: int = 0) -> Config:
  """The run's `Config`: `FULL` or `QUICK`, with the seed and, if given, the number of steps."""
  config = QUICK if quick else FULL
  config = dataclasses.replace(config, seed=seed, **({} if steps is None else {"steps": steps}))
  if config.steps < 2:
    raise ValueError(f"`steps` must be >= 2, got {config.steps}.")
  return dataclasses.replace(config, eval_every=min(config.eval_every, config.steps))


def describe(config: Config, data: tuple[np.ndarray, ...], norms: Sequence[str]) -> list[str]:
  """What the run is, in a few lines: printed before training starts."""
  return [
      f"jaxnorm tour: scikit-learn's digits (8x8 images, {len(data[0])} training, {len(data[2])} test), "
      "one CNN per normalization",
      f"normalizations: {', '.join(norms)}",
      f"model: {len(config.widths)} conv 3x3 of widths {config.widths}, each + normalization + ReLU; "
      "average pooling, Dense(10)",
      f"training: {config.steps} steps of batch {config.batch_size} (random 1-pixel shifts), SGD + Nesterov 0.9, "
      f"lr {config.learning_rate} cosine",
      f"the same seed ({config.seed}), batches and budget for every model; jax {jax.__version__} on "
      f"{jax.devices()[0].platform}, python {platform.python_version()}",
  ]


def run(
    *,
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    norms: Sequence[str] = NORMS,
    progress: bool = True,
    data: tuple[np.ndarray, ...] | None = None,
) -> list[Run]:
  """Trains one model per normalization in `norms`; returns their `Run`s.

  Example (not run here: it trains):
    >>> runs = run(quick=True, norms=["group norm"], progress=False)  # doctest: +SKIP
    >>> runs[0].norm, 0 <= runs[0].final_error <= 1  # doctest: +SKIP
    ('group norm', True)
  """
  unknown = [n for n in norms if n not in NORMS]
  if unknown or not norms:
    raise ValueError(f"unknown normalization(s) {unknown}; choose from {', '.join(NORMS)}.")
  config = make_config(quick=quick, steps=steps, seed=seed)
  data = load_digits(seed) if data is None else data
  runs: list[Run] = []
  if not progress:
    for norm in norms:
      runs.append(train_one(norm, config, data))
    return runs

  from rich.console import Console  # noqa: PLC0415
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

  columns = (
      TextColumn("{task.description:>13}"),
      BarColumn(),
      MofNCompleteColumn(),
      TextColumn("loss {task.fields[loss]}"),
      TimeElapsedColumn(),
  )
  with Progress(*columns, console=Console(stderr=True)) as bar:
    tasks = {norm: bar.add_task(norm, total=config.steps, loss="-", start=False) for norm in norms}
    for norm in norms:
      bar.start_task(tasks[norm])

      def on_progress(done, loss, task=tasks[norm]):
        bar.update(task, completed=done, **({} if loss is None else {"loss": f"{loss:.3f}"}))

      runs.append(train_one(norm, config, data, on_progress))
  return runs


def format_table(runs: Sequence[Run]) -> str:
  """The summary table as plain text (rich's rendering, no colors), one row per normalization."""
  from rich.console import Console  # noqa: PLC0415
  from rich.table import Table  # noqa: PLC0415

  table = Table(title=None, show_edge=False)
  for name, justify in (
      ("normalization", "left"),
      ("test error %", "right"),
      ("final loss", "right"),
      ("ms / step", "right"),
      ("compile s", "right"),
  ):
    table.add_column(name, justify=justify)
  for r in runs:
    loss = f"{r.final_loss:.4f}" if math.isfinite(r.final_loss) else "diverged"
    table.add_row(r.norm, f"{100 * r.final_error:.1f}", loss, f"{r.ms_per_step:.2f}", f"{r.compile_s:.2f}")
  console = Console(width=100, color_system=None, force_terminal=False)
  with console.capture() as capture:
    console.print(table)
  return capture.get().rstrip()


def plot(runs: Sequence[Run], path: str, n_test: int, title: str) -> None:
  """Writes a PNG: training loss and test error against training steps, both on log scales, one line per run.

  A test error of 0 is drawn at half an image (``0.5 / n_test``), where a log
  scale can show it.
  """
  import matplotlib  # noqa: PLC0415  (only the plot needs it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import matplotlib.ticker  # noqa: PLC0415

  fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(12, 4.6))
  for r in runs:
    (line,) = ax_loss.plot(r.steps, r.train_loss, label=r.norm)
    errors = [max(1 - a, 0.5 / n_test) for a in r.test_accuracy]
    ax_err.plot(r.steps, errors, label=f"{r.norm} ({100 * r.final_error:.1f}%)", color=line.get_color())
  ax_loss.set(
      xlabel="training step", ylabel="training loss (mean over each interval)", yscale="log", title="Training loss"
  )
  ax_err.set(xlabel="training step", ylabel=f"test error ({n_test} images)", yscale="log", title="Test error")
  ax_err.axhline(0.9, color="gray", linewidth=0.8, linestyle=":")
  middle = max(r.steps[-1] for r in runs) / 2  # left of the legend, right of the first points
  ax_err.annotate("chance", (middle, 0.9), xytext=(0, -10), textcoords="offset points", fontsize=8, color="gray")
  ax_err.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
  for ax in (ax_loss, ax_err):
    ax.grid(alpha=0.3, which="both")
  ax_err.legend(loc="upper right", fontsize=8, title="final test error", title_fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(
    *,
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    norms: Sequence[str] = NORMS,
    out: str | None = "jaxnorm-out/tour.png",
    progress: bool = True,
) -> int:
  """Prints what the run is, trains, prints the table and writes the plot to `out`; returns the exit code."""
  start = time.perf_counter()
  config = make_config(quick=quick, steps=steps, seed=seed)
  data = load_digits(seed)
  # Before training, so that the reader knows what the next minutes are spent on.
  print("\n".join(describe(config, data, norms)), flush=True)
  print(flush=True)
  runs = run(quick=quick, steps=steps, seed=seed, norms=norms, progress=progress, data=data)
  print(format_table(runs), flush=True)
  n_test = len(data[3])
  note = (
      f"test error on {n_test} images (one image = {100 / n_test:.2f}%); final loss: mean training loss of the "
      "last evaluation interval; ms / step: wall time of a training step after compilation (noisy when the "
      "machine is busy); compile s: the first step, tracing and compiling included."
  )
  if quick:
    note += " --quick: a tiny model for a few steps, to check that the tour runs; it compares nothing."
  print("\n" + textwrap.fill(note, width=100), flush=True)
  if out is not None:
    title = (
        f"jaxnorm tour: {len(config.widths)}-layer CNN on scikit-learn's digits, {config.steps} steps of batch "
        f"{config.batch_size}, lr {config.learning_rate}, once per normalization"
    )
    plot(runs, out, n_test, title)
  elapsed = time.perf_counter() - start
  print(f"\n{len(runs)} models trained in {elapsed:.0f} s" + (f"; wrote {out}" if out else ""), flush=True)
  return 0


def _print_error(message: str) -> None:
  print(f"jaxnorm tour: error: {message}", file=sys.stderr)


def _parse_norms(text: str | None) -> tuple[str, ...]:
  if text is None:
    return NORMS
  return tuple(n.strip().replace("_", " ").replace("-", " ") for n in text.split(",") if n.strip())


def cli(args: Any) -> int:
  """The `jaxnorm tour` handler (see `jaxnorm.cli`): checks the arguments, then runs `main`."""
  norms = _parse_norms(args.norms)
  unknown = [n for n in norms if n not in NORMS]
  if unknown or not norms:
    _print_error(f"--norms: unknown normalization(s) {unknown}; choose from {', '.join(NORMS)}.")
    return 2
  if args.steps is not None and args.steps < 2:
    _print_error(f"--steps must be >= 2, got {args.steps}.")
    return 2
  from jaxnorm.cli import output_path  # noqa: PLC0415  (the command line's, which imports no JAX)

  # Created before minutes of training, so that writing cannot fail at the end.
  out = None if args.out.lower() == "none" else output_path(args.out, "tour.png", ".png")
  return main(quick=args.quick, steps=args.steps, seed=args.seed, norms=norms, out=out, progress=args.progress)
