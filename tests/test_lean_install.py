"""The library installs and imports with its runtime dependencies only.

`pip install jaxnorm` brings jax, jaxlib, flax and numpy; the tour, the
benchmark, the notebooks and the tests have extras of their own. A fresh
interpreter (a subprocess: this one has imported everything already) imports
the library and lists `sys.modules`: nothing from the extras may appear that
flax itself does not import (flax imports rich, and flax.nnx optax, so the
check is against what flax alone loads).
"""

import json
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).parents[1]
EXTRAS_ONLY = ("matplotlib", "sklearn", "rich", "optax", "chex", "torch", "scipy", "pandas", "IPython")

PROBE = f"""
import json, sys

def loaded():
  return {{m.split(".")[0] for m in sys.modules}} & set({EXTRAS_ONLY!r})

import jaxnorm
core = loaded()
import flax.linen, flax.nnx
by_flax = loaded()
import jaxnorm.linen, jaxnorm.nnx, jaxnorm.interop, jaxnorm.analysis
print(json.dumps({{"core": sorted(core), "by_flax": sorted(by_flax), "all": sorted(loaded())}}))
"""


def _probe():
  proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_library_import_needs_no_extra():
  seen = _probe()
  assert seen["core"] == [], f"`import jaxnorm` loaded {seen['core']}"
  added = sorted(set(seen["all"]) - set(seen["by_flax"]))
  assert added == [], f"jaxnorm.linen/nnx/interop/analysis loaded {added} beyond what flax itself imports"


def test_runtime_dependencies_are_the_lean_list():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = sorted(d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"])
  assert names == ["flax", "jax", "jaxlib", "numpy"]
  extras = project["optional-dependencies"]
  assert {"tour", "notebooks", "test", "compilers"} <= set(extras)
  # The test extra covers every other extra (the suite runs the tour, the
  # notebooks and the benchmarks), except the compilers and the docs: the
  # accelerator tests and the docs build skip without them, and the README's
  # test command installs all three.
  assert "docs" in extras
  test = set(extras["test"])
  for name, deps in extras.items():
    if name not in ("compilers", "docs"):
      assert set(deps) <= test, f"extra {name!r} has {sorted(set(deps) - test)} missing from 'test'"
  assert not set(extras["compilers"]) & test
  readme = (ROOT / "README.md").read_text()
  test_command = readme.split("<!-- ci: test command -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
  installed = re.fullmatch(r'pip install "\.\[([a-z,]+)\]" && python -m pytest.*', test_command)
  assert installed, test_command
  assert {"test", "compilers", "docs"} <= set(installed.group(1).split(","))
  assert "torch==2.13.0" in test
  assert not any(d.startswith("torch") for d in extras["notebooks"])
