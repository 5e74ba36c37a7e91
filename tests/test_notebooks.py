"""Every notebook in notebooks/ runs top to bottom in quick mode, and is committed executed.

Each notebook (a glob: notebooks added later are picked up) is copied to a
temporary folder and run there with nbclient in a fresh ``python3`` kernel of
this interpreter (a kernelspec written for `sys.executable` and put first on
JUPYTER_PATH, so that a ``python3`` kernelspec of another Python installed
for the user cannot be picked), with ``JAXNORM_QUICK=1`` and a time limit for
the whole notebook; any cell that raises fails the test. The committed file, with its
full-mode outputs, is never rewritten (``python notebooks/execute.py``
refreshes those).

The committed files are checked too: the first code cell reads
``JAXNORM_QUICK`` (the convention every notebook follows), every code cell
was executed, in order, in one run, and no output is an error.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import time

import ipykernel.kernelspec  # the kernel the notebooks run in: a missing install fails here, never skips
import matplotlib  # noqa: F401
import nbclient
import nbclient.exceptions
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Quick mode takes seconds (kernel start and JAX import included); the limit leaves room for a loaded machine.
TIMEOUT_S = 240


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


@pytest.fixture(scope="module")
def kernel_of_this_interpreter(tmp_path_factory):
  """A JUPYTER_PATH entry whose ``python3`` kernelspec runs ipykernel in `sys.executable`."""
  root = tmp_path_factory.mktemp("jupyter")
  ipykernel.kernelspec.write_kernel_spec(root / "kernels" / "python3")
  return root


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_and_follows_the_quick_mode_convention(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  cells = _code_cells(nb)
  assert cells, f"{path.name} has no code"
  assert "JAXNORM_QUICK" in cells[0].source, f"{path.name}: the first code cell must read JAXNORM_QUICK"
  counts = [c.execution_count for c in cells]
  assert counts == list(range(1, len(cells) + 1)), (
      f"{path.name} is not committed executed top to bottom in one run (execution counts {counts}); "
      "run `python notebooks/execute.py` first"
  )
  errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
  assert not errors, f"{path.name} is committed with an error output: {errors[0].get('ename')}"
  assert all(c.outputs for c in cells[-1:]), f"{path.name}: the last cell (the conclusions) has no output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, tmp_path, kernel_of_this_interpreter, monkeypatch):
  # Read by the kernel-spec lookup in this process, when the client creates its kernel manager.
  paths = [str(kernel_of_this_interpreter), os.environ.get("JUPYTER_PATH")]
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, paths)))
  copy = tmp_path / path.name
  shutil.copyfile(path, copy)
  nb = nbformat.read(copy, as_version=4)
  client = nbclient.NotebookClient(
      nb,
      timeout=TIMEOUT_S,
      kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}},
      record_timing=False,
  )
  env = {**os.environ, "JAXNORM_QUICK": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  # The suite's settings (conftest.py), but for dtype promotion: the notebooks
  # train with optax, whose Adam mixes its int32 step count with Python floats
  # implicitly, which strict promotion refuses inside optax.
  env["JAX_NUMPY_DTYPE_PROMOTION"] = "standard"
  start = time.monotonic()
  try:
    asyncio.run(asyncio.wait_for(client.async_execute(env=env), TIMEOUT_S))
  except asyncio.TimeoutError:
    pytest.fail(f"{path.name} did not finish within {TIMEOUT_S} s in quick mode")
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name} failed in quick mode:\n{e}")
  seconds = time.monotonic() - start
  cells = _code_cells(nb)
  assert all(c.execution_count is not None for c in cells), f"{path.name}: not every cell ran"
  assert not any(o.output_type == "error" for c in cells for o in c.outputs)
  print(f"{path.name}: {seconds:.1f} s in quick mode")
