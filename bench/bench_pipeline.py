"""Data pipeline at scale: time and peak memory to load, validate, split, scale and index every
window of a store of about 100 services x 28 days (4M rows), against a bare ``pyarrow.dataset``
read of the same columns.

    python -m bench.bench_pipeline [--services 100] [--days 28] [--repeats 7] [--store DIR] [--smoke]

Each contender runs in a fresh subprocess (so that one's memory cannot count against the other),
the two alternating; peak RSS is the process's high-water mark above its RSS after imports.
The store is generated once (``bench/results/``) and reused. ``--smoke`` runs both contenders
once, in this process, on a 3 x 2 store in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Sequence

from bench.common import (
    Result, command, ensure_store, load_average, machine, median, parse_arguments, reset_peak, run_benchmark, run_child, status_mb,
)

TARGET_TIME_RATIO = 2.0  # ours at most 2x the bare read
TARGET_MATRIX_MULTIPLE = 3.0  # peak RSS at most 3x the float32 feature matrix
SMOKE = {"services": 3, "days": 2, "repeats": 1, "in_process": True}


def _ours(store: str) -> int:
    """train.py's path up to training: every valid window of every split indexed."""
    from latency_forecast import data, fitting, store as store_io
    from latency_forecast.config import DataConfig, ModelConfig, TrainingConfig

    settings = DataConfig()
    table = store_io.load_feature_store(store)
    splits = data.fraction_splits(table, settings.validation_fraction, settings.test_fraction, settings.embargo)
    forecaster = fitting.untrained_forecaster(table, splits.train, fitting.Settings(settings, ModelConfig(), TrainingConfig(device="cpu")))
    prepared = forecaster.prepare(table, inplace=True)  # as fitting.train does for train.py
    for name in ("train", "validation", "test"):
        data.samples_in(prepared.ends, table, getattr(splits, name), settings.sequence_length, settings.horizon)
    return table.features.nbytes


def _bare(store: str) -> int:
    import glob

    import pyarrow.dataset as ds

    from latency_forecast import data
    from latency_forecast import store as store_io
    from latency_forecast.config import TARGET_COLUMN

    files = sorted(glob.glob(os.path.join(store, "**", "*.parquet"), recursive=True))
    dataset = ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=store)
    features = store_io.resolve_feature_columns(dataset.schema, None, exclude=["date"])
    table = dataset.to_table(columns=[data.TIMESTAMP_COLUMN, data.SERVICE_COLUMN, *features, TARGET_COLUMN])
    return table.num_rows * len(features) * 4


def child(contender: str, store: str) -> dict:
    """One measurement, in this (fresh) process: seconds, peak RSS above the post-import RSS, matrix size."""
    import latency_forecast.fitting  # noqa: F401  (imports are not part of the work)
    import pyarrow.dataset  # noqa: F401

    reset_peak()
    base = status_mb("VmRSS")
    started = time.perf_counter()
    matrix_bytes = {"ours": _ours, "bare": _bare}[contender](store)
    seconds = time.perf_counter() - started
    # the kernel updates RSS counters lazily: a peak a few pages below the base is 0
    return {"seconds": seconds, "peak_mb": max(0.0, status_mb("VmHWM") - base), "base_mb": base, "matrix_mb": matrix_bytes / 2**20}


def _run_child(contender: str, store: str, in_process: bool) -> dict:
    if in_process:
        return child(contender, store)
    return json.loads(run_child([sys.executable, "-m", "bench.bench_pipeline", "--child", contender, "--store", store]))


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=100, help="services in the generated store (default: %(default)s)")
    parser.add_argument("--days", type=int, default=28, help="days in the generated store (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="runs of each contender, alternating (default: %(default)s: the bare read alone swings 2x from run to run)")
    parser.add_argument("--store", help="store to use (default: bench/results/store-<services>x<days>, generated if missing; "
                        "with --smoke, a temporary directory)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the contenders in this process, not in fresh ones (their peak RSS then means little)")
    parser.add_argument("--child", choices=("ours", "bare"), help=argparse.SUPPRESS)
    args = parse_arguments(parser, argv, SMOKE)
    if args.child:
        print(json.dumps(child(args.child, args.store or _default_store(args))))
        return []
    print(f"machine: {machine()}")
    with contextlib.ExitStack() as stack:
        store = args.store
        if store is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipeline-")) if args.smoke else None
            store = _default_store(args, root)
        ensure_store(store, args.services, args.days)
        runs: dict[str, list[dict]] = {"ours": [], "bare": []}
        for repeat in range(args.repeats):
            for contender in ("ours", "bare") if repeat % 2 == 0 else ("bare", "ours"):
                runs[contender].append(_run_child(contender, store, args.in_process))
                print(f"  {contender:4}: {runs[contender][-1]}", flush=True)
    seconds = {name: median([run["seconds"] for run in values]) for name, values in runs.items()}
    peak = {name: median([run["peak_mb"] for run in values]) for name, values in runs.items()}
    matrix_mb = runs["ours"][0]["matrix_mb"]
    load, where = load_average(), command("bench.bench_pipeline", argv)
    time_ratio = seconds["ours"] / seconds["bare"]
    multiple = peak["ours"] / matrix_mb
    results = [
        Result("pipeline", f"load+validate+split+scale+index, {args.services}x{args.days} store: time (ratio = ours / bare read)",
               f"{seconds['ours']:.2f} s (bare read {seconds['bare']:.2f} s)", time_ratio,
               f"<= {TARGET_TIME_RATIO:g}x bare", time_ratio <= TARGET_TIME_RATIO, where, load),
        Result("pipeline", f"peak RSS above post-import RSS (ratio = multiple of the {matrix_mb:.0f} MB float32 feature matrix)",
               f"{peak['ours']:.0f} MB (bare read {peak['bare']:.0f} MB)", multiple,
               f"<= {TARGET_MATRIX_MULTIPLE:g}x matrix", multiple <= TARGET_MATRIX_MULTIPLE, where, load),
    ]
    print(f"load average after: {load}")
    return results


def _default_store(args: argparse.Namespace, root: str | None = None) -> str:
    return os.path.join(root or os.path.join("bench", "results"), f"store-{args.services}x{args.days}")


if __name__ == "__main__":
    sys.exit(run_benchmark(measure))
