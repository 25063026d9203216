"""forecast.py at scale: time and peak memory of one live forecast on a store of 100 services x 28
days against the same fleet's store of 1 day. It reads only the last L minutes (plus the staleness
slack) before t, pushed down to the Parquet scan, so the long store should cost about the same.

    python -m bench.bench_forecast [--services 100] [--days 28] [--repeats 3] [--smoke]

The model is a tiny one trained once on the 1-day store (its size does not depend on the store's
length). Each forecast runs in a fresh subprocess, the two stores alternating; peak RSS is the
process's high-water mark above its RSS after imports. Stores are generated once (``bench/results/``).
``--smoke`` forecasts once on each of a 3 x 1 and a 3 x 2 store, in this process, in a temporary
directory.
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

TARGET_RATIO = 1.5  # the long store costs at most 1.5x the 1-day store, in time and in peak RSS
TINY_TRAINING = ["--hidden-size", "8", "--epochs", "1", "--samples-per-epoch", "2000", "--sequence-length", "16",
                 "--horizon", "5", "--shap-samples", "0", "--baselines", "persistence", "--quiet"]
SMOKE = {"services": 3, "days": 2, "repeats": 1, "in_process": True}


def child(model: str, store: str, output: str) -> dict:
    """One forecast.py run in this (fresh) process: seconds and peak RSS above the post-import RSS."""
    import forecast

    reset_peak()
    base = status_mb("VmRSS")
    started = time.perf_counter()
    code = forecast.main([
        "--model-checkpoint", f"{model}/latency_forecaster.pt", "--scaler-path", f"{model}/scaler.pt",
        "--feature-store-path", store, "--output", output,
    ])
    seconds = time.perf_counter() - started
    assert code == 0, f"forecast.py exited {code}"
    # the kernel updates RSS counters lazily: a peak a few pages below the base is 0
    return {"seconds": seconds, "peak_mb": max(0.0, status_mb("VmHWM") - base)}


def _run_child(model: str, store: str, output: str, in_process: bool) -> dict:
    if in_process:
        return child(model, store, output)
    return json.loads(run_child([sys.executable, "-m", "bench.bench_forecast", "--child", model, store, output]))


def _loadable(path: str) -> bool:
    """Whether ``path`` holds a model this version of the package reads (a kept one may predate a new checkpoint format)."""
    import torch

    from latency_forecast.errors import UserError
    from latency_forecast.forecaster import Forecaster

    try:
        Forecaster.load(os.path.join(path, "latency_forecaster.pt"), os.path.join(path, "scaler.pt"), torch.device("cpu"))
    except (OSError, UserError):
        return False
    return True


def ensure_model(path: str, store: str) -> str:
    """A tiny model trained by train.py on ``store`` into ``path``, unless one that loads is there already."""
    import train

    if not _loadable(path):
        print(f"training a tiny model on {store} into {path}", flush=True)
        arguments = ["--feature-store-path", store, "--output-dir", path, *TINY_TRAINING]
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            code = train.main(arguments)
        if code != 0:
            raise RuntimeError(f"train.py {' '.join(arguments)} exited {code}")
    return path


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_forecast", description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=100, help="services in the generated stores (default: %(default)s)")
    parser.add_argument("--days", type=int, default=28, help="days of the long store, set against a 1-day one (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs on each store, alternating (default: %(default)s)")
    parser.add_argument("--results-dir", help="where the stores and the model are kept (default: bench/results; with --smoke, "
                        "a temporary directory)")
    parser.add_argument("--in-process", action="store_true",
                        help="forecast in this process, not in fresh ones (the peak RSS then means little)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "STORE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parse_arguments(parser, argv, SMOKE)
    if args.child:
        print(json.dumps(child(*args.child)))
        return []
    if args.days < 2:
        parser.error("--days must be at least 2 (the long store is set against a 1-day one)")
    print(f"machine: {machine()}")
    n, long = args.services, args.days
    with contextlib.ExitStack() as stack:
        results_dir = args.results_dir
        if results_dir is None:
            results_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-forecast-")) if args.smoke else os.path.join("bench", "results")
        stores = {days: ensure_store(os.path.join(results_dir, f"store-{n}x{days}"), n, days) for days in (1, long)}
        model = ensure_model(os.path.join(results_dir, f"forecast-model-{n}"), stores[1])
        output = os.path.join(results_dir, "forecasts.json")
        runs: dict[int, list[dict]] = {1: [], long: []}
        for repeat in range(args.repeats):
            for days in (1, long) if repeat % 2 == 0 else (long, 1):
                runs[days].append(_run_child(model, stores[days], output, args.in_process))
                print(f"  {n}x{days}: {runs[days][-1]}", flush=True)
    seconds = {days: median([run["seconds"] for run in values]) for days, values in runs.items()}
    peak = {days: median([run["peak_mb"] for run in values]) for days, values in runs.items()}
    load, where = load_average(), command("bench.bench_forecast", argv)
    time_ratio, memory_ratio = seconds[long] / seconds[1], peak[long] / max(peak[1], 1e-3)
    results = [
        Result("forecast", f"forecast.py at the newest minute: time, ratio = {n}x{long} store / {n}x1 store",
               f"{seconds[long]:.2f} s ({n}x1: {seconds[1]:.2f} s)", time_ratio, f"<= {TARGET_RATIO:g}x", time_ratio <= TARGET_RATIO, where, load),
        Result("forecast", f"forecast.py peak RSS above post-import RSS, ratio = {n}x{long} store / {n}x1 store",
               f"{peak[long]:.0f} MB ({n}x1: {peak[1]:.0f} MB)", memory_ratio, f"<= {TARGET_RATIO:g}x", memory_ratio <= TARGET_RATIO, where, load),
    ]
    print(f"load average after: {load}")
    return results


if __name__ == "__main__":
    sys.exit(run_benchmark(measure))
