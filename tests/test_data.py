import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latency_forecast import data
from latency_forecast.errors import UserError
from tests.conftest import hand_frame, write_frame

# ----------------------------------------------------------------------------- reading


def test_reads_hive_store_ignoring_other_files(tiny_store, tiny_frame):
    frame, _ = tiny_frame
    table = data.load_feature_store(tiny_store)
    assert len(table) == len(frame)
    assert table.services == sorted(frame["service"].unique())
    assert "date" not in table.feature_columns, "partition keys are not features"
    assert "target_latency_p99" not in table.feature_columns
    assert table.features.dtype == np.float32 and table.features.flags.c_contiguous
    # sorted by (service, minute), one block per service
    order = np.lexsort((table.minutes, table.service_codes))
    assert (order == np.arange(len(table))).all()


def test_reads_only_requested_columns_and_time_range(tiny_store):
    start, end = pd.Timestamp("2024-05-02T00:00:00Z"), pd.Timestamp("2024-05-02T06:00:00Z")
    table = data.load_feature_store(tiny_store, ["cpu_rolling_avg", "fan_out"], start, end)
    assert table.feature_columns == ["cpu_rolling_avg", "fan_out"]
    assert table.features.shape[1] == 2
    assert table.minutes.min() == data.to_minute(start)
    assert table.minutes.max() == data.to_minute(end) - 1


def test_single_file_and_naive_timestamps_are_utc(tmp_path):
    frame = hand_frame()
    frame["timestamp"] = frame["timestamp"].dt.tz_localize(None)
    path = write_frame(frame, tmp_path / "one.parquet")
    table = data.load_feature_store(path)
    assert data.format_minute(table.minutes[0]) == "2024-05-01T00:00:00Z"
    filtered = data.load_feature_store(path, start=pd.Timestamp("2024-05-01T00:10:00Z"))
    assert data.format_minute(filtered.minutes.min()) == "2024-05-01T00:10:00Z"


def test_integer_feature_with_nulls_becomes_nan(tmp_path):
    frame = hand_frame()
    frame["count"] = pd.array([1, None] * (len(frame) // 2), dtype="Int64")
    table = data.load_feature_store(write_frame(frame, tmp_path / "s.parquet"), ["count"])
    assert np.isnan(table.features[:, 0]).sum() == len(frame) // 2


def test_rows_from_many_row_groups_land_sorted_whatever_their_order(tmp_path):
    """The reader streams row group by row group and places each row by its (service, minute)."""
    frame = hand_frame(services=("b", "a", "c"), minutes=40)
    frame.loc[::7, "cpu"] = np.nan
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    arrow = pa.Table.from_pandas(shuffled, preserve_index=False)
    arrow = arrow.set_column(arrow.schema.get_field_index("service"), "service", arrow.column("service").dictionary_encode())
    path = str(tmp_path / "s.parquet")
    pq.write_table(arrow, path, row_group_size=17)
    table = data.load_feature_store(path)
    expected = frame.sort_values(["service", "timestamp"])
    assert table.services == ["a", "b", "c"]
    np.testing.assert_array_equal(table.features[:, 0], expected["cpu"].to_numpy(np.float32))
    np.testing.assert_array_equal(table.target, expected["target_latency_p99"].to_numpy(np.float32))
    assert (np.diff(table.minutes)[np.diff(table.service_codes) == 0] == 1).all()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.drop(columns=["service"]), "no 'service' column"),
        (lambda f: f.drop(columns=["timestamp"]), "no 'timestamp' column"),
        (lambda f: f.drop(columns=["target_latency_p99"]), "no 'target_latency_p99' column"),
        (lambda f: pd.concat([f, f.iloc[:3]]), "duplicate (service, minute)"),
        (lambda f: f.assign(timestamp=f["timestamp"].astype(str)), "not a timestamp"),
    ],
)
def test_contract_violations_are_user_errors(tmp_path, mutate, message):
    path = write_frame(mutate(hand_frame()), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_feature_store(path)


def test_unknown_and_non_numeric_features(tmp_path):
    frame = hand_frame(features=("cpu", "queue"))
    frame["zone"] = "eu-west-1"
    path = write_frame(frame, tmp_path / "s.parquet")
    with pytest.raises(UserError, match=r"unknown feature column 'cpux'; available numeric columns: cpu, queue"):
        data.load_feature_store(path, ["cpux"])
    with pytest.raises(UserError, match=r"'zone' is (large_)?string, not numeric"):
        data.load_feature_store(path, ["zone"])
    assert data.load_feature_store(path).feature_columns == ["cpu", "queue"]


def test_missing_path_empty_dir_unreadable_file_and_empty_range(tmp_path):
    with pytest.raises(UserError, match="does not exist; create the demo store"):
        data.load_feature_store(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("not data")
    with pytest.raises(UserError, match=r"no Parquet files"):
        data.load_feature_store(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "part-0.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match="cannot read the feature store"):
        data.load_feature_store(str(broken))
    path = write_frame(hand_frame(), tmp_path / "s.parquet")
    with pytest.raises(UserError, match="has no rows between"):
        data.load_feature_store(path, start=pd.Timestamp("2030-01-01", tz="UTC"))
    with pytest.raises(UserError, match="is not before end"):
        data.load_feature_store(path, start=pd.Timestamp("2024-05-02", tz="UTC"), end=pd.Timestamp("2024-05-01", tz="UTC"))
    with pytest.raises(UserError, match="is not a timestamp"):
        data.parse_timestamp("yesterday-ish", "--start-ts")


def test_date_partition_pruning_keeps_exact_bounds(tmp_path):
    frame = hand_frame(minutes=3 * 1440)
    path = str(tmp_path / "store")
    data.write_feature_store(frame, path)
    assert sorted(os.listdir(path)) == ["date=2024-05-01", "date=2024-05-02", "date=2024-05-03"]
    table = data.load_feature_store(path, start=pd.Timestamp("2024-05-01T23:58Z"), end=pd.Timestamp("2024-05-03T00:00Z"))
    assert data.format_minute(table.minutes.min()) == "2024-05-01T23:58:00Z"
    assert data.format_minute(table.minutes.max()) == "2024-05-02T23:59:00Z"


# ----------------------------------------------------------------------------- windows


def _table(frame: pd.DataFrame, tmp_path, name="s.parquet") -> data.SeriesTable:
    return data.load_feature_store(write_frame(frame, tmp_path / name))


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_windows_never_cross_gaps_services_or_nans(tmp_path, seed):
    rng = np.random.default_rng(seed)
    frame = hand_frame(services=("a", "b", "c"), minutes=60, features=("cpu", "queue"))
    frame = frame.drop(index=rng.choice(len(frame), 12, replace=False))
    values = frame[["cpu", "queue", "target_latency_p99"]].to_numpy(copy=True)
    values[rng.random(values.shape) < 0.03] = np.nan
    frame[["cpu", "queue", "target_latency_p99"]] = values
    table = _table(frame, tmp_path)
    L, H = 5, 3
    ends, counts = data.window_ends(table, L, H)
    assert ends.tolist() == _brute_force_ends(table, L, H)
    assert counts.samples == len(ends)
    assert counts.incomplete_span + counts.nan_input + counts.nan_target + counts.samples == len(table)


def test_windows_gather_the_right_rows(tmp_path):
    table = _table(hand_frame(services=("a", "b"), minutes=20), tmp_path)
    ends, _ = data.window_ends(table, 4, 2)
    from latency_forecast.training import gather_windows

    windows = gather_windows(table.features, ends, 4)
    assert windows.shape == (len(ends), 4, 1)
    # hand_frame's feature is the minute index: each window is 4 consecutive minutes ending at t
    assert (windows[:, -1, 0] - windows[:, 0, 0] == 3).all()
    assert (table.target[ends + 2] - table.target[ends] == 2).all(), "target is t+H of the same service"


def test_splits_are_ordered_with_embargo_and_samples_never_straddle(tiny_store):
    table = data.load_feature_store(tiny_store)
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


def test_fraction_cut_points_follow_present_minutes_not_wall_clock(tmp_path):
    day_one = hand_frame(minutes=100, start="2024-05-01T00:00:00Z")
    day_two = hand_frame(minutes=100, start="2024-05-09T00:00:00Z")
    table = _table(pd.concat([day_one, day_two]), tmp_path)
    splits = data.fraction_splits(table, 0.25, 0.25, 0)
    # half the minutes are training, even though day two starts a week later
    assert data.format_minute(splits.train.end) == "2024-05-09T00:00:00Z"


# ----------------------------------------------------------------------------- scaling


def test_scaler_sees_training_rows_only(tiny_store):
    table = data.load_feature_store(tiny_store)
    splits = data.fraction_splits(table, 0.2, 0.2, 20)
    rows = data.rows_in(table, splits.train)
    clean = data.FeatureScaler().fit(table.features, rows)
    poisoned = table.features.copy()
    poisoned[~rows] = 1e9
    dirty = data.FeatureScaler().fit(poisoned, rows)
    np.testing.assert_array_equal(clean.scaler.mean_, dirty.scaler.mean_)
    np.testing.assert_array_equal(clean.scaler.scale_, dirty.scaler.scale_)


def test_constant_feature_scales_to_zero_not_nan(tiny_store):
    table = data.load_feature_store(tiny_store)
    scaler = data.FeatureScaler().fit(table.features, np.ones(len(table), dtype=bool))
    scaled = scaler.transform(table.features)
    constant = table.feature_columns.index("node_cpu_cores")
    assert scaler.scaler.scale_[constant] == 1.0
    assert (scaled[:, constant] == 0).all()
    finite = np.isfinite(table.features)
    assert np.isfinite(scaled[finite]).all() and np.isnan(scaled[~finite]).all()
    assert abs(np.nanmean(scaled[:, 0])) < 1e-3


def test_scaler_state_rebuilds_a_fitted_standard_scaler(tiny_store):
    import torch

    table = data.load_feature_store(tiny_store)
    scaler = data.FeatureScaler("log1p").fit(table.features, np.ones(len(table), dtype=bool))
    state = scaler.state(table.feature_columns)
    path = tiny_store + "-scaler.pt"
    torch.save(state, path)
    restored = data.FeatureScaler.from_state(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(restored.transform(table.features), scaler.transform(table.features))
    transformed = np.sign(table.features[:50]) * np.log1p(np.abs(table.features[:50]))
    np.testing.assert_allclose(
        restored.scaler.transform(np.nan_to_num(transformed)), scaler.scaler.transform(np.nan_to_num(transformed))
    )


def test_target_normalizer_is_per_service_and_inverts(tmp_path):
    table = _table(hand_frame(services=("fast", "slow"), minutes=200), tmp_path)
    table.target[table.service_codes == 1] *= 100
    normalizer = data.TargetNormalizer.fit(table, np.ones(len(table), dtype=bool))
    assert normalizer.location[1] - normalizer.location[0] > 3
    z = normalizer.normalize(table.target, table.service_codes)
    assert abs(np.median(z[table.service_codes == 0])) < 0.1 and abs(np.median(z[table.service_codes == 1])) < 0.1
    np.testing.assert_allclose(normalizer.denormalize(z, table.service_codes), table.target, rtol=1e-4)


def test_target_named_as_a_feature_is_read_once(tmp_path):
    path = write_frame(hand_frame(features=("cpu",)), tmp_path / "s.parquet")
    table = data.load_feature_store(path, ["cpu", "target_latency_p99"])
    assert table.feature_columns == ["cpu", "target_latency_p99"]
    np.testing.assert_array_equal(table.features[:, 1], table.target)
