"""The only reader and writer of feature stores: Parquet files or hive-partitioned directories,
local or any filesystem pyarrow opens, with the time range and columns pushed down to the scan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from latency_forecast.config import TARGET_COLUMN, StoreConfig, TimeRangeConfig
from latency_forecast.data import NS_PER_MINUTE, SERVICE_COLUMN, TIMESTAMP_COLUMN, SeriesTable, TimeRange, format_minute, parallel_map, parse_timestamp
from latency_forecast.errors import UserError, warn

PARQUET_SUFFIXES = (".parquet", ".parq")
_MIN_RUN = 64  # rows per run of consecutive places below which one fancy-indexed copy is faster

def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a path or URI (``s3://bucket/prefix``: the AWS_* variables, AWS_ENDPOINT_URL
    included, are read by pyarrow) and the path inside it."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, ValueError) as error:
            raise UserError(f"cannot open feature store {path}: {error}") from error
        except OSError as error:  # S3 without a region asks the store for the bucket's region
            raise _object_store_error(path, error) from error
    return pafs.LocalFileSystem(), os.path.abspath(path)


# Words of the AWS SDK's errors (as pyarrow passes them on) -> what went wrong
_OBJECT_STORE_PROBLEMS = (
    ("missing bucket", ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist", "not found")),
    ("denied", ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "credentials")),
    ("unreachable", ("NETWORK_CONNECTION", "curlCode", "Could not resolve", "Failed to connect", "timed out")),
)


def _object_store_error(path: str, error: BaseException | None) -> UserError:
    """The one-line error, with its fix, for an object store that cannot be listed (``error`` None:
    the bucket does not exist)."""
    detail = "" if error is None else _first_line(error)
    problem = "missing bucket" if error is None else next(
        (name for name, words in _OBJECT_STORE_PROBLEMS if any(word.lower() in detail.lower() for word in words)), None
    )
    if path.lower().startswith("s3://"):
        variable = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        endpoint = f"{variable}={os.environ[variable]}" if os.environ.get(variable) else "AWS (AWS_ENDPOINT_URL is unset)"
        credentials = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    else:
        endpoint, credentials = "the URI's host", "the filesystem's credentials"
    if problem == "missing bucket":
        bucket = path.split("://", 1)[1].split("/", 1)[0]
        return UserError(f"bucket {bucket!r} does not exist at {endpoint}; create it, or fix the bucket in --feature-store-path {path}")
    if problem == "denied":
        return UserError(f"access to the feature store {path} was denied ({detail}); set {credentials} to credentials that may read it")
    if problem == "unreachable":
        return UserError(f"cannot reach the object store of {path} at {endpoint} ({detail}); check the endpoint and the network")
    return UserError(f"cannot open the feature store {path}: {detail}; check the URI, {credentials} and the endpoint ({endpoint})")


def _parquet_files(path: str) -> tuple[pafs.FileSystem, str, list[str]]:
    filesystem, root = _filesystem(path)
    local = isinstance(filesystem, pafs.LocalFileSystem)
    try:
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound and not local:
            bucket = root.split("/", 1)[0]  # an object store's first level; empty for HDFS-like paths
            if bucket and (bucket == root or filesystem.get_file_info(bucket).type == pafs.FileType.NotFound):
                raise _object_store_error(path, None)
            raise UserError(f"feature store {path} does not exist: nothing is stored under that prefix; check the prefix, or upload the store there")
        if info.type == pafs.FileType.NotFound:
            raise UserError(
                f"feature store {path} does not exist; create the demo store with "
                f"`python -m latency_forecast.synthetic --output {path}` or pass --feature-store-path"
            )
        if info.type == pafs.FileType.File:
            return filesystem, os.path.dirname(root), [root]
        entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as error:
        if local:
            raise
        raise _object_store_error(path, error) from error
    files = sorted(
        entry.path
        for entry in entries
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
    except timestamp, service and partition keys; the target's own history is one of them
    (contract: it is the strongest clue to the next minutes), last."""
    numeric = [
        f.name
        for f in schema
        if _is_numeric(f.type) and f.name not in (TARGET_COLUMN, TIMESTAMP_COLUMN, SERVICE_COLUMN, *exclude)
    ]
    if requested is None:
        if not numeric:
            raise UserError("the feature store has no numeric feature columns besides the target")
        return [*numeric, TARGET_COLUMN]
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


def _open_dataset(path: str) -> tuple[ds.Dataset, set[str]]:
    """The store as a pyarrow dataset with its schema checked, and its hive partition keys."""
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
    return dataset, _partition_keys(root, files)


def minute_span(path: str) -> TimeRange:
    """The store's first minute to one past its newest, from the files' row-group statistics
    where they have them (no data is read), else from a scan of the timestamp column."""
    dataset, _ = _open_dataset(path)
    unit = dataset.schema.field(TIMESTAMP_COLUMN).type.unit
    bounds: list[int] = []
    try:
        for fragment in dataset.get_fragments():
            values = _timestamp_statistics(fragment)
            if not values or any(value is None for value in values):  # no statistics: read the column
                stamps = fragment.to_table(columns=[TIMESTAMP_COLUMN]).column(0).drop_null()
                values = list(pc.min_max(stamps).values()) if len(stamps) else []
            bounds.extend(_minute_of(value, unit) for value in values)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read the feature store {path}: {_first_line(error)}; check that every *.parquet file is valid Parquet") from error
    if not bounds:
        raise UserError(f"the feature store {path} has no rows; check the path")
    return TimeRange(min(bounds), max(bounds) + 1)


def _timestamp_statistics(fragment: ds.ParquetFileFragment) -> list:
    """Each row group's min and max timestamp from the file's footer (None where it has none).

    Read straight from the Parquet metadata of the one column: the fragments' ``statistics``
    dicts convert every column's, and a wide store spent most of forecast.py's time there."""
    metadata = fragment.metadata
    names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    if TIMESTAMP_COLUMN not in names:
        return []
    column = names.index(TIMESTAMP_COLUMN)
    values: list = []
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(column).statistics
        values.extend((statistics.min, statistics.max) if statistics is not None and statistics.has_min_max else (None, None))
    return values


def _minute_of(value, unit: str) -> int:
    """Minute index of a statistics value (a datetime, or a raw integer in the column's unit)."""
    if isinstance(value, pa.Scalar):
        value = value.as_py()
    if isinstance(value, (int, np.integer)):
        return int(value) // _UNITS_PER_MINUTE[unit]
    stamp = pd.Timestamp(value)
    return int((stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp).value // NS_PER_MINUTE)


def newest_minutes(path: str, services: Sequence[str], before: pd.Timestamp) -> dict[str, int]:
    """Each named service's newest minute before ``before`` (services without rows are left out);
    reads only the timestamp and service columns of those services' rows."""
    dataset, partition_keys = _open_dataset(path)
    unit = dataset.schema.field(TIMESTAMP_COLUMN).type.unit
    row_filter = _time_filter(dataset, partition_keys, None, before) & ds.field(SERVICE_COLUMN).isin(list(services))
    newest: dict[str, int] = {}
    try:
        keys = _read_keys(_key_pass(dataset, _pieces(dataset, row_filter), row_filter, unit))
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read the feature store {path}: {_first_line(error)}; check that every *.parquet file is valid Parquet") from error
    if keys is not None:
        last = np.searchsorted(keys.codes, np.arange(len(keys.names) + 1))[1:] - 1
        newest = {name: int(keys.minutes[row]) for name, row in zip(keys.names, last)}
    return newest


def service_rows(path: str, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None) -> dict[str, int]:
    """Each service's number of rows in ``[start, end)``, by name (sorted), reading only the
    ``service`` column (and the timestamps the range needs): how torchrun ranks share the services."""
    dataset, partition_keys = _open_dataset(path)
    counts: dict[str, int] = {}
    try:
        for batch in _scan(dataset, [SERVICE_COLUMN], _time_filter(dataset, partition_keys, start, end)):
            services = batch.column(0)
            encoded = services if pa.types.is_dictionary(services.type) else services.dictionary_encode()
            indices = pc.drop_null(encoded.indices).to_numpy(zero_copy_only=False)
            rows = np.bincount(indices, minlength=len(encoded.dictionary))
            for name, count in zip(encoded.dictionary.to_pylist(), rows.tolist()):
                if count:
                    counts[name] = counts.get(name, 0) + count
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read the feature store {path}: {_first_line(error)}; check that every *.parquet file is valid Parquet") from error
    return dict(sorted(counts.items()))


def load_feature_store(
    path: str,
    feature_columns: Sequence[str] | None = None,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    services: Sequence[str] | None = None,
) -> SeriesTable:
    """Read and validate a feature store (contract section 1).

    Only ``timestamp``, ``service``, the features and the target are read; the time range
    ``[start, end)`` is pushed down to the scan (row-group statistics and ``date=`` partitions),
    and so is ``services`` (only those services' rows are read; None reads all).
    Timestamps are floored to the minute; tz-naive values are taken as UTC.

    Raises
    ------
    UserError : for every contract violation, with a one-line message naming the fix.
    """
    if start is not None and end is not None and start >= end:
        raise UserError(f"start {start.isoformat()} is not before end {end.isoformat()}; swap or widen the range")
    dataset, partition_keys = _open_dataset(path)
    schema = dataset.schema
    features = resolve_feature_columns(schema, feature_columns, exclude=sorted(partition_keys))

    row_filter = _time_filter(dataset, partition_keys, start, end)
    if services is not None:
        service_filter = ds.field(SERVICE_COLUMN).isin(list(services))
        row_filter = service_filter if row_filter is None else row_filter & service_filter
    unit = schema.field(TIMESTAMP_COLUMN).type.unit
    try:
        # Two passes over the row groups, a few at a time, so that the Arrow copy of the store never
        # exists whole: the keys first, to find each row's place, then the values, written straight there.
        pieces = _pieces(dataset, row_filter)
        piece_keys = _key_pass(dataset, pieces, row_filter, unit)
        pa.default_memory_pool().release_unused()  # the pool keeps freed pages until asked; not per row group: refaulting costs
        piece_rows = [0 if piece.minutes is None else len(piece.minutes) for piece in piece_keys]
        keys = _read_keys(piece_keys)
        del piece_keys
        if keys is None:
            span = "" if start is None and end is None else f" between {start} and {end}"
            raise UserError(f"the feature store {path} has no rows{span}; check the path and the time range")
        # the target may also be a feature (its own history): read it once
        columns = list(dict.fromkeys([TIMESTAMP_COLUMN, *features, TARGET_COLUMN]))
        matrix, target, invalid = _read_values(
            pieces, piece_rows, lambda piece: _read_piece(piece, dataset, columns, row_filter), keys, features, unit
        )
        pa.default_memory_pool().release_unused()
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read the feature store {path}: {_first_line(error)}; check that all files share one schema") from error
    return SeriesTable(keys.minutes, keys.codes, keys.names, matrix, target, list(features), invalid)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


_UNITS_PER_MINUTE = {"s": 60, "ms": 60_000, "us": 60_000_000, "ns": NS_PER_MINUTE}


def _pieces(dataset: ds.Dataset, row_filter: ds.Expression | None) -> list[ds.ParquetFileFragment]:
    """The row groups the filter may touch, in one fixed order (every pass reads them in it)."""
    pieces = []
    for fragment in dataset.get_fragments(filter=row_filter):
        try:
            pieces.extend(fragment.split_by_row_group(filter=row_filter, schema=dataset.schema))
        except (pa.ArrowException, OSError) as error:
            raise _fragment_error(fragment, error) from error
    return pieces


def _read_piece(piece: ds.ParquetFileFragment, dataset: ds.Dataset, columns: list[str], row_filter: ds.Expression | None) -> pa.Table:
    """One row group's ``columns``, filtered."""
    try:
        table = piece.to_table(schema=dataset.schema, columns=columns, filter=row_filter)
    except (pa.ArrowException, OSError) as error:  # Arrow's message need not name the file
        raise _fragment_error(piece, error) from error
    return table


def _fragment_error(fragment: ds.Fragment, error: BaseException) -> UserError:
    return UserError(
        f"cannot read {fragment.path} of the feature store: {_first_line(error)}; "
        "rewrite or remove that file (every *.parquet file must be valid Parquet with the store's schema)"
    )


def _scan(dataset: ds.Dataset, columns: list[str], row_filter: ds.Expression | None) -> Iterator[pa.RecordBatch]:
    """The non-empty record batches of ``columns``, in the pieces' order, one row group at a time."""
    for piece in _pieces(dataset, row_filter):
        for batch in _read_piece(piece, dataset, columns, row_filter).to_batches():
            if batch.num_rows:
                yield batch


def _minutes(stamps: pa.Array, unit: str) -> np.ndarray:
    """Minutes since the epoch, floored, of a timestamp array without nulls."""
    return np.floor_divide(stamps.cast(pa.int64()).to_numpy(), _UNITS_PER_MINUTE[unit])


@dataclass
class _Keys:
    """Where each scanned row goes: ``destination[i]`` is the sorted position of the i-th row scanned."""

    minutes: np.ndarray  # (n_rows,) int64, sorted by (service, minute)
    codes: np.ndarray  # (n_rows,) int32
    names: list[str]
    destination: np.ndarray  # (n_rows,) int32 (int64 from 2^31 rows)


@dataclass
class _PieceKeys:
    """One row group's keys as read: minutes, indices into its own list of service names."""

    minutes: np.ndarray | None  # None when a timestamp or service is null (counted, for the message)
    indices: np.ndarray | None
    names: list[str]  # the names its indices point at (unused dictionary entries are None)
    null_timestamps: int
    null_services: int


def _piece_keys(table: pa.Table, unit: str) -> _PieceKeys:
    """The keys of one row group (its ``timestamp`` and ``service`` columns), on a reading thread."""
    stamps, services = table.column(0), table.column(1)
    if stamps.null_count or services.null_count:
        return _PieceKeys(None, None, [], stamps.null_count, services.null_count)
    if pa.types.is_dictionary(services.type):  # chunks may carry their own dictionaries: one for all
        services = table.unify_dictionaries().column(1)
    services = services.combine_chunks() if table.num_rows else pa.array([], type=pa.string())
    encoded = services if pa.types.is_dictionary(services.type) else services.dictionary_encode()
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    used = np.flatnonzero(np.bincount(indices, minlength=len(encoded.dictionary)))  # a dictionary may hold unused names
    names: list = [None] * len(encoded.dictionary)
    for index, name in zip(used.tolist(), encoded.dictionary.take(pa.array(used)).to_pylist()):
        names[index] = name
    return _PieceKeys(_minutes(stamps, unit), indices, names, 0, 0)


def _key_pass(dataset: ds.Dataset, pieces: Sequence[ds.ParquetFileFragment], row_filter: ds.Expression | None, unit: str) -> list[_PieceKeys]:
    """The keys of every piece, in order."""
    return parallel_map(lambda piece: _piece_keys(_read_piece(piece, dataset, [TIMESTAMP_COLUMN, SERVICE_COLUMN], row_filter), unit), pieces)


def _read_keys(pieces: Sequence[_PieceKeys]) -> _Keys | None:
    """Minutes and service codes of every row, sorted by (service, minute); None without rows."""
    null_timestamps = sum(piece.null_timestamps for piece in pieces)
    null_services = sum(piece.null_services for piece in pieces)
    if null_timestamps:
        raise UserError(f"{null_timestamps} rows have no timestamp; every row needs its minute")
    if null_services:
        raise UserError(f"{null_services} rows have no service name; every row needs its service")
    pieces = [piece for piece in pieces if len(piece.minutes)]
    if not pieces:
        return None
    names = sorted({name for piece in pieces for name in piece.names if name is not None})
    position = {name: code for code, name in enumerate(names)}
    minutes = [piece.minutes for piece in pieces]
    codes = [np.array([-1 if name is None else position[name] for name in piece.names], dtype=np.int32)[piece.indices] for piece in pieces]
    index_dtype = np.int32 if sum(map(len, minutes)) < 2**31 else np.int64
    by_runs = _sort_by_runs(minutes, codes, index_dtype)
    if by_runs is not None:
        return _Keys(*by_runs[:2], names, by_runs[2])
    # Every step in place or on the smallest dtype: a fresh process pays for each new page it touches.
    minutes, codes = np.concatenate(minutes), np.concatenate(codes)
    first, span = int(minutes.min()), int(minutes.max() - minutes.min()) + 1
    if span * len(names) < 2**62:  # one int64 key: its stable sort is lexsort((minutes, codes)), faster
        key = codes.astype(np.int64)
        key *= span
        key += minutes
        key -= first
        order = np.argsort(key, kind="stable")
        del key
    else:
        order = np.lexsort((minutes, codes))
    minutes, codes = minutes[order], codes[order]
    duplicate = minutes[1:] == minutes[:-1]
    duplicate &= codes[1:] == codes[:-1]
    if duplicate.any():
        at = int(np.flatnonzero(duplicate)[0])
        raise UserError(
            f"{int(duplicate.sum())} duplicate (service, minute) rows, e.g. {names[codes[at]]} at "
            f"{format_minute(minutes[at])}; the store must hold one row per service and minute"
        )
    del duplicate
    destination = np.empty(len(order), dtype=index_dtype)
    destination[order] = np.arange(len(order), dtype=index_dtype)
    return _Keys(minutes, codes, names, destination)


def _sort_by_runs(
    minutes: Sequence[np.ndarray], codes: Sequence[np.ndarray], index_dtype: type
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Sorted minutes, sorted codes and each row's sorted place, without a sort of the rows, when
    the row groups' rows (``minutes[i]`` and ``codes[i]`` are the i-th row group's) come in long
    runs of one service at rising minutes (write_feature_store's day files hold one run per
    service) and no two runs of a service overlap in time; None otherwise.

    Only the runs are sorted (services x files of them): a row's place is its run's place plus
    its offset in the run, and nothing of n rows is built but the three results (no concatenated
    copy of the keys). Rows of one minute twice never pass (they end a run, and runs that touch
    are refused), so duplicates are left to the full sort, which names them.
    """
    n = sum(map(len, minutes))
    local_starts = [np.flatnonzero((piece_codes[1:] != piece_codes[:-1]) | (piece_minutes[1:] <= piece_minutes[:-1])) + 1
                    for piece_minutes, piece_codes in zip(minutes, codes)]
    if sum(len(starts) + 1 for starts in local_starts) * _MIN_RUN > n:
        return None
    local_starts = [np.concatenate([[0], starts]) for starts in local_starts]
    run_piece = np.concatenate([np.full(len(starts), piece) for piece, starts in enumerate(local_starts)])
    local_start = np.concatenate(local_starts)
    lengths = np.concatenate([np.diff(np.append(starts, len(piece_minutes))) for starts, piece_minutes in zip(local_starts, minutes)])
    run_codes = np.concatenate([piece_codes[starts] for starts, piece_codes in zip(local_starts, codes)])
    first = np.concatenate([piece_minutes[starts] for starts, piece_minutes in zip(local_starts, minutes)])
    last = np.concatenate([piece_minutes[np.append(starts[1:], len(piece_minutes)) - 1] for starts, piece_minutes in zip(local_starts, minutes)])
    run_order = np.lexsort((first, run_codes))
    ordered_codes, ordered_first, ordered_last = run_codes[run_order], first[run_order], last[run_order]
    if np.any((ordered_codes[1:] == ordered_codes[:-1]) & (ordered_first[1:] <= ordered_last[:-1])):
        return None
    place = np.empty(len(lengths), dtype=np.int64)  # each run's first sorted position
    place[run_order] = np.concatenate([[0], np.cumsum(lengths[run_order])[:-1]])
    # Places rise by one inside a run and jump between runs: the cumulative sum of those steps.
    destination = np.ones(n, dtype=index_dtype)
    run_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # each run's first scanned position
    destination[0] = place[0]
    destination[run_start[1:]] = place[1:] - (place[:-1] + lengths[:-1] - 1)
    np.cumsum(destination, dtype=index_dtype, out=destination)
    sorted_minutes = np.empty(n, dtype=np.int64)
    for piece, start, run_place, length in zip(run_piece.tolist(), local_start.tolist(), place.tolist(), lengths.tolist()):
        sorted_minutes[run_place : run_place + length] = minutes[piece][start : start + length]
    return sorted_minutes, np.repeat(ordered_codes, lengths[run_order]), destination


# A p99 above an hour is no latency but a broken exporter (or a unit mix-up): read as missing.
MAX_LATENCY_MS = 3_600_000.0


def _read_values(
    pieces: Sequence[ds.ParquetFileFragment],
    piece_rows: Sequence[int],
    read: Callable[[ds.ParquetFileFragment], pa.Table],
    keys: _Keys,
    features: Sequence[str],
    unit: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(n_rows, n_features) float32 features and (n_rows,) float32 target, each row group written
    straight to its rows' sorted places (by threads, each its own rows), and the count per column
    of values read as missing.

    Infinities (a rate() over a counter reset, a division by zero requests) and latencies that
    cannot be (negative, over ``MAX_LATENCY_MS``) become NaN, so they are handled like any
    missing value: the windows that hold them are not samples, and they are counted.
    """
    n = len(keys.minutes)
    matrix = np.empty((n, len(features)), dtype=np.float32)
    target = np.empty(n, dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(piece_rows)]).astype(np.int64)
    if offsets[-1] != n:
        raise UserError("the feature store changed while it was being read; read it again")

    def write(position: int) -> dict[str, int]:
        table = read(pieces[position])
        place = keys.destination[offsets[position] : offsets[position + 1]]
        if table.num_rows != len(place) or not np.array_equal(keys.minutes[place], _minutes(table.column(0), unit)):
            raise UserError("the feature store changed while it was being read; read it again")
        invalid = dict.fromkeys([*features, TARGET_COLUMN], 0)
        block = np.empty((len(place), len(features)), dtype=np.float32)
        for j, name in enumerate(features):
            block[:, j] = _as_float(table.column(name))
        # one pass over the whole block first: infinities are rare, impossible latencies are checked always
        checked = features if np.isinf(block).any() else [name for name in features if name == TARGET_COLUMN]
        for name in checked:
            j = features.index(name)
            invalid[name] += _drop_invalid(block[:, j], name)
        latency = _as_float(table.column(TARGET_COLUMN)).astype(np.float32)
        dropped = _drop_invalid(latency, TARGET_COLUMN)
        if TARGET_COLUMN not in features:  # else counted above, as a feature
            invalid[TARGET_COLUMN] += dropped
        del table
        _scatter(matrix, place, block)
        _scatter(target, place, latency)
        return invalid

    invalid = dict.fromkeys([*features, TARGET_COLUMN], 0)
    for counts in parallel_map(write, range(len(pieces))):
        for name, count in counts.items():
            invalid[name] += count
    return matrix, target, {name: count for name, count in invalid.items() if count}


def _scatter(out: np.ndarray, place: np.ndarray, values: np.ndarray) -> None:
    """``out[place] = values``, by slices where ``place`` runs in steps of one (a store sorted by
    service within each file has a run per service): a copy per run instead of one per row."""
    breaks = np.flatnonzero(np.diff(place) != 1) + 1
    if len(breaks) * _MIN_RUN > len(place):
        out[place] = values
        return
    bounds = [0, *breaks.tolist(), len(place)]
    for first, last in zip(bounds[:-1], bounds[1:]):
        out[place[first] : place[first] + last - first] = values[first:last]


def _drop_invalid(values: np.ndarray, name: str) -> int:
    """Set infinities (and, for the latency, impossible values) to NaN in place; how many."""
    with np.errstate(invalid="ignore"):
        bad = np.isinf(values)
        if name == TARGET_COLUMN:
            bad |= (values < 0) | (values > MAX_LATENCY_MS)
    values[bad] = np.nan
    return int(bad.sum())


def _as_float(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numeric column as a float array, nulls as NaN."""
    if not pa.types.is_floating(column.type):
        column = pc.cast(column, pa.float64())
    return column.to_numpy(zero_copy_only=False)  # a float array's nulls become NaN



def write_feature_store(frame: pd.DataFrame, path: str) -> None:
    """Write ``frame`` as a store hive-partitioned by day (``date=YYYY-MM-DD/part-0.parquet``).

    The store is built beside ``path`` and swapped in at the end, so an interrupted write
    leaves any earlier store intact.
    """
    from latency_forecast.artifacts import replace_directory, staging_directory  # artifacts imports data: import late

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



def time_bounds(time_range: TimeRangeConfig) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """``--start-ts`` and ``--end-ts`` as UTC timestamps; start must be before end."""
    start = parse_timestamp(time_range.start_ts, "--start-ts")
    end = parse_timestamp(time_range.end_ts, "--end-ts")
    if start is not None and end is not None and start >= end:
        raise UserError(f"--start-ts {time_range.start_ts} is not before --end-ts {time_range.end_ts}; swap or widen the range")
    return start, end


def load_store(store_config: StoreConfig, time_range: TimeRangeConfig, feature_columns: Sequence[str] | None) -> SeriesTable:
    """The store named by the --feature-store-path/--start-ts/--end-ts flags."""
    return _warn_invalid(load_feature_store(store_config.feature_store_path, feature_columns, *time_bounds(time_range)))


def _warn_invalid(table: SeriesTable) -> SeriesTable:
    if table.invalid_values:
        counts = ", ".join(f"{name} {count:,}" for name, count in table.invalid_values.items())
        warn(f"values read as missing (infinite, or a negative or over-an-hour latency): {counts}; their windows are not samples")
    return table


def load_model_features(
    path: str, feature_columns: Sequence[str], start: pd.Timestamp | None, end: pd.Timestamp | None
) -> SeriesTable:
    """:func:`load_feature_store` for a trained model's features: a missing one is the store's fault."""
    try:
        return _warn_invalid(load_feature_store(path, feature_columns, start, end))
    except ColumnError as error:
        raise UserError(
            f"the store does not hold the model's features ({error}); use a store of the kind the model was trained on"
        ) from error
