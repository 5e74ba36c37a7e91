"""Command line of jaxnorm: `jaxnorm [command]`, also `python -m jaxnorm`.

Each command registers itself in `_COMMANDS` with a parser builder and a
handler returning the exit code; `tour` runs when no command is given, and
its options work without naming it (`jaxnorm --quick`).

The programs live beside this file: `tour`, `bench` (and `bench_targets`, its
compile-only mode for accelerators), `bench_blocks` (`jaxnorm blocks`, the
in-model benchmark), `bench_memory` (`jaxnorm memory`, what
``saved="output"`` frees), `selfcheck` (`jaxnorm check`) and
`_timing`, which the last two share. This module imports none of them, nor
JAX, at import time: `jaxnorm --help` answers in a fraction of a second, and
each handler imports its program when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

DEFAULT_COMMAND = "tour"
# Where the tour and the benchmark write their files unless `--out` says otherwise.
DEFAULT_OUT = "jaxnorm-out"


class OutputError(Exception):
  """The place a command would write to cannot be written: found before the command runs, said in one line."""


def output_path(out: str, default_name: str, suffix: str) -> str:
  """The file a command writes: `out` itself when it ends with `suffix`, else `default_name` in the folder `out`.

  The folder is created if missing, and the file is checked writable, so
  that a run never fails at its end; an `OutputError` says why not.

  Example:
    >>> import tempfile, os
    >>> folder = os.path.join(tempfile.mkdtemp(), "results")
    >>> output_path(folder, "tour.png", ".png") == os.path.join(folder, "tour.png")
    True
    >>> os.path.isdir(folder)
    True
  """
  path = out if out.lower().endswith(suffix) else os.path.join(out, default_name)
  existed = os.path.exists(path)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a"):
      pass
  except OSError as e:
    raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
  if not existed:
    os.remove(path)
  return path


def _add_check(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "check",
      help="verify accuracy against float64 references and time against flax.linen",
      description=(
          "Self-check on this machine. Accuracy: moments, normalize, batch_norm, layer_norm and "
          "rms_norm on random float32 inputs, forward and gradients (x, scale, bias) compared "
          "with autodiff of the textbook formula in float64; plus layer norm at mean offset 1e4, "
          "std 1, where flax.linen.LayerNorm()'s default fast variance is shown for contrast. "
          "Speed: jitted forward+backward of jaxnorm vs flax.linen BatchNorm, LayerNorm and "
          "RMSNorm, median of interleaved runs. Exit code 0 when every accuracy check passes, "
          "1 otherwise. Takes under a minute on 2 CPU cores."
      ),
  )
  p.add_argument(
      "--quick", action="store_true", help="tiny shapes and few repeats (a few seconds; for tests)"
  )
  p.add_argument("--no-timing", dest="timing", action="store_false", help="run the accuracy checks only")
  p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
  return p


def _run_check(args: argparse.Namespace) -> int:
  # Imported here so that `jaxnorm --help` stays fast.
  from jaxnorm.cli import selfcheck

  report = selfcheck.run(quick=args.quick, timing=args.timing, seed=args.seed)
  print(selfcheck.format_report(report), flush=True)
  return 0 if report.passed else 1


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "bench",
      help="benchmark time, memory traffic and residuals against flax.linen, plain jnp and torch",
      description=(
          "Benchmark on this machine. Cases: layer_norm and rms_norm on (8192, 1024) and (4096, 4096) "
          "in float32 and bfloat16; batch_norm and group_norm (32 groups) on NHWC (64, 32, 32, 128) and "
          "(16, 32, 32, 256) in float32. Modes: fwd (y = op(x, params)) and fwd_bwd (jitted gradient of "
          "sum(y * ct) wrt x and params, ct an argument). Implementations, interleaved run by run in this "
          "process after warm-up: jaxnorm; flax.linen with defaults; flax.linen with "
          "use_fast_variance=False; the textbook formula in plain jax.numpy under autodiff; PyTorch CPU "
          "(torch.nn.functional, channels_last images, autograd; skipped with a note if torch is missing). "
          "Reports the median time with its quartiles; XLA's bytes accessed and temporary bytes of each "
          "compiled program; the bytes of residuals saved for the backward; compile time; and a floor: "
          "the bytes the program must move (fwd: read x, write y; fwd_bwd: read x and ct, write dx; plus "
          "parameters) over the copy bandwidth measured in the same loop. Prints a table with the ratios "
          "jaxnorm/flax, jaxnorm/torch and jaxnorm/floor, writes a JSON file and a PNG plot. A full run "
          "takes a few minutes on 2 CPU cores."
      ),
  )
  p.add_argument("--quick", action="store_true", help="tiny shapes and 3 repeats (seconds; for tests)")
  p.add_argument(
      "--target",
      choices=("h100", "a100", "tpu-v5e", "tpu-v4"),
      default=None,
      help=(
          "compile every case for this GPU or TPU without the device and report XLA's figures for the optimized "
          "programs (kernels, bytes accessed or estimated cycles, temporaries; nothing runs, no timing). Needs "
          "the compiler plugin at this jax's version: jax-cuda12-plugin and jax-cuda12-pjrt (GPU) or libtpu "
          "(TPU, via jax[tpu])"
      ),
  )
  p.add_argument(
      "--cases",
      metavar="PATTERNS",
      default=None,
      help=(
          "comma-separated patterns; runs the cases whose name (op/dtype/shape, e.g. "
          "layer_norm/bf16/4096x4096) contains one; shell wildcards allowed (default: all)"
      ),
  )
  p.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default: 12; --quick: 3)")
  p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 2; --quick: 1)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
  p.add_argument(
      "--out",
      default=DEFAULT_OUT,
      metavar="DIR",
      help=(
          f"output folder, created if missing (default: {DEFAULT_OUT}); the run writes bench.json and bench.png "
          "there (with --target T: bench-T.json); a path ending in .json names the report itself"
      ),
  )
  p.add_argument(
      "--plot",
      default=None,
      help="PNG plot path (default: beside the report, with .png; 'none' to skip)",
  )
  return p


def _run_bench(args: argparse.Namespace) -> int:
  from jaxnorm.cli import bench  # noqa: PLC0415  (imported here so that `jaxnorm --help` stays fast)

  # Checked before minutes of measuring, so that writing cannot fail at the end.
  args.out = output_path(args.out, "bench.json" if args.target is None else f"bench-{args.target}.json", ".json")
  if args.target is not None:
    return _run_bench_target(args)
  plot = args.plot
  if plot is None:
    plot = output_path(os.path.splitext(args.out)[0] + ".png", "bench.png", ".png")
  elif plot.lower() == "none":
    plot = None
  else:
    plot = output_path(plot, "bench.png", ".png")
  if plot is not None and importlib.util.find_spec("matplotlib") is None:
    print(
        "jaxnorm bench: matplotlib is not installed, so no plot is drawn (pip install 'jaxnorm[bench]' "
        "brings it); the table and the JSON report are written as usual.",
        file=sys.stderr,
    )
    plot = None
  try:
    report = bench.run(
        quick=args.quick, patterns=args.cases, repeats=args.repeats, warmup=args.warmup, seed=args.seed
    )
  except ValueError as e:
    print(f"jaxnorm bench: error: {e}", file=sys.stderr)
    return 2
  # The table first: it is the result even if writing the files fails.
  print(bench.format_report(report), flush=True)
  bench.write(report, args.out, plot)
  print(f"wrote {args.out}" + (f" and {plot}" if plot else ""), flush=True)
  return 0


def _run_bench_target(args: argparse.Namespace) -> int:
  _compile_only_host()
  from jaxnorm.cli import bench_targets  # noqa: PLC0415

  def run():
    bench_targets.require(args.target)
    return bench_targets.run(args.target, quick=args.quick, patterns=args.cases)

  return _report("bench", run, bench_targets.format_report, args.out)


def _compile_only_host() -> None:
  """Compile-only runs: the host stays the CPU, and JAX must not look for a GPU at start-up.

  Set before JAX is first imported; a user's own setting wins.
  """
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def _report(command: str, run: Callable[[], dict], describe: Callable[[dict], str], out: str) -> int:
  """Runs a measuring command, prints its table and writes its JSON report; a bad argument ends in one line."""
  import json  # noqa: PLC0415

  try:
    report = run()
  except (ValueError, RuntimeError) as e:
    print(f"jaxnorm {command}: error: {e}", file=sys.stderr)
    return 2
  print(describe(report), flush=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
    f.write("\n")
  print(f"wrote {out}", flush=True)
  return 0


def _add_blocks(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "blocks",
      help="one training step of a DiT block and a Gemma-style block, jaxnorm against the flax composition",
      description=(
          "In-model benchmark on this machine. Blocks (flax.linen, float32, one jitted training step: forward, "
          "backward, Adam update): a DiT block (adaLN-Zero, attention, MLP; B 8, N 256, C 256, 4 heads) with "
          "jaxnorm.linen.AdaLNZero against LayerNorm(x) * (1 + scale) + shift; a pre-norm transformer block as Gemma "
          "3 builds it (zero-centred RMS norm, QK-norm, gated MLP) with jaxnorm.linen.RMSNorm(scale_offset=1) "
          "against Gemma's RMSNorm from flax's examples; and the fused residual add rms_norm(x + r) composed "
          "against the same under one VJP ((4096, 1024)). Reports each step's temporary memory (XLA's memory "
          "analysis), time per step (median of interleaved runs), and the first step's loss and gradient "
          "agreement; writes a JSON report. About a minute on 2 CPU cores. With --target, compiles the steps for "
          "that GPU or TPU without the device and reports XLA's temporaries and kernels (nothing runs)."
      ),
  )
  p.add_argument("--quick", action="store_true", help="tiny shapes and 2 repeats (seconds; for tests)")
  p.add_argument("--target", choices=("h100", "a100", "tpu-v5e", "tpu-v4"), default=None,
                 help="compile-only for this GPU or TPU (needs its compiler plugin, as `bench --target`)")
  p.add_argument("--repeats", type=int, default=None, help="timed steps per implementation (default: 10)")
  p.add_argument(
      "--out",
      default=DEFAULT_OUT,
      metavar="DIR",
      help=f"output folder (default: {DEFAULT_OUT}); writes blocks.json (blocks-T.json with --target)",
  )
  return p


def _run_blocks(args: argparse.Namespace) -> int:
  args.out = output_path(args.out, "blocks.json" if args.target is None else f"blocks-{args.target}.json", ".json")
  if args.target is not None:
    _compile_only_host()
  from jaxnorm.cli import bench_blocks  # noqa: PLC0415

  def run():
    if args.target is None:
      return bench_blocks.run(quick=args.quick, repeats=args.repeats)
    return bench_blocks.run_target(args.target, quick=args.quick)

  return _report("blocks", run, bench_blocks.format_report, args.out)


def _add_memory(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "memory",
      help="what saved='output' frees in a training step: a ResNet-style CNN and pre-norm transformer blocks",
      description=(
          "Activation-memory benchmark on this machine. One jitted training step (forward, backward, Adam) of a "
          "ResNet-style CNN (Conv -> BatchNorm -> ReLU blocks with residuals; 16 images of 16x16, 64 channels) and "
          "of pre-norm transformer blocks (LayerNorm before attention and MLP; 16 sequences of 128 tokens, width "
          "256), each with jaxnorm's modules as they are (saved='input'), with saved='output', and with flax's own "
          "modules, without and with nn.remat around every block. Reports the step's temporary memory (XLA's memory "
          "analysis), the largest batch that fits 16 GiB on its per-example slope, the time per step (median of "
          "interleaved runs) and the gradients against saved='input'; writes a JSON report. About two minutes on "
          "2 CPU cores. With --target, compiles the steps for that GPU without the device (nothing runs)."
      ),
  )
  p.add_argument("--quick", action="store_true", help="tiny shapes and 1 repeat (seconds; for tests)")
  p.add_argument("--target", choices=("h100", "a100"), default=None,
                 help="compile-only for this GPU (needs its compiler plugin, as `bench --target`)")
  p.add_argument("--repeats", type=int, default=None, help="timed steps per implementation (default: 5)")
  p.add_argument(
      "--out",
      default=DEFAULT_OUT,
      metavar="DIR",
      help=f"output folder (default: {DEFAULT_OUT}); writes memory.json (memory-T.json with --target)",
  )
  return p


def _run_memory(args: argparse.Namespace) -> int:
  args.out = output_path(args.out, "memory.json" if args.target is None else f"memory-{args.target}.json", ".json")
  if args.target is not None:
    _compile_only_host()
  from jaxnorm.cli import bench_memory  # noqa: PLC0415

  def run():
    return bench_memory.run(quick=args.quick, target=args.target, repeats=args.repeats)

  return _report("memory", run, bench_memory.format_report, args.out)


def _add_tour(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "tour",
      help="train a deep CNN on scikit-learn's digits once per normalization and compare them (the default)",
      description=(
          "A guided tour of the normalizations on a task where they matter. Trains the same deep, narrow CNN "
          "(six 3x3 convolutions, global average pooling, a Dense layer; flax's default init) on scikit-learn's "
          "bundled 8x8 handwritten digits (1347 training, 450 test images; random 1-pixel shifts as augmentation) "
          "once per normalization: none, batch norm, batch renorm, group norm, layer norm and weight norm (with "
          "data-dependent init), all from jaxnorm.linen, with the same seed, batches, optimizer and budget: 1500 "
          "steps of 16 images, SGD with Nesterov momentum at learning rate 0.1, cosine-decayed: a rate at which the "
          "models that normalize their activations train well and the others slowly or not at all. Prints what it runs, shows a "
          "progress bar per model on stderr, then prints a table of the final test error, the final training "
          "loss, the wall time per training step and the compile time, and writes a PNG of the training loss "
          "and test error (log scales) into the output folder. Takes about a minute on 2 CPU cores (--quick: "
          "seconds). Needs scikit-learn, matplotlib and rich (pip install 'jaxnorm[tour]')."
      ),
  )
  p.add_argument(
      "--quick", action="store_true", help="a two-layer model for 30 steps: checks that the tour runs (seconds; for tests)"
  )
  p.add_argument("--steps", type=int, default=None, help="training steps per model (default: 1500; --quick: 30)")
  p.add_argument(
      "--norms",
      metavar="LIST",
      default=None,
      help="comma-separated subset to train, e.g. 'none,batch norm' (default: all six)",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batches (default: 0)")
  p.add_argument(
      "--out",
      default=DEFAULT_OUT,
      metavar="DIR",
      help=(
          f"output folder, created if missing (default: {DEFAULT_OUT}); the PNG plot is written there as tour.png; "
          "a path ending in .png names the plot itself; 'none' to skip the plot"
      ),
  )
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
  return p


def _run_tour(args: argparse.Namespace) -> int:
  from jaxnorm.cli import tour  # noqa: PLC0415  (imported here so that `jaxnorm --help` stays fast)

  return tour.cli(args)


AddParser = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
Handler = Callable[[argparse.Namespace], int]

# name -> (adds the subparser, runs the command); commands are listed in this order.
_COMMANDS: dict[str, tuple[AddParser, Handler]] = {
    "check": (_add_check, _run_check),
    "bench": (_add_bench, _run_bench),
    "blocks": (_add_blocks, _run_blocks),
    "memory": (_add_memory, _run_memory),
    "tour": (_add_tour, _run_tour),
}


def build_parser() -> argparse.ArgumentParser:
  """The argument parser with one subparser per command."""
  parser = argparse.ArgumentParser(
      prog="jaxnorm",
      description=(
          "jaxnorm: normalization layers for JAX and Flax with hand-derived VJPs and stable "
          f"statistics. Without a command, runs `{DEFAULT_COMMAND}`."
      ),
      epilog="Run `jaxnorm COMMAND --help` for the options of a command.",
  )
  from jaxnorm import __version__

  parser.add_argument("--version", action="version", version=f"jaxnorm {__version__}")
  sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
  for name, (add, handler) in _COMMANDS.items():
    add(sub).set_defaults(handler=handler)
  return parser


def _with_default_command(argv: list[str]) -> list[str]:
  """`argv` with the default command put first when it names none and starts with one of its options.

  >>> _with_default_command(["--quick"]), _with_default_command([]), _with_default_command(["--help"])
  (['tour', '--quick'], ['tour'], ['--help'])
  """
  if not argv:
    return [DEFAULT_COMMAND]
  # A first word that is not an option is a command (argparse reports an unknown one);
  # the top-level options are the program's own, not the default command's.
  if argv[0].startswith("-") and argv[0].split("=")[0] not in ("-h", "--help", "--version"):
    return [DEFAULT_COMMAND, *argv]
  return argv


def main(argv: Sequence[str] | None = None) -> int:
  """Parses `argv` (default: `sys.argv[1:]`), runs the command and returns its exit code.

  Ctrl-C ends a command with one line on stderr and exit code 130, not a traceback.
  """
  parser = build_parser()
  args = parser.parse_args(_with_default_command(list(sys.argv[1:] if argv is None else argv)))
  try:
    return args.handler(args)
  except KeyboardInterrupt:
    print(f"\njaxnorm {args.command}: interrupted", file=sys.stderr, flush=True)
    return 130
  except OutputError as e:
    print(f"jaxnorm {args.command}: error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
  sys.exit(main())
