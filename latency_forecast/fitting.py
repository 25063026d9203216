"""The one training step: a table, its training and validation ranges and the settings in, a
finished :class:`~latency_forecast.forecaster.Forecaster` out (scalers, networks, cause model,
fitted baselines, calibrated alert rule, explanation background, run id). train.py, backtest
folds and the development-store judge all call :func:`train`; nobody completes its result.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from latency_forecast import background, config, cpus, data, distributed, ensemble, evaluation, training
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.config import (
    AlertConfig,
    BaselineConfig,
    DataConfig,
    ExplainConfig,
    ImportanceConfig,
    ModelConfig,
    StoreConfig,
    TimeRangeConfig,
    TrainingConfig,
)
from latency_forecast.data import SeriesTable, Splits, TimeRange
from latency_forecast.errors import UserError
from latency_forecast.evaluation import Evaluation
from latency_forecast.forecaster import CAUSE_MODEL_PURPOSE, Forecaster, PreparedSeries, build_cause_model, build_model, cause_columns, reads_latency_history
from latency_forecast.model import LatencyForecaster

# The cause model's validation loss jumps from epoch to epoch more than the anchored forecaster's
# (it has no latency at t to start from), so it waits longer before stopping: on the development
# stores patience 4 stopped it at epoch 2 (AC@1 0.85 / 0.77), 8 at a lower loss (0.96 / 0.91).
CAUSE_MODEL_MIN_PATIENCE = 8
# It only ranks features, and it ranks them as well in batches of 256 as in the forecaster's smaller
# ones, at a fraction of the steps: demo chaos runs AC@1 0.93 / AC@3 0.95 either way (128 or 256),
# TrainTicket's top two and their shares the same (64 or 256), its training 3 s against 7 s.
CAUSE_MODEL_MIN_BATCH_SIZE = config.AUTO_BATCH_SIZES[-1]
# The per-epoch validation loss (early stopping, the learning-rate schedule, the best epoch) reads
# at most this many validation windows, evenly spaced over services and time: --samples-per-epoch
# bounds a training epoch whatever the store's size, and this bounds its validation pass the same
# way (all 58,590 of the demo store's took about 3.2 s of a 15 s epoch; neighbouring minutes are
# near-duplicates). Every protocol store has fewer (the largest 10,368), so none of them is
# subsampled. Ensemble weights and the alert rule still read every validation window.
MAX_EARLY_STOPPING_WINDOWS = 16_384


def early_stopping_ends(ends: np.ndarray, limit: int = MAX_EARLY_STOPPING_WINDOWS) -> np.ndarray:
    """At most ``limit`` of the validation samples ``ends`` (ordered by service, then minute),
    evenly spaced, so every service and every part of the span is represented."""
    if len(ends) <= limit:
        return ends
    return ends[np.linspace(0, len(ends) - 1, limit).round().astype(np.int64)]


@dataclass(frozen=True)
class Settings:
    """Every setting of one training step, in one frozen group."""

    data: DataConfig
    model: ModelConfig
    training: TrainingConfig
    alert: AlertConfig = field(default_factory=AlertConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    importance: ImportanceConfig | None = None  # None: no explanation background (backtest folds)
    explain: ExplainConfig | None = None  # recorded with the run (train.py explains after the step)
    store: StoreConfig | None = None  # where the table came from, recorded with the model
    time_range: TimeRangeConfig | None = None
    latency_thresholds: LatencyThresholds | None = None  # None: --latency-threshold for every service

    @property
    def thresholds(self) -> LatencyThresholds:
        return self.latency_thresholds or LatencyThresholds(self.data.latency_threshold)

    def identity(self) -> list[object]:
        """The settings that, with the data, identify a run (a resumed run must share them)."""
        groups = (self.store, self.time_range, self.data, self.model, self.training, self.alert, self.baseline, self.importance, self.explain)
        return [group for group in groups if group is not None]


@dataclass
class Trained:
    """What the training step returns: the finished forecaster and what it was judged on so far."""

    forecaster: Forecaster
    prepared: PreparedSeries  # the table the step was given (under torchrun: the whole store), prepared for it
    samples: dict[str, np.ndarray]  # "train", "validation": the ends of the samples it learned and calibrated on
    validation: Evaluation  # the validation samples under the calibrated alert rule
    history: list[dict]  # the forecaster's per-epoch history
    cause_history: list[dict] | None  # the cause model's, when it has one

    def metrics_report(self, splits: Splits, test: Evaluation) -> dict:
        """``metrics.json``: validation (where the alert rule was calibrated) and ``test`` beside
        the baselines, and the data the run learned from."""
        forecaster, table = self.forecaster, self.prepared.table
        evaluations = {"validation": self.validation, "test": test}
        report = {
            "run_id": forecaster.run_id,
            **evaluation.metrics_report(forecaster, evaluations, table.services, forecaster.alert_config or AlertConfig()),
            "data": {
                "splits": splits.as_dict(),
                "windows": self.prepared.counts.as_dict(),
                "invalid_values": table.invalid_values,
                "samples": {**{name: int(len(ends)) for name, ends in self.samples.items()}, "test": int(len(test))},
                "services": table.services,
                "feature_columns": table.feature_columns,
                "latency_thresholds": forecaster.latency_thresholds.as_dict(),
            },
        }
        if self.cause_history is not None:
            # without the epochs' wall times (training_history.json has those): metrics.json is reproducible
            report["cause_model"] = {
                "purpose": CAUSE_MODEL_PURPOSE,
                "history": [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in self.cause_history],
            }
        return report


def train(
    table: SeriesTable,
    train_range: TimeRange,
    validation_range: TimeRange,
    settings: Settings,
    *,
    resume_dir: str | None = None,
    full_table: Callable[[], SeriesTable] | None = None,
    inplace: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Trained | None:
    """Fit everything a forecaster needs on ``train_range`` rows, stop early and calibrate the
    alert rule on ``validation_range``; never reads a row of any other range.

    ``resume_dir`` keeps each network's state after every epoch (and at the batch where a signal
    stopped the run) and continues from a state an interrupted run with the same data and
    settings saved there. ``inplace`` (for callers that own ``table``) scales its features in
    their own memory. Under torchrun every rank trains the networks on its own services
    (``table`` is its shard); then rank 0 reads ``full_table()`` and finishes the bundle on every
    service, and the other ranks return None.
    """
    rank, world_size = distributed.rank_and_world_size()
    run_id = distributed.joint_digest(data.fingerprint(table, settings.identity()))  # before features are scaled in place

    def resume(name: str) -> training.ResumeFile | None:
        return None if resume_dir is None else training.ResumeFile(os.path.join(resume_dir, name), run_id)

    untrained, prepared, history = fit_networks(table, train_range, validation_range, settings, inplace, progress, log, resume("forecaster.pt"))
    cause_model, cause_history = None, None
    # before the baselines and calibration: under torchrun every rank takes part in this too
    if reads_latency_history(untrained.feature_columns) and cause_columns(untrained.feature_columns):
        log("training the cause model that explains the forecasts (level forecast from the telemetry features alone)")
        cause_model, cause_history = fit_cause_model(
            untrained, prepared, prepared.samples(train_range, "train"), early_stopping_ends(prepared.samples(validation_range, "validation")),
            progress, log, resume("cause_model.pt"),
        )
    distributed.barrier()  # under torchrun: every rank has finished training, the process group is done
    distributed.close()
    if world_size > 1:
        if rank != 0:
            return None
        del table, prepared  # rank 0's services only: finish on every service
        prepared = untrained.prepare(full_table(), inplace=True)
    samples = {"train": prepared.samples(train_range, "train"), "validation": prepared.samples(validation_range, "validation")}
    # the trees' OpenMP threads follow --num-threads, as torch's do (their result does not depend on it)
    with threadpool_limits(limits=cpus.pool_threads(settings.training.num_threads)):
        baselines = evaluation.fit_baselines(untrained, prepared, samples["train"], settings.baseline)
    fitted = dataclasses.replace(untrained, baselines=baselines)
    members = fitted.predict_members(prepared, samples["validation"])  # read once: weighed, then calibrated on
    if settings.model.ensemble == "greedy":
        actual = prepared.table.target[samples["validation"] + settings.data.horizon]
        weights = ensemble.select_weights({name: members.members[name] for name in ensemble.MEMBERS if name in members.members}, actual)
        fitted = dataclasses.replace(fitted, ensemble_weights=weights)
    # the operating point is chosen on validation; a test split only measures it
    validation, rule = evaluation.calibrated_evaluation(fitted, prepared, samples["validation"], settings.alert, members)
    explanation_background = None
    if settings.importance is not None:
        explanation_background = background.build_background(
            prepared.tensors, samples["train"], len(untrained.services), settings.importance.background_size, settings.training.seed
        )
    forecaster = dataclasses.replace(
        fitted, alert=rule, cause_model=cause_model, background=explanation_background,
        store_config=settings.store, time_range_config=settings.time_range, alert_config=settings.alert, run_id=run_id,
    )
    return Trained(forecaster, prepared, samples, validation, history, cause_history)


def untrained_forecaster(table: SeriesTable, fit_range: TimeRange, settings: Settings) -> Forecaster:
    """Scalers fitted on ``fit_range`` rows only, and a freshly initialised (seeded) model."""
    data_config, training_config = settings.data, settings.training
    device = training.resolve_device(training_config.device)
    training.configure_threads(training_config.num_threads)
    fit_rows = data.rows_in(table, fit_range)
    # under torchrun, of every rank's rows together (each rank holds its own services)
    scaler, normalizer = distributed.fit_statistics(table, fit_rows, data_config, training_config.seed)
    torch.manual_seed(training_config.seed)
    model = build_model(table.feature_columns, len(table.services), settings.model, normalizer).to(device)
    return Forecaster(
        model, scaler, normalizer, list(table.services), list(table.feature_columns), data_config, settings.model,
        training_config, device, settings.thresholds, AlertRule.uncalibrated(settings.model),
    )


def fit_networks(
    table: SeriesTable,
    fit_range: TimeRange,
    stop_range: TimeRange,
    settings: Settings,
    inplace: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: training.ResumeFile | None = None,
) -> tuple[Forecaster, PreparedSeries, list[dict]]:
    """Scalers fitted on ``fit_range`` rows only, then the networks trained with early stopping on
    ``stop_range``: the first part of :func:`train` (its forecaster alerts with the uncalibrated
    rule, and has no baselines, cause model or background yet).

    Returns the forecaster, the table prepared for it, and the per-epoch history. The automatic
    batch size is resolved here and recorded in the forecaster's settings.
    """
    if settings.training.targets_per_sequence > 1 and settings.model.latency_history == "relative":
        raise UserError(
            "--targets-per-sequence above 1 forecasts from every step of a sequence, but --latency-history relative reads "
            "the latency relative to one step; use --latency-history difference (or level)"
        )
    if settings.model.anchor_minutes > settings.data.sequence_length:
        raise UserError(
            f"--anchor-minutes {settings.model.anchor_minutes} is longer than the window (--sequence-length "
            f"{settings.data.sequence_length}); use at most {settings.data.sequence_length}"
        )
    forecaster = untrained_forecaster(table, fit_range, settings)
    prepared = forecaster.prepare(table, inplace=inplace)
    if len(prepared.ends) == 0:
        raise UserError(
            f"too little data for one window: none of the {len(table):,} rows starts {settings.data.window_minutes} "
            "consecutive minutes (sequence length + horizon) of one service with finite features and latency; "
            "use a shorter --sequence-length/--horizon or a longer store"
        )
    train_ends = prepared.samples(fit_range, "training")
    stop_ends = early_stopping_ends(prepared.samples(stop_range, "early-stopping (validation)"))
    windows = int(distributed.all_reduce(np.array([len(train_ends)]))[0])  # under torchrun, every rank's
    forecaster = _resolve_auto_batch_size(forecaster, windows, log)
    history = training.fit(forecaster.model, prepared.tensors, train_ends, stop_ends, forecaster.training_config, progress, log, resume)
    return forecaster, prepared, history


def _resolve_auto_batch_size(forecaster: Forecaster, windows: int, log: Callable[[str], None]) -> Forecaster:
    """``--batch-size 0`` resolved for ``windows`` training windows."""
    training_config = forecaster.training_config
    if training_config.batch_size == 0:
        batch_size = auto_batch_size(windows, training_config.samples_per_epoch, distributed.rank_and_world_size()[1])
        steps = training_config.targets_per_sequence
        if steps > 1:
            batch_size = sequences_per_batch(batch_size, steps)
        training_config = dataclasses.replace(training_config, batch_size=batch_size)
        forecaster = dataclasses.replace(forecaster, training_config=training_config)
        if steps > 1:
            log(f"batches of {batch_size} sequences of {steps} targets ({windows:,} training windows)")
        else:
            log(f"batches of {batch_size} windows ({windows:,} training windows, at most {config.MAX_AUTO_BATCH_STEPS} steps an epoch)")
    return forecaster


def fit_cause_model(
    forecaster: Forecaster,
    prepared: PreparedSeries,
    train_ends: np.ndarray,
    stop_ends: np.ndarray,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: training.ResumeFile | None = None,
) -> tuple[LatencyForecaster, list[dict]]:
    """The cause model for ``forecaster``, trained on its samples, and its per-epoch history.

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
    steps = training_config.targets_per_sequence
    min_batch = CAUSE_MODEL_MIN_BATCH_SIZE if steps == 1 else sequences_per_batch(CAUSE_MODEL_MIN_BATCH_SIZE, steps)
    settings = dataclasses.replace(
        training_config,
        patience=max(training_config.patience, CAUSE_MODEL_MIN_PATIENCE),
        batch_size=max(training_config.batch_size, min_batch),
    )
    history = training.fit(model, prepared.tensors, train_ends, stop_ends, settings, progress, log, resume)
    return model, history


def sequences_per_batch(windows_per_batch: int, targets_per_sequence: int) -> int:
    """``--batch-size 0`` under sequence training: sequences holding twice the targets of the
    automatic batch of windows, so an epoch takes half the steps. A sequence's targets are
    neighbouring minutes, worth less than as many windows drawn across the store (batches of 64
    sequences of 8 lost to 16 on the development stores)."""
    return max(1, round(2 * windows_per_batch / targets_per_sequence))


def auto_batch_size(training_windows: int, samples_per_epoch: int, world_size: int = 1) -> int:
    """``--batch-size 0``: the smallest of AUTO_BATCH_SIZES whose epoch (of each rank's share of
    ``samples_per_epoch``, or of every training window) takes at most MAX_AUTO_BATCH_STEPS steps.

    Batches of 64 beat 256 on every development store (TrainTicket's validation MAE over four
    seeds, both synthetic stores' episodes and MAE skill; docs/results.md), but a step of 64
    costs half one of 256 on a CPU, so a full epoch of 100,000 windows takes twice as long. Small
    stores, where an epoch of 256 is a few dozen steps and training is cheap, get 64; a full
    epoch takes 128 (782 steps, about 1.25x the time of 256, and ahead of gradient boosting's
    episodes on both synthetic stores, where 256 is behind it).
    """
    epoch = -(-min(samples_per_epoch or training_windows, training_windows) // max(world_size, 1))
    for size in config.AUTO_BATCH_SIZES:
        if epoch <= size * config.MAX_AUTO_BATCH_STEPS:
            return size
    return config.AUTO_BATCH_SIZES[-1]
