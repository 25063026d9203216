"""ensemble.py: greedy ensemble selection by hand, the shipped mean, quantiles that never cross."""

import numpy as np
import pytest

from latency_forecast import ensemble


def test_selection_weighs_members_by_the_mae_of_their_mean():
    actual = np.array([10.0, 20.0, 30.0, 40.0])
    # "low" is 4 ms under everywhere, "high" 4 ms over: their mean is exact, each alone is 4 off
    forecasts = {"recurrent": actual - 4.0, "gradient_boosting": actual + 4.0, "persistence": actual + 40.0}
    weights = ensemble.select_weights(forecasts, actual, rounds=10)
    assert weights == {"recurrent": 0.5, "gradient_boosting": 0.5, "persistence": 0.0}
    shipped = ensemble.combine(weights, forecasts)
    np.testing.assert_allclose(shipped, actual)
    assert np.mean(np.abs(shipped - actual)) < min(np.mean(np.abs(f - actual)) for f in forecasts.values())


def test_a_member_better_everywhere_takes_every_round_and_ties_go_to_the_first():
    actual = np.arange(1.0, 50.0)
    best = ensemble.select_weights({"recurrent": actual + 5, "persistence": actual}, actual)
    assert best == {"recurrent": 0.0, "persistence": 1.0}
    tie = ensemble.select_weights({"recurrent": actual + 1, "persistence": actual + 1}, actual)
    assert tie == {"recurrent": 1.0, "persistence": 0.0}
    assert sum(ensemble.select_weights({"a": actual * 1.1, "b": actual * 0.8, "c": actual + 3}, actual).values()) == pytest.approx(1.0)


def test_samples_without_a_forecast_or_a_truth_are_left_out():
    actual = np.array([10.0, np.nan, 30.0])
    forecasts = {"recurrent": np.array([11.0, 0.0, 31.0]), "persistence": np.array([np.nan, 20.0, 30.0])}
    assert ensemble.select_weights(forecasts, actual, rounds=4) == {"recurrent": 0.0, "persistence": 1.0}
    assert ensemble.select_weights({"recurrent": np.array([np.nan])}, np.array([1.0])) == {"recurrent": 1.0}


def test_the_mean_reads_no_member_of_weight_zero():
    forecasts = {"recurrent": np.array([1.0, 2.0]), "persistence": np.array([np.nan, np.nan])}
    np.testing.assert_array_equal(ensemble.combine({"recurrent": 1.0, "persistence": 0.0}, forecasts), [1.0, 2.0])


def test_quantiles_move_with_the_shipped_forecast_and_never_cross(rng):
    recurrent = rng.uniform(10, 100, 200)
    quantiles = {"0.5": recurrent, "0.9": recurrent * rng.uniform(1.0, 2.0, 200), "0.1": recurrent * rng.uniform(0.5, 1.0, 200)}
    shipped = recurrent * rng.uniform(0.3, 3.0, 200)
    moved = ensemble.rescale_quantiles(quantiles, recurrent, shipped)
    assert list(moved) == ["0.1", "0.5", "0.9"]
    np.testing.assert_allclose(moved["0.5"], shipped)
    np.testing.assert_allclose(moved["0.9"] / shipped, quantiles["0.9"] / recurrent, err_msg="the band keeps its relative width")
    assert (np.diff(np.stack(list(moved.values())), axis=0) >= 0).all()
    assert ensemble.rescale_quantiles({}, recurrent, shipped) == {}


def test_a_member_without_a_forecast_gives_its_weight_to_the_others():
    forecasts = {"recurrent": np.array([10.0, 10.0, 10.0]), "persistence": np.array([20.0, np.nan, np.nan]), "gradient_boosting": np.array([40.0, 40.0, np.nan])}
    shipped = ensemble.combine({"recurrent": 0.0, "persistence": 0.5, "gradient_boosting": 0.5}, forecasts)
    np.testing.assert_allclose(shipped, [30.0, 40.0, 10.0])
