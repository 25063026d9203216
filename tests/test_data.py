"""data.py: windows that never cross a gap, a service or a NaN; time splits with embargoes;
slicing a table by time."""

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
