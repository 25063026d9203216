"""train.py end to end through main(argv): every contract artifact, the checkpoint's round trip,
the on-call numbers of metrics.json, per-service thresholds, and every user error as exit status 2."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import train
from latency_forecast import evaluation, forecaster, metrics, store
from latency_forecast.errors import UserError
from tests.helpers import (
    TINY_TRAINING,
    assert_documented_defaults,
    assert_one_line_error,
    assert_png,
    assert_reproduces_saved_test_metrics,
    hand_frame,
    reload,
    split_range,
    write_frame,
)

QUICK = ["--shap-samples", "0", "--baselines", "persistence"]  # for runs whose explanation and GBM are not looked at


def _report(directory):
    return json.loads(open(f"{directory}/metrics.json").read())


def test_writes_every_contract_artifact(trained_dir):
    assert sorted(os.listdir(trained_dir)) == [
        "alert_tradeoff.png",
        "config.json",
        "feature_importance.json",
        "feature_importance.png",
        "forecast_vs_actual.png",
        "gradient_boosting.skops",
        "latency_forecaster.pt",
        "loss_curve.png",
        "metrics.json",
        "scaler.pt",
        "training_history.json",
    ]
    report = _report(trained_dir)
    for section in (report["validation"], report["test"], *report["baseline"]["persistence"].values()):
        assert tuple(section) == metrics.METRIC_KEYS
    assert set(report["baseline"]) == {"persistence", "window_median", "gradient_boosting"}
    for name in report["baseline"]:
        assert report["test"]["n_samples"] == report["baseline"][name]["test"]["n_samples"] == report["data"]["samples"]["test"] > 0
    assert set(report["per_service"]["test"]) <= set(report["data"]["services"])
    history = json.loads(open(f"{trained_dir}/training_history.json").read())
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1)) and len(history) <= 2
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "seconds"}
    for figure in ("alert_tradeoff.png", "feature_importance.png", "forecast_vs_actual.png", "loss_curve.png"):
        assert_png(os.path.join(trained_dir, figure))


def test_checkpoint_round_trip_with_weights_only(trained_dir, tiny_store):
    checkpoint = torch.load(f"{trained_dir}/latency_forecaster.pt", map_location="cpu", weights_only=True)
    scaler = torch.load(f"{trained_dir}/scaler.pt", map_location="cpu", weights_only=True)
    assert checkpoint["format_version"] == forecaster.FORMAT_VERSION
    assert checkpoint["config"]["model"]["hidden_size"] == 8
    assert checkpoint["config"]["store"]["feature_store_path"] == tiny_store
    assert scaler["feature_columns"] == checkpoint["feature_columns"]
    trained = reload(trained_dir)
    prepared = trained.prepare(store.load_feature_store(tiny_store, trained.feature_columns))
    forecast = trained.predict(prepared, prepared.ends[:100]).ms
    assert forecast.shape == (100,) and np.isfinite(forecast).all() and (forecast >= 0).all()
    assert_reproduces_saved_test_metrics(trained, trained_dir, tiny_store)
    assert not trained.model.anchored and trained.cause_model is None, "telemetry only: explained directly"


def test_latency_history_forecaster_is_anchored_and_keeps_its_cause_model(history_dir, tiny_store):
    trained = reload(history_dir)
    assert trained.model.anchored and trained.cause_model is not None
    assert trained.cause_model.input_columns.tolist() == forecaster.cause_columns(trained.feature_columns)
    assert trained.explained_model is trained.cause_model
    report = _report(history_dir)
    assert report["cause_model"]["history"] and "never used for alerts" in report["cause_model"]["purpose"]
    assert_reproduces_saved_test_metrics(trained, history_dir, tiny_store)  # it needs the latency at t
    with pytest.raises(UserError, match="no cause model to explain"):
        reload(history_dir, drop_cause_model=True).explained_model


def test_metrics_json_has_the_on_call_numbers(trained_dir, tiny_store):
    report = _report(trained_dir)
    alerting = report["alerting"]
    point = alerting["operating_point"]
    assert point["target_fpr"] == 0.02 and point["validation_false_positive_rate"] <= 0.02  # conftest trains with 0.02
    assert point["validation_false_positive_rate"] == report["validation"]["false_positive_rate"]
    assert point["test_false_positive_rate"] == report["test"]["false_positive_rate"]
    for split in ("validation", "test"):
        for who in ("model", "persistence"):
            assert {"roc_auc", "pr_auc", "episodes", "anticipated_share", "median_lead_minutes", "false_alarm_episodes_per_service_day"} <= set(alerting[split][who])
    # persistence held to the model's paging load: matched on validation, never paging more there
    paged, model = alerting["validation"]["persistence_at_model_false_alarms"], alerting["validation"]["model"]
    assert paged["false_alarm_episodes_per_service_day"] <= model["false_alarm_episodes_per_service_day"] + 1e-12
    # the test split's ROC-AUCs, recomputed by scikit-learn from the reloaded model's forecasts
    trained = reload(trained_dir)
    prepared = trained.prepare(store.load_feature_store(tiny_store, trained.feature_columns))
    test = evaluation.evaluate(trained, prepared, prepared.samples(split_range(report["data"]["splits"]["test"]), "test"))
    if test.breach.any() and not test.breach.all():
        assert alerting["test"]["model"]["roc_auc"] == pytest.approx(roc_auc_score(test.breach, test.score))
        assert alerting["test"]["persistence"]["roc_auc"] == pytest.approx(roc_auc_score(test.breach, test.persistence_score))
    else:  # one class only: no AUC, reported as null
        assert alerting["test"]["model"]["roc_auc"] is None and alerting["test"]["persistence"]["roc_auc"] is None
    assert point["alert_threshold_ms"] == {name: pytest.approx(point["threshold"] * 500.0) for name in report["data"]["services"]}


@pytest.fixture(scope="module")
def two_scales_store(tmp_path_factory):
    """A 3 ms cache and an 800 ms gateway whose latency follows its own load."""
    rng = np.random.default_rng(1)
    minutes = 3 * 1440
    frames = []
    for service, level in (("cache", 3.0), ("gateway", 800.0)):
        load = 0.5 + 0.4 * np.sin(np.arange(minutes) / 90.0) + rng.normal(0, 0.02, minutes)
        latency = level * (1 + 2.0 * np.clip(load - 0.7, 0, None)) * np.exp(rng.normal(0, 0.05, minutes))
        frames.append(
            pd.DataFrame(
                {
                    "timestamp": pd.Timestamp("2024-05-01", tz="UTC") + pd.to_timedelta(np.arange(minutes), unit="min"),
                    "service": service,
                    "load": load,
                    "target_latency_p99": latency,
                }
            )
        )
    path = tmp_path_factory.mktemp("scales") / "store.parquet"
    pd.concat(frames).to_parquet(path, index=False)
    return str(path)


def test_per_service_thresholds_end_to_end(two_scales_store, tmp_path):
    thresholds = tmp_path / "slo.yaml"
    thresholds.write_text("cache: 4\ngateway: 1000\n")
    out = tmp_path / "out"
    argv = ["--feature-store-path", two_scales_store, "--output-dir", str(out), "--latency-thresholds", str(thresholds), *TINY_TRAINING, *QUICK]
    argv += ["--alert-on", "forecast"]  # a tiny model's point forecast: its alert level stays near the cache's SLO
    assert train.main(argv) == 0
    report = _report(out)
    assert report["data"]["latency_thresholds"] == {"default": 500.0, "per_service": {"cache": 4.0, "gateway": 1000.0}}
    for service in ("cache", "gateway"):
        persistence = report["per_service"]["test"][service]["persistence"]
        assert persistence["true_positives"] + persistence["false_negatives"] > 0, f"{service} breaches its own SLO"
    # with one global 500 ms threshold the cache could never breach and the gateway always would
    checkpoint = torch.load(out / "latency_forecaster.pt", weights_only=True)
    assert checkpoint["latency_thresholds"]["per_service"] == {"cache": 4.0, "gateway": 1000.0}
    point = report["alerting"]["operating_point"]
    assert point["alert_threshold_ms"] == {"cache": pytest.approx(4.0 * point["threshold"]), "gateway": pytest.approx(1000.0 * point["threshold"])}
    assert point["alert_threshold_ms"]["cache"] < 10


def test_seed_example_command_runs(tiny_store, tmp_path, capsys):
    argv = [
        "--feature-store-path", tiny_store, "--feature-columns", "cpu_rolling_avg,path_depth,fan_out",
        "--sequence-length", "8", "--latency-threshold", "500", "--epochs", "1", "--output-dir", str(tmp_path),
        "--hidden-size", "8", "--num-layers", "2", "--dropout", "0.1", "--device", "cpu", "--samples-per-epoch", "1000",
        "--cell", "gru", "--quiet", *QUICK,
    ]
    assert train.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    report = _report(tmp_path)
    test, split = report["test"], report["data"]["splits"]["test"]
    assert f"artifacts written to {os.path.abspath(tmp_path)}/ in" in lines[1]
    assert f"test period: {split['start']} to {split['end']}, {test['n_samples']:,} samples" in lines
    confusion = f"{test['true_positives']}/{test['false_positives']}/{test['true_negatives']}/{test['false_negatives']}"
    assert f"confusion (TP/FP/TN/FN): {confusion}" in lines
    checkpoint = torch.load(tmp_path / "latency_forecaster.pt", weights_only=True)
    assert checkpoint["feature_columns"] == ["cpu_rolling_avg", "path_depth", "fan_out"]
    assert checkpoint["config"]["model"]["cell"] == "gru" and checkpoint["config"]["model"]["num_layers"] == 2
    assert checkpoint["config"]["data"]["sequence_length"] == 8


def test_help_shows_the_documented_defaults(capsys):
    # the README's table of the flags that matter
    assert_documented_defaults(
        train.build_parser(),
        {
            "--feature-store-path": "feature_store",
            "--start-ts": "None",
            "--end-ts": "None",
            "--sequence-length": "16",
            "--horizon": "5",
            "--latency-threshold": "500.0",
            "--latency-thresholds": "None",
            "--target-fpr": "0.01",
            "--epochs": "20",
            "--seed": "0",
            "--device": "auto",
            "--num-threads": "0",
            "--output-dir": "artifacts",
            "--quiet": None,
        },
    )
    with pytest.raises(SystemExit) as raised:
        train.main(["--help"])
    assert raised.value.code == 0 and capsys.readouterr().out.startswith("usage: train.py")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--feature-columns", "cpu_rolling_avg,nope"], "unknown feature column 'nope'"),
        (["--start-ts", "2024-05-03", "--end-ts", "2024-05-02"], "is not before"),
        (["--start-ts", "2031-01-01"], "has no rows"),
        (["--sequence-length", "3000"], "too little data"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (
            ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cpu", "--target-fpr", "1.5"],
            "--device cuda but no CUDA device is visible" if not torch.cuda.is_available() else "--target-fpr must be in [0, 1)",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tiny_store, tmp_path, extra, message):
    argv = ["--feature-store-path", tiny_store, "--output-dir", str(tmp_path / "out"), *TINY_TRAINING, *QUICK, *extra]
    assert_one_line_error(capsys, train.main(argv), message)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_bad_stores_exit_2(capsys, tmp_path):
    assert_one_line_error(capsys, train.main(["--feature-store-path", str(tmp_path / "absent")]), "does not exist")
    frame = hand_frame(features=("cpu",))
    frame["zone"] = "a"
    path = write_frame(frame, tmp_path / "s.parquet")
    assert_one_line_error(capsys, train.main(["--feature-store-path", path, "--feature-columns", "zone"]), "not numeric")
    no_service = write_frame(frame.drop(columns="service"), tmp_path / "n.parquet")
    assert_one_line_error(capsys, train.main(["--feature-store-path", no_service]), "no 'service' column")


def test_failed_run_keeps_earlier_artifacts(tiny_store, tmp_path, monkeypatch):
    out = str(tmp_path)
    argv = ["--feature-store-path", tiny_store, "--output-dir", out, *TINY_TRAINING, *QUICK]
    assert train.main(argv) == 0
    before = _artifact_bytes(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.plots, "forecast_vs_actual", crash)  # dies after the checkpoint is staged
    assert train.main([*argv, "--seed", "9"]) == 130
    assert _artifact_bytes(out) == before
    assert os.listdir(os.path.join(out, train.RESUME_DIR)), "the interrupted run's training state is kept, to --resume"


def _artifact_bytes(directory: str) -> dict[str, bytes]:
    """Every artifact's bytes (the hidden resume state and staging directories aside)."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory) if not name.startswith(".")}


def test_shap_samples_0_skips_the_explanation(tiny_store, tmp_path):
    argv = ["--feature-store-path", tiny_store, "--output-dir", str(tmp_path), *TINY_TRAINING, *QUICK, "--epochs", "1"]
    assert train.main(argv) == 0
    assert not any(name.startswith("feature_importance") for name in os.listdir(tmp_path))
    checkpoint = torch.load(tmp_path / "latency_forecaster.pt", weights_only=True)
    assert checkpoint["explain_background"]["windows"].shape[1:] == (6, len(checkpoint["feature_columns"]))
    assert set(_report(tmp_path)["baseline"]) == {"persistence", "window_median"}, "--baselines persistence: no gradient boosting"
