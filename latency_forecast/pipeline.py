"""A trained forecaster as one object (model + scalers + settings), and the steps every script
shares: fit it on a time range, prepare a table for it, forecast in ms, evaluate beside persistence.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from latency_forecast import artifacts, config, data, metrics, training
from latency_forecast.config import DataConfig, ModelConfig, TrainingConfig
from latency_forecast.data import FeatureScaler, SeriesTable, TargetNormalizer, TimeRange
from latency_forecast.errors import UserError
from latency_forecast.model import LatencyForecaster


@dataclass
class Forecaster:
    """Everything needed to turn telemetry into forecasts, saved together in the checkpoint."""

    model: LatencyForecaster
    scaler: FeatureScaler
    target_normalizer: TargetNormalizer
    services: list[str]
    feature_columns: list[str]
    settings: dict[str, dict[str, Any]]  # {"data": ..., "model": ..., "training": ...}
    device: torch.device

    @property
    def data_config(self) -> DataConfig:
        return config.from_dict(DataConfig, self.settings["data"])

    def checkpoint(self) -> dict:
        """Plain dict for ``latency_forecaster.pt`` (contract section 4)."""
        return {
            "format_version": artifacts.FORMAT_VERSION,
            "config": self.settings,
            "feature_columns": list(self.feature_columns),
            "services": list(self.services),
            "target_normalizer": self.target_normalizer.state(),
            "state_dict": {key: value.detach().cpu() for key, value in self.model.state_dict().items()},
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, scaler_state: dict, device: torch.device) -> "Forecaster":
        """Rebuild from ``latency_forecaster.pt`` and ``scaler.pt``; the model comes from the saved config."""
        if list(scaler_state["feature_columns"]) != list(checkpoint["feature_columns"]):
            raise UserError(
                f"scaler features {scaler_state['feature_columns']} do not match the checkpoint's "
                f"{checkpoint['feature_columns']}; pass the scaler.pt saved beside this checkpoint"
            )
        settings = checkpoint["config"]
        normalizer = TargetNormalizer.from_state(checkpoint["target_normalizer"])
        model = build_model(
            len(checkpoint["feature_columns"]), len(checkpoint["services"]), config.from_dict(ModelConfig, settings["model"]), normalizer
        )
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            raise UserError("the checkpoint's weights do not match its saved config; retrain with train.py") from error
        model.to(device).eval()
        return cls(
            model,
            FeatureScaler.from_state(scaler_state),
            normalizer,
            list(checkpoint["services"]),
            list(checkpoint["feature_columns"]),
            settings,
            device,
        )


def build_model(n_features: int, n_services: int, model_config: ModelConfig, normalizer: TargetNormalizer) -> LatencyForecaster:
    """The network for this config, carrying the target statistics its head mixes with."""
    return LatencyForecaster(
        n_features, n_services, model_config, normalizer.location, normalizer.scale, normalizer.pooled
    )


@dataclass
class PreparedSeries:
    """A table scaled for one forecaster, on its device, with every valid sample indexed."""

    table: SeriesTable
    tensors: training.SeriesTensors
    ends: np.ndarray  # (n_samples,) row index where each valid sample's inputs end
    counts: data.WindowCounts
    unknown_services: list[str]


def prepare(table: SeriesTable, forecaster: Forecaster, inplace: bool = False) -> PreparedSeries:
    """Scale ``table`` with the forecaster's scalers and index its valid samples.

    Rows of services the forecaster was not trained on are not forecast (their names are
    returned in ``unknown_services``). ``inplace`` scales ``table.features`` in its own memory.
    """
    if table.feature_columns != forecaster.feature_columns:
        raise UserError(
            f"the store's features {table.feature_columns} differ from the model's {forecaster.feature_columns}; "
            "read the store with the checkpoint's feature columns"
        )
    settings = forecaster.data_config
    known = {name: code for code, name in enumerate(forecaster.services)}
    code_map = np.array([known.get(name, -1) for name in table.services], dtype=np.int64)
    model_codes = code_map[table.service_codes]
    ends, counts = data.window_ends(table, settings.sequence_length, settings.horizon)
    ends = ends[model_codes[ends] >= 0]
    scaled = forecaster.scaler.transform(table.features, inplace=inplace)
    target = forecaster.target_normalizer.normalize(table.target, np.maximum(model_codes, 0))
    device = forecaster.device
    tensors = training.SeriesTensors(
        inputs=torch.from_numpy(scaled).to(device),
        target=torch.from_numpy(target).to(device),
        service_codes=torch.from_numpy(np.maximum(model_codes, 0)).to(device),
        sequence_length=settings.sequence_length,
        horizon=settings.horizon,
    )
    unknown = [name for name, code in zip(table.services, code_map) if code < 0]
    return PreparedSeries(table, tensors, ends, counts, unknown)


def require_samples(ends: np.ndarray, what: str, time_range: TimeRange, settings: DataConfig) -> None:
    if len(ends) == 0:
        raise UserError(
            f"too little data: the {what} period {data.format_minute(time_range.start)} to "
            f"{data.format_minute(time_range.end)} holds no complete window of {settings.window_minutes} minutes "
            "(sequence length + horizon) with finite values; use a shorter --sequence-length/--horizon or more data"
        )


def fit_forecaster(
    table: SeriesTable,
    fit_range: TimeRange,
    stop_range: TimeRange,
    data_config: DataConfig,
    model_config: ModelConfig,
    training_config: TrainingConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Forecaster, PreparedSeries, list[dict]]:
    """Fit scalers on ``fit_range`` rows only, then train with early stopping on ``stop_range``.

    Returns the forecaster, the table prepared for it, and the per-epoch history.
    """
    device = training.resolve_device(training_config.device)
    training.configure_threads(training_config.num_threads)
    fit_rows = data.rows_in(table, fit_range)
    scaler = FeatureScaler(data_config.feature_transform).fit(table.features, fit_rows)
    normalizer = TargetNormalizer.fit(table, fit_rows)
    torch.manual_seed(training_config.seed)
    model = build_model(len(table.feature_columns), len(table.services), model_config, normalizer).to(device)
    settings = {
        "data": config.to_dict(data_config),
        "model": config.to_dict(model_config),
        "training": config.to_dict(training_config),
    }
    forecaster = Forecaster(model, scaler, normalizer, list(table.services), list(table.feature_columns), settings, device)
    prepared = prepare(table, forecaster)
    if len(prepared.ends) == 0:
        raise UserError(
            f"too little data for one window: none of the {len(table):,} rows starts {data_config.window_minutes} "
            "consecutive minutes (sequence length + horizon) of one service with finite features and latency; "
            "use a shorter --sequence-length/--horizon or a longer store"
        )
    L, H = data_config.sequence_length, data_config.horizon
    train_ends = data.samples_in(prepared.ends, table, fit_range, L, H)
    stop_ends = data.samples_in(prepared.ends, table, stop_range, L, H)
    require_samples(train_ends, "training", fit_range, data_config)
    require_samples(stop_ends, "early-stopping (validation)", stop_range, data_config)
    history = training.fit(model, prepared.tensors, train_ends, stop_ends, training_config, progress, log)
    return forecaster, prepared, history


def forecast_ms(forecaster: Forecaster, prepared: PreparedSeries, ends: np.ndarray) -> np.ndarray:
    """(n_samples,) forecast p99 latency in ms at t+H for the samples ending at ``ends``."""
    normalized = training.predict(forecaster.model, prepared.tensors, ends)
    codes = prepared.tensors.service_codes[torch.as_tensor(ends, device=forecaster.device)].cpu().numpy()
    return forecaster.target_normalizer.denormalize(normalized, codes)


@dataclass
class Evaluation:
    """Forecasts and truth for one set of samples, with the contract metrics for both forecasters."""

    ends: np.ndarray
    actual: np.ndarray  # latency at t+H, ms
    forecast: np.ndarray  # model, ms
    persistence: np.ndarray  # latency at t, ms
    model_metrics: dict
    persistence_metrics: dict


def evaluate(forecaster: Forecaster, prepared: PreparedSeries, ends: np.ndarray) -> Evaluation:
    """Model and persistence baseline on exactly the same samples."""
    settings = forecaster.data_config
    actual = prepared.table.target[ends + settings.horizon].astype(np.float64)
    persistence = prepared.table.target[ends].astype(np.float64)
    forecast = forecast_ms(forecaster, prepared, ends)
    threshold = settings.latency_threshold
    return Evaluation(
        ends,
        actual,
        forecast,
        persistence,
        metrics.forecast_metrics(actual, forecast, threshold),
        metrics.forecast_metrics(actual, persistence, threshold),
    )


def per_service(evaluation: Evaluation, table: SeriesTable, threshold: float) -> dict[str, dict[str, dict]]:
    """Contract metrics per service: ``{service: {"model": {...}, "persistence": {...}}}``."""
    codes = table.service_codes[evaluation.ends]
    result = {}
    for code in np.unique(codes):
        mine = codes == code
        result[table.services[code]] = {
            "model": metrics.forecast_metrics(evaluation.actual[mine], evaluation.forecast[mine], threshold),
            "persistence": metrics.forecast_metrics(evaluation.actual[mine], evaluation.persistence[mine], threshold),
        }
    return result


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def alerts(forecaster: Forecaster, forecast: np.ndarray, service_codes: np.ndarray) -> np.ndarray:
    """(n_samples,) bool: the alert decision for forecasts (ms) of the model's services.

    The one place where a forecast becomes an alert, so a calibrated or per-service threshold
    saved with the model replaces it everywhere at once. Today: the forecast reaches the
    latency threshold.
    """
    del service_codes  # the threshold is one number for every service today
    return np.asarray(forecast) >= forecaster.data_config.latency_threshold


def breaches(forecaster: Forecaster, actual: np.ndarray, service_codes: np.ndarray) -> np.ndarray:
    """(n_samples,) bool: which observed latencies (ms) breach the SLO of their service."""
    del service_codes
    return np.asarray(actual) >= forecaster.data_config.latency_threshold
