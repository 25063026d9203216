"""The trained bundle: forecaster and cause model networks, scalers, thresholds, alert rule,
explanation background and settings, its one checkpoint format, and the steps that fit it to a
table and prepare a table for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from latency_forecast import artifacts, config, data, distributed, training
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig, StoreConfig, TimeRangeConfig, TrainingConfig
from latency_forecast.data import FeatureScaler, SeriesTable, TargetNormalizer, TimeRange
from latency_forecast.errors import UserError
from latency_forecast.explain import Background
from latency_forecast.model import Ensemble, LatencyForecaster

# 3: quantile outputs (model.quantiles) and the scaler's fingerprint; 2: a model that reads the
# latency's history forecasts the change from the latency at t and is explained through a cause model
FORMAT_VERSION = 3
CHECKPOINT_KEYS = (
    "format_version",
    "config",
    "feature_columns",
    "services",
    "target_normalizer",
    "latency_thresholds",
    "alert",
    "state_dict",
    "cause_model_state_dict",
    "scaler_fingerprint",
)

# The cause model's validation loss jumps from epoch to epoch more than the anchored forecaster's
# (it has no latency at t to start from), so it waits longer before stopping: on the development
# stores patience 4 stopped it at epoch 2 (AC@1 0.85 / 0.77), 8 at a lower loss (0.96 / 0.91).
CAUSE_MODEL_MIN_PATIENCE = 8
# It only ranks features, and it ranks them as well in batches of 256 as in the forecaster's smaller
# ones, at a fraction of the steps: demo chaos runs AC@1 0.93 / AC@3 0.95 either way (128 or 256),
# TrainTicket's top two and their shares the same (64 or 256), its training 3 s against 7 s.
CAUSE_MODEL_MIN_BATCH_SIZE = config.AUTO_BATCH_SIZES[-1]

CAUSE_MODEL_PURPOSE = (
    "explains the forecasts (feature_importance.json, analyze_causality.py): the forecaster's network "
    "forecasting the level from the telemetry features alone; never used for alerts or metrics"
)


@dataclass
class Forecast:
    """The forecaster's outputs in milliseconds for a set of samples (p99 at t+H)."""

    ms: np.ndarray  # (n,) point forecast
    quantiles: dict[str, np.ndarray]  # quantile level ("0.9") -> (n,) ms; empty without quantiles
    probability: np.ndarray | None  # (n,) breach probability of a multitask model


@dataclass
class PreparedSeries:
    """A table scaled for one forecaster, on its device, with every valid sample indexed."""

    table: SeriesTable
    tensors: training.SeriesTensors
    ends: np.ndarray  # (n_samples,) row index where each valid sample's inputs end
    counts: data.WindowCounts
    unknown_services: list[str]
    service_thresholds: np.ndarray  # (n_services of the table,) each service's breach threshold, ms

    def latency_threshold(self, rows: np.ndarray) -> np.ndarray:
        """The breach threshold (ms) of each given row's service."""
        return self.service_thresholds[self.table.service_codes[rows]]

    def samples(self, time_range: TimeRange, what: str) -> np.ndarray:
        """The samples whose whole span lies in ``time_range``; a user error naming ``what``
        (e.g. "test") when there is none."""
        tensors = self.tensors
        return data.require_samples_in(self.ends, self.table, time_range, tensors.sequence_length, tensors.horizon, what)


@dataclass
class Forecaster:
    """Everything needed to turn telemetry into forecasts and alerts, saved together in the checkpoint."""

    model: LatencyForecaster | Ensemble
    scaler: FeatureScaler
    target_normalizer: TargetNormalizer
    services: list[str]
    feature_columns: list[str]
    data_config: DataConfig
    model_config: ModelConfig
    training_config: TrainingConfig
    device: torch.device
    latency_thresholds: LatencyThresholds
    alert: AlertRule
    # explains the forecasts when the forecaster itself cannot name causes (see fit_cause_model)
    cause_model: LatencyForecaster | None = None
    background: Background | None = None  # "normal" windows per service, for explanations
    # recorded with the model, not needed to run it
    store_config: StoreConfig | None = None
    time_range_config: TimeRangeConfig | None = None
    alert_config: AlertConfig | None = None
    run_id: str | None = None  # the train.py run that wrote it (metrics.json has the same)

    @property
    def explained_model(self) -> LatencyForecaster | Ensemble:
        """The network whose forecasts the Shapley values explain: the cause model if there is one."""
        if self.cause_model is not None:
            return self.cause_model
        if self.model.anchored:  # it needs the latency at t, which is not a feature to explain
            raise UserError(
                "this checkpoint has no cause model to explain its forecasts with (it was trained without "
                f"telemetry features besides {config.TARGET_COLUMN}); retrain with more --feature-columns"
            )
        return self.model

    @property
    def settings(self) -> dict[str, dict]:
        """Every setting as plain dicts: the checkpoint's ``config``."""
        settings = {
            "data": config.to_dict(self.data_config),
            "model": config.to_dict(self.model_config),
            "training": config.to_dict(self.training_config),
        }
        if self.store_config is not None:
            store = {**config.to_dict(self.store_config), **config.to_dict(self.time_range_config or TimeRangeConfig())}
            settings = {"store": store, **settings}
        if self.alert_config is not None:
            settings["alert"] = config.to_dict(self.alert_config)
        return settings

    def prepare(self, table: SeriesTable, inplace: bool = False) -> PreparedSeries:
        """Scale ``table`` with this forecaster's scalers and index its valid samples.

        Rows of services the forecaster was not trained on are not forecast (their names are
        returned in ``unknown_services``). ``inplace`` scales ``table.features`` in its own memory.
        """
        if table.feature_columns != self.feature_columns:
            raise UserError(
                f"the store's features {table.feature_columns} differ from the model's {self.feature_columns}; "
                "read the store with the checkpoint's feature columns"
            )
        L, H = self.data_config.sequence_length, self.data_config.horizon
        known = {name: code for code, name in enumerate(self.services)}
        code_map = np.array([known.get(name, -1) for name in table.services], dtype=np.int32)  # int32: one per row
        model_codes = code_map[table.service_codes]
        ends, counts = data.window_ends(table, L, H)
        ends = ends[model_codes[ends] >= 0]
        np.maximum(model_codes, 0, out=model_codes)  # unknown services' rows: never a sample, any code will do
        scaled = self.scaler.transform(table.features, inplace=inplace)
        target = self.target_normalizer.normalize(table.target, model_codes)
        service_thresholds = np.asarray(self.latency_thresholds.for_services(table.services), dtype=np.float64)
        breach = None
        if self.model.multitask:
            breach = torch.from_numpy((table.target >= service_thresholds[table.service_codes]).astype(np.float32)).to(self.device)
        # spikes in each service's own spread, whatever scale the network learns in (training weighs them)
        spike = torch.from_numpy(self.target_normalizer.spikes(table.target, model_codes, training.SPIKE_Z)).to(self.device)
        tensors = training.SeriesTensors(
            inputs=torch.from_numpy(scaled).to(self.device),
            target=torch.from_numpy(target).to(self.device),
            service_codes=torch.from_numpy(model_codes).to(self.device),
            sequence_length=L,
            horizon=H,
            breach=breach,
            spike=spike,
        )
        unknown = [name for name, code in zip(table.services, code_map) if code < 0]
        return PreparedSeries(table, tensors, ends, counts, unknown, service_thresholds)

    def predict(self, prepared: PreparedSeries, ends: np.ndarray) -> Forecast:
        """Forecasts (ms) at t+H for the samples ending at ``ends``."""
        predictions = training.predict(self.model, prepared.tensors, ends)
        codes = prepared.tensors.service_codes[torch.as_tensor(ends, device=self.device)].cpu().numpy()
        quantiles = {}
        if predictions.quantiles is not None:
            for name, column in zip(self.model_config.quantile_names, predictions.quantiles.T):
                quantiles[name] = self.target_normalizer.denormalize(column, codes)
        return Forecast(self.target_normalizer.denormalize(predictions.forecast, codes), quantiles, predictions.probability)

    def checkpoint(self) -> dict:
        """Plain dict for ``latency_forecaster.pt`` (contract section 4), loadable with ``weights_only=True``."""
        return {
            "format_version": FORMAT_VERSION,
            "config": self.settings,
            "feature_columns": list(self.feature_columns),
            "services": list(self.services),
            "target_normalizer": self.target_normalizer.state(),
            "latency_thresholds": self.latency_thresholds.as_dict(),
            "alert": self.alert.as_dict(),
            "state_dict": _cpu_state(self.model),
            "cause_model_state_dict": None if self.cause_model is None else _cpu_state(self.cause_model),
            "explain_background": None if self.background is None else self.background.state(),
            "scaler_fingerprint": scaler_fingerprint(self.scaler.state(self.feature_columns)),
            "run_id": self.run_id,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, scaler_state: dict, device: torch.device, source: str = "the checkpoint") -> "Forecaster":
        """Rebuild from ``latency_forecaster.pt`` and ``scaler.pt``; the model comes from the saved config."""
        version = checkpoint.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(
                f"checkpoint {source} has format_version {version}, this version reads {FORMAT_VERSION}; retrain it with train.py"
            )
        missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
        if missing:
            raise UserError(f"checkpoint {source} lacks {', '.join(missing)}; retrain it with train.py")
        if list(scaler_state["feature_columns"]) != list(checkpoint["feature_columns"]):
            raise UserError(
                f"scaler features {scaler_state['feature_columns']} do not match the checkpoint's "
                f"{checkpoint['feature_columns']}; pass the scaler.pt saved beside this checkpoint"
            )
        if scaler_fingerprint(scaler_state) != checkpoint["scaler_fingerprint"]:
            raise UserError(
                f"the scaler was not saved with checkpoint {source} (they come from different train.py runs); "
                "pass the scaler.pt written beside this checkpoint"
            )
        settings = checkpoint["config"]
        model_config = config.from_dict(ModelConfig, settings["model"])
        normalizer = TargetNormalizer.from_state(checkpoint["target_normalizer"])
        columns, n_services = checkpoint["feature_columns"], len(checkpoint["services"])
        model = _with_weights(build_model(columns, n_services, model_config, normalizer), checkpoint["state_dict"], "weights", device)
        cause_model = None
        if checkpoint["cause_model_state_dict"] is not None:
            cause_model = _with_weights(
                build_cause_model(columns, n_services, model_config, normalizer), checkpoint["cause_model_state_dict"], "cause model", device
            )
        background = checkpoint.get("explain_background")
        return cls(
            model,
            FeatureScaler.from_state(scaler_state),
            normalizer,
            list(checkpoint["services"]),
            list(columns),
            config.from_dict(DataConfig, settings["data"]),
            model_config,
            config.from_dict(TrainingConfig, settings["training"]),
            device,
            LatencyThresholds.from_dict(checkpoint["latency_thresholds"]),
            AlertRule.from_dict(checkpoint["alert"]),
            cause_model,
            Background.from_state(background) if isinstance(background, dict) else None,
            config.from_dict(StoreConfig, settings["store"]) if "store" in settings else None,
            config.from_dict(TimeRangeConfig, settings["store"]) if "store" in settings else None,
            config.from_dict(AlertConfig, settings["alert"]) if "alert" in settings else None,
            checkpoint.get("run_id"),
        )

    @classmethod
    def load(cls, checkpoint_path: str, scaler_path: str, device: torch.device) -> "Forecaster":
        """Read ``latency_forecaster.pt`` and ``scaler.pt`` (``weights_only=True``) and rebuild."""
        checkpoint = artifacts.load_torch(checkpoint_path, "checkpoint", "--model-checkpoint")
        scaler_state = artifacts.load_torch(scaler_path, "scaler", "--scaler-path")
        missing = [key for key in ("mean", "scale", "feature_columns") if key not in scaler_state]
        if missing:
            raise UserError(f"scaler {scaler_path} lacks {', '.join(missing)}; pass the scaler.pt written beside the checkpoint")
        return cls.from_checkpoint(checkpoint, scaler_state, device, checkpoint_path)

    def require_background(self, source: str) -> Background:
        """The explanation background, checked against the model it explains."""
        if self.background is None:
            raise UserError(f"checkpoint {source} carries no explanation background (it predates explanations); retrain it with train.py")
        if self.background.windows.shape[1:] != (self.data_config.sequence_length, len(self.feature_columns)):
            raise UserError(f"checkpoint {source}: its explanation background does not match its model; retrain it with train.py")
        return self.background


def scaler_fingerprint(scaler_state: dict) -> str:
    """A digest of what a scaler does (its columns, transform, means and scales): the checkpoint
    keeps the one it was trained with, so a scaler from another run is refused."""
    digest = hashlib.sha256()
    digest.update(repr((list(scaler_state["feature_columns"]), scaler_state.get("transform", "none"))).encode())
    if scaler_state.get("saturating_columns"):  # absent from scalers written before auto: their digests hold
        digest.update(repr(list(scaler_state["saturating_columns"])).encode())
    for key in ("mean", "scale"):
        digest.update(scaler_state[key].numpy().astype(np.float64).tobytes())
    return digest.hexdigest()


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in model.state_dict().items()}


def _with_weights(model: torch.nn.Module, state: dict, what: str, device: torch.device) -> torch.nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"the checkpoint's {what} do not match its saved config; retrain with train.py") from error
    return model.to(device).eval()


def reads_latency_history(feature_columns: Sequence[str]) -> bool:
    """Whether the latency's own history is an input.

    Such a forecaster is anchored (with ``--anchor auto``) and explained through a cause model
    (:func:`fit_cause_model`).
    """
    return config.TARGET_COLUMN in feature_columns


def build_model(
    feature_columns: Sequence[str], n_services: int, model_config: ModelConfig, normalizer: TargetNormalizer
) -> LatencyForecaster | Ensemble:
    """The network for this config, carrying the target statistics its head mixes with; it
    forecasts the change from the latency at t when it reads that latency's history. With
    ``ensemble_size`` above 1, that many such networks (an unresolved auto size builds one)."""

    def network() -> LatencyForecaster:
        return LatencyForecaster(
            len(feature_columns), n_services, model_config, normalizer.location, normalizer.scale, normalizer.pooled,
            anchored=reads_latency_history(feature_columns) and model_config.anchor == "auto",
        )

    if model_config.ensemble_size <= 1:
        return network()
    return Ensemble([network() for _ in range(model_config.ensemble_size)])


def auto_ensemble_size(training_windows: int, samples_per_epoch: int) -> int:
    """``--ensemble-size 0``: as many networks as the training windows fill an epoch of
    ``samples_per_epoch`` (each network sees every window once an epoch), from MIN_AUTO_ENSEMBLE
    to MAX_AUTO_ENSEMBLE.

    Three networks of 32 units (the default) take 1.45x the step of one of 64 on a CPU, and their
    mean beat that one network's MAE in 7 of 8 splits of the synthetic development stores
    (docs/results.md); stores too small to fill an epoch, where one network's seed decides its
    test MAE more than any setting does, get up to five for the same compute an epoch.
    """
    if not samples_per_epoch:
        return config.MIN_AUTO_ENSEMBLE
    return max(config.MIN_AUTO_ENSEMBLE, min(config.MAX_AUTO_ENSEMBLE, samples_per_epoch // max(training_windows, 1)))


def auto_batch_size(training_windows: int, samples_per_epoch: int, world_size: int = 1) -> int:
    """``--batch-size 0``: the smallest of AUTO_BATCH_SIZES whose epoch (of each rank's share of
    ``samples_per_epoch``, or of every training window) takes at most MAX_AUTO_BATCH_STEPS steps.

    Batches of 64 beat 256 on every development store (TrainTicket's validation MAE over four
    seeds, both synthetic stores' episodes and MAE skill; docs/results.md), but a step of 64
    costs half one of 256 on a CPU, so a full epoch of 100,000 windows takes twice as long. Small
    stores, where an epoch of 256 is a few dozen steps and training is cheap, get 64; a full
    epoch takes 128 (782 steps, about 1.25x the time of 256, and ahead of gradient boosting's
    episodes on both synthetic stores, which 256 was not).
    """
    epoch = -(-min(samples_per_epoch or training_windows, training_windows) // max(world_size, 1))
    for size in config.AUTO_BATCH_SIZES:
        if epoch <= size * config.MAX_AUTO_BATCH_STEPS:
            return size
    return config.AUTO_BATCH_SIZES[-1]


def cause_columns(feature_columns: Sequence[str]) -> list[int]:
    """Positions of the telemetry features, i.e. every input but the latency's own history."""
    return [i for i, name in enumerate(feature_columns) if name != config.TARGET_COLUMN]


def build_cause_model(
    feature_columns: Sequence[str], n_services: int, model_config: ModelConfig, normalizer: TargetNormalizer
) -> LatencyForecaster:
    """The cause model's network: the forecaster's settings, level forecast, telemetry columns only."""
    columns = cause_columns(feature_columns)
    settings = dataclasses.replace(model_config, anchor="none", multitask=False, quantiles="none", ensemble_size=1)
    return LatencyForecaster(
        len(columns), n_services, settings, normalizer.location, normalizer.scale, normalizer.pooled, input_columns=columns
    )


def untrained_forecaster(
    table: SeriesTable,
    fit_range: TimeRange,
    data_config: DataConfig,
    model_config: ModelConfig,
    training_config: TrainingConfig,
    latency_thresholds: LatencyThresholds | None = None,
) -> Forecaster:
    """Scalers fitted on ``fit_range`` rows only, and a freshly initialised (seeded) model."""
    device = training.resolve_device(training_config.device)
    training.configure_threads(training_config.num_threads)
    fit_rows = data.rows_in(table, fit_range)
    # under torchrun, of every rank's rows together (each rank holds its own services)
    scaler, normalizer = distributed.fit_statistics(table, fit_rows, data_config, training_config.seed)
    torch.manual_seed(training_config.seed)
    model = build_model(table.feature_columns, len(table.services), model_config, normalizer).to(device)
    return Forecaster(
        model,
        scaler,
        normalizer,
        list(table.services),
        list(table.feature_columns),
        data_config,
        model_config,
        training_config,
        device,
        latency_thresholds or LatencyThresholds(data_config.latency_threshold),
        AlertRule.uncalibrated(model_config),
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
    latency_thresholds: LatencyThresholds | None = None,
    inplace: bool = False,
    resume: training.ResumeFile | None = None,
) -> tuple[Forecaster, PreparedSeries, list[dict]]:
    """Fit scalers on ``fit_range`` rows only, then train with early stopping on ``stop_range``.

    The returned forecaster alerts with the uncalibrated rule (see ``evaluation.calibrated_evaluation``).
    Returns the forecaster, the table prepared for it, and the per-epoch history.
    ``inplace`` (for callers that own ``table``) scales its features in their own memory
    instead of a second copy of the feature matrix. ``resume`` saves the fit's state after every
    epoch and continues from a state saved there by an interrupted run.
    """
    forecaster = untrained_forecaster(table, fit_range, data_config, model_config, training_config, latency_thresholds)
    prepared = forecaster.prepare(table, inplace=inplace)
    if len(prepared.ends) == 0:
        raise UserError(
            f"too little data for one window: none of the {len(table):,} rows starts {data_config.window_minutes} "
            "consecutive minutes (sequence length + horizon) of one service with finite features and latency; "
            "use a shorter --sequence-length/--horizon or a longer store"
        )
    train_ends = prepared.samples(fit_range, "training")
    stop_ends = prepared.samples(stop_range, "early-stopping (validation)")
    windows = int(distributed.all_reduce(np.array([len(train_ends)]))[0])  # under torchrun, every rank's
    if training_config.batch_size == 0:  # auto: resolved here, recorded in the checkpoint's config
        batch_size = auto_batch_size(windows, training_config.samples_per_epoch, distributed.rank_and_world_size()[1])
        training_config = forecaster.training_config = dataclasses.replace(training_config, batch_size=batch_size)
        log(f"batches of {batch_size} windows ({windows:,} training windows, at most {config.MAX_AUTO_BATCH_STEPS} steps an epoch)")
    if model_config.ensemble_size == 0:  # auto: resolved here, recorded in the checkpoint's config
        model_config = dataclasses.replace(model_config, ensemble_size=auto_ensemble_size(windows, training_config.samples_per_epoch))
        forecaster.model_config = model_config
        if model_config.ensemble_size > 1:
            torch.manual_seed(training_config.seed)  # its first network starts where a single one would
            forecaster.model = build_model(forecaster.feature_columns, len(forecaster.services), model_config, forecaster.target_normalizer)
            forecaster.model.to(forecaster.device)
            log(f"{windows:,} training windows fill {model_config.ensemble_size} networks' epochs: training an ensemble of {model_config.ensemble_size}")
    history = training.fit(forecaster.model, prepared.tensors, train_ends, stop_ends, training_config, progress, log, resume)
    return forecaster, prepared, history


def fit_cause_model(
    forecaster: Forecaster,
    prepared: PreparedSeries,
    train_ends: np.ndarray,
    stop_ends: np.ndarray,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: training.ResumeFile | None = None,
) -> list[dict]:
    """Train ``forecaster.cause_model`` on the forecaster's samples; returns its per-epoch history.

    A forecaster that reads the latency's own history leans on it: Shapley values of its
    forecast credit the latency itself, and the telemetry that moved it gets little (on the demo
    store's chaos runs the top feature matched the injected root cause for about half the faults,
    against 0.96-1.00 for a model of the level from telemetry alone). So such a forecaster is
    explained through a cause model: the same network, forecasting the level, from the telemetry
    only, with the same samples, scalers, target and loop (patience at least
    ``CAUSE_MODEL_MIN_PATIENCE``, batches of at least ``CAUSE_MODEL_MIN_BATCH_SIZE``). Its
    forecasts are never used for alerts or metrics.
    """
    if not cause_columns(forecaster.feature_columns):
        raise UserError(
            f"no telemetry features besides {config.TARGET_COLUMN} to explain the forecasts with; "
            "add telemetry columns to --feature-columns"
        )
    training_config = forecaster.training_config
    torch.manual_seed(training_config.seed)
    model = build_cause_model(forecaster.feature_columns, len(forecaster.services), forecaster.model_config, forecaster.target_normalizer)
    model.to(forecaster.device)
    settings = dataclasses.replace(
        training_config,
        patience=max(training_config.patience, CAUSE_MODEL_MIN_PATIENCE),
        batch_size=max(training_config.batch_size, CAUSE_MODEL_MIN_BATCH_SIZE),
    )
    history = training.fit(model, prepared.tensors, train_ends, stop_ends, settings, progress, log, resume)
    forecaster.cause_model = model
    return history
