"""The README's examples run as written, and its commands are the ones CI runs."""

import json
import os
import pathlib
import re
import subprocess
import sys

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)

# One fresh interpreter runs every block, each in a namespace of its own, so a
# block that leans on a name or an import of an earlier one fails here as it
# would for a reader who pastes it alone. It starts with 8 host devices (as
# tests/test_multidevice.py does) so that the shard_map example splits its
# batch; XLA_FLAGS must be set before JAX starts, hence the subprocess.
RUNNER = """
import json, sys, traceback
import numpy as np
blocks = json.loads(sys.stdin.read())
report = []
for i, block in enumerate(blocks):
  namespace = {"__name__": "__main__"}
  try:
    exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
  except Exception:
    report.append({"error": traceback.format_exc()})
    continue
  values = {}
  for name in ("grads", "hess", "y_dot", "logits", "loss", "accuracy", "y2"):
    if name in namespace:
      a = np.asarray(namespace[name], np.float64)
      values[name] = {"shape": list(a.shape), "max_abs": float(np.max(np.abs(a))) if a.size else 0.0}
  report.append({"error": None, "values": values})
print(json.dumps(report))
"""


def _run_blocks():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  proc = subprocess.run(
      [sys.executable, "-c", RUNNER], input=json.dumps(BLOCKS), capture_output=True, text=True, timeout=300, env=env
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_python_example_runs_alone():
  assert len(BLOCKS) >= 5
  report = _run_blocks()
  failed = {i + 1: r["error"] for i, r in enumerate(report) if r["error"]}
  assert not failed, "README python blocks failed when run alone:\n" + "\n".join(f"block {i}:\n{e}" for i, e in failed.items())
  values = {}
  for r in report:
    values.update(r["values"])
  # The gradient examples must differentiate a loss that depends on the input
  # (the sum of a normalized output is identically 0, and so is its gradient).
  assert values["grads"]["shape"] == [32, 128] and values["grads"]["max_abs"] > 1e-3
  assert values["hess"]["shape"] == [128, 128] and values["hess"]["max_abs"] > 1e-3
  assert values["y_dot"]["shape"] == [32, 128] and values["y_dot"]["max_abs"] > 1e-3
  assert values["logits"]["shape"] in ([32, 10], [64, 10])
  assert 0.0 <= values["accuracy"]["max_abs"] <= 1.0


def test_readme_mentions_what_first_models_trip_on():
  assert "mutable=[\"batch_stats\"]" in README and "optax" in README and "from flax import nnx" in README
  assert "58.9%" in README and "96.2%" in README and "precise_batch_stats" in README
  # jax.hessian works through the custom VJP; only forward mode does not.
  assert not re.search(r"hessian[^\n]*\)? cannot pass", README)


def test_ci_runs_the_readme_test_command():
  script = (pathlib.Path(__file__).parents[1] / ".ci" / "run").read_text()
  assert "<!-- ci: test command -->" in script
  for marker in ("<!-- ci: main command -->", "<!-- ci: test command -->"):
    command = README.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command.startswith("pip install ")
