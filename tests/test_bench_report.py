"""jaxnorm.analysis.bench_records and load_bench_report, on a real (one-case, quick) `jaxnorm.cli.bench` report.

The records must restate the report: every implementation and mode present,
the normalized measures equal to the quotients of the raw ones computed here,
and the time ratios equal to the report's own `ratios` (jaxnorm / other).
"""

from __future__ import annotations

import io
import json
import math

import pytest

from jaxnorm.cli import bench
from jaxnorm.analysis import bench_records, load_bench_report
from jaxnorm.analysis._bench_report import BENCH_SCHEMA



@pytest.fixture(scope="module")
def report():
  return bench.run(quick=True, patterns="rms_norm/f32", repeats=1, warmup=0, progress=io.StringIO())


def test_records_restate_the_report(report, tmp_path):
  path = tmp_path / "b.json"
  path.write_text(json.dumps(report))
  records = bench_records(load_bench_report(path))
  (case,) = report["cases"]
  impls = list(report["implementations"])
  assert [(r["implementation"], r["mode"]) for r in records] == [(i, m) for i in impls for m in report["modes"]]
  x_bytes = math.prod(case["shape"]) * 4
  for r in records:
    res = case["results"][r["implementation"]]
    if not res["available"]:
      assert r["median_ms"] is None and r["time_over_jaxnorm"] is None
      continue
    ms = res[r["mode"]]["ms"]["median"]
    floor = case["floor"][r["mode"]]
    assert r["median_ms"] == ms
    assert math.isclose(r["time_over_floor"], ms / floor["ms"], rel_tol=1e-12)
    assert math.isclose(r["residual_over_x"], res["residual_bytes"] / x_bytes, rel_tol=1e-12)
    if res[r["mode"]]["bytes_accessed"] is not None:
      assert math.isclose(r["accessed_over_floor"], res[r["mode"]]["bytes_accessed"] / floor["bytes"], rel_tol=1e-12)
    ratio = case["ratios"][r["mode"]].get(f"jaxnorm/{r['implementation']}")
    if r["implementation"] == "jaxnorm":
      assert r["time_over_jaxnorm"] == 1.0
    elif ratio:
      assert math.isclose(r["time_over_jaxnorm"], 1 / ratio, rel_tol=1e-12)
  # The design's promise, visible in the records: jaxnorm keeps at most x plus per-row statistics.
  jn = next(r for r in records if r["implementation"] == "jaxnorm")
  assert jn["residual_over_x"] < 1.1


def test_schema(tmp_path):
  assert BENCH_SCHEMA == bench.SCHEMA
  path = tmp_path / "other.json"
  path.write_text(json.dumps({"schema": "something-else/1", "cases": []}))
  with pytest.raises(ValueError, match="not a jaxnorm-bench/1 report"):
    load_bench_report(path)
