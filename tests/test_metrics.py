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
    # errors 10, 50, -400, 320, -50: |e| sums to 830, e^2 to 100 + 2500 + 160000 + 102400 + 2500 = 267500
    assert result["mae"] == pytest.approx(166.0)
    assert result["rmse"] == pytest.approx(np.sqrt(53_500.0))
    assert result["n_samples"] == 5
    assert tuple(result) == metrics.METRIC_KEYS


def test_errors_on_four_samples_by_hand():
    # errors 10, -10, 30, -50: MAE (10 + 10 + 30 + 50) / 4 = 25, RMSE sqrt((100 + 100 + 900 + 2500) / 4) = 30
    result = metrics.forecast_metrics(np.array([100.0, 200.0, 300.0, 400.0]), np.array([110.0, 190.0, 330.0, 350.0]), 250.0)
    assert result["mae"] == 25.0 and result["rmse"] == 30.0
    # breaches 300, 400; alerts 330, 350: all four decided right
    assert (result["true_positives"], result["true_negatives"], result["breach_accuracy"]) == (2, 2, 1.0)


def test_rate():
    assert metrics.rate(1, 4) == 0.25 and metrics.rate(0, 3) == 0.0
    assert metrics.rate(0, 0) is None


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


def test_calibration_picks_the_most_sensitive_threshold_within_the_target():
    rng = np.random.default_rng(0)
    breach = np.zeros(1000, dtype=bool)
    breach[:50] = True
    score = np.where(breach, rng.normal(2.0, 0.5, 1000), rng.normal(0.0, 1.0, 1000))
    threshold = metrics.calibrate_threshold(score, breach, 0.01)
    negatives = score[~breach]
    assert np.mean(negatives >= threshold) <= 0.01
    # one notch lower would break the target: it is the most sensitive such threshold
    lower = np.sort(negatives)[::-1][int(0.01 * len(negatives))]
    assert np.mean(negatives >= lower) > 0.01
    assert metrics.calibrate_threshold(score[breach], breach[breach], 0.01) is None


def test_calibration_by_hand():
    # ten normal samples scored 0.0 .. 0.9 and one breach at 0.75: the conformal rank for FPR 0.2 is
    # ceil(11 * 0.8) = 9, so the threshold sits just above the 9th smallest negative (0.8): one false alarm
    score = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.75])
    breach = np.arange(11) == 10
    threshold = metrics.calibrate_threshold(score, breach, 0.2)
    assert threshold == np.nextafter(0.8, np.inf)  # alerts: 0.9 only
    assert metrics.calibrate_threshold(score, breach, 0.0) == np.nextafter(0.9, np.inf), "no false alarm allowed"
    assert metrics.calibrate_threshold(score, breach, 0.999) == np.nextafter(0.0, np.inf)


def test_calibration_with_ties_never_exceeds_the_target():
    score = np.array([1.0] * 50 + [0.5] * 50)
    breach = np.zeros(100, dtype=bool)
    threshold = metrics.calibrate_threshold(score, breach, 0.3)
    assert np.mean(score >= threshold) <= 0.3


def test_episode_metrics_by_hand():
    # service 0, minutes 0..19; breach episode at 10-12; alerts made for minutes 8 and 9..10 (fired at 8-H..)
    horizon = 3
    minutes = np.arange(20)
    codes = np.zeros(20, dtype=int)
    breach = np.isin(minutes, [10, 11, 12])
    alert = np.isin(minutes, [10, 16, 17])  # the alert for minute 10 was fired at minute 7
    result = metrics.episode_metrics(codes, minutes, breach, alert, horizon)
    assert result["episodes"] == 1 and result["anticipated_episodes"] == 1
    assert result["median_lead_minutes"] == 3.0  # fired at 7 for an episode starting at 10
    assert result["alert_episodes"] == 2 and result["false_alarm_episodes"] == 1
    late = metrics.episode_metrics(codes, minutes, breach, np.isin(minutes, [13]), horizon)
    assert late["anticipated_episodes"] == 0, "an alert fired after the breach began does not anticipate it"
    # a gap in minutes splits episodes; another service never merges with this one
    two = metrics.episode_metrics(np.array([0, 0, 1, 1]), np.array([5, 7, 6, 7]), np.ones(4, bool), np.zeros(4, bool), horizon)
    assert two["episodes"] == 3


def test_ranking_metrics():
    breach = np.array([0, 0, 1, 1], dtype=bool)
    assert metrics.ranking_metrics(np.array([0.1, 0.2, 0.8, 0.9]), breach) == {"roc_auc": 1.0, "pr_auc": 1.0}
    # by hand: of the 4 (breach, normal) pairs, 0.35 < 0.4 is the one ranked wrong -> ROC-AUC 3/4;
    # ranked 0.8 (breach), 0.4, 0.35 (breach), 0.1: precision 1 at recall 1/2, 2/3 at recall 1 -> AP 5/6
    hand = metrics.ranking_metrics(np.array([0.1, 0.4, 0.35, 0.8]), breach)
    assert hand == {"roc_auc": pytest.approx(0.75), "pr_auc": pytest.approx(5 / 6)}
    # a tie between a breach and a normal sample counts one half
    assert metrics.ranking_metrics(np.array([0.1, 0.5, 0.5, 0.9]), breach)["roc_auc"] == pytest.approx(0.875)
    assert metrics.ranking_metrics(np.array([0.1, 0.2]), np.array([False, False])) == {"roc_auc": None, "pr_auc": None}


def test_roc_points_by_hand():
    fpr, tpr = metrics.roc_points(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], dtype=bool))
    # thresholds above all, 0.8, 0.4, 0.35, 0.1
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
    empty = metrics.roc_points(np.array([0.1, 0.2]), np.array([True, True]))
    assert len(empty[0]) == len(empty[1]) == 0


def test_false_alarm_matching_picks_the_most_sensitive_threshold_within_the_paging_budget():
    # one service, two days of minutes (2 service-days), no breach at all
    minutes = np.arange(2880)
    codes = np.zeros(2880, dtype=np.int64)
    breach = np.zeros(2880, dtype=bool)
    score = np.zeros(2880)
    score[100:110] = 0.9  # one long run: a single false-alarm episode above 0.8
    score[[500, 700, 900, 1100]] = 0.6  # four isolated blips, each its own episode above 0.5
    rate = lambda threshold: metrics.episode_metrics(codes, minutes, breach, score >= threshold, 0)["false_alarm_episodes_per_service_day"]

    budget = 0.5  # one episode over the two days
    threshold = metrics.match_false_alarm_rate(codes[::-1], minutes[::-1], breach[::-1], score[::-1], budget)  # any order
    assert rate(threshold) <= budget and 0.6 < threshold <= 0.9
    generous = metrics.match_false_alarm_rate(codes, minutes, breach, score, 2.5)  # five episodes allowed
    assert rate(generous) <= 2.5 and generous <= 0.6
    none = metrics.match_false_alarm_rate(codes, minutes, breach, score, 0.0)
    assert not (score >= none).any()


def test_threshold_at_rate_allows_exactly_that_share_of_in_sample_false_positives():
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 5.0])
    breach = np.array([False] * 10 + [True])
    for rate, false_positives in ((0.0, 0), (0.1, 1), (0.25, 2), (1.0, 10)):
        threshold = metrics.threshold_at_rate(score, breach, rate)
        assert int(((score >= threshold) & ~breach).sum()) == false_positives
        assert score[breach][0] >= threshold
    assert metrics.threshold_at_rate(score[breach], breach[breach], 0.1) is None
