"""Reads Google Benchmark JSON: the one place that decides which rows a figure or table uses."""
import json
import pathlib


def medians(path):
    """The medians when the run had repetitions, the plain runs otherwise; failed runs dropped."""
    data = json.loads(pathlib.Path(path).read_text())
    benchmarks = data.get("benchmarks", [])
    has_aggregates = any(b.get("run_type") == "aggregate" for b in benchmarks)
    for bench in benchmarks:
        if has_aggregates and bench.get("aggregate_name") != "median":
            continue
        if bench.get("error_occurred"):
            continue
        yield bench


def run_fields(run_name):
    """The name:value arguments of a benchmark run name, as ints ("BM_X/n:512/heads:8" ->
    {"n": 512, "heads": 8})."""
    return {k: int(v) for k, v in (part.split(":") for part in run_name.split("/") if ":" in part)}
