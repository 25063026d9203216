"""The benchmarks' smoke modes (``python -m bench.bench_* --smoke``): the toolkit's side of every
benchmark runs here, in-process, on a tiny generated store, so a change of the package's API fails
a test instead of the next ``make bench``. Darts' side runs only where Darts is installed (the
bench venv, ``make .venv-bench/.installed``); elsewhere its test is skipped."""

from __future__ import annotations

import argparse
import math
import pkgutil
import shutil

import pytest

import bench
from bench import bench_end_to_end, bench_explain, bench_forecast, bench_pipeline, bench_time_to_accuracy, bench_training, run_all
from bench.common import Result, parse_arguments

# each benchmark module -> its smoke run's arguments and the rows it gives
SMOKE_RUNS = {
    "bench_end_to_end": (bench_end_to_end, ["--smoke"], 1),
    "bench_explain": (bench_explain, ["--smoke"], 3),  # F = 3, F = 8, and F = 8's time against its target
    "bench_forecast": (bench_forecast, ["--smoke"], 2),  # time, peak RSS
    "bench_pipeline": (bench_pipeline, ["--smoke"], 2),  # time, peak RSS
    "bench_training": (bench_training, ["--smoke", "--contenders", "ours"], 1),  # Darts' side: test_training_against_darts
    # ours and ours-sequence; Darts' side: test_time_to_accuracy_against_darts
    "bench_time_to_accuracy": (bench_time_to_accuracy, ["--smoke", "--contenders", "ours,ours-sequence"], 2),
}


def _check_rows(results: list[Result], benchmark: str, expected: int) -> None:
    assert len(results) == expected
    for result in results:
        assert isinstance(result, Result)
        assert result.benchmark == benchmark
        assert "--smoke" in result.command
        assert result.ratio is None or (math.isfinite(result.ratio) and result.ratio >= 0)  # an in-process peak may be 0
        assert result.row().startswith(f"| {benchmark} | ") and result.row().count(" | ") == 7


def test_every_benchmark_has_a_smoke_run():
    modules = {info.name for info in pkgutil.iter_modules(bench.__path__) if info.name.startswith("bench_")}
    assert modules == set(SMOKE_RUNS), "a bench/bench_*.py without a smoke run here (or one here that is gone)"


@pytest.mark.parametrize("name", sorted(SMOKE_RUNS))
def test_smoke_run(name):
    module, argv, rows = SMOKE_RUNS[name]
    if module is bench_end_to_end and shutil.which("make") is None:
        pytest.skip("the end-to-end benchmark reads make demo's commands through make")
    names = {"end_to_end": "end to end", "explain": "explanations", "time_to_accuracy": "time to accuracy"}
    benchmark = names.get(name.removeprefix("bench_"), name.removeprefix("bench_"))
    _check_rows(module.measure(argv), benchmark, rows)


def test_training_against_darts():
    pytest.importorskip("darts", reason="Darts is installed only in the bench venv (requirements-bench.txt)")
    results = bench_training.measure(["--smoke"])
    _check_rows(results, "training", 1)
    assert results[0].ratio is not None and "Darts" in results[0].value


def test_time_to_accuracy_against_darts():
    pytest.importorskip("darts", reason="Darts is installed only in the bench venv (requirements-bench.txt)")
    results = bench_time_to_accuracy.measure(["--smoke"])
    _check_rows(results, "time to accuracy", 4)  # ours, ours-sequence, BlockRNNModel, RNNModel
    assert [result.measure.endswith(label) for result, label in zip(results[2:], ("BlockRNNModel", "RNNModel"))] == [True, True]
    for result in results[:2]:  # each of ours: a ratio to Darts' fastest, or why there is none
        assert "ratio = Darts' fastest / ours" in result.measure
        assert (result.ratio is not None and "Darts' fastest: " in result.value) or (result.ratio is None and "no ratio" in result.value)


def test_time_to_accuracy_curve_stops_at_the_target_or_the_limit():
    curve = bench_time_to_accuracy._Curve(target_mae=10.0, time_limit=5.0, max_epochs=0)
    assert [curve.add(seconds, mae) for seconds, mae in [(1.0, 14.0), (2.0, 11.0), (3.0, 9.5)]] == [False, False, True]
    assert curve.reached == (3, 3.0) and curve.best == (3, 9.5) and curve.summary().startswith("3.00 s (epoch 3")
    curve = bench_time_to_accuracy._Curve(target_mae=10.0, time_limit=5.0, max_epochs=0)
    assert [curve.add(seconds, mae) for seconds, mae in [(2.0, 12.0), (4.0, 11.0), (6.0, 11.5)]] == [False, False, True]
    assert curve.reached is None and curve.summary() == "not reached in 6.0 s, 3 epochs (best 11.00 ms, epoch 2)"


def test_time_to_accuracy_refuses_unknown_contenders(capsys):
    with pytest.raises(SystemExit) as raised:
        bench_time_to_accuracy.measure(["--smoke", "--contenders", "ours,prophet"])
    assert raised.value.code == 2 and "prophet" in capsys.readouterr().err


def test_smoke_defaults_yield_to_explicit_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--days", type=int, default=28)
    smoke = {"repeats": 1, "days": 2}
    assert vars(parse_arguments(parser, ["--smoke", "--repeats", "3"], smoke)) == {"repeats": 3, "days": 2, "smoke": True}
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    assert vars(parse_arguments(parser, [], {"repeats": 1})) == {"repeats": 5, "smoke": False}


def test_run_all_rewrites_only_the_table(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\nbefore\n\n{run_all.START}\nold table\n{run_all.END}\n\nafter\n")
    assert run_all.main(["--smoke", "--only", "pipeline", "--output", str(path)]) == 0
    text = path.read_text()
    assert "old table" not in text and text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    table = text[text.index(run_all.START) : text.index(run_all.END)]
    assert table.count("| pipeline | ") == 2 and "`python -m bench.bench_pipeline --smoke`" in table
    assert "Not run, so absent: `bench.bench_end_to_end`, `bench.bench_explain`" in table  # --only says what is missing


def test_run_all_refuses_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as raised:
        run_all.main(["--smoke", "--only", "pipelines"])
    assert raised.value.code == 2 and "pipelines" in capsys.readouterr().err
