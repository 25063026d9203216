"""backtest.py end to end through main(argv): the contract's backtest.json, --jobs, and user errors."""

import json
import os
import re

import pytest

import backtest
from latency_forecast import metrics
from tests.conftest import TINY_TRAINING

# The tiny store covers 2024-05-01 to 2024-05-04: two folds of 2 days + half a day.
WINDOWS = ["--train-window-days", "2", "--val-window-days", "0.5"]
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _run(tiny_store, output, *extra):
    argv = ["--feature-store-path", tiny_store, "--output", str(output), *TINY_TRAINING, *WINDOWS, *extra]
    assert backtest.main(argv) == 0
    return json.loads(open(output).read(), parse_constant=lambda name: pytest.fail(f"{name} in backtest.json"))


@pytest.fixture(scope="module")
def one_job(tmp_path_factory, tiny_store):
    return _run(tiny_store, tmp_path_factory.mktemp("backtest") / "backtest.json", "--num-threads", "1")


def _without_timings(report):
    return [{key: value for key, value in fold.items() if key != "seconds"} for fold in report["folds"]]


def test_backtest_json_follows_the_contract(one_job, tiny_store):
    report = one_job
    assert {"config", "folds", "summary"} <= set(report)
    assert [fold["fold"] for fold in report["folds"]] == [1, 2]
    embargo = report["config"]["resolved"]["embargo_minutes"]
    assert embargo == 6 + 2
    for fold in report["folds"]:
        for key in ("train_start", "train_end", "val_start", "val_end"):
            assert ISO.match(fold[key]), fold[key]
        assert list(fold["baseline"]) == ["persistence", "window_median", "gradient_boosting"]
        for baseline in fold["baseline"].values():
            assert tuple(fold["metrics"]) == tuple(baseline) == metrics.METRIC_KEYS
            assert fold["metrics"]["n_samples"] == baseline["n_samples"] == fold["samples"]["validation"] > 0
        assert fold["val_start"] == _plus(fold["train_end"], embargo) and fold["val_end"] <= "2024-05-04T00:00:00Z"
        assert fold["train_start"] < fold["early_stopping_start"] < fold["train_end"]
        assert fold["resolved"]["batch_size"] == 256, "--batch-size 256 given: kept as given"
        assert fold["resolved"]["ensemble_size"] == 3
    assert [(f["train_start"], f["val_end"]) for f in report["folds"]] == [
        ("2024-05-01T00:00:00Z", "2024-05-03T12:00:00Z"),
        ("2024-05-01T12:00:00Z", "2024-05-04T00:00:00Z"),
    ]
    assert tuple(report["summary"]) == metrics.METRIC_KEYS
    assert all(set(value) == {"mean", "std"} for value in report["summary"].values())
    assert report["config"]["model"]["hidden_size"] == 8 and report["config"]["backtest"]["train_window_days"] == 2


def _plus(stamp, minutes):
    import pandas as pd

    return (pd.Timestamp(stamp) + pd.Timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_two_jobs_give_the_same_folds_as_one(one_job, tiny_store, tmp_path, capsys):
    argv = [*(a for a in TINY_TRAINING if a != "--quiet"), "--jobs", "2"]
    output = tmp_path / "backtest.json"
    assert backtest.main(["--feature-store-path", tiny_store, "--output", str(output), *argv, *WINDOWS]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^fold [12]/2 .* MAE .* FPR .* TPR .*s$", out, flags=re.MULTILINE)) == 2
    report = json.loads(output.read_text())
    assert report["config"]["resolved"]["jobs"] == 2
    assert _without_timings(report) == _without_timings(one_job)
    assert report["summary"] == one_job["summary"]
    assert sorted(os.listdir(tmp_path)) == ["backtest.json", "backtest.png"]


def _one_line_error(capsys, argv, *messages):
    code = backtest.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for message in messages:
        assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, messages",
    [
        (
            ["--train-window-days", "3"],
            ["the data spans 3 days (2024-05-01T00:00:00Z to 2024-05-04T00:00:00Z)", "needs", "= 3.5 days"],
        ),
        (["--train-window-days", "0"], ["--train-window-days must be positive"]),
        (["--val-window-days", "-1"], ["--val-window-days must be positive"]),
        (["--step-days", "0"], ["--step-days must be positive"]),
        (["--jobs", "0"], ["--jobs must be at least 1"]),
        (["--val-window-days", "0.005"], ["embargo"]),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tiny_store, tmp_path, extra, messages):
    argv = ["--feature-store-path", tiny_store, "--output", str(tmp_path / "b.json"), *TINY_TRAINING, *WINDOWS, *extra]
    _one_line_error(capsys, argv, *messages)
    assert not os.listdir(tmp_path)


def test_output_that_is_a_directory_exits_2(capsys, tiny_store, tmp_path):
    _one_line_error(capsys, ["--feature-store-path", tiny_store, "--output", str(tmp_path)], "is a directory")


def test_failed_run_keeps_earlier_results(tiny_store, tmp_path, monkeypatch):
    output = tmp_path / "backtest.json"
    _run(tiny_store, output, "--num-threads", "1", "--epochs", "1")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(backtest.plots, "backtest_folds", crash)  # dies after backtest.json is staged
    argv = ["--feature-store-path", tiny_store, "--output", str(output), *TINY_TRAINING, *WINDOWS, "--num-threads", "1", "--seed", "3"]
    assert backtest.main(argv) == 130
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
