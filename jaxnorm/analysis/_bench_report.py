r"""The report of `jaxnorm.cli.bench` (its JSON) as flat records, one per case, implementation and mode.

`jaxnorm.cli.bench` nests its measures as ``cases[i].results[implementation][mode]``
with the floor and the copy bandwidth beside them. For plotting and tables a
flat list is handier; `bench_records` also derives the normalized measures:

.. math::
    \text{time\_over\_jaxnorm} = \frac{t_\text{impl}}{t_\text{jaxnorm}}, \quad
    \text{time\_over\_floor} = \frac{t_\text{impl}}{t_\text{floor}}, \quad
    \text{accessed\_over\_floor} = \frac{\text{bytes accessed}}{\text{floor bytes}}, \quad
    \text{residual\_over\_x} = \frac{\text{residual bytes}}{|x|},

`t` the median time of the mode, the floor the bytes the program must move
over the measured copy bandwidth (see `jaxnorm.cli.bench`), and the residual bytes
what the implementation keeps from the forward for the backward pass. A
measure the report lacks (torch has no XLA cost analysis; an implementation
that was skipped) is None.
"""

from __future__ import annotations

import json
import os
from typing import Any

BENCH_SCHEMA = "jaxnorm-bench/1"


def load_bench_report(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a `jaxnorm bench --out` JSON file and checks its schema.

  Args:
    path: the JSON file.

  Returns:
    the report as a dict (``header``, ``settings``, ``cases``, ...).

  Example:
    >>> import json, tempfile, os
    >>> from jaxnorm.analysis import load_bench_report
    >>> path = os.path.join(tempfile.mkdtemp(), "b.json")
    >>> with open(path, "w") as f:
    ...   json.dump({"schema": "jaxnorm-bench/1", "cases": []}, f)
    >>> load_bench_report(path)["cases"]
    []
  """
  with open(path) as f:
    report = json.load(f)
  if not isinstance(report, dict) or report.get("schema") != BENCH_SCHEMA:
    found = report.get("schema") if isinstance(report, dict) else type(report).__name__
    raise ValueError(f"`path` {os.fspath(path)!r} is not a {BENCH_SCHEMA} report (schema: {found!r}).")
  return report


def _div(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None or not b > 0 else a / b


def bench_records(report: dict[str, Any]) -> list[dict[str, Any]]:
  """One flat record per case, implementation and mode of a `jaxnorm.cli.bench` report.

  Args:
    report: the dict `jaxnorm.cli.bench.run` returns or `load_bench_report` reads.

  Returns:
    a list of dicts with the keys ``case, op, dtype, shape, x_bytes,
    implementation, available, mode, median_ms, q1_ms, q3_ms, floor_ms,
    time_over_jaxnorm, time_over_floor, bytes_accessed, floor_bytes,
    accessed_over_floor, temp_bytes, residual_bytes, residual_over_x``
    (``pandas.DataFrame(records)`` makes a table of it). Implementations in the
    report's order, modes ``fwd`` then ``fwd_bwd``.

  Example:
    >>> from jaxnorm.analysis import bench_records
    >>> ms = {"median": 2.0, "q1": 1.9, "q3": 2.1}
    >>> res = {"available": True, "residual_bytes": 80, "fwd": {"ms": ms, "bytes_accessed": 300.0}}
    >>> case = {"name": "c", "op": "layer_norm", "dtype": "float32", "shape": [4, 4], "x_bytes": 64,
    ...         "floor": {"fwd": {"ms": 1.0, "bytes": 150}}, "results": {"jaxnorm": res}}
    >>> r = bench_records({"modes": ["fwd"], "implementations": {"jaxnorm": "jaxnorm"}, "cases": [case]})[0]
    >>> r["time_over_floor"], r["accessed_over_floor"], r["residual_over_x"]
    (2.0, 2.0, 1.25)
  """
  modes = report.get("modes", ["fwd", "fwd_bwd"])
  records = []
  for case in report["cases"]:
    results = case["results"]
    impls = [i for i in report.get("implementations", results) if i in results]
    for impl in impls:
      res = results[impl]
      for mode in modes:
        m = res.get(mode) or {}
        ms = m.get("ms") or {}
        jn = ((results.get("jaxnorm", {}).get(mode) or {}).get("ms") or {}).get("median")
        floor = case["floor"][mode]
        median = ms.get("median")
        records.append(
            {
                "case": case["name"],
                "op": case["op"],
                "dtype": case["dtype"],
                "shape": tuple(case["shape"]),
                "x_bytes": case["x_bytes"],
                "implementation": impl,
                "available": bool(res.get("available", True)),
                "mode": mode,
                "median_ms": median,
                "q1_ms": ms.get("q1"),
                "q3_ms": ms.get("q3"),
                "floor_ms": floor["ms"],
                "time_over_jaxnorm": _div(median, jn),
                "time_over_floor": _div(median, floor["ms"]),
                "bytes_accessed": m.get("bytes_accessed"),
                "floor_bytes": floor["bytes"],
                "accessed_over_floor": _div(m.get("bytes_accessed"), floor["bytes"]),
                "temp_bytes": m.get("temp_bytes"),
                "residual_bytes": res.get("residual_bytes"),
                "residual_over_x": _div(res.get("residual_bytes"), case["x_bytes"]),
            }
        )
  return records
