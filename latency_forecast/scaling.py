"""Feature and target scalers, fitted on training rows only.

Features: a transform per column (signed log1p, or -log(1 - x) for fractions) and standard
scaling; the target: log1p(latency) centred per service. Both also combine the statistics of
torchrun's shards into what one process fitting all rows would get.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from sklearn.preprocessing import StandardScaler

from latency_forecast.data import SeriesTable, parallel_map, row_chunks
from latency_forecast.errors import UserError

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

    return combine_feature_bounds(parallel_map(bounds, row_chunks(len(features))) or [bounds(slice(0, 0))])


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

        parts = [part for part in parallel_map(moments, row_chunks(len(features))) if part is not None]
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

        parallel_map(scale_chunk, row_chunks(len(features)))
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

        parallel_map(spikes_in, row_chunks(len(latency_ms)))
        return out

    def normalize(self, latency_ms: np.ndarray, service_codes: np.ndarray) -> np.ndarray:
        """(n,) float32; computed in float64 by chunks, so a long store needs no n-row float64 copies."""
        out = np.empty(len(latency_ms), dtype=np.float32)

        def normalize_chunk(chunk: slice) -> None:
            log_latency = np.log1p(np.maximum(latency_ms[chunk].astype(np.float64), 0.0))
            codes = service_codes[chunk]
            out[chunk] = (log_latency - self.location[codes]) / self.scale[codes]

        parallel_map(normalize_chunk, row_chunks(len(latency_ms)))
        return out

    def denormalize(self, normalized: np.ndarray, service_codes: np.ndarray, current_ms: np.ndarray | None = None) -> np.ndarray:
        """Normalised predictions back to milliseconds (float64), at most the training maximum,
        or the latency at t (``current_ms``, per prediction) where that is higher.

        A recurrent net extrapolates freely; a forecast above the largest p99 any service showed
        in training is not evidence, so it is capped there (still far above any SLO). A service
        already above that maximum (its level moved up after training, then a fault came) is
        forecast at least as high as it is now: the cap held such a service at the training
        maximum, a third of where it was, for the whole fault.
        """
        log_latency = normalized.astype(np.float64) * self.scale[service_codes] + self.location[service_codes]
        ceiling: float | np.ndarray = self.ceiling
        if current_ms is not None:
            with np.errstate(invalid="ignore"):  # a NaN latency at t leaves the training maximum
                ceiling = np.fmax(self.ceiling, np.log1p(np.maximum(np.asarray(current_ms, dtype=np.float64), 0.0)))
        return np.expm1(np.clip(log_latency, 0.0, ceiling))

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
