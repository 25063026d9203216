"""Walk-forward backtesting: fold arithmetic (pure functions of the data span and the settings),
and a runner that gives every fold a fresh scaler and model, fitted on that fold's past only,
in this process, in worker processes, or as Ray tasks (ray_folds.py).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from latency_forecast import data, evaluation, fitting, forecaster, ray_folds
from latency_forecast.config import MINUTES_PER_DAY, DataConfig
from latency_forecast.data import SeriesTable, TimeRange
from latency_forecast.errors import UserError
from latency_forecast.metrics import METRIC_KEYS
from latency_forecast.script_config import BacktestConfig

# ---------------------------------------------------------------------------------------------
# Fold arithmetic


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold; every range is half-open, in minutes since the epoch.

    ``train`` is every minute the fold may learn from. It is cut in two, with an embargo
    between: ``fit`` (scaler, target statistics and weights) and ``early_stopping`` (the last
    ``--validation-fraction`` of it). ``validation`` starts an embargo after ``train`` ends.
    """

    number: int  # 1-based
    train: TimeRange
    fit: TimeRange
    early_stopping: TimeRange
    validation: TimeRange


def _days(minutes: int) -> str:
    return f"{minutes / MINUTES_PER_DAY:.4g} days"


def early_stopping_split(train: TimeRange, data_config: DataConfig) -> tuple[TimeRange, TimeRange]:
    """``train`` as (fit, early_stopping): the last ``validation_fraction`` of it, after an embargo,
    is for early stopping, exactly as train.py carves its validation split from the store."""
    length = train.end - train.start
    cut = train.end - round(length * data_config.validation_fraction)
    fit = TimeRange(train.start, cut)
    stop = TimeRange(cut + data_config.embargo, train.end)
    shortest = min(fit.end - fit.start, stop.end - stop.start)
    if shortest < data_config.window_minutes:
        raise UserError(
            f"a {_days(length)} training window leaves {fit.end - fit.start} minutes to fit on and "
            f"{max(stop.end - stop.start, 0)} for early stopping (its last --validation-fraction "
            f"{data_config.validation_fraction:g}, after a {data_config.embargo}-minute embargo); each needs at least "
            f"sequence length + horizon = {data_config.window_minutes} minutes; lengthen --train-window-days"
        )
    return fit, stop


def plan_folds(span: TimeRange, backtest_config: BacktestConfig, data_config: DataConfig) -> list[Fold]:
    """The folds that fit in ``span``, oldest first.

    Fold k (from 0) trains on ``[train_end - train, train_end)`` (sliding) or
    ``[span.start, train_end)`` (expanding), with ``train_end = span.start + train + k * step``,
    and is validated on ``[train_end + embargo, train_end + validation)``. Folds are added while
    the validation window ends within the span; a tail shorter than a step is not validated on.

    Raises
    ------
    UserError : when not even one fold fits, or a window is too short to hold one sample.
    """
    train, validation, step = (
        backtest_config.train_window_minutes,
        backtest_config.val_window_minutes,
        backtest_config.step_minutes,
    )
    embargo, window = data_config.embargo, data_config.window_minutes
    if validation < embargo + window:
        raise UserError(
            f"--val-window-days {backtest_config.val_window_days:g} is {validation} minutes: after the "
            f"{embargo}-minute embargo no complete sample fits; it must be at least embargo + sequence length + "
            f"horizon = {embargo + window} minutes"
        )
    found, needed = span.end - span.start, train + validation
    if found < needed:
        raise UserError(
            f"the data spans {_days(found)} ({data.format_minute(span.start)} to {data.format_minute(span.end)}) but one "
            f"fold needs --train-window-days + --val-window-days = {_days(needed)}; shorten the windows or use a longer store"
        )
    folds = []
    for k in range((found - needed) // step + 1):
        train_end = span.start + train + k * step
        train_range = TimeRange(span.start if backtest_config.window_mode == "expanding" else train_end - train, train_end)
        fit, stop = early_stopping_split(train_range, data_config)
        folds.append(Fold(k + 1, train_range, fit, stop, TimeRange(train_end + embargo, train_end + validation)))
    return folds


def check_folds(table: SeriesTable, folds: Sequence[Fold], data_config: DataConfig) -> None:
    """Fail before any training when a fold's fit, early-stopping or validation range holds no sample."""
    L, H = data_config.sequence_length, data_config.horizon
    ends, _ = data.window_ends(table, L, H)
    for fold in folds:
        for what, time_range in (("training", fold.fit), ("early-stopping", fold.early_stopping), ("validation", fold.validation)):
            data.require_samples_in(ends, table, time_range, L, H, f"fold {fold.number} {what}")


def threads_per_fold(jobs: int, num_threads: int) -> int:
    """``--num-threads`` for each fold's process: the user's, else 0 (auto: one torch thread, the
    native pools on every CPU) for one fold at a time and 1 for folds side by side, which would
    otherwise each size their pools to every CPU."""
    if num_threads:
        return num_threads
    return 0 if jobs <= 1 else 1


# ---------------------------------------------------------------------------------------------
# One fold


@dataclass
class FoldTask:
    """Everything one fold needs, picklable for a worker process.

    ``table`` holds the rows of ``[fold.train.start, fold.validation.end)`` only.
    """

    fold: Fold
    table: SeriesTable
    settings: fitting.Settings


@dataclass
class FoldResult:
    fold: Fold
    metrics: dict
    baseline: dict[str, dict]  # each baseline's metrics, on exactly the same samples
    operating_point: dict  # alert rule calibrated on the fold's early-stopping slice, with its FPRs
    alerting: dict  # ROC/PR-AUC and episodes on the validation window, model and persistence
    samples: dict[str, int]
    history: list[dict]
    unforecast_services: list[str]  # in the validation window but absent from the fold's training rows
    resolved: dict  # what was decided on this fold's past: automatic sizes, the ensemble's weights
    seconds: float

    def as_dict(self) -> dict:
        """The fold's entry in backtest.json."""
        best = min(self.history, key=lambda row: row["val_loss"])
        return {
            "fold": self.fold.number,
            "train_start": data.format_minute(self.fold.train.start),
            "train_end": data.format_minute(self.fold.train.end),
            "val_start": data.format_minute(self.fold.validation.start),
            "val_end": data.format_minute(self.fold.validation.end),
            "metrics": self.metrics,
            "baseline": self.baseline,
            "operating_point": self.operating_point,
            "alerting": self.alerting,
            "fit_end": data.format_minute(self.fold.fit.end),
            "early_stopping_start": data.format_minute(self.fold.early_stopping.start),
            "samples": self.samples,
            "epochs": len(self.history),
            "best_epoch": best["epoch"],
            "unforecast_services": self.unforecast_services,
            "resolved": self.resolved,
            "seconds": self.seconds,
        }


@dataclass
class TrainedFold:
    """A fold's finished forecaster, with what was decided on its past only."""

    forecaster: forecaster.Forecaster
    history: list[dict]
    samples: dict[str, int]
    operating_point: dict  # the calibrated alert rule and its early-stopping FPR
    compared: dict[str, tuple[str, float]]  # the baselines' alerts, thresholds chosen on early stopping


def train_fold(task: FoldTask) -> TrainedFold:
    """The training step on the fold's training rows: a fresh scaler, target normaliser, seeded
    model and baselines fitted on its fit range, every alert threshold calibrated on its
    early-stopping slice.

    Only the rows of ``fold.train`` are handed on: nothing at or after ``fold.train.end``
    (not a value, not a service name) can reach the fitted state or the alert thresholds.
    """
    fold, settings = task.fold, task.settings
    run = fitting.train(data.table_in(task.table, fold.train), fold.fit, fold.early_stopping, settings, progress=False, log=_silent)
    assert run is not None  # folds never run under torchrun
    trained, calibrated = run.forecaster, run.validation
    return TrainedFold(
        trained,
        run.history,
        {"fit": len(run.samples["train"]), "early_stopping": len(run.samples["validation"])},
        {**trained.alert.as_dict(), "early_stopping_false_positive_rate": calibrated.model_metrics["false_positive_rate"]},
        evaluation.comparisons(calibrated, trained.alert, settings.alert, settings.data.horizon),
    )


def _silent(message: str) -> None:
    pass


def run_fold(task: FoldTask) -> FoldResult:
    """Train the fold's forecaster and baselines, then judge them on its validation window."""
    started = time.perf_counter()
    fold = task.fold
    trained = train_fold(task)
    prepared = trained.forecaster.prepare(data.table_in(task.table, fold.validation), inplace=True)
    ends = prepared.samples(fold.validation, f"fold {fold.number} validation")
    with threadpool_limits(limits=1):
        judged = evaluation.evaluate(trained.forecaster, prepared, ends)
    return FoldResult(
        fold,
        judged.model_metrics,
        judged.baseline_metrics,
        {**trained.operating_point, "validation_false_positive_rate": judged.model_metrics["false_positive_rate"]},
        evaluation.alerting_report(judged, task.settings.data.horizon, trained.compared),
        {**trained.samples, "validation": int(len(ends))},
        trained.history,
        prepared.unknown_services,
        {
            "batch_size": trained.forecaster.training_config.batch_size,
            "ensemble_size": trained.forecaster.model_config.ensemble_size,
            "ensemble_weights": dict(trained.forecaster.ensemble_weights),
        },
        time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# All folds


def _tasks(table: SeriesTable, folds: Sequence[Fold], template: FoldTask) -> Iterator[FoldTask]:
    """One task per fold, built lazily: each copies only its own rows out of the table."""
    for fold in folds:
        rows = data.table_in(table, TimeRange(fold.train.start, fold.validation.end))
        yield dataclasses.replace(template, fold=fold, table=rows)


def run_backtest(
    table: SeriesTable,
    folds: Sequence[Fold],
    settings: fitting.Settings,
    jobs: int = 1,
    threads: int = 0,
    on_result: Callable[[FoldResult], None] = lambda result: None,
    executor: str = "local",
    ray_address: str | None = None,
) -> list[FoldResult]:
    """Run every fold; ``jobs`` > 1 runs them in that many worker processes, and executor
    ``"ray"`` runs each as a Ray task (``jobs`` at a time, see :func:`ray_folds.run_on_ray`).

    Each fold sets ``threads`` torch threads (0 keeps torch's default) and seeds its model with
    the training seed, so a fold's result does not depend on which process ran it or when.
    ``on_result`` is called as each fold finishes; the results come back in fold order.
    """
    fold_settings = dataclasses.replace(settings, training=dataclasses.replace(settings.training, num_threads=threads))
    template = FoldTask(folds[0], table, fold_settings)
    tasks = _tasks(table, folds, template)
    if executor == "ray":
        return ray_folds.run_on_ray(run_fold, tasks, jobs, threads, settings.training.device, ray_address, on_result)
    results = []
    if jobs <= 1:
        for task in tasks:
            results.append(run_fold(task))
            on_result(results[-1])
        return results
    # spawn, not fork: the parent has pyarrow's and torch's thread pools running
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: set[Future] = set()

        def submit_next() -> None:
            task = next(tasks, None)
            if task is not None:  # at most `jobs` tasks (and their rows) are in flight
                pending.add(pool.submit(run_fold, task))

        for _ in range(jobs):
            submit_next()
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    pending.discard(future)
                    results.append(future.result())  # re-raises a worker's UserError here
                    on_result(results[-1])
                    submit_next()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return sorted(results, key=lambda result: result.fold.number)


def summarize(blocks: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """Mean and sample standard deviation of each metric across folds (``{metric: {"mean", "std"}}``).

    Folds where a rate is null (no denominator) are left out of that rate; std is null with
    fewer than two values.
    """
    summary = {}
    for key in METRIC_KEYS:
        values = np.array([block[key] for block in blocks if block[key] is not None], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) >= 2 else None,
        }
    return summary


def report(results: Sequence[FoldResult], run_config: dict) -> dict:
    """backtest.json: ``{"config", "folds", "summary"}`` (contract section 4), plus the
    baselines' summaries beside the model's."""
    return {
        "config": run_config,
        "folds": [result.as_dict() for result in results],
        "summary": summarize([result.metrics for result in results]),
        "baseline_summary": {name: summarize([result.baseline[name] for result in results]) for name in results[0].baseline},
    }
