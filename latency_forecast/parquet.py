"""How store.py gets at a feature store's Parquet: the filesystem of a path or URI (with the
object store's errors as one line and a fix), the data files and hive partitions, the dataset with
the contract's columns checked, the time range as a scan filter, row groups and their footers.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from latency_forecast.config import TARGET_COLUMN
from latency_forecast.data import NS_PER_MINUTE, SERVICE_COLUMN, TIMESTAMP_COLUMN
from latency_forecast.errors import UserError

PARQUET_SUFFIXES = (".parquet", ".parq")
VALID_PARQUET = "check that every *.parquet file is valid Parquet"
_UNITS_PER_MINUTE = {"s": 60, "ms": 60_000, "us": 60_000_000, "ns": NS_PER_MINUTE}


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
    """The filesystem, the root and the sorted data files of a store (one file, or a directory's)."""
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


def is_numeric(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_decimal(data_type)


def open_dataset(path: str) -> tuple[ds.Dataset, set[str]]:
    """The store as a pyarrow dataset with its schema checked, and its hive partition keys."""
    filesystem, root, files = _parquet_files(path)
    with reading(path):
        # service names come as Parquet stores them, dictionary-encoded: no string per row is built
        file_format = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=[SERVICE_COLUMN]))
        dataset = ds.dataset(files, filesystem=filesystem, format=file_format, partitioning="hive", partition_base_dir=root)
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
    if not is_numeric(schema.field(TARGET_COLUMN).type):
        raise UserError(f"column {TARGET_COLUMN!r} is {schema.field(TARGET_COLUMN).type}, not numeric milliseconds")
    return dataset, _partition_keys(root, files)


@contextlib.contextmanager
def reading(path: str, fix: str = VALID_PARQUET) -> Iterator[None]:
    """Arrow's and the filesystem's errors inside the block, as a one-line user error naming the
    store and ``fix``."""
    try:
        yield
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read the feature store {path}: {_first_line(error)}; {fix}") from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def time_filter(
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


# ---------------------------------------------------------------------------------------------
# Row groups and their timestamps


def row_groups(dataset: ds.Dataset, row_filter: ds.Expression | None) -> list[ds.ParquetFileFragment]:
    """The row groups the filter may touch, in one fixed order (every pass reads them in it)."""
    pieces = []
    for fragment in dataset.get_fragments(filter=row_filter):
        try:
            pieces.extend(fragment.split_by_row_group(filter=row_filter, schema=dataset.schema))
        except (pa.ArrowException, OSError) as error:
            raise _fragment_error(fragment, error) from error
    return pieces


def read_row_group(piece: ds.ParquetFileFragment, dataset: ds.Dataset, columns: list[str], row_filter: ds.Expression | None) -> pa.Table:
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


def scan(dataset: ds.Dataset, columns: list[str], row_filter: ds.Expression | None) -> Iterator[pa.RecordBatch]:
    """The non-empty record batches of ``columns``, in the pieces' order, one row group at a time."""
    for piece in row_groups(dataset, row_filter):
        for batch in read_row_group(piece, dataset, columns, row_filter).to_batches():
            if batch.num_rows:
                yield batch


def minutes_of(stamps: pa.Array, unit: str) -> np.ndarray:
    """Minutes since the epoch, floored, of a timestamp array without nulls."""
    return np.floor_divide(stamps.cast(pa.int64()).to_numpy(), _UNITS_PER_MINUTE[unit])


def file_minutes(fragment: ds.ParquetFileFragment, unit: str) -> list[int]:
    """The first and last minute of each row group of one file, from the footer's statistics (no
    data is read); where a row group has none, from a read of the file's timestamp column."""
    values = _timestamp_statistics(fragment)
    if not values or any(value is None for value in values):  # no statistics: read the column
        stamps = fragment.to_table(columns=[TIMESTAMP_COLUMN]).column(0).drop_null()
        values = list(pc.min_max(stamps).values()) if len(stamps) else []
    return [_minute_of(value, unit) for value in values]


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
