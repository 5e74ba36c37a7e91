"""The README's examples run as written, and its commands are the ones CI runs.

The README is the front door: one example, and links into the guides
(`docs/guides/*.md`), which carry the rest of the examples. Every ```python
block of the README and of the guides runs here, each on its own.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
GUIDES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "docs" / "guides").glob("*.md"))}
PAGES = {"README.md": README, **GUIDES}
BLOCKS = [(page, i, block) for page, text in PAGES.items()
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S))]

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
for page, i, block in blocks:
  namespace = {"__name__": "__main__"}
  try:
    exec(compile(block, f"{page} python block {i + 1}", "exec"), namespace)
  except Exception:
    report.append({"page": page, "block": i + 1, "error": traceback.format_exc()})
    continue
  values = {}
  for name in ("grads", "hess", "y_dot", "logits", "loss", "accuracy", "y2"):
    if name in namespace:
      a = np.asarray(namespace[name], np.float64)
      values[name] = {"shape": list(a.shape), "max_abs": float(np.max(np.abs(a))) if a.size else 0.0}
  report.append({"page": page, "block": i + 1, "error": None, "values": values})
print(json.dumps(report))
"""


def _run_blocks():
  env = dict(os.environ)
  # Under the suite's settings (conftest.py), but for dtype promotion: the
  # training examples use optax, whose Adam mixes its int32 step count with
  # Python floats implicitly, which strict promotion refuses inside optax.
  env["JAX_NUMPY_DTYPE_PROMOTION"] = "standard"
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  proc = subprocess.run(
      [sys.executable, "-c", RUNNER], input=json.dumps(BLOCKS), capture_output=True, text=True, timeout=300, env=env
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_python_example_runs_alone():
  pages_with_blocks = {page for page, _, _ in BLOCKS}
  # The README keeps its own example; the guides carry the others.
  assert "README.md" in pages_with_blocks
  assert {"docs/guides/getting_started.md", "docs/guides/flax.md", "docs/guides/models.md",
          "docs/guides/devices.md", "docs/guides/performance.md"} <= pages_with_blocks
  assert len(BLOCKS) >= 8
  report = _run_blocks()
  assert len(report) == len(BLOCKS)
  failed = {f"{r['page']} block {r['block']}": r["error"] for r in report if r["error"]}
  assert not failed, "python blocks failed when run alone:\n" + "\n".join(f"{k}:\n{e}" for k, e in failed.items())
  values = {}
  for r in report:
    values.setdefault(r["page"], {}).update(r["values"])
  # The README's own example builds a flax model and applies it.
  assert values["README.md"]["logits"]["shape"] == [32, 10]
  # The gradient examples must differentiate a loss that depends on the input
  # (the sum of a normalized output is identically 0, and so is its gradient).
  functional = values["docs/guides/getting_started.md"]
  assert functional["grads"]["shape"] == [32, 128] and functional["grads"]["max_abs"] > 1e-3
  assert functional["hess"]["shape"] == [128, 128] and functional["hess"]["max_abs"] > 1e-3
  assert functional["y_dot"]["shape"] == [32, 128] and functional["y_dot"]["max_abs"] > 1e-3
  flax_guide = values["docs/guides/flax.md"]
  assert flax_guide["logits"]["shape"] in ([32, 10], [64, 10])
  assert 0.0 <= flax_guide["accuracy"]["max_abs"] <= 1.0
  assert values["docs/guides/devices.md"]["y2"]["shape"] == [64, 128]


def test_readme_mentions_what_first_models_trip_on():
  assert "mutable=[\"batch_stats\"]" in README and "optax" in README and "from flax import nnx" in README
  assert "58.9%" in README and "96.2%" in README and "precise_batch_stats" in README
  # The full training step (optax, precise_batch_stats) and the nnx model are
  # in the flax guide, which the README links.
  flax_guide = GUIDES["docs/guides/flax.md"]
  assert "docs/guides/flax.md" in README
  assert "mutable=[\"batch_stats\"]" in flax_guide and "optax.adam" in flax_guide and "from flax import nnx" in flax_guide
  assert "58.9%" in flax_guide and "96.2%" in flax_guide and "jnn.precise_batch_stats(" in flax_guide
  # jax.hessian works through the custom VJP; only forward mode does not.
  for page, text in PAGES.items():
    assert not re.search(r"hessian[^\n]*\)? cannot pass", text), page


def test_readme_links_resolve():
  # The README links into the docs by relative paths, so that they work on
  # GitHub without a hosted site: each must name a file or folder of the repository.
  links = [link.split("#", 1)[0] for link in re.findall(r"\]\(([^)\s]+)\)", README)
           if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
  assert links
  missing = [link for link in links if not (ROOT / link).exists()]
  assert not missing, f"README links to missing paths: {missing}"
  for guide in GUIDES:
    assert guide in README, f"README does not link {guide}"


def test_ci_runs_the_readme_test_command():
  script = (ROOT / ".ci" / "run").read_text()
  assert "<!-- ci: test command -->" in script
  for marker in ("<!-- ci: main command -->", "<!-- ci: test command -->"):
    command = README.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command.startswith("pip install ")
