"""data.py: windows that never cross a gap, a service or a NaN; time splits with embargoes; scalers
fitted on training rows only; slicing a table by time."""

import numpy as np
import pandas as pd
import pytest

from latency_forecast import data, store
from latency_forecast.data import TimeRange
from latency_forecast.errors import UserError
from tests.helpers import hand_frame, table_of

START = data.to_minute(pd.Timestamp("2024-05-01T00:00:00Z"))

# ----------------------------------------------------------------------------- minutes


def test_minutes_and_their_iso_strings(tmp_path):
    assert START == 1714521600 // 60  # 2024-05-01T00:00:00Z in Unix seconds, by hand
    assert data.format_minute(START + 61) == "2024-05-01T01:01:00Z"
    assert data.to_minute(pd.Timestamp("2024-05-01T00:00:59Z")) == START, "floored to the minute"
    assert data.span(table_of(hand_frame(minutes=30), tmp_path)) == TimeRange(START, START + 30)
    assert TimeRange(START, START + 90).as_dict() == {"start": "2024-05-01T00:00:00Z", "end": "2024-05-01T01:30:00Z"}


# ----------------------------------------------------------------------------- windows


def _brute_force_ends(table: data.SeriesTable, L: int, H: int) -> list[int]:
    ends = []
    for t in range(len(table)):
        rows = range(t - L + 1, t + H + 1)
        if rows.start < 0 or rows.stop > len(table):
            continue
        services = {table.service_codes[r] for r in rows}
        minutes = [table.minutes[r] for r in rows]
        if len(services) != 1 or minutes != list(range(minutes[0], minutes[0] + L + H)):
            continue
        if not np.isfinite(table.features[t - L + 1 : t + 1]).all():
            continue
        if not (np.isfinite(table.target[t + H]) and np.isfinite(table.target[t])):
            continue
        ends.append(t)
    return ends


def test_finite_rows_checks_every_value_even_where_a_row_sum_overflows():
    big = np.finfo(np.float32).max
    features = np.array(
        [[1.0, 2.0], [np.nan, 0.0], [np.inf, -np.inf], [big, big], [-big, -big], [big, np.nan], [0.0, -np.inf]],
        dtype=np.float32,
    )
    assert data.finite_rows(features).tolist() == [True, False, False, True, True, False, False]
    assert data.finite_rows(np.zeros((0, 3), dtype=np.float32)).tolist() == []


@pytest.mark.parametrize("seed, chunk_rows", [(0, 1 << 18), (1, 1 << 18), (2, 1 << 18), (0, 7), (1, 1)])
def test_windows_never_cross_gaps_services_or_nans(tmp_path, monkeypatch, seed, chunk_rows):
    monkeypatch.setattr(data, "_CHUNK_ROWS", chunk_rows)  # windows are found chunk by chunk of start positions
    rng = np.random.default_rng(seed)
    frame = hand_frame(services=("a", "b", "c"), minutes=60, features=("cpu", "queue"))
    frame = frame.drop(index=rng.choice(len(frame), 12, replace=False))
    values = frame[["cpu", "queue", "target_latency_p99"]].to_numpy(copy=True)
    values[rng.random(values.shape) < 0.03] = np.nan
    frame[["cpu", "queue", "target_latency_p99"]] = values
    table = table_of(frame, tmp_path)
    L, H = 5, 3
    ends, counts = data.window_ends(table, L, H)
    assert ends.tolist() == _brute_force_ends(table, L, H)
    assert counts.samples == len(ends)
    assert counts.incomplete_span + counts.nan_input + counts.nan_target + counts.samples == len(table)


def test_window_counts_by_hand(tmp_path):
    # one service, 10 minutes, L=3, H=2: starts 0..5 are complete (6 of the 10 positions)
    frame = hand_frame(services=("a",), minutes=10)
    frame.loc[1, "cpu"] = np.nan  # inputs of the windows starting at 0 and 1
    frame.loc[9, "target_latency_p99"] = np.nan  # the target of the window starting at 5
    ends, counts = data.window_ends(table_of(frame, tmp_path), 3, 2)
    assert counts.as_dict() == {"rows": 10, "incomplete_span": 4, "nan_input": 2, "nan_target": 1, "samples": 3}
    assert ends.tolist() == [4, 5, 6]  # windows starting at 2, 3, 4 end at t = start + L - 1


def test_latest_windows_by_hand(tmp_path):
    frame = hand_frame(services=("a", "b", "c", "d"), minutes=10)
    frame = frame.drop(index=frame.index[(frame["service"] == "b") & (frame["timestamp"] == pd.Timestamp("2024-05-01T00:08Z"))])
    frame.loc[(frame["service"] == "c") & (frame["timestamp"] == pd.Timestamp("2024-05-01T00:07Z")), "cpu"] = np.nan
    frame = frame[(frame["service"] != "d") | (frame["timestamp"] < pd.Timestamp("2024-05-01T00:02Z"))]
    table = table_of(frame, tmp_path)
    latest = data.latest_windows(table, 3, START)
    assert (table.minutes[latest.newest] - START).tolist() == [9, 9, 9, 1]
    # b misses minute 8 (so its newest complete window ends at 7), c has a NaN at 7, d 2 minutes only
    assert (table.minutes[latest.row[:3]] - START).tolist() == [9, 7, 6] and latest.row[3] == -1
    assert latest_rows(data.latest_windows(table, 3, START + 8)) == [9, None, None, None]  # none older than 8


def latest_rows(latest) -> list:
    return [None if row < 0 else int(row % 10) for row in latest.row]


def test_latest_windows_skip_newest_minutes_without_latency_when_anchored(tmp_path):
    frame = hand_frame(services=("a",), minutes=10)
    frame.loc[frame.index[-2:], "target_latency_p99"] = np.nan  # not aggregated yet
    table = table_of(frame, tmp_path, feature_columns=["cpu"])
    assert latest_rows(data.latest_windows(table, 3, START)) == [9]  # the latency is not an input
    assert latest_rows(data.latest_windows(table, 3, START, latency_at_end=True)) == [7]


def test_samples_in_keeps_whole_spans_and_require_names_the_period(tmp_path):
    table = table_of(hand_frame(services=("a",), minutes=30), tmp_path)
    ends, _ = data.window_ends(table, 4, 2)
    inside = data.samples_in(ends, table, TimeRange(START + 10, START + 20), 4, 2)
    # inputs from t-3, target at t+2: t in [13, 17]
    assert (table.minutes[inside] - START).tolist() == [13, 14, 15, 16, 17]
    with pytest.raises(UserError) as raised:
        data.require_samples_in(ends, table, TimeRange(START + 10, START + 14), 4, 2, "test")
    assert str(raised.value).startswith(
        "too little data: the test period 2024-05-01T00:10:00Z to 2024-05-01T00:14:00Z holds no complete window of 6 minutes"
    )


def test_splits_are_ordered_with_embargo_and_samples_never_straddle(tiny_store):
    table = store.load_feature_store(tiny_store)
    L, H, embargo = 8, 3, 11
    splits = data.fraction_splits(table, 0.2, 0.2, embargo)
    assert splits.train.end + embargo == splits.validation.start
    assert splits.validation.end + embargo == splits.test.start
    ends, _ = data.window_ends(table, L, H)
    parts = {name: data.samples_in(ends, table, getattr(splits, name), L, H) for name in ("train", "validation", "test")}
    assert all(len(part) for part in parts.values())
    train_last_target = (table.minutes[parts["train"]] + H).max()
    validation_first_input = (table.minutes[parts["validation"]] - L + 1).min()
    assert train_last_target < splits.train.end <= splits.validation.start <= validation_first_input
    validation_last_target = (table.minutes[parts["validation"]] + H).max()
    assert validation_last_target < (table.minutes[parts["test"]] - L + 1).min()
    assert not set(parts["train"]) & set(parts["validation"])


def test_fraction_splits_by_hand(tmp_path):
    # 100 minutes, 20% validation, 10% test, embargo 5: cuts at minutes 70 and 90
    splits = data.fraction_splits(table_of(hand_frame(services=("a",), minutes=100), tmp_path), 0.2, 0.1, 5)
    assert splits == data.Splits(TimeRange(START, START + 70), TimeRange(START + 75, START + 90), TimeRange(START + 95, START + 100))


def test_fraction_cut_points_follow_present_minutes_not_wall_clock(tmp_path):
    day_one = hand_frame(minutes=100, start="2024-05-01T00:00:00Z")
    day_two = hand_frame(minutes=100, start="2024-05-09T00:00:00Z")
    table = table_of(pd.concat([day_one, day_two]), tmp_path)
    splits = data.fraction_splits(table, 0.25, 0.25, 0)
    # half the minutes are training, even though day two starts a week later
    assert data.format_minute(splits.train.end) == "2024-05-09T00:00:00Z"


# ----------------------------------------------------------------------------- scaling


def test_scaler_sees_training_rows_only(tiny_store):
    table = store.load_feature_store(tiny_store)
    splits = data.fraction_splits(table, 0.2, 0.2, 20)
    rows = data.rows_in(table, splits.train)
    clean = data.FeatureScaler().fit(table.features, rows)
    poisoned = table.features.copy()
    poisoned[~rows] = 1e9
    dirty = data.FeatureScaler().fit(poisoned, rows)
    np.testing.assert_array_equal(clean.scaler.mean_, dirty.scaler.mean_)
    np.testing.assert_array_equal(clean.scaler.scale_, dirty.scaler.scale_)


def test_scaler_by_hand():
    features = np.array([[0.0, 5.0], [np.e - 1, 5.0], [np.nan, 5.0], [-(np.e - 1), 5.0]], dtype=np.float32)
    rows = np.array([True, True, False, True])
    scaler = data.FeatureScaler("log1p").fit(features, rows)
    # signed log1p: 0, 1, -1 -> mean 0, population std sqrt(2/3); the constant column gets scale 1
    np.testing.assert_allclose(scaler.scaler.mean_, [0.0, np.log1p(5.0)], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scaler.scaler.scale_, [np.sqrt(2 / 3), 1.0], rtol=1e-6)
    scaled = scaler.transform(features)
    np.testing.assert_allclose(scaled[[0, 1, 3], 0], [0.0, 1 / np.sqrt(2 / 3), -1 / np.sqrt(2 / 3)], rtol=1e-5, atol=1e-6)
    assert np.isnan(scaled[2, 0]) and (scaled[:, 1] == 0).all()
    identity = data.FeatureScaler("none").fit(features, rows)
    np.testing.assert_allclose(identity.scaler.mean_[0], 0.0, atol=1e-7)
    with pytest.raises(UserError, match="no training rows"):
        data.FeatureScaler().fit(features, np.zeros(4, dtype=bool))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # scikit-learn's, on the all-NaN feature
def test_auto_transform_spreads_fractions_near_saturation(monkeypatch):
    """auto: -log(1 - x) for a column whose training rows all lie in [0, 1], signed log1p for the
    rest; rows outside training do not decide it, and a fraction past 1 later stays finite."""
    monkeypatch.setattr(data, "_CHUNK_ROWS", 2)  # the bounds pool their chunks
    features = np.array([
        # utilisation, a counter, a ratio that once left [0, 1], a column never seen in training
        [0.10, 3.0, 0.5, np.nan],
        [0.88, 0.0, 1.5, np.nan],
        [0.98, 12.0, 0.2, np.nan],
        [np.nan, 7.0, 0.9, np.nan],
        [0.50, 1e6, -3.0, 0.5],  # not training: it decides nothing
    ], dtype=np.float32)
    rows = np.array([True, True, True, True, False])
    scaler = data.FeatureScaler("auto").fit(features, rows)
    assert scaler.saturating.tolist() == [True, False, False, False]
    raw = scaler._transform_block(features.copy())
    np.testing.assert_allclose(raw[[0, 1, 2], 0], -np.log(1 - np.array([0.10, 0.88, 0.98])), rtol=1e-5)
    np.testing.assert_allclose(raw[:, 1], np.log1p(features[:, 1]), rtol=1e-6)
    np.testing.assert_allclose(raw[:, 2], np.sign(features[:, 2]) * np.log1p(np.abs(features[:, 2])), rtol=1e-6)
    assert np.isnan(raw[3, 0]) and np.isnan(raw[:4, 3]).all()
    # the last points before saturation are spread, not squeezed as log1p squeezes them
    assert raw[2, 0] - raw[1, 0] > 1.5 > 10 * (np.log1p(0.98) - np.log1p(0.88))
    later = np.array([[1.0, 1.0, 1.0, 1.0], [1.7, 1.0, 1.0, 1.0], [-0.2, 1.0, 1.0, 1.0]], dtype=np.float32)
    scaled = scaler.transform(later)
    assert np.isfinite(scaled).all() and scaled[0, 0] == scaled[1, 0]
    np.testing.assert_allclose(scaled[2, 0], (0.0 - scaler.scaler.mean_[0]) / scaler.scaler.scale_[0], rtol=1e-5)
    inplace = later.copy()
    np.testing.assert_array_equal(scaler.transform(inplace, inplace=True), scaled)
    assert data.FeatureScaler("log1p").fit(features, rows).saturating is None


def test_scaler_pools_its_chunks_into_standard_scalers_fit(monkeypatch, rng):
    """Chunk by chunk (3 rows each here), NaNs ignored: the mean and variance StandardScaler
    finds on the transformed training rows at once."""
    from sklearn.preprocessing import StandardScaler

    features = (rng.lognormal(2.0, 1.5, size=(40, 3)) * rng.choice([-1, 1], size=(40, 3))).astype(np.float32)
    features[rng.random((40, 3)) < 0.2] = np.nan
    features[:, 2] = np.nan  # never seen: constant 0
    rows = rng.random(40) < 0.7
    monkeypatch.setattr(data, "_CHUNK_ROWS", 3)
    fitted = data.FeatureScaler("log1p").fit(features, rows).scaler
    transformed = np.sign(features[rows]) * np.log1p(np.abs(features[rows]))
    reference = StandardScaler().fit(transformed[:, :2])
    np.testing.assert_allclose(fitted.mean_[:2], reference.mean_, rtol=1e-6)
    np.testing.assert_allclose(fitted.var_[:2], reference.var_, rtol=1e-5)
    np.testing.assert_array_equal(fitted.n_samples_seen_[:2], reference.n_samples_seen_)
    assert fitted.mean_[2] == 0.0 and fitted.scale_[2] == 1.0 and fitted.n_samples_seen_[2] == 0


def test_constant_feature_scales_to_zero_not_nan(tiny_store):
    table = store.load_feature_store(tiny_store)
    scaler = data.FeatureScaler().fit(table.features, np.ones(len(table), dtype=bool))
    scaled = scaler.transform(table.features)
    constant = table.feature_columns.index("node_cpu_cores")
    assert scaler.scaler.scale_[constant] == 1.0
    assert (scaled[:, constant] == 0).all()
    finite = np.isfinite(table.features)
    assert np.isfinite(scaled[finite]).all() and np.isnan(scaled[~finite]).all()
    assert abs(np.nanmean(scaled[:, 0])) < 1e-3


def test_scaler_state_rebuilds_a_fitted_standard_scaler(tiny_store, tmp_path):
    import torch

    table = store.load_feature_store(tiny_store)
    for transform in ("auto", "log1p"):
        fitted = data.FeatureScaler(transform).fit(table.features, np.ones(len(table), dtype=bool))
        torch.save(fitted.state(table.feature_columns), tmp_path / "scaler.pt")
        restored = data.FeatureScaler.from_state(torch.load(tmp_path / "scaler.pt", weights_only=True))
        np.testing.assert_array_equal(restored.transform(table.features), fitted.transform(table.features))
    auto = data.FeatureScaler("auto").fit(table.features, np.ones(len(table), dtype=bool))
    assert {"cpu_rolling_avg", "mem_usage"} <= set(auto.state(table.feature_columns)["saturating_columns"])
    assert not set(auto.state(table.feature_columns)["saturating_columns"]) & {"request_rate", "queue_depth"}
    scaler = data.FeatureScaler("log1p").fit(table.features, np.ones(len(table), dtype=bool))
    transformed = np.sign(table.features[:50]) * np.log1p(np.abs(table.features[:50]))
    np.testing.assert_allclose(
        restored.scaler.transform(np.nan_to_num(transformed)), scaler.scaler.transform(np.nan_to_num(transformed))
    )


def test_target_normalizer_centres_each_service_on_one_scale_and_inverts(tmp_path):
    table = table_of(hand_frame(services=("fast", "slow"), minutes=200), tmp_path)
    table.target[table.service_codes == 1] *= 100
    table.target[np.flatnonzero(table.service_codes == 1)[::2]] *= 20  # bimodal: a wide spread of its own
    normalizer = data.TargetNormalizer.fit(table, np.ones(len(table), dtype=bool))
    assert normalizer.location[1] - normalizer.location[0] > 3
    assert normalizer.scale.tolist() == [normalizer.pooled[1]] * 2
    own = data.TargetNormalizer.fit(table, np.ones(len(table), dtype=bool), per_service_scale=True)
    assert own.scale[1] > 2 * own.scale[0] and own.location.tolist() == normalizer.location.tolist()
    # a spike is measured in the service's own spread, whatever the scale: 20x its median is one on
    # the steadier service, not on the bimodal one (20x is its other mode)
    spikes = normalizer.spikes(np.expm1(normalizer.location + np.log(20.0)), np.array([0, 1]), z=3.0)
    assert spikes.tolist() == [True, False] and (normalizer.spread == own.scale).all()
    z = normalizer.normalize(table.target, table.service_codes)
    assert abs(np.median(z[table.service_codes == 0])) < 0.1 and abs(np.median(z[table.service_codes == 1])) < 0.1
    np.testing.assert_allclose(normalizer.denormalize(z, table.service_codes), table.target, rtol=1e-4)
    # forecasts are capped at the largest latency seen in training
    assert normalizer.denormalize(np.array([1e3]), np.array([1]))[0] == pytest.approx(float(table.target.max()), rel=1e-5)
    again = data.TargetNormalizer.from_state(normalizer.state())
    np.testing.assert_array_equal(again.location, normalizer.location)
    assert (again.pooled, again.ceiling) == (normalizer.pooled, normalizer.ceiling)


# ----------------------------------------------------------------------------- rows of a range


def test_table_in_is_what_a_pushed_down_read_returns(tiny_store):
    full = store.load_feature_store(tiny_store)
    start, end = pd.Timestamp("2024-05-02T03:00:00Z"), pd.Timestamp("2024-05-02T09:30:00Z")
    sliced = data.table_in(full, TimeRange(data.to_minute(start), data.to_minute(end)))
    read = store.load_feature_store(tiny_store, None, start, end)
    assert sliced.services == read.services and sliced.feature_columns == read.feature_columns
    for name in ("minutes", "service_codes", "features", "target"):
        np.testing.assert_array_equal(getattr(sliced, name), getattr(read, name))


def test_table_in_drops_services_absent_from_the_range(tmp_path):
    frame = hand_frame(services=("a", "b", "c"), minutes=40)
    frame = frame[(frame["service"] != "b") | (frame["timestamp"] >= pd.Timestamp("2024-05-01T00:30:00Z"))]
    table = table_of(frame, tmp_path)
    early = data.table_in(table, TimeRange(START, START + 30))
    assert early.services == ["a", "c"] and set(early.service_codes) == {0, 1}
    np.testing.assert_array_equal(early.target[early.service_codes == 1], 30.0 + np.arange(30))
