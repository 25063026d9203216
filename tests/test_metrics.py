import numpy as np
import pytest

from latency_forecast import metrics


def test_hand_computed_values():
    actual = np.array([100.0, 600.0, 700.0, 200.0, 550.0])
    forecast = np.array([110.0, 650.0, 300.0, 520.0, 500.0])
    result = metrics.forecast_metrics(actual, forecast, 500.0)
    # breaches: 600, 700, 550 ; alerts: 650, 520, 500
    assert (result["true_positives"], result["false_positives"], result["true_negatives"], result["false_negatives"]) == (2, 1, 1, 1)
    assert result["true_positive_rate"] == pytest.approx(2 / 3)
    assert result["false_negative_rate"] == pytest.approx(1 / 3)
    assert result["false_positive_rate"] == pytest.approx(1 / 2)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["breach_accuracy"] == pytest.approx(3 / 5)
    errors = forecast - actual
    assert result["mae"] == pytest.approx(np.mean(np.abs(errors)))
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean(errors**2)))
    assert result["n_samples"] == 5
    assert tuple(result) == metrics.METRIC_KEYS


def test_rates_without_denominator_are_null_not_nan():
    result = metrics.forecast_metrics(np.array([10.0, 20.0]), np.array([15.0, 25.0]), 500.0)
    assert result["true_positive_rate"] is None and result["false_negative_rate"] is None
    assert result["precision"] is None
    assert result["false_positive_rate"] == 0.0
    empty = metrics.forecast_metrics(np.array([]), np.array([]), 500.0)
    assert empty["mae"] is None and empty["n_samples"] == 0


def test_threshold_per_sample_and_separate_alert_score():
    actual = np.array([40.0, 40.0, 900.0])
    forecast = np.array([60.0, 30.0, 950.0])
    per_service = metrics.forecast_metrics(actual, forecast, np.array([50.0, 50.0, 1000.0]))
    assert (per_service["true_positives"], per_service["false_positives"], per_service["true_negatives"]) == (0, 1, 2)
    scored = metrics.forecast_metrics(actual, forecast, 500.0, alert_threshold=0.5, alert_score=np.array([0.1, 0.9, 0.7]))
    assert (scored["true_positives"], scored["false_positives"]) == (1, 1)
