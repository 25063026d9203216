"""What every benchmark shares: the machine line, medians, the smoke flag, generated stores, peak
memory, and the result rows that ``bench.run_all`` writes into BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Sequence

import torch


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: on a shared machine they say how much to trust a time."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine(packages: Sequence[str] = ("numpy", "pyarrow", "shap")) -> str:
    """One line: platform, CPU model, cores, torch and its thread count, package versions, load."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as stream:
            cpu = next(line.split(":", 1)[1].strip() for line in stream if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = "; ".join(f"{name} {_version(name)}" for name in packages)
    return (
        f"{platform.platform()}; {cpu}; {os.cpu_count()} CPUs; python {platform.python_version()}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; {versions}; load average {load_average()}"
    )


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *arguments])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None, smoke: dict) -> argparse.Namespace:
    """Parse ``argv``, adding ``--smoke``: the flag values in ``smoke`` become the defaults (flags
    given explicitly still win), so a smoke run is the same code as a full one, only tiny."""
    shown = " ".join(
        f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}") for name, value in smoke.items() if value is not None
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help=f"a check that the benchmark still runs, in seconds (tests/test_bench.py runs it); its numbers mean "
        f"nothing. Defaults become: {shown or 'see the module docstring'}",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def chosen_contenders(parser: argparse.ArgumentParser, text: str, contenders: Sequence[str]) -> list[str]:
    """``--contenders``' comma-separated names, each one of ``contenders`` and none twice (else
    the parser's usage error)."""
    names = text.split(",")
    if not names or set(names) - set(contenders) or len(set(names)) != len(names):
        parser.error(f"--contenders takes some of {', '.join(contenders)}, got {text!r}")
    return names


def ensure_store(path: str, services: int, days: int, seed: int = 0) -> str:
    """The demo generator's store of ``services`` x ``days`` at ``path`` (with its chaos manifest),
    written unless it is there already."""
    from latency_forecast import synthetic

    if not os.path.exists(os.path.join(path, "chaos_manifest.json")):
        print(f"generating {services} services x {days} days into {path}", flush=True)
        arguments = ["--output", path, "--days", str(days), "--services", str(services), "--seed", str(seed)]
        if synthetic.main(arguments) != 0:
            raise RuntimeError(f"python -m latency_forecast.synthetic {' '.join(arguments)} failed")
    return path


def run_child(arguments: Sequence[str]) -> str:
    """Run a benchmark's measurement in a fresh process; its last line of output (a JSON object).
    A failure raises with the end of the child's stderr, where its error is."""
    process = subprocess.run(list(arguments), capture_output=True, text=True, check=False)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} exited {process.returncode}:\n" + "\n".join(process.stderr.splitlines()[-15:]))
    return process.stdout.strip().splitlines()[-1]


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as stream:
        line = next(line for line in stream if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Make VmHWM restart from the current RSS (Linux >= 4.0), so earlier peaks (imports) do not count."""
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")


@dataclass
class Result:
    """One row of the BENCHMARKS.md table.

    ``ratio`` compares two numbers measured in the same run; ``measure`` says which over which.
    ``met`` is None where the row has no target.
    """

    benchmark: str
    measure: str
    value: str  # the median, with its unit
    ratio: float | None
    target: str
    met: bool | None
    command: str
    load: str  # load average when the measurement ended

    def row(self) -> str:
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}x"
        met = {None: "", True: "yes", False: "**no**"}[self.met]
        return f"| {self.benchmark} | {self.measure} | {self.value} | {ratio} | {self.target} | {met} | `{self.command}` | {self.load} |"


TABLE_HEADER = (
    "| benchmark | measure | median | ratio | target | met? | command | load (1/5/15 min) |\n"
    "|---|---|---|---|---|---|---|---|"
)


def print_results(results: Sequence[Result]) -> None:
    print(TABLE_HEADER)
    for result in results:
        print(result.row())


def run_benchmark(measure: Callable[[Sequence[str] | None], list[Result]]) -> int:
    """A benchmark module's ``__main__``: measure with the command line's flags, print the table."""
    results = measure(None)
    if results:  # a child process of a benchmark prints its own JSON line instead
        print_results(results)
    return 0
