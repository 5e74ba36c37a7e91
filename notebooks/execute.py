"""Executes the notebooks in FULL mode, in place, to refresh the outputs committed with them.

    python notebooks/execute.py                       # every notebooks/*.ipynb
    python notebooks/execute.py notebooks/02_invariance.ipynb
    python notebooks/execute.py --quick 01            # quick mode, for a look; keeps the file unchanged

Each notebook runs top to bottom in a fresh `python3` kernel of this
interpreter (a kernelspec for `sys.executable`, first on JUPYTER_PATH), with
the notebook's folder as the working directory and JAXNORM_QUICK=0 (full
sizes), and is written back with its outputs (plots as inline PNG) only if
every cell succeeded. `--quick` sets JAXNORM_QUICK=1 and
writes nothing (`tests/test_notebooks.py` runs them that way). A notebook
that fails is left as it was; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import ipykernel.kernelspec

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

HERE = pathlib.Path(__file__).resolve().parent


def execute(path: pathlib.Path, *, quick: bool, timeout: float) -> nbformat.NotebookNode:
  """Runs the notebook at `path` and returns it with outputs; raises `CellExecutionError` on a failing cell."""
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
      nb,
      timeout=timeout,
      kernel_name="python3",
      resources={"metadata": {"path": str(path.parent)}},
      record_timing=False,  # no timestamps in the committed file: its diffs show only what changed
  )
  env = {**os.environ, "JAXNORM_QUICK": "1" if quick else "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  client.execute(env=env)
  return nb


def _resolve(name: str) -> pathlib.Path:
  """A path, or a notebook of notebooks/ named by a prefix such as ``01``."""
  path = pathlib.Path(name)
  if path.exists():
    return path.resolve()
  matches = sorted(HERE.glob(f"{name}*.ipynb"))
  if len(matches) != 1:
    raise SystemExit(f"execute.py: {name!r} names {len(matches)} notebooks in {HERE}")
  return matches[0]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="*", help="paths or prefixes (default: every notebooks/*.ipynb)")
  parser.add_argument("--quick", action="store_true", help="JAXNORM_QUICK=1 and do not write the result")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per cell (default: 1800)")
  args = parser.parse_args(argv)
  # The kernel runs this interpreter: its kernelspec goes first on JUPYTER_PATH, ahead of any `python3`
  # kernelspec of another Python installed for the user.
  with tempfile.TemporaryDirectory(prefix="jaxnorm-kernel-") as jupyter:
    ipykernel.kernelspec.write_kernel_spec(os.path.join(jupyter, "kernels", "python3"))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [jupyter, os.environ.get("JUPYTER_PATH")]))
    return _run_all(args)


def _run_all(args: argparse.Namespace) -> int:
  paths = [_resolve(n) for n in args.notebooks] or sorted(HERE.glob("*.ipynb"))
  failed = []
  for path in paths:
    start = time.perf_counter()
    print(f"{path.name}: running ({'quick' if args.quick else 'full'} mode) ...", flush=True)
    try:
      nb = execute(path, quick=args.quick, timeout=args.timeout)
    except (CellExecutionError, DeadKernelError, TimeoutError) as e:
      failed.append(path.name)
      print(f"{path.name}: FAILED, left unchanged\n{e}", file=sys.stderr, flush=True)
      continue
    seconds = time.perf_counter() - start
    if not args.quick:
      nbformat.write(nb, path)
    print(f"{path.name}: done in {seconds:.0f} s{'' if args.quick else ', written'}", flush=True)
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
