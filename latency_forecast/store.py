"""The only reader and writer of feature stores: Parquet files or hive-partitioned directories,
local or any filesystem pyarrow opens, with the time range, services and columns pushed down to
the scan. One reader of rows (:func:`load_feature_store`); three of what the store holds that read
less (:func:`minute_span`, :func:`service_rows`, :func:`newest_minutes`). Opening the files is
``parquet.py``'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from latency_forecast import graph, parquet
from latency_forecast.config import TARGET_COLUMN, TimeRangeConfig
from latency_forecast.data import SERVICE_COLUMN, TIMESTAMP_COLUMN, SeriesTable, TimeRange, format_minute, parallel_map, parse_timestamp
from latency_forecast.errors import UserError, warn

_MIN_RUN = 64  # rows per run of consecutive places below which one fancy-indexed copy is faster


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
        if parquet.is_numeric(f.type) and f.name not in (TARGET_COLUMN, TIMESTAMP_COLUMN, SERVICE_COLUMN, *exclude)
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
        if not parquet.is_numeric(schema.field(name).type):
            raise ColumnError(
                f"feature column {name!r} is {schema.field(name).type}, not numeric; choose among: {', '.join(numeric)}"
            )
    return list(requested)


def time_bounds(time_range: TimeRangeConfig) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """``--start-ts`` and ``--end-ts`` as UTC timestamps; start must be before end."""
    start = parse_timestamp(time_range.start_ts, "--start-ts")
    end = parse_timestamp(time_range.end_ts, "--end-ts")
    if start is not None and end is not None and start >= end:
        raise UserError(f"--start-ts {time_range.start_ts} is not before --end-ts {time_range.end_ts}; swap or widen the range")
    return start, end


def load_feature_store(
    path: str,
    feature_columns: Sequence[str] | None = None,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    services: Sequence[str] | None = None,
    *,
    for_model: bool = False,
    warn_invalid: bool = False,
) -> SeriesTable:
    """Read and validate a feature store (contract section 1).

    Only ``timestamp``, ``service``, the features and the target are read; the time range
    ``[start, end)`` is pushed down to the scan (row-group statistics and ``date=`` partitions),
    and so is ``services`` (only those services' rows are read; None reads all).
    Timestamps are floored to the minute; tz-naive values are taken as UTC.

    Parameters
    ----------
    for_model : ``feature_columns`` are a trained model's: a missing one is the store's fault,
        and the error says so
    warn_invalid : warn about the values read as missing (what the scripts do)

    Raises
    ------
    UserError : for every contract violation, with a one-line message naming the fix.
    """
    if start is not None and end is not None and start >= end:
        raise UserError(f"start {start.isoformat()} is not before end {end.isoformat()}; swap or widen the range")
    dataset, partition_keys = parquet.open_dataset(path)
    try:
        features = resolve_feature_columns(dataset.schema, feature_columns, exclude=sorted(partition_keys))
    except ColumnError as error:
        if not for_model:
            raise
        raise UserError(
            f"the store does not hold the model's features ({error}); use a store of the kind the model was trained on"
        ) from error
    row_filter = parquet.time_filter(dataset, partition_keys, start, end)
    if services is not None:
        service_filter = ds.field(SERVICE_COLUMN).isin(list(services))
        row_filter = service_filter if row_filter is None else row_filter & service_filter
    with parquet.reading(path, "check that all files share one schema"):
        table = _read_rows(path, dataset, row_filter, features, start, end)
    if warn_invalid and table.invalid_values:
        counts = ", ".join(f"{name} {count:,}" for name, count in table.invalid_values.items())
        warn(f"values read as missing (infinite, or a negative or over-an-hour latency): {counts}; their windows are not samples")
    return table


def _read_rows(
    path: str, dataset: ds.Dataset, row_filter: ds.Expression | None, features: Sequence[str],
    start: pd.Timestamp | None, end: pd.Timestamp | None,
) -> SeriesTable:
    """The filtered rows as a table, sorted by (service, minute).

    Two passes over the row groups, a few at a time, so that the Arrow copy of the store never
    exists whole: the keys first, to find each row's place, then the values, written straight there.
    """
    unit = dataset.schema.field(TIMESTAMP_COLUMN).type.unit
    pieces = parquet.row_groups(dataset, row_filter)
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
        pieces, piece_rows, lambda piece: parquet.read_row_group(piece, dataset, columns, row_filter), keys, features, unit
    )
    pa.default_memory_pool().release_unused()
    return SeriesTable(keys.minutes, keys.codes, keys.names, matrix, target, list(features), invalid)


# ---------------------------------------------------------------------------------------------
# What the store holds, reading less than its rows


def minute_span(path: str) -> TimeRange:
    """The store's first minute to one past its newest, from the files' row-group statistics
    where they have them (no data is read), else from a scan of the timestamp column."""
    dataset, _ = parquet.open_dataset(path)
    unit = dataset.schema.field(TIMESTAMP_COLUMN).type.unit
    with parquet.reading(path):
        bounds = [minute for fragment in dataset.get_fragments() for minute in parquet.file_minutes(fragment, unit)]
    if not bounds:
        raise UserError(f"the feature store {path} has no rows; check the path")
    return TimeRange(min(bounds), max(bounds) + 1)


def service_rows(path: str, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None) -> dict[str, int]:
    """Each service's number of rows in ``[start, end)``, by name (sorted), reading only the
    ``service`` column (and the timestamps the range needs): how torchrun ranks share the services."""
    dataset, partition_keys = parquet.open_dataset(path)
    counts: dict[str, int] = {}
    with parquet.reading(path):
        for batch in parquet.scan(dataset, [SERVICE_COLUMN], parquet.time_filter(dataset, partition_keys, start, end)):
            services = batch.column(0)
            encoded = services if pa.types.is_dictionary(services.type) else services.dictionary_encode()
            indices = pc.drop_null(encoded.indices).to_numpy(zero_copy_only=False)
            rows = np.bincount(indices, minlength=len(encoded.dictionary))
            for name, count in zip(encoded.dictionary.to_pylist(), rows.tolist()):
                if count:
                    counts[name] = counts.get(name, 0) + count
    return dict(sorted(counts.items()))


def newest_minutes(path: str, services: Sequence[str], before: pd.Timestamp) -> dict[str, int]:
    """Each named service's newest minute before ``before`` (services without rows are left out);
    reads only the timestamp and service columns of those services' rows."""
    dataset, partition_keys = parquet.open_dataset(path)
    unit = dataset.schema.field(TIMESTAMP_COLUMN).type.unit
    row_filter = parquet.time_filter(dataset, partition_keys, None, before) & ds.field(SERVICE_COLUMN).isin(list(services))
    newest: dict[str, int] = {}
    with parquet.reading(path):
        keys = _read_keys(_key_pass(dataset, parquet.row_groups(dataset, row_filter), row_filter, unit))
    if keys is not None:
        last = np.searchsorted(keys.codes, np.arange(len(keys.names) + 1))[1:] - 1
        newest = {name: int(keys.minutes[row]) for name, row in zip(keys.names, last)}
    return newest


def read_call_graph(store_path: str, path: str | None = None, services: Sequence[str] | None = None) -> graph.CallGraph | None:
    """The call graph at ``path`` or, without one, ``call_graph.json`` beside a local store's
    Parquet files; None when there is none. Edges naming services not in ``services`` are dropped
    with a warning (see :func:`graph.parse_call_graph`).

    Raises
    ------
    UserError : when ``path`` is given but missing, or the file is not a valid call graph.
    """
    if path is None:
        if "://" in store_path:  # object storage: a graph is passed explicitly
            return None
        folder = store_path if os.path.isdir(store_path) else os.path.dirname(os.path.abspath(store_path))
        path = os.path.join(folder, graph.CALL_GRAPH_FILE)
        if not os.path.isfile(path):
            return None
    entries = read_json(
        path, f"call graph {path}", "pass a call_graph.json or leave --call-graph out",
        'JSON like {"edges": [{"caller": ..., "callee": ...}]}',
    )
    return graph.parse_call_graph(entries, path, services)


def read_json(path: str, what: str, fix_when_missing: str, expected: str) -> Any:
    """The JSON in ``path``, or a UserError naming ``what`` it is and how to fix it."""
    try:
        with open(path) as stream:
            return json.load(stream)
    except FileNotFoundError as error:
        raise UserError(f"{what} does not exist; {fix_when_missing}") from error
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {what} ({type(error).__name__}); it must be {expected}") from error


# ---------------------------------------------------------------------------------------------
# Rows in (service, minute) order: keys first, then the values straight to their places


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
    return _PieceKeys(parquet.minutes_of(stamps, unit), indices, names, 0, 0)


def _key_pass(dataset: ds.Dataset, pieces: Sequence[ds.ParquetFileFragment], row_filter: ds.Expression | None, unit: str) -> list[_PieceKeys]:
    """The keys of every piece, in order."""
    return parallel_map(lambda piece: _piece_keys(parquet.read_row_group(piece, dataset, [TIMESTAMP_COLUMN, SERVICE_COLUMN], row_filter), unit), pieces)


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
        if table.num_rows != len(place) or not np.array_equal(keys.minutes[place], parquet.minutes_of(table.column(0), unit)):
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
