"""parquet.py: which files are a store's data, its hive partition keys, the time range as a filter
that prunes day partitions, row groups and the minutes their footers hold, and Arrow's errors as one
line that names the store or the file."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latency_forecast import parquet, store
from latency_forecast.data import to_minute
from latency_forecast.errors import UserError
from tests.helpers import hand_frame, write_frame


def _day_store(tmp_path, days=3) -> str:
    path = str(tmp_path / "s")
    store.write_feature_store(hand_frame(minutes=days * 1440 // 60).assign(
        timestamp=lambda f: f["timestamp"].iloc[0] + (f["timestamp"] - f["timestamp"].iloc[0]) * 60), path)
    return path


def test_open_dataset_keeps_the_data_files_and_names_the_partition_keys(tmp_path):
    path = _day_store(tmp_path)
    (tmp_path / "s" / "_SUCCESS").write_text("")
    (tmp_path / "s" / "notes.txt").write_text("not data")
    os.makedirs(tmp_path / "s" / ".staging")
    write_frame(hand_frame(services=("zz",)), tmp_path / "s" / ".staging" / "part-0.parquet")
    dataset, keys = parquet.open_dataset(path)
    assert keys == {"date"}
    assert [os.path.relpath(name, path) for name in dataset.files] == [
        f"date=2024-05-0{day}/part-0.parquet" for day in (1, 2, 3)
    ]
    assert parquet.open_dataset(write_frame(hand_frame(), tmp_path / "one.parquet"))[1] == set()


def test_the_time_filter_prunes_day_partitions_and_keeps_exact_bounds(tmp_path):
    dataset, keys = parquet.open_dataset(_day_store(tmp_path))
    start, end = pd.Timestamp("2024-05-02T00:00Z"), pd.Timestamp("2024-05-02T05:00Z")
    row_filter = parquet.time_filter(dataset, keys, start, end)
    pieces = parquet.row_groups(dataset, row_filter)
    assert {os.path.basename(os.path.dirname(piece.path)) for piece in pieces} == {"date=2024-05-02"}
    minutes = np.concatenate([parquet.minutes_of(batch.column(0), "ms") for batch in parquet.scan(dataset, ["timestamp"], row_filter)])
    assert minutes.min() == to_minute(start) and minutes.max() == to_minute(end) - 60
    assert len(minutes) == 2 * 5
    assert parquet.time_filter(dataset, set(), None, None) is None


def test_a_naive_timestamp_column_is_filtered_as_utc(tmp_path):
    frame = hand_frame(minutes=30)
    frame["timestamp"] = frame["timestamp"].dt.tz_localize(None)
    dataset, keys = parquet.open_dataset(write_frame(frame, tmp_path / "naive.parquet"))
    row_filter = parquet.time_filter(dataset, keys, pd.Timestamp("2024-05-01T00:10Z"), None)
    assert sum(batch.num_rows for batch in parquet.scan(dataset, ["timestamp"], row_filter)) == 2 * 20


def test_file_minutes_come_from_the_footer_or_else_the_column(tmp_path):
    frame = hand_frame(services=("a",), minutes=30)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    first = to_minute(pd.Timestamp("2024-05-01T00:00Z"))
    with_statistics = str(tmp_path / "footer.parquet")
    pq.write_table(table, with_statistics, row_group_size=10)
    dataset, _ = parquet.open_dataset(with_statistics)
    (fragment,) = dataset.get_fragments()
    assert parquet.file_minutes(fragment, "ms") == [first, first + 9, first + 10, first + 19, first + 20, first + 29]
    without = str(tmp_path / "plain.parquet")
    pq.write_table(table, without, row_group_size=10, write_statistics=False)
    dataset, _ = parquet.open_dataset(without)
    (fragment,) = dataset.get_fragments()
    assert parquet.file_minutes(fragment, "ms") == [first, first + 29]


def test_minutes_are_floored_whatever_the_unit():
    stamps = pa.array([-1, 59_999, 60_000, 119_999], pa.timestamp("ms"))
    assert parquet.minutes_of(stamps, "ms").tolist() == [-1, 0, 1, 1]
    assert parquet.minutes_of(pa.array([59, 60], pa.timestamp("s")), "s").tolist() == [0, 1]


def test_arrow_errors_become_one_line_naming_the_store_and_the_fix():
    with pytest.raises(UserError) as raised:
        with parquet.reading("somewhere", "fix it"):
            raise pa.ArrowInvalid("bad footer\nmore detail")
    assert str(raised.value) == "cannot read the feature store somewhere: bad footer; fix it"
    assert isinstance(raised.value.__cause__, pa.ArrowInvalid)
    with pytest.raises(UserError, match="check that every \\*.parquet file is valid Parquet"):
        with parquet.reading("somewhere"):
            raise OSError("disk gone")
    with pytest.raises(KeyError):  # not an I/O error: a bug keeps its own
        with parquet.reading("somewhere"):
            raise KeyError("x")


def test_a_file_broken_after_opening_is_named(tmp_path):
    path = _day_store(tmp_path)
    dataset, keys = parquet.open_dataset(path)
    broken = os.path.join(path, "date=2024-05-02", "part-0.parquet")
    with open(broken, "wb") as file:
        file.write(b"this is not parquet")
    with pytest.raises(UserError) as raised:
        parquet.row_groups(dataset, None)
    assert str(raised.value).startswith(f"cannot read {broken} of the feature store: ")
    assert str(raised.value).endswith("rewrite or remove that file (every *.parquet file must be valid Parquet with the store's schema)")


def test_schema_checks_name_the_contract(tmp_path):
    with pytest.raises(UserError, match="no 'service' column"):
        parquet.open_dataset(write_frame(hand_frame().drop(columns=["service"]), tmp_path / "s.parquet"))
    assert parquet.is_numeric(pa.int8()) and parquet.is_numeric(pa.decimal128(5, 2)) and not parquet.is_numeric(pa.string())
