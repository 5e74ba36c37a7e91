"""`python -m jaxnorm tour`: the quick tour trains every model, prints the table and writes the PNG."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from jaxnorm import cli

NORMS = ("none", "batch norm", "batch renorm", "group norm", "layer norm", "weight norm")


def test_quick_tour_prints_the_table_and_writes_the_plot(tmp_path):
  png = tmp_path / "tour.png"
  # A subprocess: the tour runs as a user would run it, with JAX's float32 defaults.
  proc = subprocess.run(
      [sys.executable, "-m", "jaxnorm", "tour", "--quick", "--out", str(png)],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout
  assert "scikit-learn's digits" in out and "1347 training, 450 test" in out
  assert re.search(r"normalization\s.*test accuracy\s.*final loss\s.*ms / step\s.*compile s", out)
  accuracies = {}
  for norm in NORMS:
    row = re.search(rf"^\s*{norm}\s*\S\s*([\d.]+)\s*\S\s*([\d.]+)\s*\S\s*([\d.]+)\s*\S\s*([\d.]+)\s*$", out, re.M)
    assert row, (norm, out)
    accuracy, loss, ms, compile_s = map(float, row.groups())
    assert 0 <= accuracy <= 1 and loss > 0 and ms > 0 and compile_s > 0, row.group(0)
    accuracies[norm] = accuracy
  # 40 steps are enough to learn something: far above chance (0.1) for the best models.
  assert max(accuracies.values()) > 0.5, accuracies
  assert f"wrote {png}" in out
  # The progress bars went to stderr, one per model, complete.
  assert proc.stderr.count("40/40") == len(NORMS), proc.stderr

  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = plt.imread(png)
  assert image.shape[0] > 300 and image.shape[1] > 600


def test_tour_help_explains_it(capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(["tour", "--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  for phrase in ("digits", "batch renorm", "weight norm", "--quick", "--out", "--norms", "PNG"):
    assert phrase in out, phrase


def test_tour_is_listed_and_rejects_unknown_norms(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert "tour" in capsys.readouterr().out
  assert cli.main(["tour", "--norms", "batch norm,batchnorm"]) == 2
  assert "unknown normalization(s) ['batchnorm']" in capsys.readouterr().err
  assert cli.main(["tour", "--steps", "1"]) == 2
