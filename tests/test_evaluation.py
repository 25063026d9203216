"""evaluation.py: the model beside its baselines on exactly the same samples, the alerting view
(ROC/PR-AUC checked against scikit-learn), per-service metrics and quantile coverage by hand, and
the sections of metrics.json."""

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from latency_forecast import evaluation, metrics
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.config import AlertConfig
from tests.helpers import HORIZON, hand_evaluation

# two services; a at 500 ms, b at 50 ms
CODES = np.array([0, 0, 0, 0, 1, 1, 1])
MINUTES = np.array([10, 11, 12, 13, 10, 11, 12])
FORECAST = [100.0, 600.0, 450.0, 700.0, 20.0, 60.0, 40.0]
ACTUAL = [120.0, 400.0, 550.0, 800.0, 30.0, 55.0, 70.0]
THRESHOLD = [500.0] * 4 + [50.0] * 3
PERSISTENCE = [110.0, 130.0, 420.0, 560.0, 25.0, 30.0, 52.0]


def _hand():
    return hand_evaluation(CODES, MINUTES, FORECAST, ACTUAL, THRESHOLD, persistence=PERSISTENCE)


def test_evaluation_of_hand_made_samples():
    judged = _hand()
    assert len(judged) == 7
    assert judged.breach.tolist() == [False, False, True, True, False, True, True]
    assert judged.alert.tolist() == [False, True, False, True, False, True, False]
    assert judged.true_positive.tolist() == [False, False, False, True, False, True, False]
    np.testing.assert_allclose(judged.persistence_score, [0.22, 0.26, 0.84, 1.12, 0.5, 0.6, 1.04])
    model = judged.model_metrics
    assert (model["true_positives"], model["false_positives"], model["true_negatives"], model["false_negatives"]) == (2, 1, 2, 2)
    # |errors| 20, 200, 100, 100, 10, 5, 30
    assert model["mae"] == pytest.approx(465 / 7)
    persistence = judged.persistence_metrics
    # persistence alerts at 560 (a, breach) and 52 (b, breach)
    assert (persistence["true_positives"], persistence["false_positives"], persistence["false_negatives"]) == (2, 0, 2)
    assert persistence["mae"] == pytest.approx((10 + 270 + 130 + 240 + 5 + 25 + 18) / 7)
    assert judged.baseline_metrics == {"persistence": persistence}


def test_another_alert_rule_changes_the_alerts_only():
    judged = _hand()
    stricter = judged.with_alert_rule(AlertRule(threshold=1.0, per_service={"b": 1.25}), ["a", "b"])
    assert stricter.alert_threshold.tolist() == [1.0] * 4 + [1.25] * 3
    assert stricter.alert.tolist() == [False, True, False, True, False, False, False]
    np.testing.assert_array_equal(stricter.forecast, judged.forecast)
    assert stricter.model_metrics["mae"] == judged.model_metrics["mae"]
    assert stricter.model_metrics["true_positives"] == 1


def test_per_service_by_hand():
    report = evaluation.per_service(_hand(), ["a", "b"])
    assert list(report) == ["a", "b"] and set(report["a"]) == {"model", "recurrent", "persistence"}
    a, b = report["a"]["model"], report["b"]["model"]
    assert (a["n_samples"], a["true_positives"], a["false_positives"], a["false_negatives"], a["mae"]) == (4, 1, 1, 1, 105.0)
    assert (b["n_samples"], b["true_positives"], b["false_negatives"], b["mae"]) == (3, 1, 1, 15.0)
    assert report["b"]["persistence"]["true_positives"] == 1 and report["a"]["persistence"]["mae"] == 162.5


def test_quantile_coverage_and_pinball_loss_by_hand():
    judged = hand_evaluation([0] * 4, range(4), [2.0] * 4, [1.0, 2.0, 3.0, 4.0], quantiles={"0.5": np.full(4, 2.0), "0.9": np.full(4, 3.5)})
    report = evaluation.quantile_report(judged)
    # 0.5: actual <= 2 for 1 and 2 (coverage 1/2); errors -1, 0, 1, 2 -> 0.5 * (1 + 0 + 1 + 2) / 4
    assert report["0.5"] == {"nominal": 0.5, "coverage": 0.5, "pinball_loss_ms": pytest.approx(0.5)}
    # 0.9: covers 1, 2, 3; errors -2.5, -1.5, -0.5, 0.5 -> (0.1 * 4.5 + 0.9 * 0.5) / 4
    assert report["0.9"] == {"nominal": 0.9, "coverage": 0.75, "pinball_loss_ms": pytest.approx(0.225)}


def test_alert_thresholds_in_milliseconds_by_hand(tiny_fit):
    trained = dataclasses.replace(
        tiny_fit.forecaster, alert=AlertRule(threshold=0.8, per_service={"cache": 0.5}), latency_thresholds=LatencyThresholds(500.0, {"cache": 4.0})
    )
    assert evaluation.alert_thresholds_ms(trained, ["api", "cache"]) == {"api": 400.0, "cache": 2.0}
    assert evaluation.alert_thresholds_ms(dataclasses.replace(trained, alert=AlertRule("probability", 0.5)), ["api"]) is None


# ----------------------------------------------------------------------------- on the tiny forecaster


@pytest.fixture(scope="module")
def judged(tiny_fit):
    validation, rule = evaluation.calibrated_evaluation(tiny_fit.forecaster, tiny_fit.prepared, tiny_fit.ends["validation"], AlertConfig(0.05))
    calibrated = dataclasses.replace(tiny_fit.forecaster, alert=rule)
    return calibrated, {"validation": validation, "test": evaluation.evaluate(calibrated, tiny_fit.prepared, tiny_fit.ends["test"])}


def test_model_and_persistence_on_exactly_the_same_samples(tiny_fit, judged):
    trained, evaluations = judged
    test, table, ends = evaluations["test"], tiny_fit.table, tiny_fit.ends["test"]
    np.testing.assert_array_equal(test.ends, ends)
    np.testing.assert_array_equal(test.actual, table.target[ends + HORIZON])
    np.testing.assert_array_equal(test.persistence, table.target[ends])
    np.testing.assert_array_equal(test.target_minutes, table.minutes[ends] + HORIZON)
    np.testing.assert_array_equal(test.service_codes, table.service_codes[ends])
    assert (test.latency_threshold == 300.0).all()
    forecast = trained.predict(tiny_fit.prepared, ends)
    np.testing.assert_array_equal(test.forecast, forecast.ms)
    np.testing.assert_array_equal(test.score, forecast.quantiles["0.9"] / 300.0)  # --alert-on auto: the upper quantile
    assert (test.alert_threshold == trained.alert.threshold).all()
    assert test.model_metrics["n_samples"] == test.persistence_metrics["n_samples"] == len(ends)


def test_alerting_report_against_scikit_learn(judged):
    trained, evaluations = judged
    test = evaluations["test"]
    assert test.breach.any() and not test.breach.all(), "the tiny store breaches 300 ms now and then"
    report = evaluation.alerting_report(test, HORIZON, {"persistence": ("persistence", 1.0), "persistence_at_2": ("persistence", 2.0)})
    assert report["model"]["roc_auc"] == pytest.approx(roc_auc_score(test.breach, test.score))
    assert report["model"]["pr_auc"] == pytest.approx(average_precision_score(test.breach, test.score))
    latency_ratio = test.persistence / test.latency_threshold
    for name, threshold in (("persistence", 1.0), ("persistence_at_2", 2.0)):
        view = report[name]
        assert view["roc_auc"] == pytest.approx(roc_auc_score(test.breach, latency_ratio))
        assert view["pr_auc"] == pytest.approx(average_precision_score(test.breach, latency_ratio))
        alert = latency_ratio >= threshold
        assert view["alert_threshold"] == threshold
        assert view["true_positive_rate"] == pytest.approx(np.sum(alert & test.breach) / np.sum(test.breach))
        assert view["false_positive_rate"] == pytest.approx(np.sum(alert & ~test.breach) / np.sum(~test.breach))
    episodes = metrics.episode_metrics(test.service_codes, test.target_minutes, test.breach, test.alert, HORIZON)
    assert {key: report["model"][key] for key in episodes} == episodes


def test_tradeoff_curves_are_scikit_learns_roc_curves(judged):
    trained, evaluations = judged
    test = evaluations["test"]
    report = evaluation.alerting_report(test, HORIZON, {"persistence": ("persistence", 1.0)})
    curves, points = evaluation.tradeoff_curves(test, report)
    for name, score in (("model", test.score), ("persistence", test.persistence / test.latency_threshold)):
        fpr, tpr, _ = roc_curve(test.breach, score)
        np.testing.assert_allclose(curves[name][0], fpr)
        np.testing.assert_allclose(curves[name][1], tpr)
    assert points["model (chosen)"] == (test.model_metrics["false_positive_rate"], test.model_metrics["true_positive_rate"])
    assert points["persistence"] == (report["persistence"]["false_positive_rate"], report["persistence"]["true_positive_rate"])


def test_persistence_is_compared_at_thresholds_chosen_on_validation(judged):
    trained, evaluations = judged
    validation = evaluations["validation"]
    compared = evaluation.comparisons(validation, trained.alert, AlertConfig(0.05), HORIZON)
    assert compared["persistence"] == ("persistence", 1.0)
    source, at_target = compared["persistence_at_target_fpr"]
    assert source == "persistence"
    assert at_target == metrics.calibrate_threshold(validation.persistence_score, validation.breach, 0.05)
    report = evaluation.alerting_report(validation, HORIZON, compared)
    assert report["persistence_at_target_fpr"]["false_positive_rate"] <= 0.05
    # held to the model's paging load on validation: never paging more there
    paged = report["persistence_at_model_false_alarms"]["false_alarm_episodes_per_service_day"]
    assert paged <= report["model"]["false_alarm_episodes_per_service_day"] + 1e-12


def test_matched_view_holds_every_other_forecast_to_the_models_fpr_and_skips_its_own_score():
    # the hand samples' model alerts at FPR 1/3 (one of three non-breaches); upper quantile 1.2x the forecast
    judged = hand_evaluation(CODES, MINUTES, FORECAST, ACTUAL, THRESHOLD, persistence=PERSISTENCE,
                             quantiles={"0.5": np.asarray(FORECAST), "0.9": 1.2 * np.asarray(FORECAST)})
    fpr = judged.model_metrics["false_positive_rate"]
    on_forecast = evaluation.matched_on_test(judged, AlertRule(threshold=1.0))
    assert set(on_forecast) == {"persistence", "model_quantile_0.5", "model_quantile_0.9"}
    on_upper = evaluation.matched_on_test(judged, AlertRule(threshold=1.0, score="quantile_ratio", quantile="0.9"))
    assert set(on_upper) == {"persistence", "model_forecast", "model_quantile_0.5"}
    report = evaluation.alerting_report(judged, HORIZON, on_forecast)
    for label, (source, threshold) in on_forecast.items():
        assert report[label]["source"] == source and report[label]["false_positive_rate"] <= fpr
        assert threshold == metrics.threshold_at_rate(judged.ratio(source), judged.breach, fpr)


def test_metrics_report_sections(tiny_fit, judged):
    trained, evaluations = judged
    report = evaluation.metrics_report(trained, evaluations, tiny_fit.table.services, AlertConfig(0.05))
    assert report["validation"] == evaluations["validation"].model_metrics and report["test"] == evaluations["test"].model_metrics
    for split in ("validation", "test"):
        assert report["baseline"]["persistence"][split] == evaluations[split].persistence_metrics
        assert tuple(report["baseline"]["persistence"][split]) == metrics.METRIC_KEYS
        assert set(report["per_service"][split]) == {tiny_fit.table.services[c] for c in np.unique(evaluations[split].service_codes)}
    point = report["alerting"]["operating_point"]
    assert point["threshold"] == trained.alert.threshold and point["target_fpr"] == 0.05
    assert point["validation_false_positive_rate"] == report["validation"]["false_positive_rate"] <= 0.05
    assert point["test_false_positive_rate"] == report["test"]["false_positive_rate"]
    assert point["alert_threshold_ms"] == {name: pytest.approx(trained.alert.threshold * 300.0) for name in tiny_fit.table.services}


def test_forecast_panels_show_the_services_that_breach_most_around_their_worst_minute():
    # service 0 breaches once, service 1 twice; service 2 never
    minutes = np.arange(1000)
    codes = np.repeat([0, 1, 2], [400, 400, 200])
    actual = np.full(1000, 100.0)
    actual[[100, 500, 510]] = [900.0, 700.0, 800.0]
    judged = hand_evaluation(codes, np.concatenate([minutes[:400], minutes[:400], minutes[:200]]), actual, actual)
    panels = evaluation.forecast_panels(judged, ["a", "b", "c"], n_services=2)
    assert [panel["service"] for panel in panels] == ["b", "a"]
    b, a = panels
    # b's worst minute is 110 (row 510): minutes 0 .. 290 lie within three hours of it
    assert (b["minutes"][0], b["minutes"][-1]) == (np.datetime64(0, "m"), np.datetime64(290, "m"))
    assert (a["minutes"][0], a["minutes"][-1]) == (np.datetime64(0, "m"), np.datetime64(280, "m"))
    assert b["latency_threshold"] == 500.0 and b["alert"].sum() == 2
