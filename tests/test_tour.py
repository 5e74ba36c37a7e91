"""`python -m jaxnorm tour`: the quick tour trains every model, prints the table and writes the PNG."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from jaxnorm import cli

NORMS = ("none", "batch norm", "batch renorm", "group norm", "layer norm", "weight norm")


def test_quick_tour_prints_the_table_and_writes_the_plot(tmp_path):
  # A subprocess: the tour runs as a user would run it, with JAX's float32 defaults, and
  # without naming the command; no --out, so the plot goes into ./jaxnorm-out/.
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "jaxnorm", "--quick"],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=tmp_path,
  )
  elapsed = time.perf_counter() - start
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout
  # What the run is comes first, before any training (the table).
  lines = out.splitlines()
  assert "scikit-learn's digits" in lines[0] and "1347 training, 450 test" in lines[0]
  assert "conv 3x3" in lines[2] and "30 steps of batch 16" in lines[3]
  assert re.search(r"normalization\s.*test error %\s.*final loss\s.*ms / step\s.*compile s", out)
  for norm in NORMS:
    row = re.search(rf"^\s*{norm}\s*\S\s*([\d.]+)\s*\S\s*([\d.]+)\s*\S\s*([\d.]+)\s*\S\s*([\d.]+)\s*$", out, re.M)
    assert row, (norm, out)
    error, loss, ms, compile_s = map(float, row.groups())
    assert 0 <= error <= 100 and loss > 0 and ms > 0 and compile_s > 0, row.group(0)
    assert norm in lines[1]
  png = tmp_path / "jaxnorm-out" / "tour.png"
  assert "wrote jaxnorm-out/tour.png" in out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["jaxnorm-out"]
  # The progress bars went to stderr, one per model, complete.
  assert proc.stderr.count("30/30") == len(NORMS), proc.stderr
  # Seconds, as its help says (generous: the test machine is shared).
  assert elapsed < 90, elapsed

  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = plt.imread(png)
  assert image.shape[0] > 300 and image.shape[1] > 600


def test_plot_draws_loss_and_error_on_log_scales(tmp_path, monkeypatch):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  from jaxnorm.cli import tour  # noqa: PLC0415

  runs = [
      tour.Run("none", [50, 100], [1.0, 0.5], [0.5, 0.9], 1.0, 1.0),
      tour.Run("batch norm", [50, 100], [0.3, 0.01], [0.98, 1.0], 1.0, 1.0),  # error 0: drawn at half an image
  ]
  axes = []
  original = plt.Figure.savefig
  monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: (axes.extend(fig.axes), original(fig, *a, **k)))
  tour.plot(runs, str(tmp_path / "t.png"), n_test=450, title="t")
  assert [ax.get_title() for ax in axes] == ["Training loss", "Test error"]
  assert [ax.get_yscale() for ax in axes] == ["log", "log"]
  assert min(axes[1].get_lines()[1].get_ydata()) == 0.5 / 450


def test_ctrl_c_ends_the_tour_with_one_line(monkeypatch, capsys):
  from jaxnorm.cli import tour  # noqa: PLC0415

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(tour, "train_one", interrupted)
  monkeypatch.setattr(tour, "load_digits", lambda seed: ([0] * 1347, None, [0] * 450, None))
  assert cli.main(["--quick", "--no-progress", "--out", "none"]) == 130
  captured = capsys.readouterr()
  assert captured.err.strip() == "jaxnorm tour: interrupted"
  # What the run is was printed before the interruption.
  assert "scikit-learn's digits" in captured.out


def test_tour_help_explains_it(capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(["tour", "--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  for phrase in ("digits", "batch renorm", "weight norm", "--quick", "--out", "--norms", "PNG", "jaxnorm-out"):
    assert phrase in out, phrase


def test_tour_is_listed_and_rejects_unknown_norms(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert "tour" in capsys.readouterr().out
  assert cli.main(["tour", "--norms", "batch norm,batchnorm"]) == 2
  assert "unknown normalization(s) ['batchnorm']" in capsys.readouterr().err
  assert cli.main(["tour", "--steps", "1"]) == 2
