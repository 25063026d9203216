"""The gradient-boosting baseline: fitted on training spans only, bounded, chunked, and useful."""

from __future__ import annotations

import numpy as np
import pytest

from latency_forecast import baselines
from latency_forecast.baselines import GradientBoostingBaseline

L, H = 4, 2
N_SERVICES = 3


def _series(rows_per_service: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (service, minute): 3 features, the latency at t+H is 2x feature 0 at t
    plus a service level, so the trees have something to learn."""
    rng = np.random.default_rng(seed)
    n = N_SERVICES * rows_per_service
    codes = np.repeat(np.arange(N_SERVICES, dtype=np.int32), rows_per_service)
    features = rng.normal(size=(n, 3)).astype(np.float32)
    features[:, 0] = rng.uniform(5, 50, size=n)
    target = np.full(n, np.nan, dtype=np.float32)
    for code in range(N_SERVICES):
        rows = np.flatnonzero(codes == code)
        target[rows[H:]] = 2.0 * features[rows[:-H], 0] + 10.0 * code + rng.normal(0, 1, size=len(rows) - H)
    target[np.isnan(target)] = 20.0  # the first H minutes of each service: some latency
    return features, target, codes


def _ends(codes: np.ndarray, start: float, stop: float) -> np.ndarray:
    """Window ends whose whole span lies in the [start, stop) share of each service's rows."""
    ends = []
    for code in range(N_SERVICES):
        rows = np.flatnonzero(codes == code)
        first, last = rows[0] + int(start * len(rows)), rows[0] + int(stop * len(rows))
        ends.append(np.arange(first + L - 1, last - H))
    return np.concatenate(ends)


def _fit(features, target, codes, ends, **kwargs) -> GradientBoostingBaseline:
    settings = dict(sequence_length=L, horizon=H, n_services=N_SERVICES, seed=3, max_iter=40)
    settings.update(kwargs)
    return GradientBoostingBaseline.fit(features, target, codes, ends, **settings)


def _corrupt_outside(features, target, train_ends, seed=1, with_nan=True):
    """Copies in which every row the training windows do not need holds wild values: features
    outside the inputs ``t-L+1 .. t`` of every training window, latency outside ``t`` (the
    anchor) and ``t+H`` (the target). Stricter than the spans ``t-L+1 .. t+H``, so it also
    catches inputs read from ``t+1 .. t+H``."""
    inputs = np.zeros(len(target), dtype=bool)
    for offset in range(1 - L, 1):
        inputs[train_ends + offset] = True
    latency = np.zeros(len(target), dtype=bool)
    latency[train_ends] = latency[train_ends + H] = True
    rng = np.random.default_rng(seed)
    values = [1e6, -1e6, np.nan] if with_nan else [1e6, -1e6]
    wild = rng.choice(np.array(values, dtype=np.float32), size=(len(target), features.shape[1] + 1))
    features, target = features.copy(), target.copy()
    features[~inputs] = wild[~inputs, :-1]
    target[~latency] = wild[~latency, -1]
    return features, target, inputs | latency


def test_fit_reads_only_the_training_spans():
    features, target, codes = _series()
    train = _ends(codes, 0.0, 0.6)
    probe = _ends(codes, 0.7, 1.0)  # windows to compare the two fits on, read from clean rows
    clean = _fit(features, target, codes, train).predict(features, target, codes, probe)
    bad_features, bad_target, inside = _corrupt_outside(features, target, train)
    assert (~inside).sum() > len(target) // 3  # validation and test rows really were corrupted
    corrupted = _fit(bad_features, bad_target, codes, train).predict(features, target, codes, probe)
    np.testing.assert_array_equal(corrupted, clean)


def test_the_leakage_check_catches_a_fit_that_reads_one_row_late():
    """The check above is not vacuous: a fit that reads one row past its windows (ends + 1)
    reads a corrupted row and forecasts differently (finite wild values here: a NaN target
    would make scikit-learn refuse the leaky fit outright, which proves less)."""
    features, target, codes = _series()
    train = _ends(codes, 0.0, 0.6)
    probe = _ends(codes, 0.7, 1.0)
    bad_features, bad_target, _ = _corrupt_outside(features, target, train, with_nan=False)
    bad_target = np.nan_to_num(bad_target, nan=1e6)  # a late read must fit, not fail on NaN
    clean = _fit(features, target, codes, train + 1).predict(features, target, codes, probe)
    leaky = _fit(bad_features, bad_target, codes, train + 1).predict(features, target, codes, probe)
    assert not np.array_equal(leaky, clean)


@pytest.mark.parametrize("loss", baselines.LOSSES)
def test_forecasts_beat_a_constant_on_held_out_windows(loss):
    features, target, codes = _series()
    train, held_out = _ends(codes, 0.0, 0.7), _ends(codes, 0.75, 1.0)
    model = _fit(features, target, codes, train, loss=loss, max_iter=100)
    forecast = model.predict(features, target, codes, held_out)
    actual = target[held_out + H]
    assert forecast.shape == (len(held_out),) and forecast.dtype == np.float64
    assert np.isfinite(forecast).all()
    constant = np.median(target[train + H])
    assert np.mean(np.abs(forecast - actual)) < 0.5 * np.mean(np.abs(constant - actual))


def test_unanchored_forecasts_beat_a_constant_too():
    features, target, codes = _series()
    train, held_out = _ends(codes, 0.0, 0.7), _ends(codes, 0.75, 1.0)
    forecast = _fit(features, target, codes, train, anchor=False, max_iter=100).predict(features, target, codes, held_out)
    actual = target[held_out + H]
    assert np.mean(np.abs(forecast - actual)) < 0.5 * np.mean(np.abs(np.median(target[train + H]) - actual))


def test_subsample_is_bounded_and_seeded():
    features, target, codes = _series()
    train = _ends(codes, 0.0, 0.7)
    model = _fit(features, target, codes, train, max_samples=50)
    assert model.n_samples == 50 and model.n_fit_samples == 50 and model.n_early_stopping_samples == 0
    probe = _ends(codes, 0.75, 1.0)
    again = _fit(features, target, codes, train, max_samples=50)
    np.testing.assert_array_equal(again.predict(features, target, codes, probe), model.predict(features, target, codes, probe))
    other = _fit(features, target, codes, train, max_samples=50, seed=4)
    assert not np.array_equal(other.predict(features, target, codes, probe), model.predict(features, target, codes, probe))


def test_chunked_predict_equals_one_shot():
    features, target, codes = _series()
    model = _fit(features, target, codes, _ends(codes, 0.0, 0.6))
    probe = _ends(codes, 0.6, 1.0)
    one_shot = model.predict(features, target, codes, probe, chunk_size=len(probe))
    np.testing.assert_array_equal(model.predict(features, target, codes, probe, chunk_size=7), one_shot)
    assert model.predict(features, target, codes, probe[:0]).shape == (0,)


def test_early_stopping_holds_out_the_last_windows_of_each_service():
    features, target, codes = _series()
    ends = _ends(codes, 0.0, 1.0).astype(np.int64)
    fit, held = baselines._early_stopping_split(ends, codes, 0.1, L + H)
    assert not (fit & held).any()
    for code in range(N_SERVICES):
        mine = codes[ends] == code
        assert held[mine].sum() == int(mine.sum() * 0.1)
        first_held = ends[mine & held].min()
        assert ends[mine & fit].max() <= first_held - (L + H)  # an embargo between the two
        assert (ends[mine & held] >= first_held).all()


@pytest.mark.parametrize("native", [True, False])
def test_early_stopping_on_the_held_out_training_windows(monkeypatch, native):
    """With more windows than scikit-learn's early-stopping threshold, the trees stop on the
    held-out slice of training windows, with ``X_val`` or, on an older scikit-learn, without."""
    if native and not baselines._supports_validation_set():
        pytest.skip("this scikit-learn has no fit(X_val=, y_val=)")
    monkeypatch.setattr(baselines, "EARLY_STOPPING_MIN_SAMPLES", 500)
    monkeypatch.setattr(baselines, "_supports_validation_set", lambda: native)
    features, target, codes = _series()
    train = _ends(codes, 0.0, 0.7)
    model = _fit(features, target, codes, train, max_iter=200)
    assert model.n_early_stopping_samples > 0
    assert model.n_fit_samples + model.n_early_stopping_samples <= model.n_samples == len(train)
    assert 1 <= model.n_iterations < 200
    held_out = _ends(codes, 0.75, 1.0)
    forecast = model.predict(features, target, codes, held_out)
    assert np.isfinite(forecast).all()


def test_window_median_reads_only_the_window_minutes():
    target = np.arange(20, dtype=np.float32) * 10.0
    ends = np.array([3, 9, 19])
    np.testing.assert_allclose(baselines.window_median(target, ends, 4), [15.0, 75.0, 175.0])
    # anything outside t-L+1 .. t (before the window, or after t) does not change it
    corrupted = target.copy()
    corrupted[[4, 5, 10, 11, 12, 13, 14, 15]] = 1e9
    np.testing.assert_allclose(baselines.window_median(corrupted, ends, 4), [15.0, 75.0, 175.0])


def test_window_median_skips_missing_minutes_and_is_nan_without_any():
    target = np.array([1.0, np.nan, 3.0, 100.0, np.nan, np.nan, np.nan], dtype=np.float32)
    np.testing.assert_allclose(baselines.window_median(target, np.array([2, 3, 6]), 3), [2.0, 51.5, np.nan])
    assert baselines.window_median(target, np.array([], dtype=np.int64), 3).shape == (0,)


def test_window_median_beats_persistence_on_a_noisy_level():
    """The point of the member: around a steady level, a p99 that jumps minute to minute is
    forecast better by the median of the window than by its last minute."""
    rng = np.random.default_rng(0)
    target = np.exp(np.log(200.0) + rng.normal(0, 0.6, size=5000))
    ends = np.arange(15, 5000 - 5)
    actual = target[ends + 5]
    median_error = np.mean(np.abs(baselines.window_median(target, ends, 16) - actual))
    assert median_error < 0.8 * np.mean(np.abs(target[ends] - actual))
