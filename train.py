r"""Train the latency forecaster on a feature store and write artifacts/.

Example:
    python train.py --feature-store-path feature_store --feature-columns cpu_rolling_avg,path_depth,fan_out \
        --sequence-length 8 --latency-threshold 500 --epochs 30 --output-dir artifacts
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from latency_forecast import alerting, artifacts, config, data, evaluation, explain, forecaster, plots, store
from latency_forecast.config import (
    AlertConfig,
    DataConfig,
    ExplainConfig,
    ImportanceConfig,
    ModelConfig,
    OutputConfig,
    ProgressConfig,
    StoreConfig,
    TimeRangeConfig,
    TrainingConfig,
)
from latency_forecast.errors import cli_entrypoint, warn

CONFIGS = (StoreConfig, TimeRangeConfig, DataConfig, ModelConfig, TrainingConfig, AlertConfig, ImportanceConfig, ExplainConfig, OutputConfig, ProgressConfig)


def build_parser() -> config.ArgumentParser:
    return config.build_parser(prog="train.py", description=__doc__, parents=[config.parent_parser(*CONFIGS)])


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store_config, time_range, data_config, model_config, training_config, alert_config, importance_config, explain_config, output, progress = (
        config.from_args(args, *CONFIGS)
    )
    thresholds = alerting.read_latency_thresholds(data_config)
    log = (lambda message: None) if progress.quiet else print
    started = time.perf_counter()

    table = store.load_store(store_config, time_range, data_config.feature_columns)
    unknown = sorted(set(thresholds.per_service) - set(table.services))
    if unknown:
        warn(f"--latency-thresholds names services not in the store: {', '.join(unknown)}")
    splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo)
    log(
        f"loaded {len(table):,} rows: {len(table.services)} services, {len(table.feature_columns)} features "
        f"({', '.join(table.feature_columns)})"
    )
    trained, prepared, history = forecaster.fit_forecaster(
        table, splits.train, splits.validation, data_config, model_config, training_config, not progress.quiet, log, thresholds,
        inplace=True,  # the raw features are not needed again
    )
    trained.store_config, trained.time_range_config, trained.alert_config = store_config, time_range, alert_config
    split_ends = {name: prepared.samples(getattr(splits, name), name) for name in ("train", "validation", "test")}

    # The operating point is chosen on validation; the test split only measures it.
    validation, trained.alert = evaluation.calibrated_evaluation(trained, prepared, split_ends["validation"], alert_config)
    evaluations = {"validation": validation, "test": evaluation.evaluate(trained, prepared, split_ends["test"])}
    report = {
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
    explainable = True
    if forecaster.reads_latency_history(trained.feature_columns):
        if forecaster.cause_columns(trained.feature_columns):
            log("training the cause model that explains the forecasts (level forecast from the telemetry features alone)")
            cause_history = forecaster.fit_cause_model(trained, prepared, split_ends["train"], split_ends["validation"], not progress.quiet, log)
            report["cause_model"] = {"purpose": forecaster.CAUSE_MODEL_PURPOSE, "history": cause_history}
        else:
            explainable = False
            warn(f"no telemetry features besides {config.TARGET_COLUMN}: nothing to explain the forecasts with")
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
    _print_summary(report, output.output_dir, time.perf_counter() - started)
    if importance is not None:
        shares = sorted(importance["normalized"].items(), key=lambda item: -item[1])[:3]
        print("top features (share of mean |SHAP|): " + ", ".join(f"{name} {share:.0%}" for name, share in shares))
    return 0


def _print_summary(report: dict, output_dir: str, seconds: float) -> None:
    test, baseline = report["test"], report["baseline"]["persistence"]["test"]
    alerting, point = report["alerting"]["test"], report["alerting"]["operating_point"]

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    def number(value: float | None, fmt: str = "{:.1f}") -> str:
        return "n/a" if value is None else fmt.format(value)

    print(f"\nartifacts written to {os.path.abspath(output_dir)}/ in {seconds:.0f}s")
    print(f"test period: {report['data']['splits']['test']['start']} to {report['data']['splits']['test']['end']}, {test['n_samples']:,} samples")
    if point["target_fpr"]:
        print(
            f"alert threshold calibrated on validation for FPR <= {point['target_fpr']:.1%}: score >= {point['threshold']:.3g} "
            f"({point['score']}); validation FPR {rate(point['validation_false_positive_rate'])}, test FPR {rate(point['test_false_positive_rate'])}"
        )
    print(f"{'':26}{'model':>12}{'persistence':>14}")
    for label, key in (("MAE (ms)", "mae"), ("RMSE (ms)", "rmse")):
        print(f"{label:26}{number(test[key]):>12}{number(baseline[key]):>14}")
    for label, key in (("breach TPR", "true_positive_rate"), ("false positive rate", "false_positive_rate"), ("precision", "precision")):
        print(f"{label:26}{rate(test[key]):>12}{rate(baseline[key]):>14}")
    model, persistence = alerting["model"], alerting["persistence"]
    print(f"{'ROC-AUC':26}{number(model['roc_auc'], '{:.3f}'):>12}{number(persistence['roc_auc'], '{:.3f}'):>14}")
    print(f"{'episodes anticipated':26}{model['anticipated_episodes']:>8}/{model['episodes']:<3}{persistence['anticipated_episodes']:>10}/{persistence['episodes']:<3}")
    matched = alerting.get("persistence_at_target_fpr")
    if matched:
        print(f"{'  persistence at same FPR':26}{'':12}{matched['anticipated_episodes']:>10}/{matched['episodes']:<3}")
    paged = alerting["persistence_at_model_false_alarms"]
    print(f"{'  at same false alarms':26}{'':12}{paged['anticipated_episodes']:>10}/{paged['episodes']:<3}")
    per_day = "false_alarm_episodes_per_service_day"
    print(f"{'false alarms /service-day':26}{number(model[per_day], '{:.2f}'):>12}{number(persistence[per_day], '{:.2f}'):>14}")
    if matched:
        print(f"{'  persistence at same FPR':26}{'':12}{number(matched[per_day], '{:.2f}'):>14}")
    print(f"{'  at same false alarms':26}{'':12}{number(paged[per_day], '{:.2f}'):>14}")
    print(
        f"{'confusion (TP/FP/TN/FN)':26}"
        f"{test['true_positives']}/{test['false_positives']}/{test['true_negatives']}/{test['false_negatives']}"
    )
    if test["mae"] is not None and baseline["mae"]:
        print(f"model MAE is {test['mae'] / baseline['mae']:.2f}x persistence's on the same samples")


if __name__ == "__main__":
    sys.exit(main())
