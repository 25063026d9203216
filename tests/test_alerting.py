"""alerting.py: per-service latency thresholds and their file, the alert rule and its score, and
calibration on validation only, returning a new rule (checked against scikit-learn's ROC curve)."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from latency_forecast import alerting, data, evaluation, metrics, store
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig
from latency_forecast.errors import UserError
from latency_forecast.forecaster import Forecaster
from tests.helpers import TINY_MODEL, fit_tiny

# ----------------------------------------------------------------------------- thresholds


def test_thresholds_file_json_and_yaml(tmp_path):
    json_file = tmp_path / "t.json"
    json_file.write_text('{"default": 400, "cache": 50}')
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("cache: 50\nfrontend: 1200\n")
    from_json = alerting.read_latency_thresholds(DataConfig(latency_thresholds=str(json_file)))
    from_yaml = alerting.read_latency_thresholds(DataConfig(latency_thresholds=str(yaml_file), latency_threshold=300))
    assert from_json == LatencyThresholds(400.0, {"cache": 50.0})
    assert from_yaml == LatencyThresholds(300.0, {"cache": 50.0, "frontend": 1200.0})
    assert from_yaml.for_services(["cache", "other", "frontend"]).tolist() == [50.0, 300.0, 1200.0]
    assert alerting.read_latency_thresholds(DataConfig(latency_threshold=250)) == LatencyThresholds(250.0)
    assert LatencyThresholds.from_dict(from_yaml.as_dict()) == from_yaml


@pytest.mark.parametrize(
    "text, message",
    [
        ("cache: fast\n", "'cache' must be a positive number of milliseconds, got 'fast'"),
        ("cache: -5\n", "'cache' must be a positive number of milliseconds, got -5"),
        ("cache: true\n", "must be a positive number"),
        ("- 50\n", "must map service names to milliseconds"),
        ("cache: [50\n", "is not valid JSON or YAML"),
    ],
)
def test_bad_thresholds_files_are_user_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        alerting.read_latency_thresholds(DataConfig(latency_thresholds=str(path)))
    assert message in str(raised.value)


def test_unreadable_thresholds_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read --latency-thresholds"):
        alerting.read_latency_thresholds(DataConfig(latency_thresholds=str(tmp_path / "absent.json")))


# ----------------------------------------------------------------------------- the rule


def _forecast(ms, probability=None, quantiles=None):
    """The forecaster's outputs for hand-made samples."""
    from latency_forecast.forecaster import Forecast

    return Forecast(np.asarray(ms, dtype=np.float64), quantiles or {}, probability, {})


def test_rule_scores_by_hand():
    threshold = np.array([500.0, 50.0, 500.0])
    forecast = _forecast([250.0, 75.0, 500.0], probability=np.array([0.2, 0.9, 0.5], dtype=np.float32))
    np.testing.assert_allclose(AlertRule().scores(forecast, threshold), [0.5, 1.5, 1.0])
    np.testing.assert_allclose(AlertRule("probability", 0.5).scores(forecast, threshold), [0.2, 0.9, 0.5])
    with pytest.raises(UserError, match="has no breach head"):
        AlertRule("probability", 0.5).scores(_forecast([1.0, 2.0, 3.0]), threshold)
    rule = AlertRule(threshold=1.2, per_service={"cache": 0.8})
    assert rule.thresholds_for(["api", "cache"]).tolist() == [1.2, 0.8]
    assert AlertRule.from_dict(rule.as_dict()) == rule


def test_uncalibrated_rule():
    assert AlertRule.uncalibrated(ModelConfig()) == AlertRule("forecast_ratio", 1.0)
    assert AlertRule.uncalibrated(ModelConfig(multitask=True)) == AlertRule("probability", 0.5)


def test_alert_on_auto_takes_the_upper_quantile_and_falls_back_to_the_forecast():
    assert AlertConfig().alert_on == "auto"
    assert AlertRule.uncalibrated(ModelConfig(), AlertConfig()) == AlertRule("quantile_ratio", 1.0, quantile="0.9")
    assert AlertRule.uncalibrated(ModelConfig(quantiles="0.5,0.8,0.95"), AlertConfig()).quantile == "0.95"
    for quantiles in ("none", "0.5", "0.1,0.5"):
        assert AlertRule.uncalibrated(ModelConfig(quantiles=quantiles), AlertConfig()) == AlertRule(), quantiles
    assert AlertRule.uncalibrated(ModelConfig(), AlertConfig(alert_on="forecast")) == AlertRule()
    assert AlertRule.uncalibrated(ModelConfig(multitask=True), AlertConfig()) == AlertRule("probability", 0.5)
    with pytest.raises(UserError, match="--alert-on 0.8 is not one of the model's --quantiles"):
        AlertRule.uncalibrated(ModelConfig(), AlertConfig(alert_on="0.8"))


# ----------------------------------------------------------------------------- calibration


def _scores(rng, n=4000, services=2):
    codes = np.repeat(np.arange(services), n // services)
    breach = rng.random(n) < 0.1
    score = np.where(breach, rng.normal(1.5, 0.5, n), rng.normal(0.5, 0.3, n)) + 0.3 * codes
    return score, breach, codes


def _operating_point(score, breach, threshold):
    counts = metrics.alert_counts(breach, score >= threshold)
    return counts["false_positive_rate"], counts["true_positive_rate"]


def _roc_point_at(score, breach, threshold):
    """scikit-learn's ROC point of the alerts ``score >= threshold``: the curve's point at the
    lowest of its thresholds that is at least ``threshold``."""
    fpr, tpr, thresholds = roc_curve(breach, score, drop_intermediate=False)
    at = np.flatnonzero(thresholds >= threshold)[-1]
    return fpr[at], tpr[at]


def test_calibration_meets_the_target_on_validation_by_roc_curve(rng):
    score, breach, codes = _scores(rng)
    uncalibrated = AlertRule()
    rule = alerting.calibrate(score, breach, codes, ["a", "b"], uncalibrated, AlertConfig(target_fpr=0.05))
    assert rule.score == "forecast_ratio" and rule.target_fpr == 0.05 and rule.per_service == {}
    fpr, tpr = _operating_point(score, breach, rule.threshold)
    assert (fpr, tpr) == pytest.approx(_roc_point_at(score, breach, rule.threshold))
    assert 0 < fpr <= 0.05
    # the most sensitive of the conformal thresholds: the next lower negative score alerts too often
    # for the (n + 1)-sample guarantee, i.e. it lets through more than (n + 1) * target - 1 negatives
    negatives = np.sort(score[~breach])
    lower = negatives[negatives < rule.threshold][-1]
    assert np.sum(negatives >= lower) > (len(negatives) + 1) * 0.05 - 1


def test_calibration_per_service_only_with_enough_negatives(rng):
    score, breach, codes = _scores(rng)
    codes = codes.copy()
    codes[-150:] = 2  # a third service with ~135 negatives: 6.75 allowed false alarms at 5%
    services = ["a", "b", "c"]
    rule = alerting.calibrate(score, breach, codes, services, AlertRule(), AlertConfig(0.05, calibrate_per_service=True))
    assert set(rule.per_service) == {"a", "b"}, "c has too few negatives for its own threshold"
    assert alerting.MIN_ALLOWED_FALSE_ALARMS == 10
    for code, name in enumerate(services[:2]):
        mine = codes == code
        threshold = rule.thresholds_for(services)[code]
        assert threshold == rule.per_service[name] != rule.threshold
        fpr, tpr = _operating_point(score[mine], breach[mine], threshold)
        assert (fpr, tpr) == pytest.approx(_roc_point_at(score[mine], breach[mine], threshold)) and fpr <= 0.05
    assert rule.thresholds_for(services)[2] == rule.threshold


def test_calibration_returns_a_new_rule_and_changes_nothing_it_is_given(rng):
    score, breach, codes = _scores(rng)
    inputs = (score.copy(), breach.copy(), codes.copy())
    uncalibrated = AlertRule("probability", 0.5)
    before = copy.deepcopy(uncalibrated)
    settings = AlertConfig(0.02, calibrate_per_service=True)
    rule = alerting.calibrate(score, breach, codes, ["a", "b"], uncalibrated, settings)
    assert rule is not uncalibrated and rule.per_service is not uncalibrated.per_service
    assert uncalibrated == before, "the uncalibrated rule is not modified"
    assert settings == AlertConfig(0.02, calibrate_per_service=True)
    for given, kept in zip((score, breach, codes), inputs):
        np.testing.assert_array_equal(given, kept)
    assert (rule.score, rule.target_fpr) == ("probability", 0.02) and rule.threshold != 0.5
    # target 0: the uncalibrated rule, as it was
    assert alerting.calibrate(score, breach, codes, ["a", "b"], uncalibrated, AlertConfig(0.0)) == before
    # no negatives at all: the uncalibrated threshold, with the target recorded
    kept = alerting.calibrate(score[breach], breach[breach], codes[breach], ["a", "b"], uncalibrated, AlertConfig(0.05))
    assert (kept.threshold, kept.target_fpr) == (0.5, 0.05)


def test_calibration_never_sees_test_data(tiny_store, tiny_fit):
    fit = tiny_fit
    settings = AlertConfig(target_fpr=0.05, calibrate_per_service=True)
    alert_before = copy.deepcopy(fit.forecaster.alert)
    validation, rule = evaluation.calibrated_evaluation(fit.forecaster, fit.prepared, fit.ends["validation"], settings)
    assert fit.forecaster.alert == alert_before, "calibrated_evaluation leaves the forecaster alone"
    # poison everything in the test period: a calibration that looked at it would move
    poisoned = store.load_feature_store(tiny_store, fit.forecaster.feature_columns)
    in_test = data.rows_in(poisoned, fit.splits.test)
    poisoned.target[in_test] = 1e6
    poisoned.features[in_test] = 1e6
    again = evaluation.calibrated_evaluation(fit.forecaster, fit.forecaster.prepare(poisoned), fit.ends["validation"], settings)[1]
    assert again == rule
    assert rule.target_fpr == 0.05
    assert validation.model_metrics["false_positive_rate"] <= 0.05
    fpr, tpr = _roc_point_at(validation.score, validation.breach, rule.threshold)
    if not rule.per_service:
        assert (validation.model_metrics["false_positive_rate"], validation.model_metrics["true_positive_rate"]) == pytest.approx((fpr, tpr))


@pytest.fixture(scope="module")
def multitask_fit(tiny_store):
    table = store.load_feature_store(tiny_store)
    return fit_tiny(table, model_config=dataclasses.replace(TINY_MODEL, multitask=True))


def test_multitask_alerts_on_probability(multitask_fit, tiny_store):
    fit = multitask_fit
    trained = fit.forecaster
    assert trained.alert.score == "probability" and trained.alert.threshold == 0.5
    test = evaluation.evaluate(trained, fit.prepared, fit.ends["test"])
    assert ((test.score >= 0) & (test.score <= 1)).all()
    np.testing.assert_array_equal(test.score, trained.predict(fit.prepared, fit.ends["test"]).probability.astype(np.float64))
    _, rule = evaluation.calibrated_evaluation(trained, fit.prepared, fit.ends["validation"], AlertConfig(0.02))
    assert rule.score == "probability" and rule.target_fpr == 0.02
    calibrated = dataclasses.replace(trained, alert=rule)
    restored = Forecaster.from_checkpoint(calibrated.checkpoint(), trained.scaler.state(trained.feature_columns), torch.device("cpu"))
    assert restored.alert == rule
    again = evaluation.evaluate(restored, restored.prepare(store.load_feature_store(tiny_store)), fit.ends["test"])
    np.testing.assert_allclose(again.score, evaluation.evaluate(calibrated, fit.prepared, fit.ends["test"]).score, rtol=1e-5)
    np.testing.assert_array_equal(again.alert, again.score >= rule.threshold)
