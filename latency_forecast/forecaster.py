"""The trained bundle: forecaster and cause model networks, scalers, thresholds, fitted
baselines, alert rule, explanation background and settings; its one checkpoint format, and the
step that prepares a table for it. ``fitting.train`` is the one step that builds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from latency_forecast import artifacts, config, data, ensemble, training
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.background import Background
from latency_forecast.baselines import WINDOW_MEDIAN, GradientBoostingBaseline, UntrustedModelError, window_median
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig, StoreConfig, TimeRangeConfig, TrainingConfig
from latency_forecast.data import SeriesTable, TimeRange
from latency_forecast.errors import UserError
from latency_forecast.model import Ensemble, LatencyForecaster
from latency_forecast.scaling import FeatureScaler, TargetNormalizer

# 4: the shipped forecast is a weighted ensemble (ensemble_weights) whose gradient-boosting member is
# saved beside the checkpoint; 3: quantile outputs and the scaler's fingerprint; 2: a model that reads
# the latency's history forecasts the change from the latency at t and is explained through a cause model
FORMAT_VERSION = 4
GRADIENT_BOOSTING_FILE = "gradient_boosting.skops"  # beside latency_forecaster.pt
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
    "ensemble_weights",
    "gradient_boosting",
)

CAUSE_MODEL_PURPOSE = (
    "explains the forecasts (feature_importance.json, analyze_causality.py): the forecaster's network "
    "forecasting the level from the telemetry features alone; never used for alerts or metrics"
)


@dataclass
class Forecast:
    """The forecaster's outputs in milliseconds for a set of samples (p99 at t+H): the shipped
    forecast (the ensemble's weighted mean of its members) and each member's own."""

    ms: np.ndarray  # (n,) shipped point forecast
    quantiles: dict[str, np.ndarray]  # quantile level ("0.9") -> (n,) ms; empty without quantiles
    probability: np.ndarray | None  # (n,) breach probability of a multitask model
    members: dict[str, np.ndarray]  # member name (ensemble.MEMBERS) -> (n,) its point forecast, ms


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
    # explains the forecasts when the forecaster itself cannot name causes (see fitting.fit_cause_model)
    cause_model: LatencyForecaster | None = None
    background: Background | None = None  # "normal" windows per service, for explanations
    # the baselines that learn, fitted on the same training samples (members of the ensemble)
    baselines: dict[str, GradientBoostingBaseline] = dataclasses.field(default_factory=dict)
    # the shipped forecast's weight of each member, fitted on validation (fitting.train)
    ensemble_weights: dict[str, float] = dataclasses.field(default_factory=lambda: {ensemble.RECURRENT: 1.0})
    # recorded with the model, not needed to run it
    store_config: StoreConfig | None = None
    time_range_config: TimeRangeConfig | None = None
    alert_config: AlertConfig | None = None
    run_id: str | None = None  # the train.py run that wrote it (metrics.json has the same)

    @property
    def explainable(self) -> bool:
        """Whether a network can name causes: the forecaster itself, unless it reads the latency's
        history (then its cause model, which needs telemetry features besides the latency)."""
        return self.cause_model is not None or not reads_latency_history(self.feature_columns)

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
            anchor_minutes=self.model_config.anchor_minutes,
        )
        unknown = [name for name, code in zip(table.services, code_map) if code < 0]
        return PreparedSeries(table, tensors, ends, counts, unknown, service_thresholds)

    def predict(self, prepared: PreparedSeries, ends: np.ndarray) -> Forecast:
        """Forecasts (ms) at t+H for the samples ending at ``ends``: the shipped forecast and every
        member's (the recurrent networks, persistence, the window median and each fitted baseline)."""
        return self.ship(self.predict_members(prepared, ends))

    def predict_members(self, prepared: PreparedSeries, ends: np.ndarray) -> Forecast:
        """Every member's forecast for the samples ending at ``ends``, the recurrent networks' as
        the point forecast and quantiles: what :meth:`ship` weighs (under any weights)."""
        predictions = training.predict(self.model, prepared.tensors, ends)
        codes = prepared.tensors.service_codes[torch.as_tensor(ends, device=self.device)].cpu().numpy()
        current = prepared.table.target[ends].astype(np.float64)
        recurrent = self.target_normalizer.denormalize(predictions.forecast, codes, current)
        quantiles = {}
        if predictions.quantiles is not None:
            for name, column in zip(self.model_config.quantile_names, predictions.quantiles.T):
                quantiles[name] = self.target_normalizer.denormalize(column, codes, current)
        window = window_median(prepared.table.target, ends, self.data_config.sequence_length)
        members = {ensemble.RECURRENT: recurrent, "persistence": current, WINDOW_MEDIAN: window}
        if self.baselines:
            inputs, all_codes = prepared.tensors.inputs.cpu().numpy(), prepared.tensors.service_codes.cpu().numpy()
            for name, baseline in self.baselines.items():
                members[name] = baseline.predict(inputs, prepared.table.target, all_codes, ends)
        return Forecast(recurrent, quantiles, predictions.probability, members)

    def ship(self, members: Forecast) -> Forecast:
        """The shipped forecast from :meth:`predict_members`' output: the members weighted by
        ``ensemble_weights``, the networks' quantile band carried to it."""
        if self.ensemble_weights == {ensemble.RECURRENT: 1.0}:
            return members
        recurrent = members.members[ensemble.RECURRENT]
        shipped = ensemble.combine(self.ensemble_weights, members.members)
        return Forecast(shipped, ensemble.rescale_quantiles(members.quantiles, recurrent, shipped), members.probability, members.members)

    def saved_members(self) -> dict[str, bytes]:
        """The files saved beside the checkpoint: the gradient-boosting member's trees (skops)."""
        if "gradient_boosting" not in self.baselines:
            return {}
        return {GRADIENT_BOOSTING_FILE: self.baselines["gradient_boosting"].saved}

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
            "ensemble_weights": dict(self.ensemble_weights),
            "gradient_boosting": self._gradient_boosting_record(),
        }

    def _gradient_boosting_record(self) -> dict | None:
        """The gradient-boosting member's settings and the digest of its saved trees (a file from
        another run is refused, as a scaler from another run is)."""
        if "gradient_boosting" not in self.baselines:
            return None
        member = self.baselines["gradient_boosting"]
        return {**member.state(), "file": GRADIENT_BOOSTING_FILE, "sha256": hashlib.sha256(member.saved).hexdigest()}

    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict, scaler_state: dict, device: torch.device, source: str = "the checkpoint", saved_members: dict[str, bytes] | None = None
    ) -> "Forecaster":
        """Rebuild from ``latency_forecaster.pt``, ``scaler.pt`` and the member files saved beside
        them (``saved_members``: file name -> bytes); the model comes from the saved config."""
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
            _saved_baselines(checkpoint["gradient_boosting"], saved_members or {}, source),
            {str(name): float(weight) for name, weight in checkpoint["ensemble_weights"].items()},
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
        beside = os.path.dirname(os.path.abspath(checkpoint_path))
        saved = {name: artifacts.read_bytes(os.path.join(beside, name)) for name in (GRADIENT_BOOSTING_FILE,)}
        return cls.from_checkpoint(checkpoint, scaler_state, device, checkpoint_path, {name: data for name, data in saved.items() if data is not None})

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


def _saved_baselines(record: dict | None, saved_members: dict[str, bytes], source: str) -> dict[str, GradientBoostingBaseline]:
    """The gradient-boosting member the checkpoint's ``record`` names, from its saved file."""
    if record is None:
        return {}
    record = dict(record)
    name, digest = record.pop("file"), record.pop("sha256")
    saved = saved_members.get(name)
    if saved is None:
        raise UserError(f"checkpoint {source} needs {name} beside it (its gradient-boosting member); copy it with the checkpoint or retrain")
    if hashlib.sha256(saved).hexdigest() != digest:
        raise UserError(f"{name} was not saved with checkpoint {source} (another train.py run wrote it); use the one written beside it")
    try:
        return {"gradient_boosting": GradientBoostingBaseline.from_saved(record, saved)}
    except UntrustedModelError as error:
        raise UserError(f"refusing {name} beside checkpoint {source}: {error}; retrain with train.py") from None


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
    (:func:`fitting.fit_cause_model`).
    """
    return config.TARGET_COLUMN in feature_columns


def build_model(
    feature_columns: Sequence[str], n_services: int, model_config: ModelConfig, normalizer: TargetNormalizer
) -> LatencyForecaster | Ensemble:
    """The network for this config, carrying the target statistics its head mixes with; it
    forecasts the change from the latency at t when it reads that latency's history. With
    ``ensemble_size`` above 1, that many such networks."""

    anchored = reads_latency_history(feature_columns) and model_config.anchor == "auto"
    relative = list(feature_columns).index(config.TARGET_COLUMN) if anchored and model_config.latency_history != "level" else None

    def network() -> LatencyForecaster:
        return LatencyForecaster(
            len(feature_columns), n_services, model_config, normalizer.location, normalizer.scale, normalizer.pooled,
            anchored=anchored, relative_column=relative, differenced=model_config.latency_history == "difference",
        )

    if model_config.ensemble_size <= 1:
        return network()
    return Ensemble([network() for _ in range(model_config.ensemble_size)])


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
