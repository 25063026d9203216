r"""Train the latency forecaster on a feature store and write artifacts/.

Example:
    python train.py --feature-store-path feature_store --feature-columns cpu_rolling_avg,path_depth,fan_out \
        --sequence-length 8 --latency-threshold 500 --epochs 30 --output-dir artifacts
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from typing import Sequence

import numpy as np

from latency_forecast import alerting, artifacts, config, data, distributed, errors, evaluation, explain, fitting, flags, plots, store, summaries
from latency_forecast.config import (
    AlertConfig,
    BaselineConfig,
    DataConfig,
    ExplainConfig,
    ImportanceConfig,
    ModelConfig,
    OutputConfig,
    ProgressConfig,
    ResumeConfig,
    StoreConfig,
    TimeRangeConfig,
    TrainingConfig,
)
from latency_forecast.errors import cli_entrypoint, warn

CONFIGS = (
    StoreConfig, TimeRangeConfig, DataConfig, ModelConfig, TrainingConfig, AlertConfig, BaselineConfig,
    ImportanceConfig, ExplainConfig, OutputConfig, ResumeConfig, ProgressConfig,
)
RESUME_DIR = ".resume"  # inside --output-dir: the state of each fit, saved after every epoch and on SIGTERM or SIGINT


def build_parser() -> flags.ArgumentParser:
    return flags.build_parser(prog="train.py", description=__doc__, parents=[flags.parent_parser(*CONFIGS)])


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store_config, time_range, data_config, model_config, training_config, alert_config, baseline_config, importance_config, explain_config, output, resume, progress = (
        flags.from_args(args, *CONFIGS)
    )
    settings = fitting.Settings(
        data_config, model_config, training_config, alert_config, baseline_config, importance_config, explain_config, store_config, time_range,
        alerting.read_latency_thresholds(data_config),
    )
    alerting.AlertRule.uncalibrated(model_config, alert_config)  # a bad --alert-on fails before training
    # a signal during training waits for the next batch, where the training state is saved
    errors.stop_on_signals("rerun the same command with --resume to continue from the saved training state")
    # Under torchrun every rank trains on its own services; rank 0 then evaluates and writes the
    # artifacts on the whole store, the others exit quietly. Without torchrun: one rank.
    ranks = distributed.init_from_env(training_config.device)
    log = print if ranks.is_main and not progress.quiet else (lambda message: None)
    with artifacts.output_lock(output.output_dir) if ranks.is_main else contextlib.nullcontext():
        started = time.perf_counter()

        def read_store() -> data.SeriesTable:
            return store.load_feature_store(store_config.feature_store_path, data_config.feature_columns, *store.time_bounds(time_range), warn_invalid=True)

        table, present = distributed.load_shard(store_config, time_range, data_config.feature_columns, ranks) if ranks.world_size > 1 else (read_store(), None)
        unknown = sorted(set(settings.thresholds.per_service) - set(table.services))
        if unknown and ranks.is_main:
            warn(f"--latency-thresholds names services not in the store: {', '.join(unknown)}")
        splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo, present)
        resume_dir, saved = artifacts.resume_directory(output.output_dir, RESUME_DIR, resume.resume)
        log(f"loaded {len(table):,} rows: {len(table.services)} services, {len(table.feature_columns)} features ({', '.join(table.feature_columns)})")
        if resume.resume and not saved:
            log(f"--resume: no saved training state in {output.output_dir}; starting from the beginning")
        if ranks.world_size > 1:
            held = int(np.count_nonzero(np.diff(table.service_bounds)))
            log(f"torchrun: {ranks.world_size} ranks, each training on its own services (rank 0: {held}, the rows above); rank 0 evaluates all")
        run = fitting.train(
            table, splits.train, splits.validation, settings, resume_dir=resume_dir, full_table=read_store,
            inplace=True, progress=not progress.quiet, log=log,  # inplace: the raw features are not needed again
        )
        if run is None:  # a torchrun rank other than 0
            return 0
        trained = run.forecaster
        if not trained.explainable:
            warn(f"no telemetry features besides {config.TARGET_COLUMN}: nothing to explain the forecasts with")
        if trained.alert.negatives_needed and trained.alert.validation_negatives < trained.alert.negatives_needed:
            warn(
                f"validation holds {trained.alert.validation_negatives:,} non-breach samples; a --target-fpr of "
                f"{alert_config.target_fpr:g} needs {trained.alert.negatives_needed:,} to mean something "
                "(the calibrated threshold is conservative); use a longer store or a larger --validation-fraction"
            )
        test = evaluation.evaluate(trained, run.prepared, run.prepared.samples(splits.test, "test"))
        report = run.metrics_report(splits, test)
        importance = None
        if importance_config.shap_samples and trained.explainable:
            explain_started = time.perf_counter()
            importance = explain.feature_importance(
                trained, run.prepared, run.validation.ends, run.validation.alert, trained.background,
                importance_config.shap_samples, explain_config, training_config.seed,
            )
            log(f"explained {importance['n_windows']} validation windows in {time.perf_counter() - explain_started:.1f}s")
        with artifacts.staged(output.output_dir) as stage:
            _write_artifacts(stage, run, report, test, importance, settings)
        shutil.rmtree(resume_dir, ignore_errors=True)  # the run is complete: nothing left to resume
    print(summaries.training_summary(report, output.output_dir, time.perf_counter() - started))
    if importance is not None:
        shares = sorted(importance["normalized"].items(), key=lambda item: -item[1])[:3]
        print("top features (share of mean |SHAP|): " + ", ".join(f"{name} {share:.0%}" for name, share in shares))
    return 0


def _write_artifacts(stage: artifacts.Stage, run: fitting.Trained, report: dict, test: evaluation.Evaluation, importance: dict | None, settings: fitting.Settings) -> None:
    trained, table = run.forecaster, run.prepared.table
    stage.save_torch("latency_forecaster.pt", trained.checkpoint())
    for name, saved in trained.saved_members().items():
        stage.write_bytes(name, saved)
    stage.save_torch("scaler.pt", trained.scaler.state(table.feature_columns))
    stage.write_json("metrics.json", report)
    stage.write_json("training_history.json", run.history)
    stage.write_json("config.json", {**trained.settings, "importance": config.to_dict(settings.importance), "explain": config.to_dict(settings.explain)})
    if importance is not None:
        stage.write_json("feature_importance.json", importance)
        stage.save_figure("feature_importance.png", plots.feature_importance(importance))
    stage.save_figure("loss_curve.png", plots.loss_curve(run.history))
    stage.save_figure("forecast_vs_actual.png", plots.forecast_vs_actual(evaluation.forecast_panels(test, table.services), settings.data.horizon))
    curves, points = evaluation.tradeoff_curves(test, report["alerting"]["test"])
    stage.save_figure("alert_tradeoff.png", plots.alert_tradeoff(curves, points, settings.alert.target_fpr or None))


if __name__ == "__main__":
    sys.exit(main())
