"""Issue: per-service latency thresholds, an alert threshold calibrated on validation only,
the multitask breach head, and the on-call numbers in metrics.json."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import train
from latency_forecast import config, data, pipeline
from latency_forecast.config import AlertConfig, DataConfig, LatencyThresholds, ModelConfig, TrainingConfig
from latency_forecast.errors import UserError
from tests.conftest import TINY_TRAINING


def test_thresholds_file_json_and_yaml(tmp_path):
    json_file = tmp_path / "t.json"
    json_file.write_text('{"default": 400, "cache": 50}')
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("cache: 50\nfrontend: 1200\n")
    from_json = config.latency_thresholds(DataConfig(latency_thresholds=str(json_file)))
    from_yaml = config.latency_thresholds(DataConfig(latency_thresholds=str(yaml_file), latency_threshold=300))
    assert from_json == LatencyThresholds(400.0, {"cache": 50.0})
    assert from_yaml == LatencyThresholds(300.0, {"cache": 50.0, "frontend": 1200.0})
    assert from_yaml.for_services(["cache", "other", "frontend"]).tolist() == [50.0, 300.0, 1200.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: fast\n")
    with pytest.raises(UserError, match="positive number of milliseconds"):
        config.latency_thresholds(DataConfig(latency_thresholds=str(bad)))
    with pytest.raises(UserError, match="cannot read --latency-thresholds"):
        config.latency_thresholds(DataConfig(latency_thresholds=str(tmp_path / "absent.json")))


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
    argv = ["--feature-store-path", two_scales_store, "--output-dir", str(out), "--latency-thresholds", str(thresholds), *TINY_TRAINING]
    assert train.main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["data"]["latency_thresholds"] == {"default": 500.0, "per_service": {"cache": 4.0, "gateway": 1000.0}}
    for service in ("cache", "gateway"):
        persistence = report["per_service"]["test"][service]["persistence"]
        assert persistence["true_positives"] + persistence["false_negatives"] > 0, f"{service} breaches its own SLO"
    # with one global 500 ms threshold the cache could never breach and the gateway always would
    checkpoint = torch.load(out / "latency_forecaster.pt", weights_only=True)
    assert checkpoint["latency_thresholds"]["per_service"] == {"cache": 4.0, "gateway": 1000.0}
    assert report["alerting"]["operating_point"]["alert_threshold_ms"]["cache"] < 10


def _fitted(store, multitask=False):
    table = data.load_feature_store(store)
    data_config = DataConfig(sequence_length=6, horizon=2)
    splits = data.fraction_splits(table, 0.2, 0.2, data_config.embargo)
    forecaster, prepared, _ = pipeline.fit_forecaster(
        table, splits.train, splits.validation, data_config, ModelConfig(hidden_size=8, multitask=multitask),
        TrainingConfig(epochs=2, samples_per_epoch=2000), progress=False, log=lambda _: None,
        latency_thresholds=LatencyThresholds(300.0),
    )
    ends = {name: data.samples_in(prepared.ends, table, getattr(splits, name), 6, 2) for name in ("validation", "test")}
    return table, splits, forecaster, prepared, ends


def test_calibration_never_sees_test_data(tiny_store):
    table, splits, forecaster, prepared, ends = _fitted(tiny_store)
    validation = pipeline.evaluate(forecaster, prepared, ends["validation"])
    rule = pipeline.calibrate(forecaster, validation, table, AlertConfig(target_fpr=0.05, calibrate_per_service=True))
    # poison everything in the test period: a calibration that looked at it would move
    poisoned = data.load_feature_store(tiny_store)
    in_test = data.rows_in(poisoned, splits.test)
    poisoned.target[in_test] = 1e6
    poisoned.features[in_test] = 1e6
    prepared_poisoned = pipeline.prepare(poisoned, forecaster)
    again = pipeline.calibrate(
        forecaster, pipeline.evaluate(forecaster, prepared_poisoned, ends["validation"]), table, AlertConfig(0.05, True)
    )
    assert again == rule
    assert rule["target_fpr"] == 0.05
    evaluation = validation.with_alert_rule(forecaster.alert, table.services)
    assert evaluation.model_metrics["false_positive_rate"] <= 0.05


def test_multitask_alerts_on_probability(tiny_store):
    table, splits, forecaster, prepared, ends = _fitted(tiny_store, multitask=True)
    assert forecaster.alert.score == "probability" and forecaster.alert.threshold == 0.5
    evaluation = pipeline.evaluate(forecaster, prepared, ends["test"])
    assert ((evaluation.score >= 0) & (evaluation.score <= 1)).all()
    pipeline.calibrate(forecaster, pipeline.evaluate(forecaster, prepared, ends["validation"]), table, AlertConfig(0.02))
    assert forecaster.alert.score == "probability" and forecaster.alert.target_fpr == 0.02
    restored = pipeline.Forecaster.from_checkpoint(forecaster.checkpoint(), forecaster.scaler.state(table.feature_columns), torch.device("cpu"))
    again = pipeline.evaluate(restored, pipeline.prepare(data.load_feature_store(tiny_store), restored), ends["test"])
    np.testing.assert_allclose(again.score, pipeline.evaluate(forecaster, prepared, ends["test"]).score, rtol=1e-5)


def test_metrics_json_has_the_on_call_numbers(tiny_store, tmp_path):
    assert train.main(["--feature-store-path", tiny_store, "--output-dir", str(tmp_path), "--target-fpr", "0.02", *TINY_TRAINING]) == 0
    alerting = json.loads((tmp_path / "metrics.json").read_text())["alerting"]
    point = alerting["operating_point"]
    assert point["target_fpr"] == 0.02 and point["validation_false_positive_rate"] <= 0.02
    assert "test_false_positive_rate" in point
    for split in ("validation", "test"):
        for who in ("model", "persistence"):
            assert {"roc_auc", "pr_auc", "episodes", "anticipated_share", "median_lead_minutes", "false_alarm_episodes_per_service_day"} <= set(alerting[split][who])
    # persistence held to the model's paging load: matched on validation, never paging more there
    paged, model = alerting["validation"]["persistence_at_model_false_alarms"], alerting["validation"]["model"]
    assert paged["false_alarm_episodes_per_service_day"] <= model["false_alarm_episodes_per_service_day"] + 1e-12
    assert (tmp_path / "alert_tradeoff.png").stat().st_size > 10_000
