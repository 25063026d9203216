"""Run every ``bench/bench_*.py`` module in turn (``make bench``)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main() -> int:
    for module in sorted(info.name for info in pkgutil.iter_modules(bench.__path__) if info.name.startswith("bench_")):
        print(f"== bench.{module}", flush=True)
        status = importlib.import_module(f"bench.{module}").main([])
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
