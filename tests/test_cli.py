"""The command line: `python -m jaxnorm check --quick` passes and reports every op; help and dispatch work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxnorm import cli

OPS = ("moments", "normalize", "batch_norm", "layer_norm", "rms_norm")


def test_quick_check_passes_and_reports_every_op():
  # A subprocess, because the check enables float64 process-wide.
  proc = subprocess.run(
      [sys.executable, "-m", "jaxnorm", "check", "--quick"],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout
  for op in OPS:
    assert op in out
  for baseline in ("BatchNorm", "LayerNorm()", "RMSNorm()"):
    assert baseline in out
  assert "mean 1e4" in out and "FAIL" not in out
  assert "jax " in out.splitlines()[2] and "CPUs" in out
  assert "[1/" in proc.stderr and "timing layer_norm" in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"]])
def test_help(argv, capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(argv)
  assert exc.value.code == 0
  out = capsys.readouterr().out
  assert "check" in out and "usage: jaxnorm" in out


def test_no_command_runs_the_tour(monkeypatch):
  seen = []

  def fake_tour(args):
    seen.append(args)
    return 7

  monkeypatch.setitem(cli._COMMANDS, "tour", (cli._COMMANDS["tour"][0], fake_tour))
  assert cli.main([]) == 7
  assert seen[0].command == "tour" and not seen[0].quick


def test_failed_accuracy_row_fails_the_report():
  from jaxnorm.cli import selfcheck

  def row(name, rel, counts=True, wrong_dtype=""):
    return selfcheck.AccuracyRow(name, (2, 3), rel, rel, rel, 1e-4, counts, wrong_dtype)

  rows = [row("layer_norm", 1e-7), row("flax contrast", 1.0, counts=False)]
  ok = selfcheck.Report(["header"], rows, [], 1.0)
  assert ok.passed and "All 1 accuracy checks passed" in selfcheck.format_report(ok)
  for bad_row in (row("rms_norm", 1e-3), row("rms_norm", 0.0, wrong_dtype="got float64")):
    bad = selfcheck.Report(["header"], [row("layer_norm", 1e-7), bad_row], [], 1.0)
    assert not bad.passed and "FAILED: rms_norm" in selfcheck.format_report(bad)


HELP_WITHOUT_JAX = """
import runpy, sys
sys.argv = ["jaxnorm", *sys.argv[1:]]
try:
  runpy.run_module("jaxnorm", run_name="__main__")
except SystemExit:
  pass
print("loaded:", sorted(m for m in ("jax", "flax", "numpy") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["tour", "--help"], ["bench", "--help"], ["--quick", "--help"]])
def test_help_does_not_import_jax(argv):
  # `python -m jaxnorm --help` as a user runs it: the package and the parser only, no JAX (seconds to load).
  proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_JAX, *argv], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert "usage: jaxnorm" in proc.stdout
  assert proc.stdout.strip().splitlines()[-1] == "loaded: []", proc.stdout


def test_default_command_takes_its_options_without_its_name(monkeypatch):
  seen = []
  monkeypatch.setitem(cli._COMMANDS, "tour", (cli._COMMANDS["tour"][0], lambda args: seen.append(args) or 0))
  assert cli.main(["--quick", "--steps", "10"]) == 0
  assert seen[0].command == "tour" and seen[0].quick and seen[0].steps == 10


def test_ctrl_c_ends_with_one_line(monkeypatch, capsys):
  def interrupted(args):
    raise KeyboardInterrupt

  monkeypatch.setitem(cli._COMMANDS, "tour", (cli._COMMANDS["tour"][0], interrupted))
  assert cli.main(["--quick"]) == 130
  assert capsys.readouterr().err.strip() == "jaxnorm tour: interrupted"


def test_package_root_holds_the_library_only():
  # The command-line programs live in jaxnorm/cli/, not beside the library's modules.
  import pathlib

  import jaxnorm

  root = pathlib.Path(jaxnorm.__file__).parent
  programs = {"tour.py", "bench.py", "bench_targets.py", "selfcheck.py", "_timing.py", "cli.py"}
  assert not programs & {p.name for p in root.glob("*.py")}
  assert (root / "cli" / "gpu_targets" / "h100_sxm.txtpb").is_file()


def test_quick_blocks_agree_with_flax_and_write_json(tmp_path):
  """`jaxnorm blocks --quick`: every block's first step matches flax's loss and gradients; the JSON holds each figure."""
  out = tmp_path / "blocks.json"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxnorm", "blocks", "--quick", "--out", str(out)],
      capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dit (vs flax)" in proc.stdout and "add_rms_norm (vs one_vjp)" in proc.stdout
  report = json.loads(out.read_text())
  assert [b["block"] for b in report["blocks"]] == ["dit", "gemma", "add_rms_norm"]
  for block in report["blocks"]:
    assert block["loss_diff"] <= 1e-5 * max(1.0, abs(block["loss"])), block
    assert block["grad_rel_diff"] < 1e-4, block
    for figures in block["results"].values():
      assert figures["ms"] > 0 and figures["temp_bytes"] is not None
