"""End to end: wall time of the README's main command, ``make demo``, on a fresh clone, with the
setup (venv and packages, from the pip cache) excluded and included.

    python -m bench.bench_end_to_end [--repeats 1] [--keep] [--smoke]

Each repeat clones this repository's committed HEAD into a temporary directory, times
``make setup`` and then ``make demo`` there: setup excluded is the second, setup included the
sum, which is what ``make demo`` costs on a clone that has no ``.venv`` yet.
``--smoke`` clones nothing and installs nothing: it reads ``make demo``'s commands from
``make --dry-run demo`` in this tree and runs them in this process on a 3-service, 3-day store
with tiny training settings appended.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from bench.common import Result, command, load_average, machine, median, run_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the Makefile is
# appended to make demo's own arguments (the last of a repeated flag wins)
SMOKE_STORE = ["--days", "3", "--services", "3"]
SMOKE_TRAINING = ["--hidden-size", "8", "--epochs", "1", "--samples-per-epoch", "1000", "--sequence-length", "8", "--horizon", "2",
                  "--shap-samples", "0", "--baselines", "persistence", "--device", "cpu", "--quiet"]


def _timed(arguments: list[str], directory: str, log: str) -> float:
    started = time.perf_counter()
    with open(log, "a") as stream:
        subprocess.run(arguments, cwd=directory, check=True, stdout=stream, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def demo_commands(store: str, artifacts: str) -> dict[str, list[str]]:
    """The arguments ``make demo`` passes to the store generator and to train.py, read from
    ``make --dry-run demo`` (so a changed recipe changes what the smoke run runs, or fails it)."""
    if shutil.which("make") is None:
        raise RuntimeError("the end-to-end benchmark needs make")
    dry_run = subprocess.run(
        ["make", "--dry-run", "demo", f"STORE={store}", f"ARTIFACTS={artifacts}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    commands: dict[str, list[str]] = {}
    for line in dry_run.splitlines():
        words = shlex.split(line)
        if "latency_forecast.synthetic" in words:
            commands["synthetic"] = words[words.index("latency_forecast.synthetic") + 1 :]
        scripts = [i for i, word in enumerate(words) if os.path.basename(word) == "train.py"]
        if scripts:
            commands["train"] = words[scripts[0] + 1 :]
    missing = [name for name in ("synthetic", "train") if name not in commands]
    if missing:
        raise RuntimeError(f"`make --dry-run demo` runs no {' and no '.join(missing)} command any more; update --smoke:\n{dry_run}")
    return commands


def smoke(argv: Sequence[str] | None) -> list[Result]:
    """``make demo``'s commands in this process, on a tiny store with tiny training settings."""
    import train
    from latency_forecast import synthetic

    with tempfile.TemporaryDirectory(prefix="bench-e2e-smoke-") as directory:
        store, artifacts = os.path.join(directory, "store"), os.path.join(directory, "artifacts")
        commands = demo_commands(store, artifacts)
        started = time.perf_counter()
        if synthetic.main([*commands["synthetic"], *SMOKE_STORE]) != 0:
            raise RuntimeError("make demo's store generator failed")
        generated = time.perf_counter()
        if train.main([*commands["train"], *SMOKE_TRAINING]) != 0:
            raise RuntimeError("make demo's train.py failed")
        trained = time.perf_counter()
        if not os.path.exists(os.path.join(artifacts, "latency_forecaster.pt")):
            raise RuntimeError(f"make demo's train.py wrote no checkpoint into {artifacts}")
    return [Result(
        "end to end", "`make demo`'s commands in-process, 3 services x 3 days, tiny training (smoke)",
        f"{trained - started:.1f} s (store {generated - started:.1f} s)", None, "none set", None,
        command("bench.bench_end_to_end", argv), load_average(),
    )]


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_end_to_end", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="fresh clones to time (default: %(default)s; one takes minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the clones and their make.log (printed) for inspection")
    parser.add_argument(
        "--smoke", action="store_true",
        help="a check that the benchmark still runs, in seconds (tests/test_bench.py runs it): make demo's commands, "
        "from make --dry-run demo, in this process on a tiny store; no clone, no setup",
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    if args.smoke:
        return smoke(argv)
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    setup, demo = [], []
    for _ in range(args.repeats):
        directory = tempfile.mkdtemp(prefix="bench-e2e-")
        clone, log = os.path.join(directory, "clone"), os.path.join(directory, "make.log")
        try:
            subprocess.run(["git", "clone", "--quiet", root, clone], check=True)
            setup.append(_timed(["make", "setup"], clone, log))
            demo.append(_timed(["make", "demo"], clone, log))
            print(f"  clone of {head}: make setup {setup[-1]:.0f} s, make demo {demo[-1]:.0f} s", flush=True)
        finally:
            if args.keep:
                print(f"  kept {clone} (log: {log})")
            else:
                shutil.rmtree(directory, ignore_errors=True)
    where, load = command("bench.bench_end_to_end", argv), load_average()
    excluded = median(demo)
    included = median([s + d for s, d in zip(setup, demo)])
    results = [
        Result("end to end", f"`make demo` on a fresh clone of {head}, setup excluded", f"{excluded:.0f} s", None, "none set", None, where, load),
        Result("end to end", f"`make demo` on a fresh clone of {head}, setup included (venv from the pip cache)",
               f"{included:.0f} s (setup {median(setup):.0f} s)", None, "none set", None, where, load),
    ]
    return results


if __name__ == "__main__":
    sys.exit(run_benchmark(measure))
