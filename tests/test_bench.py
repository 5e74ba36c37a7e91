"""`jaxnorm bench`: the quick run's JSON schema and plot; the deterministic measures against known truths.

Timings are noise, so the subprocess test checks only structure and
arithmetic (every case and implementation present, ratios finite and equal to
the quotients of the reported medians, floors equal to bytes / bandwidth).
What does not depend on timing is checked against values known independently:
residuals of functions whose VJP residuals are fixed by calculus, the traffic
of an elementwise program, and the residuals of jaxnorm against the bound the
design promises (the input plus per-group statistics) and against plain
autodiff of the textbook formula.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import cli
from jaxnorm.cli import bench


def _close(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=1e-9)


def test_quick_run_writes_complete_json_and_png(tmp_path):
  out, png = tmp_path / "b.json", tmp_path / "b.png"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxnorm", "bench", "--quick", "--out", str(out), "--plot", str(png)],
      capture_output=True,
      text=True,
      timeout=180,
      cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "DISAGREES" not in proc.stdout
  for column in ("jn/flax", "jn/torch", "jn/floor", "residual/|x|", "copy GB/s", "Agreement"):
    assert column in proc.stdout
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  report = json.loads(out.read_text())
  assert report["schema"] == bench.SCHEMA
  assert "CPUs" in report["header"][1] and "CPUs" in report["machine"] and report["date"][:2] == "20"
  assert list(report["implementations"]) == list(bench.IMPLEMENTATIONS)
  settings = report["settings"]
  assert settings["quick"] and settings["repeats"] == bench.QUICK.repeats
  want_names = [c.name for c in bench.cases(bench.QUICK)]
  assert [c["name"] for c in report["cases"]] == want_names
  assert {c["op"] for c in report["cases"]} == {"layer_norm", "rms_norm", "batch_norm", "group_norm"}
  assert {c["dtype"] for c in report["cases"] if c["op"] == "layer_norm"} == {"float32", "bfloat16"}

  for case in report["cases"]:
    itemsize = np.dtype(jnp.dtype(case["dtype"])).itemsize
    assert case["x_bytes"] == math.prod(case["shape"]) * itemsize
    bandwidth = case["copy"]["bandwidth_GBps"] * 1e9
    assert bandwidth > 0 and _close(bandwidth, 2 * case["x_bytes"] / (case["copy"]["ms"]["median"] * 1e-3))
    param_bytes = case["shape"][-1] * itemsize * (1 if case["op"] == "rms_norm" else 2)
    floors = case["floor"]
    assert floors["fwd"]["bytes"] == 2 * case["x_bytes"] + param_bytes
    assert floors["fwd_bwd"]["bytes"] == 3 * case["x_bytes"] + 2 * param_bytes
    for mode in bench.MODES:
      assert _close(floors[mode]["ms"], 1e3 * floors[mode]["bytes"] / bandwidth)

    results = case["results"]
    assert set(results) == set(bench.IMPLEMENTATIONS)
    for impl, res in results.items():
      if not res["available"]:
        # Only torch may be missing, and then with the reason.
        assert impl == "torch" and "torch" in res["note"]
        continue
      assert res["residual_bytes"] > 0
      # Every implementation computes the same y and dx as jaxnorm (flax, torch and the
      # textbook formula are independent references), so the timings compare like with like.
      diff = res["diff_vs_jaxnorm"]
      assert diff["agrees"] and max(diff["y"], diff["dx"]) <= diff["tol"], (case["name"], impl, diff)
      if impl == "jaxnorm":
        assert diff["y"] == diff["dx"] == 0.0
      for mode in bench.MODES:
        ms = res[mode]["ms"]
        assert 0 < ms["min"] <= ms["q1"] <= ms["median"] <= ms["q3"] <= ms["max"]
        assert ms["n"] == bench.QUICK.repeats
        if impl in bench.JAX_IMPLEMENTATIONS:
          assert res[mode]["bytes_accessed"] > 0 and res[mode]["temp_bytes"] >= 0
          assert res[mode]["compile_s"] > 0

    for mode in bench.MODES:
      jn = results["jaxnorm"][mode]["ms"]["median"]
      ratios = case["ratios"][mode]
      assert set(ratios) == {f"jaxnorm/{b}" for b in bench.RATIO_BASES}
      assert _close(ratios["jaxnorm/floor"], jn / floors[mode]["ms"])
      for base in bench.RATIO_BASES[:-1]:
        if not results[base]["available"]:
          assert ratios[f"jaxnorm/{base}"] is None
          continue
        ratio = ratios[f"jaxnorm/{base}"]
        assert math.isfinite(ratio) and ratio > 0
        assert _close(ratio, jn / results[base][mode]["ms"]["median"])


def test_help_and_bad_case_pattern(capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(["bench", "--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  for word in ("--quick", "--cases", "--repeats", "--out", "floor", "use_fast_variance=False", "torch"):
    assert word in out
  with pytest.raises(ValueError, match="matches no case"):
    bench.select(bench.cases(bench.FULL), "no_such_norm")


def test_case_selection():
  full = bench.cases(bench.FULL)
  assert len(full) == 12
  assert [c.name for c in bench.select(full, "layer_norm/bf16")] == [
      "layer_norm/bf16/8192x1024",
      "layer_norm/bf16/4096x4096",
  ]
  picked = bench.select(full, "batch_norm,*/16x32x32x256")
  assert [c.name for c in picked] == [
      "batch_norm/f32/64x32x32x128",
      "batch_norm/f32/16x32x32x256",
      "group_norm/f32/16x32x32x256",
  ]


def test_residual_bytes_of_known_vjps():
  x = jnp.ones((32, 16), jnp.float32)
  # d(x*x) = 2 x dx keeps x once; d sin x = cos x dx keeps cos x; x + 1 keeps nothing.
  assert bench.residual_bytes(lambda x: x * x, x) == x.nbytes
  assert bench.residual_bytes(jnp.sin, x) == x.nbytes
  assert bench.residual_bytes(lambda x: x + 1.0, x) == 0
  # d(sin(x) * y) = y cos(x) dx + sin(x) dy keeps y, cos(x) and sin(x).
  assert bench.residual_bytes(lambda x, y: jnp.sin(x) * y, x, x) == 3 * x.nbytes


def test_bytes_accessed_of_an_elementwise_program():
  x = jnp.ones((256, 256), jnp.float32)
  prog = bench.compile_program(lambda x, a: x * a, x, jnp.float32(2.0))
  # Reads x (and a scalar), writes the product: about 2 |x| bytes.
  assert 2 * x.nbytes <= prog.bytes_accessed <= 2 * x.nbytes + 64
  assert prog.temp_bytes is not None and prog.temp_bytes >= 0
  assert np.allclose(prog.call(x, jnp.float32(2.0)), 2.0)


@pytest.mark.parametrize(
    "op, shape, groups",
    [
        ("layer_norm", (64, 256), 64),  # statistics per row
        ("batch_norm", (8, 4, 4, 64), 64),  # statistics per channel
    ],
)
def test_jaxnorm_residuals_are_input_plus_statistics(op, shape, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  c = shape[-1]
  scale, bias = jnp.ones(c, jnp.float32), jnp.zeros(c, jnp.float32)
  applies = bench.jax_applies(op, x)
  ours = bench.residual_bytes(applies["jaxnorm"], x, scale, bias)
  plain = bench.residual_bytes(applies["plain_jnp"], x, scale, bias)
  # The design: the input (or the normalized input) plus per-group statistics.
  # Allowed: x, the parameters, and a handful (8) of statistics per group, even in float64.
  bound = x.nbytes + scale.nbytes + bias.nbytes + 8 * groups * 8
  assert ours <= bound, (ours, bound)
  # Plain autodiff of the textbook formula keeps at least two full-size arrays.
  assert plain >= 2 * x.nbytes and plain > ours


def test_residuals_of_the_public_function_match_the_bench_apply():
  # The bench measures the public function itself, not a private kernel.
  x = jnp.ones((16, 32), jnp.float32)
  s = jnp.ones(32, jnp.float32)
  assert bench.residual_bytes(bench.jax_applies("rms_norm", x)["jaxnorm"], x, s) == bench.residual_bytes(
      jaxnorm.rms_norm, x, s
  )
  assert jax.eval_shape(jaxnorm.rms_norm, x, s).dtype == jnp.float32


def test_report_fits_a_100_column_terminal(monkeypatch):
  # The committed full run: 12 cases, five implementations; its tables are split rather than wrapped.
  import pathlib

  report = json.loads((pathlib.Path(__file__).parent.parent / "benchmarks" / "latest.json").read_text())
  monkeypatch.setenv("COLUMNS", "100")
  text = bench.format_report(report)
  assert max(len(line) for line in text.splitlines()) <= 100
  for column in ("jn/flax", "jn/torch", "jn/floor", "torch", "floor", "residual/|x|", "copy GB/s"):
    assert column in text
  # Wide terminals get one time table: the ratios beside the times they come from.
  wide = bench.format_report(report, width=250)
  assert any("jn/flax" in line and "flax-x" in line and "floor" in line for line in wide.splitlines())


def test_plot_titles_in_words(tmp_path, monkeypatch):
  import pathlib

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  report = json.loads((pathlib.Path(__file__).parent.parent / "benchmarks" / "latest.json").read_text())
  titles = []
  monkeypatch.setattr(plt.Axes, "set_title", lambda self, t, *a, **k: titles.append(t))
  bench.plot(report, str(tmp_path / "p.png"))
  assert titles == ["forward", "forward + backward"]
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_default_output_goes_into_a_folder(tmp_path):
  # No --out: the files go into ./jaxnorm-out/, created, and the run says so.
  proc = subprocess.run(
      [sys.executable, "-m", "jaxnorm", "bench", "--quick", "--cases", "rms_norm/f32", "--plot", "none"],
      capture_output=True,
      text=True,
      timeout=180,
      cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["jaxnorm-out"]
  assert (tmp_path / "jaxnorm-out" / "bench.json").is_file()
  assert "wrote jaxnorm-out/bench.json" in proc.stdout


@pytest.mark.parametrize("out", ["/proc/jaxnorm-bench.json", "/proc/nope/bench"])
def test_an_unwritable_output_fails_at_once_in_one_line(out, capsys, monkeypatch):
  from jaxnorm.cli import bench as bench_module

  ran = []
  monkeypatch.setattr(bench_module, "run", lambda **k: ran.append(k))
  assert cli.main(["bench", "--quick", "--out", out]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jaxnorm bench: error: cannot write") and not ran


def test_without_matplotlib_the_report_is_written_and_the_plot_skipped(tmp_path, capsys, monkeypatch):
  import importlib.util

  from jaxnorm.cli import bench as bench_module

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
  plotted = []
  monkeypatch.setattr(bench_module, "plot", lambda *a: plotted.append(a))
  out = tmp_path / "b.json"
  assert cli.main(["bench", "--quick", "--cases", "rms_norm/f32", "--repeats", "1", "--out", str(out)]) == 0
  assert out.exists() and not plotted
  assert "pip install 'jaxnorm[bench]'" in capsys.readouterr().err
