"""forecast.py at scale: time and peak memory of one live forecast on a store of 100 services x 28
days against the same fleet's store of 1 day. It reads only the last L minutes (plus the staleness
slack) before t, pushed down to the Parquet scan, so the long store should cost about the same.

    python -m bench.bench_forecast [--services 100] [--repeats 3]

The model is a tiny one trained once on the 1-day store (its size does not depend on the store's
length). Each forecast runs in a fresh subprocess, the two stores alternating; peak RSS is the
process's high-water mark above its RSS after imports. Stores are generated once (``bench/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

from bench.bench_pipeline import _reset_peak, _status_mb, ensure_store
from bench.common import Result, command, load_average, machine, median, run_benchmark

TARGET_RATIO = 1.5  # the 28-day store costs at most 1.5x the 1-day store, in time and in peak RSS
TINY_TRAINING = ["--hidden-size", "8", "--epochs", "1", "--samples-per-epoch", "2000", "--sequence-length", "16",
                 "--horizon", "5", "--shap-samples", "0", "--baselines", "persistence", "--quiet"]


def child(model: str, store: str, output: str) -> dict:
    """One forecast.py run in this (fresh) process: seconds and peak RSS above the post-import RSS."""
    import forecast

    base = _status_mb("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    code = forecast.main([
        "--model-checkpoint", f"{model}/latency_forecaster.pt", "--scaler-path", f"{model}/scaler.pt",
        "--feature-store-path", store, "--output", output,
    ])
    seconds = time.perf_counter() - started
    assert code == 0, f"forecast.py exited {code}"
    return {"seconds": seconds, "peak_mb": _status_mb("VmHWM") - base}


def _run_child(model: str, store: str, output: str) -> dict:
    stdout = subprocess.run(
        [sys.executable, "-m", "bench.bench_forecast", "--child", model, store, output], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(stdout.strip().splitlines()[-1])


def ensure_model(path: str, store: str) -> str:
    if not os.path.exists(os.path.join(path, "latency_forecaster.pt")):
        print(f"training a tiny model on {store} into {path} (once)", flush=True)
        subprocess.run([sys.executable, "train.py", "--feature-store-path", store, "--output-dir", path, *TINY_TRAINING],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_forecast", description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=100, help="services in the generated stores (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs on each store, alternating (default: %(default)s)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "STORE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return []
    print(f"machine: {machine()}")
    results_dir = os.path.join("bench", "results")
    stores = {days: ensure_store(os.path.join(results_dir, f"store-{args.services}x{days}"), args.services, days) for days in (1, 28)}
    model = ensure_model(os.path.join(results_dir, f"forecast-model-{args.services}"), stores[1])
    output = os.path.join(results_dir, "forecasts.json")
    runs: dict[int, list[dict]] = {1: [], 28: []}
    for repeat in range(args.repeats):
        for days in (1, 28) if repeat % 2 == 0 else (28, 1):
            runs[days].append(_run_child(model, stores[days], output))
            print(f"  {args.services}x{days}: {runs[days][-1]}", flush=True)
    seconds = {days: median([run["seconds"] for run in values]) for days, values in runs.items()}
    peak = {days: median([run["peak_mb"] for run in values]) for days, values in runs.items()}
    load, where = load_average(), command("bench.bench_forecast", argv)
    time_ratio, memory_ratio = seconds[28] / seconds[1], peak[28] / peak[1]
    n = args.services
    results = [
        Result("forecast", f"forecast.py at the newest minute: time, ratio = {n}x28 store / {n}x1 store",
               f"{seconds[28]:.2f} s ({n}x1: {seconds[1]:.2f} s)", time_ratio, f"<= {TARGET_RATIO:g}x", time_ratio <= TARGET_RATIO, where, load),
        Result("forecast", f"forecast.py peak RSS above post-import RSS, ratio = {n}x28 store / {n}x1 store",
               f"{peak[28]:.0f} MB ({n}x1: {peak[1]:.0f} MB)", memory_ratio, f"<= {TARGET_RATIO:g}x", memory_ratio <= TARGET_RATIO, where, load),
    ]
    print(f"load average after: {load}")
    return results


if __name__ == "__main__":
    sys.exit(run_benchmark(measure))
