"""store.py: reading a feature store by the contract (hive partitions, pushdown, every violation a
user error), writing the demo layout, the readers of what the store holds, and the options the
scripts read with (the flags' time range, a model's features, a warning about invalid values)."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latency_forecast import data, store
from latency_forecast.config import TimeRangeConfig
from latency_forecast.data import format_minute, to_minute
from latency_forecast.errors import UserError
from tests.helpers import hand_frame, write_frame


def test_reads_hive_store_ignoring_other_files(tiny_store, tiny_frame):
    frame, _ = tiny_frame
    assert "chaos_manifest.json" in os.listdir(tiny_store)
    table = store.load_feature_store(tiny_store)
    assert len(table) == len(frame)
    assert table.services == sorted(frame["service"].unique())
    assert "date" not in table.feature_columns, "partition keys are not features"
    assert table.feature_columns[-1] == "target_latency_p99", "the default features end with the latency's own history"
    assert table.features.dtype == np.float32 and table.features.flags.c_contiguous
    # sorted by (service, minute), one block per service
    order = np.lexsort((table.minutes, table.service_codes))
    assert (order == np.arange(len(table))).all()
    # the values are the frame's, row for row
    expected = frame.sort_values(["service", "timestamp"])
    np.testing.assert_array_equal(table.target, expected["target_latency_p99"].to_numpy(np.float32))
    np.testing.assert_array_equal(table.features[:, 0], expected[table.feature_columns[0]].to_numpy(np.float32))


def test_reads_only_requested_columns_and_time_range(tiny_store):
    start, end = pd.Timestamp("2024-05-02T00:00:00Z"), pd.Timestamp("2024-05-02T06:00:00Z")
    table = store.load_feature_store(tiny_store, ["cpu_rolling_avg", "fan_out"], start, end)
    assert table.feature_columns == ["cpu_rolling_avg", "fan_out"]
    assert table.features.shape[1] == 2
    assert table.minutes.min() == to_minute(start)
    assert table.minutes.max() == to_minute(end) - 1


def test_single_file_and_naive_timestamps_are_utc(tmp_path):
    frame = hand_frame()
    frame["timestamp"] = frame["timestamp"].dt.tz_localize(None)
    path = write_frame(frame, tmp_path / "one.parquet")
    table = store.load_feature_store(path)
    assert format_minute(table.minutes[0]) == "2024-05-01T00:00:00Z"
    filtered = store.load_feature_store(path, start=pd.Timestamp("2024-05-01T00:10:00Z"))
    assert format_minute(filtered.minutes.min()) == "2024-05-01T00:10:00Z"


def test_integer_feature_with_nulls_becomes_nan(tmp_path):
    frame = hand_frame()
    frame["count"] = pd.array([1, None] * (len(frame) // 2), dtype="Int64")
    table = store.load_feature_store(write_frame(frame, tmp_path / "s.parquet"), ["count"])
    assert np.isnan(table.features[:, 0]).sum() == len(frame) // 2
    assert (table.features[~np.isnan(table.features[:, 0]), 0] == 1.0).all()


def test_rows_from_many_row_groups_land_sorted_whatever_their_order(tmp_path):
    """The reader streams row group by row group and places each row by its (service, minute)."""
    frame = hand_frame(services=("b", "a", "c"), minutes=40)
    frame.loc[::7, "cpu"] = np.nan
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    arrow = pa.Table.from_pandas(shuffled, preserve_index=False)
    arrow = arrow.set_column(arrow.schema.get_field_index("service"), "service", arrow.column("service").dictionary_encode())
    path = str(tmp_path / "s.parquet")
    pq.write_table(arrow, path, row_group_size=17)
    table = store.load_feature_store(path)
    expected = frame.sort_values(["service", "timestamp"])
    assert table.services == ["a", "b", "c"]
    np.testing.assert_array_equal(table.features[:, 0], expected["cpu"].to_numpy(np.float32))
    np.testing.assert_array_equal(table.target, expected["target_latency_p99"].to_numpy(np.float32))
    assert (np.diff(table.minutes)[np.diff(table.service_codes) == 0] == 1).all()


@pytest.mark.parametrize("threads, min_run", [(1, 1), (4, 1), (4, 10**9)])
def test_day_files_sorted_by_service_land_sorted_by_runs_or_rows_alike(tmp_path, monkeypatch, threads, min_run):
    """The layout write_feature_store makes (one file per day, services in runs): each run is one
    slice copy (min_run 1) or every row is placed on its own (min_run huge), read by one or four
    threads; all give the (service, minute) order."""
    frame = hand_frame(services=("b", "a", "c"), minutes=3 * 1440 // 16)
    frame["timestamp"] = frame["timestamp"].iloc[0] + (frame["timestamp"] - frame["timestamp"].iloc[0]) * 16  # 3 days
    frame.loc[::11, "cpu"] = np.nan
    store.write_feature_store(frame, str(tmp_path / "s"))
    monkeypatch.setattr(data, "WORKER_THREADS", threads)
    monkeypatch.setattr(store, "_MIN_RUN", min_run)
    table = store.load_feature_store(str(tmp_path / "s"))
    expected = frame.sort_values(["service", "timestamp"])
    assert table.services == ["a", "b", "c"]
    np.testing.assert_array_equal(table.minutes, expected["timestamp"].map(to_minute).to_numpy())
    np.testing.assert_array_equal(table.features[:, 0], expected["cpu"].to_numpy(np.float32))
    np.testing.assert_array_equal(table.target, expected["target_latency_p99"].to_numpy(np.float32))


def test_sorting_by_runs_gives_the_full_sorts_places_or_declines():
    """Rows in runs of one service at rising minutes are placed by sorting the runs alone; runs
    of a service that overlap in time, or a minute twice, are left to the full sort."""
    rng = np.random.default_rng(0)
    days = [rng.permutation(5) for _ in range(4)]  # 4 day files, 5 services each in its own order
    minutes = np.concatenate([np.arange(day * 100, day * 100 + 100) for day, order in enumerate(days) for _ in order])
    codes = np.concatenate([np.full(100, code, dtype=np.int32) for order in days for code in order])
    minutes = np.delete(minutes, [5, 250, 251]); codes = np.delete(codes, [5, 250, 251])  # gaps inside runs
    order = np.lexsort((minutes, codes))
    for cuts in ([], [1000], [250, 700, 1300]):  # one row group, or several (a run may span two)
        sorted_minutes, sorted_codes, destination = store._sort_by_runs(np.split(minutes, cuts), np.split(codes, cuts), np.int32)
        np.testing.assert_array_equal(sorted_minutes, minutes[order])
        np.testing.assert_array_equal(sorted_codes, codes[order])
        np.testing.assert_array_equal(destination[order], np.arange(len(order)))
        assert destination.dtype == np.int32

    overlapping = minutes.copy()
    second_day = (codes == codes[0]) & (minutes >= 100) & (minutes < 200)
    overlapping[second_day] -= 150  # the first service's day-2 run now overlaps its day-1 run
    assert store._sort_by_runs([overlapping], [codes], np.int32) is None
    twice = [np.append(minutes, minutes[7])], [np.append(codes, codes[7])]  # one (service, minute) twice
    assert store._sort_by_runs(*twice, np.int32) is None
    interleaved = [np.repeat(np.arange(200), 5)], [np.tile(np.arange(5, dtype=np.int32), 200)]  # one row per service per minute
    assert store._sort_by_runs(*interleaved, np.int32) is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.drop(columns=["service"]), "no 'service' column"),
        (lambda f: f.drop(columns=["timestamp"]), "no 'timestamp' column"),
        (lambda f: f.drop(columns=["target_latency_p99"]), "no 'target_latency_p99' column"),
        (lambda f: pd.concat([f, f.iloc[:3]]), "3 duplicate (service, minute) rows, e.g. a at 2024-05-01T00:00:00Z"),
        (lambda f: f.assign(timestamp=f["timestamp"].astype(str)), "not a timestamp"),
        (lambda f: f.assign(service=1), "column 'service' is int64, not a string"),
        (lambda f: f.assign(target_latency_p99="slow"), "column 'target_latency_p99' is"),
    ],
)
def test_contract_violations_are_user_errors(tmp_path, mutate, message):
    path = write_frame(mutate(hand_frame()), tmp_path / "bad.parquet")
    with pytest.raises(UserError) as raised:
        store.load_feature_store(path)
    assert message in str(raised.value)


def test_unknown_and_non_numeric_features(tmp_path):
    frame = hand_frame(features=("cpu", "queue"))
    frame["zone"] = "eu-west-1"
    path = write_frame(frame, tmp_path / "s.parquet")
    with pytest.raises(store.ColumnError, match=r"unknown feature column 'cpux'; available numeric columns: cpu, queue"):
        store.load_feature_store(path, ["cpux"])
    with pytest.raises(store.ColumnError, match=r"'zone' is (large_)?string, not numeric"):
        store.load_feature_store(path, ["zone"])
    with pytest.raises(UserError, match="names a column twice"):
        store.load_feature_store(path, ["cpu", "cpu"])
    assert store.load_feature_store(path).feature_columns == ["cpu", "queue", "target_latency_p99"]


def test_missing_path_empty_dir_unreadable_file_and_empty_range(tmp_path):
    with pytest.raises(UserError, match="does not exist; create the demo store"):
        store.load_feature_store(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("not data")
    with pytest.raises(UserError, match=r"no Parquet files"):
        store.load_feature_store(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "part-0.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match="cannot read the feature store"):
        store.load_feature_store(str(broken))
    path = write_frame(hand_frame(), tmp_path / "s.parquet")
    with pytest.raises(UserError, match="has no rows between"):
        store.load_feature_store(path, start=pd.Timestamp("2030-01-01", tz="UTC"))
    with pytest.raises(UserError, match="is not before end"):
        store.load_feature_store(path, start=pd.Timestamp("2024-05-02", tz="UTC"), end=pd.Timestamp("2024-05-01", tz="UTC"))


def test_hidden_and_underscore_files_are_not_data(tmp_path):
    root = tmp_path / "store"
    (root / "_temporary").mkdir(parents=True)
    write_frame(hand_frame(minutes=10), root / "part-0.parquet")
    write_frame(hand_frame(services=("zz",), minutes=10), root / "_temporary" / "part-1.parquet")
    write_frame(hand_frame(services=("yy",), minutes=10), root / ".part-2.parquet")
    assert store.load_feature_store(str(root)).services == ["a", "b"]


def test_parse_timestamp():
    assert store.parse_timestamp(None, "--start-ts") is None
    assert store.parse_timestamp("2024-05-01T10:00", "--start-ts") == pd.Timestamp("2024-05-01T10:00:00Z")
    assert store.parse_timestamp("2024-05-01T12:00+02:00", "--start-ts") == pd.Timestamp("2024-05-01T10:00:00Z")
    with pytest.raises(UserError, match=r"--start-ts 'yesterday-ish' is not a timestamp; use ISO-8601"):
        store.parse_timestamp("yesterday-ish", "--start-ts")


def test_write_then_date_partition_pruning_keeps_exact_bounds(tmp_path):
    frame = hand_frame(minutes=3 * 1440)
    path = str(tmp_path / "store")
    store.write_feature_store(frame, path)
    assert sorted(os.listdir(path)) == ["date=2024-05-01", "date=2024-05-02", "date=2024-05-03"]
    table = store.load_feature_store(path, start=pd.Timestamp("2024-05-01T23:58Z"), end=pd.Timestamp("2024-05-03T00:00Z"))
    assert format_minute(table.minutes.min()) == "2024-05-01T23:58:00Z"
    assert format_minute(table.minutes.max()) == "2024-05-02T23:59:00Z"
    assert len(table) == 2 * (2 + 1440)


def test_target_named_as_a_feature_is_read_once(tmp_path):
    path = write_frame(hand_frame(features=("cpu",)), tmp_path / "s.parquet")
    table = store.load_feature_store(path, ["cpu", "target_latency_p99"])
    assert table.feature_columns == ["cpu", "target_latency_p99"]
    np.testing.assert_array_equal(table.features[:, 1], table.target)


def test_time_bounds_read_the_flags(tmp_path):
    path = write_frame(hand_frame(minutes=60), tmp_path / "s.parquet")
    time_range = TimeRangeConfig("2024-05-01T00:10:00Z", "2024-05-01T00:20:00Z")
    assert store.time_bounds(time_range) == (pd.Timestamp("2024-05-01T00:10Z"), pd.Timestamp("2024-05-01T00:20Z"))
    table = store.load_feature_store(path, None, *store.time_bounds(time_range))
    assert (format_minute(table.minutes.min()), format_minute(table.minutes.max())) == ("2024-05-01T00:10:00Z", "2024-05-01T00:19:00Z")
    assert len(table) == 2 * 10
    assert store.time_bounds(TimeRangeConfig()) == (None, None)
    with pytest.raises(UserError, match="--start-ts 2024-05-02 is not before --end-ts 2024-05-01"):
        store.time_bounds(TimeRangeConfig("2024-05-02", "2024-05-01"))


def test_infinite_and_impossible_values_are_read_as_missing_and_counted(tmp_path, capsys):
    frame = hand_frame(minutes=10)
    frame.loc[[1, 2], "cpu"] = np.inf
    frame.loc[3, "cpu"] = -np.inf
    frame.loc[4, "target_latency_p99"] = -1.0  # a negative latency
    frame.loc[5, "target_latency_p99"] = 2 * 3_600_000.0  # two hours: a broken exporter
    frame.loc[6, "target_latency_p99"] = np.nan  # merely missing: not invalid
    path = write_frame(frame, tmp_path / "s.parquet")
    table = store.load_feature_store(path)
    assert table.invalid_values == {"cpu": 3, "target_latency_p99": 2}
    assert np.isnan(table.features[[1, 2, 3], 0]).all() and np.isfinite(np.delete(table.features[:, 0], [1, 2, 3])).all()
    assert np.isnan(table.target[[4, 5, 6]]).all() and np.isfinite(np.delete(table.target, [4, 5, 6])).all()
    assert capsys.readouterr().err == "", "warned only when asked"
    store.load_feature_store(path, warn_invalid=True)
    err = capsys.readouterr().err
    assert err.startswith("warning: values read as missing") and "cpu 3, target_latency_p99 2" in err


def test_a_store_without_the_models_features_is_named_as_such(tmp_path):
    path = write_frame(hand_frame(features=("cpu",)), tmp_path / "s.parquet")
    with pytest.raises(UserError, match="the store does not hold the model's features .*'queue'"):
        store.load_feature_store(path, ["cpu", "queue"], for_model=True)
    with pytest.raises(store.ColumnError, match="unknown feature column 'queue'"):
        store.load_feature_store(path, ["cpu", "queue"])
    assert store.load_feature_store(path, ["cpu"], for_model=True).feature_columns == ["cpu"]


def test_row_group_keys_whose_chunks_carry_their_own_service_dictionaries():
    """A row group can come back in chunks with different dictionaries (a writer's dictionary
    fallback): the keys name each row's own service."""
    services = pa.chunked_array([pa.array(["x", "y"]).dictionary_encode(), pa.array(["z", "x"]).dictionary_encode()])
    stamps = pa.array([0, 60_000, 0, 120_000], pa.timestamp("ms"))
    keys = store._piece_keys(pa.table({"timestamp": stamps, "service": services}), "ms")
    assert [keys.names[i] for i in keys.indices] == ["x", "y", "z", "x"]
    assert keys.minutes.tolist() == [0, 1, 0, 2]


def test_the_readers_of_what_the_store_holds_agree_with_its_rows(tmp_path):
    """minute_span (footers, or the column where a file has no statistics), service_rows and
    newest_minutes say what a full read of the rows says."""
    frame = hand_frame(services=("a", "b", "c"), minutes=3 * 1440 // 16)
    frame["timestamp"] = frame["timestamp"].iloc[0] + (frame["timestamp"] - frame["timestamp"].iloc[0]) * 16
    frame = frame[(frame["service"] != "c") | (frame["timestamp"] < pd.Timestamp("2024-05-02T00:00Z"))]
    path = str(tmp_path / "s")
    store.write_feature_store(frame, path)
    table = store.load_feature_store(path)
    assert store.minute_span(path) == data.span(table)
    no_statistics = str(tmp_path / "plain.parquet")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), no_statistics, write_statistics=False)
    assert store.minute_span(no_statistics) == data.span(table)
    assert store.service_rows(path) == {"a": 270, "b": 270, "c": 90}
    day_two = pd.Timestamp("2024-05-02T00:00Z"), pd.Timestamp("2024-05-03T00:00Z")
    assert store.service_rows(path, *day_two) == {"a": 90, "b": 90}
    newest = store.newest_minutes(path, ["b", "c", "zz"], day_two[0])
    assert newest == {"b": to_minute(day_two[0]) - 16, "c": to_minute(day_two[0]) - 16}
    assert store.newest_minutes(path, ["a"], pd.Timestamp("2024-04-01T00:00Z")) == {}
    with pytest.raises(UserError, match="has no rows; check the path"):
        store.minute_span(write_frame(frame.iloc[:0], tmp_path / "empty.parquet"))
