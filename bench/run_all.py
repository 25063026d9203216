"""Run every ``bench/bench_*.py`` module in turn (``make bench``) and write their results table
into BENCHMARKS.md, between its ``results`` markers (the notes around the table are kept).

    python -m bench.run_all [--only training,pipeline] [--output BENCHMARKS.md] [--smoke]

``--smoke`` runs every benchmark's smoke mode (seconds each) and prints the table without
writing it anywhere unless ``--output`` is given.
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
from bench.common import TABLE_HEADER, Result, command, machine, print_results

START, END = "<!-- results:start -->", "<!-- results:end -->"


def write_table(path: str, results: Sequence[Result], seconds: float, how: str, not_run: Sequence[str] = ()) -> None:
    """Replace the text between the markers of ``path`` (appending them if absent); ``how`` is the
    command that measured them, ``not_run`` the benchmarks it left out (their rows are absent)."""
    absent = f" Not run, so absent: {', '.join(f'`bench.{name}`' for name in not_run)}." if not_run else ""
    table = "\n".join(
        [
            START,
            f"Written by {how} in {seconds / 60:.1f} minutes on: {machine()}.{absent}",
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
    parser.add_argument("--output", help="file whose results table is rewritten (default: BENCHMARKS.md; with --smoke, none)")
    parser.add_argument("--smoke", action="store_true", help="each benchmark's --smoke: a check that they all run, not a measurement")
    args = parser.parse_args(argv)
    output = args.output or (None if args.smoke else "BENCHMARKS.md")
    names = every = sorted(info.name for info in pkgutil.iter_modules(bench.__path__) if info.name.startswith("bench_"))
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {name.removeprefix("bench_") for name in names})
        if unknown:
            parser.error(f"no benchmark named {', '.join(unknown)}")
        names = [name for name in names if name.removeprefix("bench_") in wanted]
    started, results = time.perf_counter(), []
    for name in names:
        print(f"== bench.{name}", flush=True)
        results += importlib.import_module(f"bench.{name}").measure(["--smoke"] if args.smoke else [])
    if output is None:
        print_results(results)
        return 0
    where = command("bench.run_all", argv)
    how = "`make bench` (`python -m bench.run_all`)" if where == "python -m bench.run_all" else f"`{where}`"
    write_table(output, results, time.perf_counter() - started, how, [name for name in every if name not in names])
    print(f"wrote {len(results)} rows to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
