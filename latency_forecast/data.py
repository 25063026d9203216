"""Validated series table -> time splits -> window indices.

Rows are kept as one contiguous float32 matrix sorted by (service, minute); a sample is the row
index ``t`` where its input window ends, and windows are gathered from that matrix by index
arithmetic, never copied out as ``(n, L, F)``. Reading and writing stores is ``store.py``'s,
fitting scalers ``scaling.py``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import pandas as pd

from latency_forecast.errors import UserError

TIMESTAMP_COLUMN = "timestamp"
SERVICE_COLUMN = "service"
NS_PER_MINUTE = 60_000_000_000
_CHUNK_ROWS = 1 << 18  # rows per chunk of a pass over the rows (windows, scaling): bounds temporary memory
WORKER_THREADS = min(4, os.cpu_count() or 1)  # chunks (and row groups, store.py) worked on at once
T = TypeVar("T")


def parallel_map(function: Callable[[Any], T], items: Sequence) -> list[T]:
    """``function`` of every item, in the items' order, ``WORKER_THREADS`` at a time: numpy's
    array loops and pyarrow's decoding run without the GIL, so the cores share one pass, and
    only as many items' temporaries exist at once as there are threads."""
    if len(items) <= 1 or WORKER_THREADS == 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=WORKER_THREADS) as pool:
        return list(pool.map(function, items))


def row_chunks(n_rows: int) -> list[slice]:
    """Slices of ``_CHUNK_ROWS`` rows covering ``n_rows``: the units :func:`parallel_map` works on."""
    return [slice(start, start + _CHUNK_ROWS) for start in range(0, n_rows, _CHUNK_ROWS)]


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
    invalid_values : per column, how many values were read as missing (inf, impossible latency)
    """

    minutes: np.ndarray
    service_codes: np.ndarray
    services: list[str]
    features: np.ndarray
    target: np.ndarray
    feature_columns: list[str]
    invalid_values: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.minutes)

    @property
    def service_bounds(self) -> np.ndarray:
        """(n_services + 1,) row offsets: service ``s`` occupies rows ``[b[s], b[s+1])``."""
        return np.searchsorted(self.service_codes, np.arange(len(self.services) + 1), side="left")



def format_minute(minute: int | np.integer) -> str:
    """ISO-8601 UTC string of a minute index, as the contract writes timestamps."""
    return timestamp_of(minute).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def timestamp_of(minute: int | np.integer) -> pd.Timestamp:
    """The UTC timestamp of a minute index."""
    return pd.Timestamp(int(minute) * NS_PER_MINUTE, tz="UTC")


def to_minute(stamp: pd.Timestamp) -> int:
    """Minute index of a UTC timestamp (floored)."""
    return int(stamp.value // NS_PER_MINUTE)



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
    index_dtype = np.int32 if n < 2**31 else np.int64
    # Everything by slices over window start positions k (inputs k .. k+L-1, target k+L-1+H),
    # chunk by chunk on threads: no index arrays and no gathers, and the temporaries are a few
    # booleans per row of a chunk.
    bad_input = ~finite_rows(table.features)
    target_finite = np.isfinite(table.target)
    codes, minutes = table.service_codes, table.minutes

    def ends_in(chunk: slice) -> tuple[np.ndarray, np.ndarray]:
        first, last = chunk.start, chunk.stop  # start positions first .. last-1
        complete = codes[first:last] == codes[first + span - 1 : last + span - 1]
        complete &= minutes[first + span - 1 : last + span - 1] - minutes[first:last] == span - 1
        nan_input = bad_input[first:last].copy()
        for offset in range(1, L):  # a bad row anywhere among the window's L inputs
            nan_input |= bad_input[first + offset : last + offset]
        nan_target = ~(target_finite[first + span - 1 : last + span - 1] & target_finite[first + L - 1 : last + L - 1])
        tally = np.array([
            int(complete.sum()), int((complete & nan_input).sum()), int((complete & nan_target & ~nan_input).sum()),
        ])
        complete &= ~nan_input
        complete &= ~nan_target
        return (np.flatnonzero(complete) + (first + L - 1)).astype(index_dtype), tally

    starts = max(n - span + 1, 0)
    parts = parallel_map(ends_in, [slice(c.start, min(c.stop, starts)) for c in row_chunks(starts)])
    ends = np.concatenate([part[0] for part in parts]) if parts else np.zeros(0, dtype=index_dtype)
    complete, nan_input, nan_target = np.sum([part[1] for part in parts], axis=0) if parts else (0, 0, 0)
    counts = WindowCounts(
        rows=n,
        incomplete_span=n - int(complete),
        nan_input=int(nan_input),
        nan_target=int(nan_target),
        samples=len(ends),
    )
    return ends, counts


def finite_rows(features: np.ndarray) -> np.ndarray:
    """(n_rows,) bool: every value of the row is finite.

    A row's float32 sum is NaN or infinite whenever one of its values is, and a few times faster
    than isfinite(...).all(axis=1) over short rows; the rows whose sum is not finite (a missing
    value, or finite values whose sum overflows) are then checked value by value.
    """
    finite = np.empty(len(features), dtype=bool)

    def check(chunk: slice) -> None:
        with np.errstate(over="ignore", invalid="ignore"):
            finite[chunk] = np.isfinite(np.einsum("ij->i", features[chunk]))
        suspect = chunk.start + np.flatnonzero(~finite[chunk])
        finite[suspect] = np.isfinite(features[suspect]).all(axis=1)

    parallel_map(check, row_chunks(len(features)))
    return finite


@dataclass
class LatestWindows:
    """Per service, its newest row and the newest window of L minutes that can be forecast.

    newest : (n_services,) int64 row index of the service's newest minute
    row : (n_services,) int64 row index where the newest forecastable window ends (its ``as_of``),
        -1 where no window ending at or after ``oldest_minute`` is complete with finite inputs
    """

    newest: np.ndarray
    row: np.ndarray


def latest_windows(table: SeriesTable, sequence_length: int, oldest_minute: int, latency_at_end: bool = False) -> LatestWindows:
    """What a live forecast reads: for each service, the newest window whose L minutes are all
    present with finite inputs (and, with ``latency_at_end``, a finite latency at its last minute),
    ending no earlier than ``oldest_minute``. No target is read: a store whose newest minutes
    lack a feature (a latency still being aggregated) is forecast from the newest window that
    has them all."""
    bounds = table.service_bounds
    newest = (bounds[1:] - 1).astype(np.int64)
    row = np.full(len(table.services), -1, dtype=np.int64)
    for code in range(len(table.services)):
        for end in range(int(newest[code]), int(bounds[code]) + sequence_length - 2, -1):
            if table.minutes[end] < oldest_minute:
                break
            first = end - (sequence_length - 1)
            if table.minutes[end] - table.minutes[first] != sequence_length - 1:
                continue
            if not np.isfinite(table.features[first : end + 1]).all():
                continue
            if latency_at_end and not np.isfinite(table.target[end]):
                continue
            row[code] = end
            break
    return LatestWindows(newest, row)


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
    low, high = time_range.start + sequence_length - 1, time_range.end - horizon

    def samples_of(chunk: slice) -> np.ndarray:  # by chunks on threads: no n-sample gather of minutes
        minutes = table.minutes[ends[chunk]]
        return ends[chunk][(minutes >= low) & (minutes < high)]

    parts = parallel_map(samples_of, row_chunks(len(ends)))
    return np.concatenate(parts) if parts else ends[:0]


def require_samples_in(
    ends: np.ndarray, table: SeriesTable, time_range: TimeRange, sequence_length: int, horizon: int, what: str
) -> np.ndarray:
    """:func:`samples_in`, or a user error naming ``what`` (e.g. "test") when there is none."""
    samples = samples_in(ends, table, time_range, sequence_length, horizon)
    if len(samples) == 0:
        raise UserError(
            f"too little data: the {what} period {format_minute(time_range.start)} to {format_minute(time_range.end)} "
            f"holds no complete window of {sequence_length + horizon} minutes (sequence length + horizon) with finite "
            "values; use a shorter --sequence-length/--horizon or more data"
        )
    return samples


@dataclass
class Splits:
    train: TimeRange
    validation: TimeRange
    test: TimeRange

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {name: getattr(self, name).as_dict() for name in ("train", "validation", "test")}


def present_minutes(table: SeriesTable) -> np.ndarray:
    """(n_minutes,) int64, sorted: the distinct minutes of the table's rows."""
    first_minute = int(table.minutes.min())
    return first_minute + np.flatnonzero(np.bincount(table.minutes - first_minute))  # np.unique, in linear time


def fraction_splits(
    table: SeriesTable, validation_fraction: float, test_fraction: float, embargo: int, present: np.ndarray | None = None
) -> Splits:
    """Train, validation, test by global time cut points, separated by ``embargo`` minutes.

    Cut points are quantiles of the minutes present in the store, so idle stretches (a store
    holding two separate days) do not distort the shares. ``present``: the store's minutes
    (:func:`present_minutes`) when ``table`` holds only some of its services (a torchrun rank's).
    """
    present = present_minutes(table) if present is None else present
    last = int(present[-1]) + 1
    cut_validation = int(present[int(len(present) * (1 - validation_fraction - test_fraction))])
    cut_test = int(present[min(len(present) - 1, int(len(present) * (1 - test_fraction)))])
    return Splits(
        train=TimeRange(int(present[0]), cut_validation),
        validation=TimeRange(cut_validation + embargo, cut_test),
        test=TimeRange(cut_test + embargo, last),
    )


# ---------------------------------------------------------------------------------------------
# Sub-tables: a torchrun rank's services, a time range's rows


def with_services(table: SeriesTable, services: Sequence[str]) -> SeriesTable:
    """``table`` with its service codes indexing ``services``, a sorted list holding all of its own:
    a rank that read some of a store's services codes each service as every other rank does.
    Services without rows get empty blocks (``service_bounds`` still holds)."""
    if list(services) != sorted(services):
        raise ValueError("services must be sorted, so that the rows stay sorted by (service, minute)")
    position = {name: code for code, name in enumerate(services)}
    missing = [name for name in table.services if name not in position]
    if missing:
        raise ValueError(f"services lacks the table's {missing}")
    code_map = np.array([position[name] for name in table.services], dtype=np.int32)
    return dataclasses.replace(table, service_codes=code_map[table.service_codes], services=list(services))


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


def span(table: SeriesTable) -> TimeRange:
    """The minutes the table covers: its first minute to one past its last."""
    return TimeRange(int(table.minutes.min()), int(table.minutes.max()) + 1)


def fingerprint(table: SeriesTable, settings: Sequence[object]) -> str:
    """A digest of a table (every service, minute, feature and latency value) and the settings
    dataclasses a run used: two runs share it exactly when they train on the same thing."""
    digest = hashlib.blake2b(digest_size=16)
    described = [(type(item).__name__, dataclasses.asdict(item)) for item in settings]  # type: ignore[call-overload]
    digest.update(json.dumps([table.services, table.feature_columns, described], sort_keys=True, default=str).encode())
    for array in (table.minutes, table.service_codes, table.features, table.target):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()
