"""Run every ``bench/bench_*.py`` module in turn (``make bench``) and write their results table
into BENCHMARKS.md, between its ``results`` markers (the notes around the table are kept).

    python -m bench.run_all [--only training,pipeline] [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
from typing import Sequence

import bench
from bench.common import TABLE_HEADER, Result, machine

START, END = "<!-- results:start -->", "<!-- results:end -->"


def write_table(path: str, results: Sequence[Result], seconds: float) -> None:
    """Replace the text between the markers of ``path`` (appending them if absent)."""
    table = "\n".join(
        [
            START,
            f"Written by `make bench` (`python -m bench.run_all`) in {seconds / 60:.1f} minutes on: {machine()}",
            "",
            TABLE_HEADER,
            *(result.row() for result in results),
            END,
        ]
    )
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    if START in text and END in text:
        text = text[: text.index(START)] + table + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmark names (e.g. training,pipeline; default: all)")
    parser.add_argument("--output", default="BENCHMARKS.md", help="file whose results table is rewritten (default: %(default)s)")
    args = parser.parse_args(argv)
    names = sorted(info.name for info in pkgutil.iter_modules(bench.__path__) if info.name.startswith("bench_"))
    if args.only:
        names = [name for name in names if name.removeprefix("bench_") in args.only.split(",")]
    started, results = time.perf_counter(), []
    for name in names:
        print(f"== bench.{name}", flush=True)
        results += importlib.import_module(f"bench.{name}").measure([])
    write_table(args.output, results, time.perf_counter() - started)
    print(f"wrote {len(results)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
