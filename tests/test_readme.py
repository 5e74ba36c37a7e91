"""The README's examples run as written, and its commands are the ones CI runs."""

import pathlib
import re

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_python_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert len(blocks) >= 2
  namespace: dict = {}
  for block in blocks:  # later blocks reuse names from earlier ones, as a reader would
    exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["hess"].shape == (128, 128)
  assert namespace["logits"].shape == (32, 10)


def test_ci_runs_the_readme_test_command():
  script = (pathlib.Path(__file__).parents[1] / ".ci" / "run").read_text()
  assert "<!-- ci: test command -->" in script
  for marker in ("<!-- ci: main command -->", "<!-- ci: test command -->"):
    command = README.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command.startswith("pip install ")
