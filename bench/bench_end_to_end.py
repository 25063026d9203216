"""End to end: wall time of the README's main command, ``make demo``, on a fresh clone, with the
setup (venv and packages, from the pip cache) excluded and included.

    python -m bench.bench_end_to_end [--repeats 1] [--keep]

Each repeat clones this repository's committed HEAD into a temporary directory, times
``make setup`` and then ``make demo`` there: setup excluded is the second, setup included the
sum, which is what ``make demo`` costs on a clone that has no ``.venv`` yet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from bench.common import Result, command, load_average, machine, median, run_benchmark


def _timed(arguments: list[str], directory: str, log: str) -> float:
    started = time.perf_counter()
    with open(log, "a") as stream:
        subprocess.run(arguments, cwd=directory, check=True, stdout=stream, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_end_to_end", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="fresh clones to time (default: %(default)s; one takes minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the clones and their make.log (printed) for inspection")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
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
