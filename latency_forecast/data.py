"""Feature store -> validated series table -> time splits -> scalers -> window indices.

This is the only module that reads Parquet. Rows are kept as one contiguous float32 matrix
sorted by (service, minute); a sample is the row index ``t`` where its input window ends, and
windows are gathered from that matrix by index arithmetic, never copied out as ``(n, L, F)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from sklearn.preprocessing import StandardScaler

from latency_forecast.config import TARGET_COLUMN
from latency_forecast.errors import UserError

TIMESTAMP_COLUMN = "timestamp"
SERVICE_COLUMN = "service"
PARQUET_SUFFIXES = (".parquet", ".parq")
_NS_PER_MINUTE = 60_000_000_000
_CHUNK_ROWS = 1 << 18  # rows per chunk when scaling in place: bounds temporary memory
_BATCH_ROWS = 1 << 15  # rows per record batch while reading


# ---------------------------------------------------------------------------------------------
# Reading the store


@dataclass
class SeriesTable:
    """Telemetry rows sorted by (service, minute), one contiguous block of rows per service.

    Attributes
    ----------
    minutes : (n_rows,) int64, minutes since the Unix epoch (UTC)
    service_codes : (n_rows,) int32, index into ``services``
    services : sorted service names
    features : (n_rows, n_features) float32, C-contiguous, NaN where missing
    target : (n_rows,) float32, p99 latency in ms, NaN where missing
    feature_columns : names of the columns of ``features``
    """

    minutes: np.ndarray
    service_codes: np.ndarray
    services: list[str]
    features: np.ndarray
    target: np.ndarray
    feature_columns: list[str]

    def __len__(self) -> int:
        return len(self.minutes)

    @property
    def service_bounds(self) -> np.ndarray:
        """(n_services + 1,) row offsets: service ``s`` occupies rows ``[b[s], b[s+1])``."""
        return np.searchsorted(self.service_codes, np.arange(len(self.services) + 1), side="left")


def parse_timestamp(text: str | None, flag: str) -> pd.Timestamp | None:
    """An ISO-8601 string as a UTC timestamp (naive means UTC); None passes through."""
    if text is None:
        return None
    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError) as error:
        raise UserError(f"{flag} {text!r} is not a timestamp; use ISO-8601 such as 2024-05-01T10:00:00Z") from error
    if stamp is pd.NaT:
        raise UserError(f"{flag} {text!r} is not a timestamp; use ISO-8601 such as 2024-05-01T10:00:00Z")
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, ValueError) as error:
            raise UserError(f"cannot open feature store {path}: {error}") from error
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _parquet_files(path: str) -> tuple[pafs.FileSystem, str, list[str]]:
    filesystem, root = _filesystem(path)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UserError(
            f"feature store {path} does not exist; create the demo store with "
            f"`python -m latency_forecast.synthetic --output {path}` or pass --feature-store-path"
        )
    if info.type == pafs.FileType.File:
        return filesystem, os.path.dirname(root), [root]
    files = sorted(
        entry.path
        for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        if entry.type == pafs.FileType.File
        and entry.path.endswith(PARQUET_SUFFIXES)
        # hidden or underscore-prefixed parts (_SUCCESS, .staging) are not data
        and not any(part.startswith((".", "_")) for part in os.path.relpath(entry.path, root).split(os.sep))
    )
    if not files:
        raise UserError(f"no Parquet files (*.parquet) under {path}; point --feature-store-path at the store")
    return filesystem, root, files


def _partition_keys(root: str, files: Sequence[str]) -> set[str]:
    """Hive partition keys: the ``key`` of every ``key=value`` directory between root and file."""
    return {
        part.split("=", 1)[0]
        for path in files
        for part in os.path.relpath(path, root).split(os.sep)[:-1]
        if "=" in part
    }


def _is_numeric(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_decimal(data_type)


class ColumnError(UserError):
    """A requested feature column is missing from the store or is not numeric."""


def resolve_feature_columns(
    schema: pa.Schema, requested: Sequence[str] | None, exclude: Sequence[str] = ()
) -> list[str]:
    """The feature columns to read: the requested ones (validated) or every numeric column
    except the target, timestamp, service and partition keys."""
    numeric = [
        f.name
        for f in schema
        if _is_numeric(f.type) and f.name not in (TARGET_COLUMN, TIMESTAMP_COLUMN, SERVICE_COLUMN, *exclude)
    ]
    if requested is None:
        if not numeric:
            raise UserError("the feature store has no numeric feature columns besides the target")
        return numeric
    if len(set(requested)) != len(requested):
        raise UserError(f"--feature-columns names a column twice: {','.join(requested)}")
    available = set(schema.names)
    for name in requested:
        if name not in available:
            raise ColumnError(
                f"unknown feature column {name!r}; available numeric columns: {', '.join(numeric) or 'none'}"
            )
        if not _is_numeric(schema.field(name).type):
            raise ColumnError(
                f"feature column {name!r} is {schema.field(name).type}, not numeric; choose among: {', '.join(numeric)}"
            )
    return list(requested)


def _time_filter(
    dataset: ds.Dataset, partition_keys: set[str], start: pd.Timestamp | None, end: pd.Timestamp | None
) -> ds.Expression | None:
    """Row filter ``start <= timestamp < end``, plus pruning of ``date=`` partitions when present."""
    timestamp_type = dataset.schema.field(TIMESTAMP_COLUMN).type
    conditions = []

    def as_scalar(bound: pd.Timestamp) -> pa.Scalar:
        value = bound if timestamp_type.tz is not None else bound.tz_localize(None)
        return pa.scalar(value.to_pydatetime(), type=timestamp_type)

    if start is not None:
        conditions.append(ds.field(TIMESTAMP_COLUMN) >= as_scalar(start))
    if end is not None:
        conditions.append(ds.field(TIMESTAMP_COLUMN) < as_scalar(end))
    if "date" in partition_keys:
        date_type = dataset.schema.field("date").type
        if pa.types.is_string(date_type) or pa.types.is_date(date_type):

            def as_day(stamp: pd.Timestamp) -> pa.Scalar:
                day = stamp.date()
                return pa.scalar(day.isoformat()) if pa.types.is_string(date_type) else pa.scalar(day, type=date_type)

            if start is not None:
                conditions.append(ds.field("date") >= as_day(start))
            if end is not None:
                conditions.append(ds.field("date") <= as_day(end - pd.Timedelta(nanoseconds=1)))
    expression = None
    for condition in conditions:
        expression = condition if expression is None else expression & condition
    return expression


def load_feature_store(
    path: str,
    feature_columns: Sequence[str] | None = None,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
) -> SeriesTable:
    """Read and validate a feature store (contract section 1).

    Only ``timestamp``, ``service``, the features and the target are read; the time range
    ``[start, end)`` is pushed down to the scan (row-group statistics and ``date=`` partitions).
    Timestamps are floored to the minute; tz-naive values are taken as UTC.

    Raises
    ------
    UserError : for every contract violation, with a one-line message naming the fix.
    """
    if start is not None and end is not None and start >= end:
        raise UserError(f"start {start.isoformat()} is not before end {end.isoformat()}; swap or widen the range")
    filesystem, root, files = _parquet_files(path)
    try:
        # service names come as Parquet stores them, dictionary-encoded: no string per row is built
        parquet = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=[SERVICE_COLUMN]))
        dataset = ds.dataset(files, filesystem=filesystem, format=parquet, partitioning="hive", partition_base_dir=root)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read the feature store {path}: {_first_line(error)}; check that every *.parquet file is valid Parquet") from error
    schema = dataset.schema
    for required in (TIMESTAMP_COLUMN, SERVICE_COLUMN, TARGET_COLUMN):
        if required not in schema.names:
            raise UserError(
                f"the feature store has no {required!r} column (found: {', '.join(schema.names)}); "
                "it must follow the contract's schema (timestamp, service, features, target_latency_p99)"
            )
    if not pa.types.is_timestamp(schema.field(TIMESTAMP_COLUMN).type):
        raise UserError(f"column 'timestamp' is {schema.field(TIMESTAMP_COLUMN).type}, not a timestamp; store it as a Parquet timestamp")
    service_type = schema.field(SERVICE_COLUMN).type
    names_type = service_type.value_type if pa.types.is_dictionary(service_type) else service_type
    if not (pa.types.is_string(names_type) or pa.types.is_large_string(names_type)):
        raise UserError(f"column 'service' is {service_type}, not a string; store service names as strings")
    if not _is_numeric(schema.field(TARGET_COLUMN).type):
        raise UserError(f"column {TARGET_COLUMN!r} is {schema.field(TARGET_COLUMN).type}, not numeric milliseconds")
    partition_keys = _partition_keys(root, files)
    features = resolve_feature_columns(schema, feature_columns, exclude=sorted(partition_keys))

    row_filter = _time_filter(dataset, partition_keys, start, end)
    unit = schema.field(TIMESTAMP_COLUMN).type.unit
    try:
        # Two scans, batch by batch, so that the Arrow copy of the store never exists whole: the
        # keys first, to find each row's place, then the values, written straight to that place.
        keys = _read_keys(_scan(dataset, [TIMESTAMP_COLUMN, SERVICE_COLUMN], row_filter), unit)
        if keys is None:
            span = "" if start is None and end is None else f" between {start} and {end}"
            raise UserError(f"the feature store {path} has no rows{span}; check the path and the time range")
        # the target may also be a feature (its own history): read it once
        columns = list(dict.fromkeys([TIMESTAMP_COLUMN, *features, TARGET_COLUMN]))
        matrix, target = _read_values(_scan(dataset, columns, row_filter), keys, features, unit)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read the feature store {path}: {_first_line(error)}; check that all files share one schema") from error
    return SeriesTable(keys.minutes, keys.codes, keys.names, matrix, target, list(features))


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


_UNITS_PER_MINUTE = {"s": 60, "ms": 60_000, "us": 60_000_000, "ns": _NS_PER_MINUTE}


def _scan(dataset: ds.Dataset, columns: list[str], row_filter: ds.Expression | None) -> Iterator[pa.RecordBatch]:
    """The non-empty record batches of ``columns``, in the same order on every scan.

    One row group at a time: a scan of the whole dataset decodes ahead of a slower consumer
    without bound, so the Arrow copy of a large store would pile up in memory.
    """
    pool = pa.default_memory_pool()
    for fragment in dataset.get_fragments(filter=row_filter):
        for part in fragment.split_by_row_group(filter=row_filter, schema=dataset.schema):
            for batch in part.to_batches(schema=dataset.schema, columns=columns, filter=row_filter, batch_size=_BATCH_ROWS):
                if batch.num_rows:
                    yield batch
            pool.release_unused()  # the allocator keeps pages freed across threads until asked


def _minutes(stamps: pa.Array, unit: str) -> np.ndarray:
    """Minutes since the epoch, floored, of a timestamp array without nulls."""
    return np.floor_divide(stamps.cast(pa.int64()).to_numpy(), _UNITS_PER_MINUTE[unit])


@dataclass
class _Keys:
    """Where each scanned row goes: ``destination[i]`` is the sorted position of the i-th row scanned."""

    minutes: np.ndarray  # (n_rows,) int64, sorted by (service, minute)
    codes: np.ndarray  # (n_rows,) int32
    names: list[str]
    destination: np.ndarray  # (n_rows,) int64


def _read_keys(batches: Iterable[pa.RecordBatch], unit: str) -> _Keys | None:
    """Minutes and service codes of every row, sorted by (service, minute); None without rows."""
    seen: dict[str, int] = {}  # service name -> code in order of first appearance
    minutes, codes = [], []
    null_timestamps = null_services = 0
    for batch in batches:
        stamps, services = batch.column(0), batch.column(1)
        null_timestamps += stamps.null_count
        null_services += services.null_count
        if null_timestamps or null_services:
            continue  # only counted, for the message
        minutes.append(_minutes(stamps, unit))
        encoded = services if pa.types.is_dictionary(services.type) else services.dictionary_encode()
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        lookup = np.full(len(encoded.dictionary), -1, dtype=np.int32)
        used = np.flatnonzero(np.bincount(indices, minlength=len(lookup)))  # a dictionary may hold unused names
        for index, name in zip(used, encoded.dictionary.take(pa.array(used)).to_pylist()):
            lookup[index] = seen.setdefault(name, len(seen))
        codes.append(lookup[indices])
    if null_timestamps:
        raise UserError(f"{null_timestamps} rows have no timestamp; every row needs its minute")
    if null_services:
        raise UserError(f"{null_services} rows have no service name; every row needs its service")
    if not minutes:
        return None
    names = sorted(seen)
    position = {name: code for code, name in enumerate(names)}
    minutes = np.concatenate(minutes)
    codes = np.array([position[name] for name in seen], dtype=np.int32)[np.concatenate(codes)]
    first, span = int(minutes.min()), int(minutes.max() - minutes.min()) + 1
    if span * len(names) < 2**62:  # one int64 key: its stable sort is lexsort((minutes, codes)), faster
        order = np.argsort(codes.astype(np.int64) * span + (minutes - first), kind="stable")
    else:
        order = np.lexsort((minutes, codes))
    minutes, codes = minutes[order], codes[order]
    duplicate = (np.diff(minutes) == 0) & (np.diff(codes) == 0)
    if duplicate.any():
        at = int(np.flatnonzero(duplicate)[0])
        raise UserError(
            f"{int(duplicate.sum())} duplicate (service, minute) rows, e.g. {names[codes[at]]} at "
            f"{format_minute(minutes[at])}; the store must hold one row per service and minute"
        )
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))
    return _Keys(minutes, codes, names, destination)


def _read_values(
    batches: Iterable[pa.RecordBatch], keys: _Keys, features: Sequence[str], unit: str
) -> tuple[np.ndarray, np.ndarray]:
    """(n_rows, n_features) float32 features and (n_rows,) float32 target, each batch written
    straight to its rows' sorted places."""
    n = len(keys.minutes)
    matrix = np.empty((n, len(features)), dtype=np.float32)
    target = np.empty(n, dtype=np.float32)
    offset = 0
    for batch in batches:
        place = keys.destination[offset : offset + batch.num_rows]
        if len(place) < batch.num_rows or not np.array_equal(keys.minutes[place], _minutes(batch.column(0), unit)):
            raise UserError("the feature store changed while it was being read; read it again")
        block = np.empty((batch.num_rows, len(features)), dtype=np.float32)
        for j, name in enumerate(features):
            block[:, j] = _as_float(batch.column(name))
        matrix[place] = block
        target[place] = _as_float(batch.column(TARGET_COLUMN))
        offset += batch.num_rows
    if offset != n:
        raise UserError("the feature store changed while it was being read; read it again")
    return matrix, target


def _as_float(column: pa.Array) -> np.ndarray:
    """Numeric column as a float array, nulls as NaN."""
    if not pa.types.is_floating(column.type):
        column = pc.cast(column, pa.float64())
    return column.to_numpy(zero_copy_only=False)  # a float array's nulls become NaN


def format_minute(minute: int | np.integer) -> str:
    """ISO-8601 UTC string of a minute index, as the contract writes timestamps."""
    return pd.Timestamp(int(minute) * _NS_PER_MINUTE, tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def to_minute(stamp: pd.Timestamp) -> int:
    """Minute index of a UTC timestamp (floored)."""
    return int(stamp.value // _NS_PER_MINUTE)


def write_feature_store(frame: pd.DataFrame, path: str) -> None:
    """Write ``frame`` as a store hive-partitioned by day (``date=YYYY-MM-DD/part-0.parquet``).

    The store is built beside ``path`` and swapped in at the end, so an interrupted write
    leaves any earlier store intact.
    """
    from latency_forecast.artifacts import replace_directory, staging_directory

    with staging_directory(path) as staging:
        days = frame[TIMESTAMP_COLUMN].dt.strftime("%Y-%m-%d")
        numeric = [c for c in frame.columns if c not in (TIMESTAMP_COLUMN, SERVICE_COLUMN)]
        schema = pa.schema(
            [pa.field(TIMESTAMP_COLUMN, pa.timestamp("ms", tz="UTC")), pa.field(SERVICE_COLUMN, pa.string())]
            + [pa.field(c, pa.float32()) for c in numeric]
        )
        for day, rows in frame.groupby(days, sort=True):
            os.makedirs(os.path.join(staging, f"date={day}"))
            table = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
            pq.write_table(table, os.path.join(staging, f"date={day}", "part-0.parquet"))
        replace_directory(staging, path)


# ---------------------------------------------------------------------------------------------
# Windows and splits


@dataclass
class WindowCounts:
    """How many window end positions survived each check (reported, never silently dropped)."""

    rows: int
    incomplete_span: int  # the L+H minutes are not all present (series edges, scrape gaps)
    nan_input: int
    nan_target: int  # target at t+H (or the latency at t the baseline needs) is NaN
    samples: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def window_ends(table: SeriesTable, sequence_length: int, horizon: int) -> tuple[np.ndarray, WindowCounts]:
    """Row indices ``t`` that end a valid sample.

    Valid: rows ``t-L+1 .. t+H`` are one service and consecutive minutes; every input feature
    in ``t-L+1 .. t`` is finite; the latency at ``t+H`` (target) and at ``t`` (the persistence
    baseline's forecast) is finite.

    Returns
    -------
    ends : (n_samples,) sorted; int32 below 2^31 rows (half the memory of the largest index array)
    counts : why the other positions were dropped
    """
    n = len(table)
    span = sequence_length + horizon
    L = sequence_length
    # Everything by slices over window start positions k (inputs k .. k+L-1, target k+L-1+H):
    # no index arrays and no gathers, so the temporaries are a few booleans per row.
    starts = max(n - span + 1, 0)
    complete = table.service_codes[:starts] == table.service_codes[span - 1 :]
    complete &= table.minutes[span - 1 :] - table.minutes[:starts] == span - 1
    finite = np.ones(n, dtype=bool)
    for column in range(table.features.shape[1]):  # column by column: faster than .all(axis=1) over short rows
        finite &= np.isfinite(table.features[:, column])
    index_dtype = np.int32 if n < 2**31 else np.int64
    bad_before = np.zeros(n + 1, dtype=index_dtype)
    np.cumsum(~finite, out=bad_before[1:])
    del finite
    nan_input = bad_before[L : L + starts] - bad_before[:starts] > 0
    del bad_before
    target_finite = np.isfinite(table.target)
    nan_target = ~(target_finite[span - 1 : span - 1 + starts] & target_finite[L - 1 : L - 1 + starts])
    del target_finite
    counts = WindowCounts(
        rows=n,
        incomplete_span=n - int(complete.sum()),
        nan_input=int((complete & nan_input).sum()),
        nan_target=int((complete & nan_target & ~nan_input).sum()),
        samples=int((complete & ~nan_input & ~nan_target).sum()),
    )
    complete &= ~nan_input
    complete &= ~nan_target
    ends = np.flatnonzero(complete).astype(index_dtype)
    ends += L - 1
    return ends, counts


@dataclass(frozen=True)
class TimeRange:
    """Half-open range of minutes ``[start, end)``."""

    start: int
    end: int

    def as_dict(self) -> dict[str, str]:
        return {"start": format_minute(self.start), "end": format_minute(self.end)}


def samples_in(
    ends: np.ndarray, table: SeriesTable, time_range: TimeRange, sequence_length: int, horizon: int
) -> np.ndarray:
    """The samples whose whole span (inputs from t-L+1 through the target at t+H) lies in the range."""
    first_minute = table.minutes[ends] - (sequence_length - 1)
    target_minute = table.minutes[ends] + horizon
    return ends[(first_minute >= time_range.start) & (target_minute < time_range.end)]


@dataclass
class Splits:
    train: TimeRange
    validation: TimeRange
    test: TimeRange

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {name: getattr(self, name).as_dict() for name in ("train", "validation", "test")}


def fraction_splits(
    table: SeriesTable, validation_fraction: float, test_fraction: float, embargo: int
) -> Splits:
    """Train, validation, test by global time cut points, separated by ``embargo`` minutes.

    Cut points are quantiles of the minutes present in the store, so idle stretches (a store
    holding two separate days) do not distort the shares.
    """
    first_minute = int(table.minutes.min())
    present = first_minute + np.flatnonzero(np.bincount(table.minutes - first_minute))  # np.unique, in linear time
    last = int(present[-1]) + 1
    cut_validation = int(present[int(len(present) * (1 - validation_fraction - test_fraction))])
    cut_test = int(present[min(len(present) - 1, int(len(present) * (1 - test_fraction)))])
    return Splits(
        train=TimeRange(int(present[0]), cut_validation),
        validation=TimeRange(cut_validation + embargo, cut_test),
        test=TimeRange(cut_test + embargo, last),
    )


# ---------------------------------------------------------------------------------------------
# Scaling


@dataclass
class FeatureScaler:
    """Optional signed log1p, then scikit-learn's StandardScaler, fitted on training rows only.

    A constant feature gets scale 1 (StandardScaler's rule), so it maps to 0, never NaN/inf.
    """

    transform_name: str = "log1p"
    scaler: StandardScaler = field(default_factory=StandardScaler)

    def _transform_block(self, block: np.ndarray) -> np.ndarray:
        """A new array: the transform of ``block`` (same dtype)."""
        if self.transform_name == "log1p":
            out = np.abs(block)
            np.log1p(out, out=out)
            out *= np.sign(block)  # in place: the same values as sign(block) * log1p(|block|), fewer temporaries
            return out
        return block.copy()

    def fit(self, features: np.ndarray, rows: np.ndarray) -> "FeatureScaler":
        """Fit on ``features[rows]`` (``rows`` a boolean mask), chunk by chunk; NaNs are ignored."""
        self.scaler = StandardScaler()
        seen = False
        for start in range(0, len(features), _CHUNK_ROWS):
            chunk = features[start : start + _CHUNK_ROWS][rows[start : start + _CHUNK_ROWS]]
            if len(chunk):
                self.scaler.partial_fit(self._transform_block(chunk.astype(np.float64)))
                seen = True
        if not seen:
            raise UserError("no training rows to fit the feature scaler on; the training period is empty")
        # A feature that is NaN in every training row has mean NaN: treat it as constant 0.
        self.scaler.mean_ = np.nan_to_num(self.scaler.mean_)
        self.scaler.scale_ = np.where(np.isfinite(self.scaler.scale_) & (self.scaler.scale_ > 0), self.scaler.scale_, 1.0)
        return self

    def transform(self, features: np.ndarray, inplace: bool = False) -> np.ndarray:
        """(n_rows, n_features) float32, scaled; NaNs stay NaN. ``inplace`` reuses the memory."""
        out = features if inplace else np.empty_like(features, dtype=np.float32)
        mean = self.scaler.mean_.astype(np.float32)
        scale = self.scaler.scale_.astype(np.float32)
        for start in range(0, len(features), _CHUNK_ROWS):
            block = self._transform_block(features[start : start + _CHUNK_ROWS])
            block -= mean
            block /= scale
            out[start : start + _CHUNK_ROWS] = block
        return out

    def state(self, feature_columns: Sequence[str]) -> dict:
        """Plain dict for ``scaler.pt`` (loads with ``weights_only=True``)."""
        import torch

        return {
            "mean": torch.tensor(self.scaler.mean_, dtype=torch.float64),
            "scale": torch.tensor(self.scaler.scale_, dtype=torch.float64),
            "var": torch.tensor(self.scaler.var_, dtype=torch.float64),
            "n_samples_seen": torch.as_tensor(np.asarray(self.scaler.n_samples_seen_, dtype=np.int64)),
            "feature_columns": list(feature_columns),
            "transform": self.transform_name,
        }

    @classmethod
    def from_state(cls, state: dict) -> "FeatureScaler":
        """Rebuild a fitted StandardScaler from :meth:`state`."""
        scaler = StandardScaler()
        scaler.mean_ = state["mean"].numpy()
        scaler.scale_ = state["scale"].numpy()
        scaler.var_ = state["var"].numpy() if "var" in state else state["scale"].numpy() ** 2
        scaler.n_samples_seen_ = state["n_samples_seen"].numpy() if "n_samples_seen" in state else np.int64(1)
        scaler.n_features_in_ = len(scaler.mean_)
        return cls(state.get("transform", "none"), scaler)


@dataclass
class TargetNormalizer:
    """Per-service standardisation of log1p(latency), from training rows only.

    Latency spans orders of magnitude across services (a 3 ms cache, an 800 ms gateway);
    in log space a 2x spike is the same step everywhere. Median and IQR are used so that the
    faults inside the training period do not inflate a service's scale. A service with fewer
    than ``min_rows`` finite training targets uses the pooled statistics.
    """

    location: np.ndarray  # (n_services,) float64
    scale: np.ndarray  # (n_services,) float64
    pooled: tuple[float, float] = (0.0, 1.0)  # location and scale over all services
    ceiling: float = 30.0  # largest log1p(latency) seen in training: forecasts never exceed it

    @classmethod
    def fit(cls, table: SeriesTable, rows: np.ndarray, min_rows: int = 30) -> "TargetNormalizer":
        log_target = np.log1p(np.maximum(table.target.astype(np.float64), 0.0))
        usable = rows & np.isfinite(log_target)
        if not usable.any():
            raise UserError("no finite target_latency_p99 in the training period; the target cannot be learned")
        pooled = _robust_location_scale(log_target[usable])
        bounds = table.service_bounds
        location = np.full(len(table.services), pooled[0])
        scale = np.full(len(table.services), pooled[1])
        for code in range(len(table.services)):
            values = log_target[bounds[code] : bounds[code + 1]][usable[bounds[code] : bounds[code + 1]]]
            if len(values) >= min_rows:
                location[code], scale[code] = _robust_location_scale(values)
        return cls(location, scale, pooled, float(log_target[usable].max()))

    def normalize(self, latency_ms: np.ndarray, service_codes: np.ndarray) -> np.ndarray:
        """(n,) float32; computed in float64 by chunks, so a long store needs no n-row float64 copies."""
        out = np.empty(len(latency_ms), dtype=np.float32)
        for start in range(0, len(latency_ms), _CHUNK_ROWS):
            chunk = slice(start, start + _CHUNK_ROWS)
            log_latency = np.log1p(np.maximum(latency_ms[chunk].astype(np.float64), 0.0))
            codes = service_codes[chunk]
            out[chunk] = (log_latency - self.location[codes]) / self.scale[codes]
        return out

    def denormalize(self, normalized: np.ndarray, service_codes: np.ndarray) -> np.ndarray:
        """Normalised predictions back to milliseconds (float64), at most the training maximum.

        A recurrent net extrapolates freely; a forecast above the largest p99 any service showed
        in training is not evidence, so it is capped there (still far above any SLO).
        """
        log_latency = normalized.astype(np.float64) * self.scale[service_codes] + self.location[service_codes]
        return np.expm1(np.clip(log_latency, 0.0, self.ceiling))

    def state(self) -> dict:
        return {
            "location": self.location.tolist(),
            "scale": self.scale.tolist(),
            "pooled": list(self.pooled),
            "ceiling": self.ceiling,
        }

    @classmethod
    def from_state(cls, state: dict) -> "TargetNormalizer":
        return cls(
            np.asarray(state["location"], dtype=np.float64),
            np.asarray(state["scale"], dtype=np.float64),
            (float(state["pooled"][0]), float(state["pooled"][1])),
            float(state["ceiling"]),
        )


def _robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return float(median), float(max((q75 - q25) / 1.349, 0.05))


def rows_in(table: SeriesTable, time_range: TimeRange) -> np.ndarray:
    """Boolean mask of the rows whose minute lies in the range."""
    return (table.minutes >= time_range.start) & (table.minutes < time_range.end)


def table_in(table: SeriesTable, time_range: TimeRange) -> SeriesTable:
    """The rows whose minute lies in the range, as a table of their own.

    Services with no row in the range are dropped and the rest re-coded, so the result is the
    table :func:`load_feature_store` returns for that range: nothing outside it, not even a
    service name, reaches whoever is handed it.
    """
    rows = rows_in(table, time_range)
    codes = table.service_codes[rows]
    present = np.unique(codes)
    return SeriesTable(
        minutes=table.minutes[rows],
        service_codes=np.searchsorted(present, codes).astype(np.int32),
        services=[table.services[code] for code in present],
        features=table.features[rows],
        target=table.target[rows],
        feature_columns=list(table.feature_columns),
    )
