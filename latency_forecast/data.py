"""Validated series table -> time splits -> scalers -> window indices.

Rows are kept as one contiguous float32 matrix sorted by (service, minute); a sample is the row
index ``t`` where its input window ends, and windows are gathered from that matrix by index
arithmetic, never copied out as ``(n, L, F)``. Reading and writing stores is ``store.py``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from latency_forecast.errors import UserError

TIMESTAMP_COLUMN = "timestamp"
SERVICE_COLUMN = "service"
NS_PER_MINUTE = 60_000_000_000
_CHUNK_ROWS = 1 << 18  # rows per chunk when scaling in place: bounds temporary memory
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


def _chunks(n_rows: int) -> list[slice]:
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
    parts = parallel_map(ends_in, [slice(c.start, min(c.stop, starts)) for c in _chunks(starts)])
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

    parallel_map(check, _chunks(len(features)))
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

    parts = parallel_map(samples_of, _chunks(len(ends)))
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
# Scaling


# A fraction at or above this is scaled as if it were this: -log(1 - x) stays finite (6.9)
SATURATION_CEILING = 1.0 - 1e-3


def feature_bounds(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(2, n_features) float64: the smallest and largest finite value of each column of
    ``features[rows]`` (+inf and -inf for a column with none), chunk by chunk."""
    def bounds(chunk: slice) -> np.ndarray:
        selected = features[chunk][rows[chunk]]
        if not len(selected):
            return np.stack([np.full(features.shape[1], np.inf), np.full(features.shape[1], -np.inf)])
        with warnings.catch_warnings():  # an all-NaN column: nanmin warns, and gives NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanmin(selected, axis=0), np.nanmax(selected, axis=0)
        return np.stack([np.where(np.isnan(low), np.inf, low), np.where(np.isnan(high), -np.inf, high)]).astype(np.float64)

    return combine_feature_bounds(parallel_map(bounds, _chunks(len(features))) or [bounds(slice(0, 0))])


def combine_feature_bounds(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The :func:`feature_bounds` of the rows of all ``parts`` (chunks, or torchrun's shards) together."""
    stacked = np.stack([np.asarray(part, dtype=np.float64).reshape(2, -1) for part in parts])
    return np.stack([stacked[:, 0].min(axis=0), stacked[:, 1].max(axis=0)])


def saturating_columns(bounds: np.ndarray) -> np.ndarray:
    """(n_features,) bool: the columns :func:`feature_bounds` found within [0, 1] (utilisations,
    ratios), which ``--feature-transform auto`` scales as -log(1 - x)."""
    return (bounds[0] >= 0.0) & (bounds[1] <= 1.0) & (bounds[0] <= bounds[1])  # the last: a column with values


@dataclass
class FeatureScaler:
    """A transform per column, then scikit-learn's StandardScaler, fitted on training rows only.

    ``log1p``: signed log1p of every column (tames heavy-tailed counters such as bytes and queue
    depth). ``auto``: the same, except for the columns whose training values all lie in [0, 1]
    (``saturating``): those get -log(1 - x). Utilisation works on latency the way queueing does,
    as 1/(1 - rho): the last few points before saturation are where latency explodes, and log1p
    squeezes them together (0.88 and 0.98 become 0.63 and 0.68), -log(1 - x) spreads them (2.1 and
    3.9), on the scale of the log latency the model forecasts. ``none``: the values as they are.

    A constant feature gets scale 1 (StandardScaler's rule), so it maps to 0, never NaN/inf.
    """

    transform_name: str = "auto"
    scaler: StandardScaler = field(default_factory=StandardScaler)
    # (n_features,) bool, ``auto`` only: fixed by :meth:`fit` from the training rows (or given)
    saturating: np.ndarray | None = None

    def _transform_block(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The transform of ``block`` (same dtype), in ``out`` (which may be ``block``) or a new array."""
        if self.transform_name == "none":
            if out is None:
                return block.copy()
            if out is not block:
                out[...] = block
            return out
        fractions = None
        if self.transform_name == "auto" and self.saturating is not None and self.saturating.any():
            fractions = block[:, self.saturating]  # a copy, before ``out`` (maybe ``block``) is written
            np.clip(fractions, 0.0, SATURATION_CEILING, out=fractions)
            np.negative(fractions, out=fractions)
            np.log1p(fractions, out=fractions)
            np.negative(fractions, out=fractions)
        magnitude = np.abs(block)
        np.log1p(magnitude, out=magnitude)
        # sign(block) * log1p(|block|) in one pass, with no sign array
        result = np.copysign(magnitude, block, out=magnitude if out is None else out)
        if fractions is not None:
            result[:, self.saturating] = fractions
        return result

    def fit(self, features: np.ndarray, rows: np.ndarray) -> "FeatureScaler":
        """Fit on ``features[rows]`` (``rows`` a boolean mask), chunk by chunk; NaNs are ignored.

        Each chunk's counts, means and variances (transformed in float32 as :meth:`transform`
        does, then in float64) are pooled as torchrun's shards are (:func:`combine_scalers`):
        one pass, a few times faster than StandardScaler.partial_fit's float64 nan-sums."""
        if self.transform_name == "auto" and self.saturating is None:
            self.saturating = saturating_columns(feature_bounds(features, rows))

        def moments(chunk: slice) -> np.ndarray | None:
            selected = features[chunk][rows[chunk]].astype(np.float32, copy=False)  # a copy: transformed in place
            return _moments(self._transform_block(selected, out=selected)) if len(selected) else None

        parts = [part for part in parallel_map(moments, _chunks(len(features))) if part is not None]
        if not parts:
            raise UserError("no training rows to fit the feature scaler on; the training period is empty")
        # a feature that is NaN in every training row gets mean 0 and scale 1: it is constant 0
        self.scaler = combine_scalers(parts, self.transform_name).scaler
        return self

    def transform(self, features: np.ndarray, inplace: bool = False) -> np.ndarray:
        """(n_rows, n_features) float32, scaled; NaNs stay NaN. ``inplace`` reuses the memory."""
        out = features if inplace else np.empty_like(features, dtype=np.float32)
        mean = self.scaler.mean_.astype(np.float32)
        scale = self.scaler.scale_.astype(np.float32)

        def scale_chunk(chunk: slice) -> None:
            block = self._transform_block(features[chunk], out=out[chunk])
            block -= mean
            block /= scale

        parallel_map(scale_chunk, _chunks(len(features)))
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
            "saturating_columns": [] if self.saturating is None else [c for c, s in zip(feature_columns, self.saturating) if s],
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
        transform = state.get("transform", "none")
        saturating = None
        if transform == "auto":
            chosen = set(state.get("saturating_columns", []))
            saturating = np.array([column in chosen for column in state["feature_columns"]], dtype=bool)
        return cls(transform, scaler, saturating)


@dataclass
class TargetNormalizer:
    """Standardisation of log1p(latency) per service, from training rows only.

    Latency spans orders of magnitude across services (a 3 ms cache, an 800 ms gateway);
    in log space a 2x spike is the same step everywhere. Each service is centred on its own
    median, so the network sees every service around zero. The scale is one for all services
    (the pooled robust spread) unless ``per_service_scale``: then a 2x error costs the same in
    the loss on every service. A per-service scale made a calm service's 5% wobble as costly as
    a bimodal service's 20x jump (whose IQR spans both modes), so the network ignored the
    services that breach and extrapolated them wildly (docs/results.md). Median and IQR are used
    so that the faults inside the training period do not move them much. A service with fewer
    than ``min_rows`` finite training targets uses the pooled location.
    """

    location: np.ndarray  # (n_services,) float64
    scale: np.ndarray  # (n_services,) float64
    pooled: tuple[float, float] = (0.0, 1.0)  # location and scale over all services
    ceiling: float = 30.0  # largest log1p(latency) seen in training: forecasts never exceed it
    spread: np.ndarray | None = None  # (n_services,) each service's own robust spread, what a spike is measured in

    @classmethod
    def fit(cls, table: SeriesTable, rows: np.ndarray, per_service_scale: bool = False, min_rows: int = 30) -> "TargetNormalizer":
        return combine_target_statistics([target_statistics(table, rows, min_rows)], per_service_scale)

    def spikes(self, latency_ms: np.ndarray, service_codes: np.ndarray, z: float) -> np.ndarray:
        """(n,) bool: the latency lies more than ``z`` of its service's own robust standard
        deviations above its median (what a spike is, whatever scale the network learns in).
        By chunks, like :meth:`normalize`."""
        spread = self.spread if self.spread is not None else self.scale
        out = np.empty(len(latency_ms), dtype=bool)

        def spikes_in(chunk: slice) -> None:
            codes = service_codes[chunk]
            with np.errstate(invalid="ignore"):
                out[chunk] = np.log1p(np.maximum(latency_ms[chunk].astype(np.float64), 0.0)) > self.location[codes] + z * spread[codes]

        parallel_map(spikes_in, _chunks(len(latency_ms)))
        return out

    def normalize(self, latency_ms: np.ndarray, service_codes: np.ndarray) -> np.ndarray:
        """(n,) float32; computed in float64 by chunks, so a long store needs no n-row float64 copies."""
        out = np.empty(len(latency_ms), dtype=np.float32)

        def normalize_chunk(chunk: slice) -> None:
            log_latency = np.log1p(np.maximum(latency_ms[chunk].astype(np.float64), 0.0))
            codes = service_codes[chunk]
            out[chunk] = (log_latency - self.location[codes]) / self.scale[codes]

        parallel_map(normalize_chunk, _chunks(len(latency_ms)))
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
            "spread": None if self.spread is None else self.spread.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict) -> "TargetNormalizer":
        return cls(
            np.asarray(state["location"], dtype=np.float64),
            np.asarray(state["scale"], dtype=np.float64),
            (float(state["pooled"][0]), float(state["pooled"][1])),
            float(state["ceiling"]),
            None if state.get("spread") is None else np.asarray(state["spread"], dtype=np.float64),
        )


def _robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return float(median), float(max((q75 - q25) / 1.349, 0.05))


# ---------------------------------------------------------------------------------------------
# Shards: a torchrun rank holds some services; these combine the ranks' statistics


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


def _moments(block: np.ndarray) -> np.ndarray:
    """(3, n_features) float64: finite values, mean and (population) variance per column of
    ``block``, ignoring NaNs (a column without values has count, mean and variance 0). In float64
    throughout, so that pooling other chunks (torchrun's shards) changes only float64 rounding."""
    values = block.astype(np.float64)
    missing = np.isnan(values)
    has_missing = bool(missing.any())
    counts = np.full(values.shape[1], len(values))
    if has_missing:
        np.copyto(values, 0.0, where=missing)
        # per-column counts from the flat positions: reductions along axis 0 of short rows are slow
        counts -= np.bincount(np.flatnonzero(missing) % values.shape[1], minlength=values.shape[1])
    mean = np.einsum("ij->j", values) / np.maximum(counts, 1)  # einsum's column sums: faster than sum(axis=0)
    values -= mean
    if has_missing:
        np.copyto(values, 0.0, where=missing)
    variance = np.einsum("ij,ij->j", values, values) / np.maximum(counts, 1)
    return np.stack([counts.astype(np.float64), mean, variance])


def scaler_moments(scaler: FeatureScaler) -> np.ndarray:
    """(3, n_features) float64: rows seen, mean and variance per feature of a fitted scaler (what
    :func:`combine_scalers` merges)."""
    fitted = scaler.scaler
    counts = np.broadcast_to(np.asarray(fitted.n_samples_seen_, dtype=np.float64), fitted.mean_.shape)
    return np.stack([counts, fitted.mean_, fitted.var_]).astype(np.float64)


def combine_scalers(moments: Sequence[np.ndarray], transform_name: str, saturating: np.ndarray | None = None) -> FeatureScaler:
    """The scaler :meth:`FeatureScaler.fit` gives on all the shards' rows together, from each
    shard's :func:`scaler_moments` (the pooled mean and variance of Chan, Golub and LeVeque: equal
    to the one-process fit up to float64 rounding), with ``saturating`` the columns every shard
    transformed as fractions (``auto``). A feature no shard saw is constant 0."""
    stacked = np.stack([np.asarray(part, dtype=np.float64) for part in moments])  # (n_shards, 3, n_features)
    counts = stacked[:, 0]
    seen = counts > 0
    means = np.where(seen, stacked[:, 1], 0.0)
    variances = np.where(seen, stacked[:, 2], 0.0)
    total = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (counts * means).sum(axis=0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(axis=0) / total
    scaler = StandardScaler()
    # StandardScaler's rule for a constant feature (its variance within float64 error of 0: scale 1)
    eps = np.finfo(np.float64).eps
    constant = var <= total * eps * var + (total * mean * eps) ** 2
    scale = np.where(constant, 1.0, np.sqrt(var))
    scaler.mean_ = np.nan_to_num(mean)
    scaler.var_ = var
    scaler.scale_ = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    scaler.n_samples_seen_ = total.astype(np.int64) if np.ptp(total) else np.int64(total[0])
    scaler.n_features_in_ = len(mean)
    return FeatureScaler(transform_name, scaler, saturating)


@dataclass
class TargetStatistics:
    """One shard's part of a :class:`TargetNormalizer` (:func:`target_statistics`).

    location, scale : (n_services,) float64, median and robust spread of log1p(latency) of the
        services this shard fitted, 0 elsewhere
    fitted : (n_services,) float64, 1 where this shard fitted the service (at least ``min_rows``
        finite training targets), 0 elsewhere
    log_targets : (k,) float64, the shard's finite training log1p(latency): all, or a seeded
        uniform subsample
    count : how many finite training targets the shard holds
    ceiling : their maximum (-inf without any)
    """

    location: np.ndarray
    scale: np.ndarray
    fitted: np.ndarray
    log_targets: np.ndarray
    count: int
    ceiling: float


def target_statistics(
    table: SeriesTable, rows: np.ndarray, min_rows: int = 30, sample_size: int | None = None, seed: int | Sequence[int] = 0
) -> TargetStatistics:
    """A shard's target statistics, each of its services fitted as :meth:`TargetNormalizer.fit`
    fits it (a service lives in one shard, whole); ``sample_size`` caps the log targets kept for
    the pooled median and IQR (None keeps all)."""
    usable = rows & np.isfinite(table.target)
    n_services = len(table.services)
    location, scale, fitted = np.zeros(n_services), np.zeros(n_services), np.zeros(n_services)
    bounds = table.service_bounds
    per_service = []  # only the usable rows are logged: no n-row float64 copy
    for code in range(n_services):
        block = slice(bounds[code], bounds[code + 1])
        service_values = np.log1p(np.maximum(table.target[block][usable[block]].astype(np.float64), 0.0))
        per_service.append(service_values)
        if len(service_values) >= min_rows:
            location[code], scale[code] = _robust_location_scale(service_values)
            fitted[code] = 1.0
    values = np.concatenate(per_service) if per_service else np.zeros(0)
    del per_service
    kept = values
    if sample_size is not None and sample_size < len(values):
        kept = values[np.sort(np.random.default_rng(seed).choice(len(values), sample_size, replace=False))]
    return TargetStatistics(location, scale, fitted, kept, len(values), float(values.max()) if len(values) else -np.inf)


def combine_target_statistics(parts: Sequence[TargetStatistics], per_service_scale: bool = False) -> TargetNormalizer:
    """The normaliser :meth:`TargetNormalizer.fit` gives on all the shards' rows together: each
    service's location and spread (its scale with ``per_service_scale``) from the shard that
    fitted it, the pooled median and IQR of the shards' log targets (exact when every shard kept
    all of them), the largest ceiling."""
    if sum(part.count for part in parts) == 0:
        raise UserError("no finite target_latency_p99 in the training period; the target cannot be learned")
    pooled = _robust_location_scale(parts[0].log_targets if len(parts) == 1 else np.concatenate([part.log_targets for part in parts]))
    fitted = np.sum([part.fitted for part in parts], axis=0)
    if (fitted > 1).any():
        raise ValueError("a service was fitted by more than one shard; shards must hold disjoint services")
    location = np.where(fitted > 0, np.sum([part.location for part in parts], axis=0), pooled[0])
    spread = np.where(fitted > 0, np.sum([part.scale for part in parts], axis=0), pooled[1])
    scale = spread.copy() if per_service_scale else np.full(len(fitted), pooled[1])
    return TargetNormalizer(location, scale, pooled, max(part.ceiling for part in parts), spread)


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
