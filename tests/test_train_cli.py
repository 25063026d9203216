"""train.py end to end through main(argv), and every user error it must turn into exit status 2."""

import json
import os

import numpy as np
import pytest
import torch

import train
from latency_forecast import artifacts, data, metrics, pipeline, synthetic, training
from latency_forecast.errors import UserError
from tests.conftest import TINY_TRAINING, hand_frame, write_frame


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_store):
    out = str(tmp_path_factory.mktemp("artifacts"))
    code = train.main(["--feature-store-path", tiny_store, "--output-dir", out, *TINY_TRAINING])
    assert code == 0
    return out


def test_writes_every_contract_artifact(trained):
    assert sorted(os.listdir(trained)) == [
        "alert_tradeoff.png",
        "config.json",
        "feature_importance.json",
        "feature_importance.png",
        "forecast_vs_actual.png",
        "latency_forecaster.pt",
        "loss_curve.png",
        "metrics.json",
        "scaler.pt",
        "training_history.json",
    ]
    report = json.loads(open(f"{trained}/metrics.json").read())
    for section in (report["validation"], report["test"], *report["baseline"]["persistence"].values()):
        assert tuple(section) == metrics.METRIC_KEYS
    assert report["test"]["n_samples"] == report["baseline"]["persistence"]["test"]["n_samples"] > 0
    assert set(report["per_service"]["test"]) <= set(report["data"]["services"])
    history = json.loads(open(f"{trained}/training_history.json").read())
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))


def test_checkpoint_round_trip_with_weights_only(trained, tiny_store):
    checkpoint = torch.load(f"{trained}/latency_forecaster.pt", map_location="cpu", weights_only=True)
    scaler = torch.load(f"{trained}/scaler.pt", map_location="cpu", weights_only=True)
    assert checkpoint["format_version"] == artifacts.FORMAT_VERSION
    assert checkpoint["config"]["model"]["hidden_size"] == 8
    assert scaler["feature_columns"] == checkpoint["feature_columns"]
    forecaster = pipeline.Forecaster.from_checkpoint(checkpoint, scaler, torch.device("cpu"))
    table = data.load_feature_store(tiny_store, forecaster.feature_columns)
    prepared = pipeline.prepare(table, forecaster)
    forecast = pipeline.forecast_ms(forecaster, prepared, prepared.ends[:100])
    assert forecast.shape == (100,) and np.isfinite(forecast).all() and (forecast >= 0).all()
    _assert_reproduces_saved_test_metrics(forecaster, trained, tiny_store)
    assert not forecaster.model.anchored and forecaster.cause_model is None, "telemetry only: explained directly"


def _assert_reproduces_saved_test_metrics(forecaster: pipeline.Forecaster, directory: str, store: str) -> None:
    """The rebuilt forecaster gives exactly the test metrics train.py saved."""
    report = json.loads(open(f"{directory}/metrics.json").read())
    table = data.load_feature_store(store, forecaster.feature_columns)
    prepared = pipeline.prepare(table, forecaster)
    split = report["data"]["splits"]["test"]
    test_range = data.TimeRange(data.to_minute(data.parse_timestamp(split["start"], "")), data.to_minute(data.parse_timestamp(split["end"], "")))
    settings = forecaster.data_config
    ends = data.samples_in(prepared.ends, table, test_range, settings.sequence_length, settings.horizon)
    assert pipeline.evaluate(forecaster, prepared, ends).model_metrics == pytest.approx(report["test"])


@pytest.fixture(scope="module")
def with_latency_history(tmp_path_factory, tiny_store):
    out = str(tmp_path_factory.mktemp("history"))
    features = ",".join([*synthetic.FEATURE_COLUMNS, "target_latency_p99"])
    code = train.main(["--feature-store-path", tiny_store, "--output-dir", out, *TINY_TRAINING, "--feature-columns", features])
    assert code == 0
    return out


def _reload(directory: str, drop_cause_model: bool = False) -> pipeline.Forecaster:
    checkpoint = torch.load(f"{directory}/latency_forecaster.pt", map_location="cpu", weights_only=True)
    if drop_cause_model:
        checkpoint["cause_model_state_dict"] = None
    return pipeline.Forecaster.from_checkpoint(checkpoint, torch.load(f"{directory}/scaler.pt", weights_only=True), torch.device("cpu"))


def test_latency_history_forecaster_is_anchored_and_keeps_its_cause_model(with_latency_history, tiny_store):
    forecaster = _reload(with_latency_history)
    assert forecaster.model.anchored and forecaster.cause_model is not None
    assert forecaster.cause_model.input_columns.tolist() == pipeline.cause_columns(forecaster.feature_columns)
    assert forecaster.explained_model is forecaster.cause_model
    report = json.loads(open(f"{with_latency_history}/metrics.json").read())
    assert report["cause_model"]["history"] and "never used for alerts" in report["cause_model"]["purpose"]
    _assert_reproduces_saved_test_metrics(forecaster, with_latency_history, tiny_store)  # it needs the latency at t


def test_an_anchored_model_without_a_cause_model_cannot_be_explained(with_latency_history):
    with pytest.raises(UserError, match="no cause model to explain"):
        _reload(with_latency_history, drop_cause_model=True).explained_model


def test_seed_example_command_runs(tiny_store, tmp_path, capsys):
    argv = [
        "--feature-store-path", tiny_store, "--feature-columns", "cpu_rolling_avg,path_depth,fan_out",
        "--sequence-length", "8", "--latency-threshold", "500", "--epochs", "1", "--output-dir", str(tmp_path),
        "--hidden-size", "8", "--num-layers", "2", "--dropout", "0.1", "--device", "cpu", "--samples-per-epoch", "1000",
        "--cell", "gru", "--quiet",
    ]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "artifacts written to" in out and "persistence" in out
    checkpoint = torch.load(tmp_path / "latency_forecaster.pt", weights_only=True)
    assert checkpoint["feature_columns"] == ["cpu_rolling_avg", "path_depth", "fan_out"]
    assert checkpoint["config"]["model"]["cell"] == "gru"


def _one_line_error(capsys, argv, message):
    code = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--feature-columns", "cpu_rolling_avg,nope"], "unknown feature column 'nope'"),
        (["--start-ts", "2024-05-03", "--end-ts", "2024-05-02"], "is not before end"),
        (["--start-ts", "2031-01-01"], "has no rows"),
        (["--sequence-length", "3000"], "too little data"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--epochs", "0"], "--"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tiny_store, tmp_path, extra, message):
    _one_line_error(capsys, ["--feature-store-path", tiny_store, "--output-dir", str(tmp_path), *TINY_TRAINING, *extra], message)


def test_bad_stores_exit_2(capsys, tmp_path):
    _one_line_error(capsys, ["--feature-store-path", str(tmp_path / "absent")], "does not exist")
    frame = hand_frame(features=("cpu",))
    frame["zone"] = "a"
    path = write_frame(frame, tmp_path / "s.parquet")
    _one_line_error(capsys, ["--feature-store-path", path, "--feature-columns", "zone"], "not numeric")
    _one_line_error(capsys, ["--feature-store-path", write_frame(frame.drop(columns="service"), tmp_path / "n.parquet")], "no 'service' column")


def test_failed_run_keeps_earlier_artifacts(tiny_store, tmp_path, monkeypatch):
    out = str(tmp_path)
    argv = ["--feature-store-path", tiny_store, "--output-dir", out, *TINY_TRAINING]
    assert train.main(argv) == 0
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.plots, "forecast_vs_actual", crash)  # dies after the checkpoint is staged
    assert train.main([*argv, "--seed", "9"]) == 130
    after = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert after == before


def test_dev_store_comparison_runs_on_two_stores(tiny_store, tmp_path, capsys):
    from tools import dev_stores

    frame, _ = synthetic.generate(days=3, n_services=4, seed=8, faults_per_day=3.0)
    other = str(tmp_path / "other")
    data.write_feature_store(frame, other)
    flags = [flag for flag in TINY_TRAINING if flag != "--quiet"]
    assert dev_stores.main(["--dev-stores", f"{tiny_store},{other}", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("judged on all of" in line for line in lines) == 2 and all("MAE ratio" in line for line in lines[1:])
    assert dev_stores.main(["--dev-stores", tiny_store]) == 2
    assert "two or more stores" in capsys.readouterr().err
