r"""Train the latency forecaster on a feature store and write artifacts/.

Example:
    python train.py --feature-store-path feature_store --feature-columns cpu_rolling_avg,path_depth,fan_out \
        --sequence-length 8 --latency-threshold 500 --epochs 30 --output-dir artifacts
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from typing import Sequence

import numpy as np

from latency_forecast import alerting, artifacts, config, data, distributed, errors, evaluation, explain, forecaster, plots, store, training
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
from latency_forecast.errors import UserError, cli_entrypoint, warn

CONFIGS = (
    StoreConfig, TimeRangeConfig, DataConfig, ModelConfig, TrainingConfig, AlertConfig, BaselineConfig,
    ImportanceConfig, ExplainConfig, OutputConfig, ResumeConfig, ProgressConfig,
)
RESUME_DIR = ".resume"  # inside --output-dir: the state of each fit after its last finished epoch


def build_parser() -> config.ArgumentParser:
    return config.build_parser(prog="train.py", description=__doc__, parents=[config.parent_parser(*CONFIGS)])


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    (store_config, time_range, data_config, model_config, training_config, alert_config, baseline_config,
     importance_config, explain_config, output, resume, progress) = config.from_args(args, *CONFIGS)
    thresholds = alerting.read_latency_thresholds(data_config)
    alerting.AlertRule.uncalibrated(model_config, alert_config)  # a bad --alert-on fails before training
    log = (lambda message: None) if progress.quiet else print
    errors.stop_on_sigterm("the state after the last finished epoch is saved: rerun the same command with --resume")
    # Under torchrun every rank trains on its own services; rank 0 then evaluates and writes the
    # artifacts on the whole store, the others exit quietly. Without torchrun: one rank.
    ranks = distributed.init_from_env(training_config.device)
    if not ranks.is_main:
        log = lambda message: None  # noqa: E731
    with artifacts.output_lock(output.output_dir) if ranks.is_main else contextlib.nullcontext():
        started = time.perf_counter()

        if ranks.world_size > 1:
            table, present = distributed.load_shard(store_config, time_range, data_config.feature_columns, ranks)
        else:
            table, present = store.load_store(store_config, time_range, data_config.feature_columns), None
        unknown = sorted(set(thresholds.per_service) - set(table.services))
        if unknown and ranks.is_main:
            warn(f"--latency-thresholds names services not in the store: {', '.join(unknown)}")
        splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo, present)
        # what a resumed run must share with the interrupted one (before the features are scaled in place)
        run_id = distributed.joint_digest(data.fingerprint(table, [
            store_config, time_range, data_config, model_config, training_config, alert_config, baseline_config, importance_config, explain_config,
        ]))
        resume_dir = os.path.join(output.output_dir, RESUME_DIR)
        if not resume.resume:
            shutil.rmtree(resume_dir, ignore_errors=True)
        elif not os.path.isdir(resume_dir):
            raise UserError(f"--resume: {output.output_dir} holds no interrupted run to continue; run without --resume")
        log(
            f"loaded {len(table):,} rows: {len(table.services)} services, {len(table.feature_columns)} features "
            f"({', '.join(table.feature_columns)})"
        )
        if ranks.world_size > 1:
            held = int(np.count_nonzero(np.diff(table.service_bounds)))
            log(f"torchrun: {ranks.world_size} ranks, each training on its own services (rank 0: {held}, the rows above); rank 0 evaluates all")
        trained, prepared, history = forecaster.fit_forecaster(
            table, splits.train, splits.validation, data_config, model_config, training_config, not progress.quiet, log, thresholds,
            inplace=True,  # the raw features are not needed again
            resume=training.ResumeFile(os.path.join(resume_dir, "forecaster.pt"), run_id),
        )
        trained.run_id = run_id
        trained.store_config, trained.time_range_config, trained.alert_config = store_config, time_range, alert_config
        # the cause model trains before the evaluation: under torchrun every rank takes part in it
        cause_history, explainable = None, True
        if forecaster.reads_latency_history(trained.feature_columns):
            if forecaster.cause_columns(trained.feature_columns):
                log("training the cause model that explains the forecasts (level forecast from the telemetry features alone)")
                cause_history = forecaster.fit_cause_model(
                    trained, prepared, prepared.samples(splits.train, "train"), prepared.samples(splits.validation, "validation"),
                    not progress.quiet, log, resume=training.ResumeFile(os.path.join(resume_dir, "cause_model.pt"), run_id),
                )
            else:
                explainable = False
                if ranks.is_main:
                    warn(f"no telemetry features besides {config.TARGET_COLUMN}: nothing to explain the forecasts with")
        distributed.barrier()  # under torchrun: every rank has finished training, the process group is done
        distributed.close()
        if ranks.world_size > 1:
            if not ranks.is_main:
                return 0
            del table, prepared  # rank 0's services only: evaluate on every service
            table = store.load_store(store_config, time_range, data_config.feature_columns)
            prepared = trained.prepare(table, inplace=True)
        split_ends = {name: prepared.samples(getattr(splits, name), name) for name in ("train", "validation", "test")}

        baselines = evaluation.fit_baselines(trained, prepared, split_ends["train"], baseline_config)
        # The operating point is chosen on validation; the test split only measures it.
        validation, trained.alert = evaluation.calibrated_evaluation(trained, prepared, split_ends["validation"], alert_config, baselines)
        if trained.alert.negatives_needed and trained.alert.validation_negatives < trained.alert.negatives_needed:
            warn(
                f"validation holds {trained.alert.validation_negatives:,} non-breach samples; a --target-fpr of "
                f"{alert_config.target_fpr:g} needs {trained.alert.negatives_needed:,} to mean something "
                "(the calibrated threshold is conservative); use a longer store or a larger --validation-fraction"
            )
        evaluations = {"validation": validation, "test": evaluation.evaluate(trained, prepared, split_ends["test"], baselines)}
        report = {
            "run_id": run_id,
            **evaluation.metrics_report(trained, evaluations, table.services, alert_config),
            "data": {
                "splits": splits.as_dict(),
                "windows": prepared.counts.as_dict(),
                "invalid_values": table.invalid_values,
                "samples": {name: int(len(ends)) for name, ends in split_ends.items()},
                "services": table.services,
                "feature_columns": table.feature_columns,
                "latency_thresholds": thresholds.as_dict(),
            },
        }
        if cause_history is not None:
            # without the epochs' wall times (training_history.json has those): metrics.json is reproducible
            report["cause_model"] = {
                "purpose": forecaster.CAUSE_MODEL_PURPOSE,
                "history": [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in cause_history],
            }
        trained.background = explain.build_background(
            prepared.tensors, split_ends["train"], len(trained.services), importance_config.background_size, training_config.seed
        )
        importance = None
        if importance_config.shap_samples and explainable:
            explain_started = time.perf_counter()
            importance = explain.feature_importance(
                trained, prepared, validation.ends, validation.alert, trained.background,
                importance_config.shap_samples, explain_config, training_config.seed,
            )
            log(f"explained {importance['n_windows']} validation windows in {time.perf_counter() - explain_started:.1f}s")
        test = evaluations["test"]
        with artifacts.staged(output.output_dir) as stage:
            stage.save_torch("latency_forecaster.pt", trained.checkpoint())
            stage.save_torch("scaler.pt", trained.scaler.state(table.feature_columns))
            stage.write_json("metrics.json", report)
            stage.write_json("training_history.json", history)
            stage.write_json(
                "config.json", {**trained.settings, "importance": config.to_dict(importance_config), "explain": config.to_dict(explain_config)}
            )
            if importance is not None:
                stage.write_json("feature_importance.json", importance)
                stage.save_figure("feature_importance.png", plots.feature_importance(importance))
            stage.save_figure("loss_curve.png", plots.loss_curve(history))
            stage.save_figure("forecast_vs_actual.png", plots.forecast_vs_actual(evaluation.forecast_panels(test, table.services), data_config.horizon))
            curves, points = evaluation.tradeoff_curves(test, report["alerting"]["test"])
            stage.save_figure("alert_tradeoff.png", plots.alert_tradeoff(curves, points, alert_config.target_fpr or None))
        shutil.rmtree(resume_dir, ignore_errors=True)  # the run is complete: nothing left to resume
    _print_summary(report, output.output_dir, time.perf_counter() - started)
    if importance is not None:
        shares = sorted(importance["normalized"].items(), key=lambda item: -item[1])[:3]
        print("top features (share of mean |SHAP|): " + ", ".join(f"{name} {share:.0%}" for name, share in shares))
    return 0


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _number(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _print_summary(report: dict, output_dir: str, seconds: float) -> None:
    test, baselines = report["test"], {name: blocks["test"] for name, blocks in report["baseline"].items()}
    alerting, point = report["alerting"]["test"], report["alerting"]["operating_point"]
    names = list(baselines)
    print(f"\nartifacts written to {os.path.abspath(output_dir)}/ in {seconds:.0f}s")
    print(f"test period: {report['data']['splits']['test']['start']} to {report['data']['splits']['test']['end']}, {test['n_samples']:,} samples")
    if point["target_fpr"]:
        on = point["score"] + (f" {point['quantile']}" if point["quantile"] else "")
        print(
            f"alert threshold calibrated on validation for FPR <= {point['target_fpr']:.1%}: score >= {point['threshold']:.3g} "
            f"({on}); validation FPR {_rate(point['validation_false_positive_rate'])}, test FPR {_rate(point['test_false_positive_rate'])}"
        )

    def row(label: str, model: str, others: list[str]) -> None:
        print(f"{label:30}{model:>12}" + "".join(f"{other:>20}" for other in others))

    row("", "model", names)
    for label, key in (("MAE (ms)", "mae"), ("RMSE (ms)", "rmse")):
        row(label, _number(test[key]), [_number(baselines[name][key]) for name in names])
    row("breach TPR / FPR", f"{_rate(test['true_positive_rate'])} / {_rate(test['false_positive_rate'])}",
        [f"{_rate(baselines[name]['true_positive_rate'])} / {_rate(baselines[name]['false_positive_rate'])}" for name in names])
    row("ROC-AUC", _number(alerting["model"]["roc_auc"], "{:.3f}"), [_number(alerting[name]["roc_auc"], "{:.3f}") for name in names])
    model = alerting["model"]
    matched = [alerting.get(f"{name}_at_target_fpr") for name in names]
    if any(matched):
        print("at the target FPR, each threshold chosen on validation (test FPR, episodes anticipated, false alarms per service-day):")
        per_day = "false_alarm_episodes_per_service_day"

        def cell(view: dict | None) -> str:
            if view is None:
                return "n/a"
            return f"{_rate(view['false_positive_rate'])} {view['anticipated_episodes']}/{view['episodes']} {_number(view[per_day], '{:.2f}')}"

        row("  alerts", f"{_rate(test['false_positive_rate'])} {model['anticipated_episodes']}/{model['episodes']} {_number(model[per_day], '{:.2f}')}",
            [cell(view) for view in matched])
        for label, view in alerting.items():
            if label.startswith("model_") and label.endswith("_at_target_fpr"):
                print(f"  model alerting on its {view['source'].replace('_', ' ')} instead: {cell(view)}")
    matched = report["alerting"]["test_at_model_test_fpr"]
    if len(matched) > 1:
        print(
            f"at the model's test FPR ({_rate(test['false_positive_rate'])}; baselines' thresholds set on test itself, to compare): "
            + ", ".join(f"{label} {view['anticipated_episodes']}/{view['episodes']}" for label, view in matched.items())
        )
    paged = alerting["persistence_at_model_false_alarms"]
    print(f"persistence at the model's paging load: {paged['anticipated_episodes']}/{paged['episodes']} episodes anticipated")
    coverage = report["quantiles"]["test"]
    if coverage:
        print("quantile coverage on test: " + ", ".join(f"{name}: {_rate(block['coverage'])}" for name, block in coverage.items()))
    print(f"confusion (TP/FP/TN/FN): {test['true_positives']}/{test['false_positives']}/{test['true_negatives']}/{test['false_negatives']}")
    skills = [f"{1 - test['mae'] / baselines[name]['mae']:+.3f} over {name}" for name in names if test["mae"] is not None and baselines[name]["mae"]]
    if skills:
        print("model MAE skill (1 - MAE / baseline's, same samples): " + ", ".join(skills))


if __name__ == "__main__":
    sys.exit(main())
