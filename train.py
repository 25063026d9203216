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

import numpy as np

from latency_forecast import artifacts, config, data, explain, metrics, pipeline, plots
from latency_forecast.config import (
    AlertConfig,
    DataConfig,
    ExplainConfig,
    ImportanceConfig,
    ModelConfig,
    OutputConfig,
    StoreConfig,
    TrainingConfig,
)
from latency_forecast.errors import cli_entrypoint


def build_parser() -> config.ArgumentParser:
    return config.build_parser(
        prog="train.py",
        description=__doc__,
        parents=[
            config.parent_parser(
                StoreConfig, DataConfig, ModelConfig, TrainingConfig, AlertConfig, ImportanceConfig, ExplainConfig, OutputConfig
            )
        ],
    )


def _forecast_panels(evaluation: pipeline.Evaluation, table: data.SeriesTable, horizon: int, n_services: int = 4) -> list[dict]:
    """A six-hour test stretch per service around its worst minute, for the services that breach most."""
    codes = evaluation.service_codes
    breaches = np.bincount(codes, weights=evaluation.breach, minlength=len(table.services))
    peaks = np.array([evaluation.actual[codes == c].max() if (codes == c).any() else -1 for c in range(len(table.services))])
    chosen = sorted(range(len(table.services)), key=lambda c: (-breaches[c], -peaks[c]))[:n_services]
    panels = []
    for code in chosen:
        mine = np.flatnonzero(codes == code)
        if not len(mine):
            continue
        target_minutes = table.minutes[evaluation.ends[mine]] + horizon
        centre = target_minutes[np.argmax(evaluation.actual[mine])]
        near = mine[np.abs(target_minutes - centre) <= 180]
        panels.append(
            {
                "service": table.services[code],
                "minutes": (table.minutes[evaluation.ends[near]] + horizon).astype("datetime64[m]"),
                "actual": evaluation.actual[near],
                "forecast": evaluation.forecast[near],
                "persistence": evaluation.persistence[near],
                "latency_threshold": float(evaluation.latency_threshold[near][0]),
                "alert": evaluation.alert[near],
            }
        )
    return panels


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = config.from_args(StoreConfig, args)
    data_config = config.from_args(DataConfig, args)
    model_config = config.from_args(ModelConfig, args)
    training_config = config.from_args(TrainingConfig, args)
    alert_config = config.from_args(AlertConfig, args)
    importance_config = config.from_args(ImportanceConfig, args)
    explain_config = config.from_args(ExplainConfig, args)
    output = config.from_args(OutputConfig, args)
    thresholds = config.latency_thresholds(data_config)
    log = (lambda message: None) if output.quiet else print
    started = time.perf_counter()

    table = pipeline.load_store(store, data_config.feature_columns)
    unknown = sorted(set(thresholds.per_service) - set(table.services))
    if unknown:
        pipeline.warn(f"--latency-thresholds names services not in the store: {', '.join(unknown)}")
    splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo)
    log(
        f"loaded {len(table):,} rows: {len(table.services)} services, {len(table.feature_columns)} features "
        f"({', '.join(table.feature_columns)})"
    )
    forecaster, prepared, history = pipeline.fit_forecaster(
        table, splits.train, splits.validation, data_config, model_config, training_config, not output.quiet, log, thresholds,
        inplace=True,  # the raw features are not needed again
    )
    L, H = data_config.sequence_length, data_config.horizon
    split_ends = {name: data.samples_in(prepared.ends, table, getattr(splits, name), L, H) for name in ("train", "validation", "test")}
    pipeline.require_samples(split_ends["test"], "test", splits.test, data_config)

    # The operating point is chosen on validation; the test split only measures it.
    validation, calibration = pipeline.calibrated_evaluation(forecaster, prepared, split_ends["validation"], alert_config)
    test = pipeline.evaluate(forecaster, prepared, split_ends["test"])
    evaluations = {"validation": validation, "test": test}
    persistence_thresholds = {"persistence": 1.0}
    if alert_config.target_fpr > 0:
        matched = metrics.calibrate_threshold(validation.persistence_score, validation.breach, alert_config.target_fpr)
        if matched is not None:
            persistence_thresholds["persistence_at_target_fpr"] = matched
    persistence_thresholds["persistence_at_model_false_alarms"] = _match_model_false_alarms(validation, H)
    report = {
        "validation": validation.model_metrics,
        "test": test.model_metrics,
        "baseline": {"persistence": {name: evaluations[name].persistence_metrics for name in ("validation", "test")}},
        "alerting": {
            "operating_point": {
                **calibration,
                "validation_false_positive_rate": validation.model_metrics["false_positive_rate"],
                "test_false_positive_rate": test.model_metrics["false_positive_rate"],
                "alert_threshold_ms": _alert_thresholds_ms(forecaster, table),
            },
            **{name: pipeline.alerting_report(evaluations[name], H, persistence_thresholds) for name in ("validation", "test")},
        },
        "per_service": {name: pipeline.per_service(evaluations[name], table) for name in ("validation", "test")},
        "data": {
            "splits": splits.as_dict(),
            "windows": prepared.counts.as_dict(),
            "samples": {name: int(len(ends)) for name, ends in split_ends.items()},
            "services": table.services,
            "feature_columns": table.feature_columns,
            "latency_thresholds": thresholds.as_dict(),
        },
    }
    settings = {"store": config.to_dict(store), **forecaster.settings, "alert": config.to_dict(alert_config)}
    forecaster.settings = settings
    explainable = True
    if pipeline.reads_latency_history(forecaster.feature_columns):
        if pipeline.cause_columns(forecaster.feature_columns):
            log("training the cause model that explains the forecasts (level forecast from the telemetry features alone)")
            cause_history = pipeline.fit_cause_model(
                forecaster, prepared, split_ends["train"], split_ends["validation"], training_config, not output.quiet, log
            )
            report["cause_model"] = {"purpose": pipeline.CAUSE_MODEL_PURPOSE, "history": cause_history}
        else:
            explainable = False
            pipeline.warn(f"no telemetry features besides {config.TARGET_COLUMN}: nothing to explain the forecasts with")
    background = explain.build_background(
        prepared.tensors, split_ends["train"], len(forecaster.services), importance_config.background_size, training_config.seed
    )
    importance = None
    if importance_config.shap_samples and explainable:
        explain_started = time.perf_counter()
        importance = explain.feature_importance(
            forecaster, prepared, validation.ends, validation.alert, background,
            importance_config.shap_samples, explain_config, training_config.seed,
        )
        log(f"explained {importance['n_windows']} validation windows in {time.perf_counter() - explain_started:.1f}s")
    checkpoint = forecaster.checkpoint()
    checkpoint["explain_background"] = background.state()  # analyze_causality.py explains against it
    with artifacts.staged(output.output_dir) as stage:
        stage.save_torch("latency_forecaster.pt", checkpoint)
        stage.save_torch("scaler.pt", forecaster.scaler.state(table.feature_columns))
        stage.write_json("metrics.json", report)
        stage.write_json("training_history.json", history)
        stage.write_json("config.json", {**settings, "importance": config.to_dict(importance_config), "explain": config.to_dict(explain_config)})
        if importance is not None:
            stage.write_json("feature_importance.json", importance)
            stage.save_figure("feature_importance.png", plots.feature_importance(importance))
        stage.save_figure("loss_curve.png", plots.loss_curve(history))
        stage.save_figure("forecast_vs_actual.png", plots.forecast_vs_actual(_forecast_panels(test, table, H), H))
        stage.save_figure("alert_tradeoff.png", _tradeoff_figure(test, report["alerting"]["test"], alert_config.target_fpr))
    _print_summary(report, output.output_dir, time.perf_counter() - started)
    if importance is not None:
        shares = sorted(importance["normalized"].items(), key=lambda item: -item[1])[:3]
        print("top features (share of mean |SHAP|): " + ", ".join(f"{name} {share:.0%}" for name, share in shares))
    return 0


def _alert_thresholds_ms(forecaster: pipeline.Forecaster, table: data.SeriesTable) -> dict[str, float] | None:
    """Per service, the forecast (ms) at which an alert fires; None when alerts fire on a probability."""
    if forecaster.alert.score != "forecast_ratio":
        return None
    ratios = forecaster.alert.thresholds_for(table.services)
    latency = forecaster.latency_thresholds.for_services(table.services)
    return {name: float(r * ms) for name, r, ms in zip(table.services, ratios, latency)}


def _match_model_false_alarms(validation: pipeline.Evaluation, horizon: int) -> float:
    """Persistence's threshold that pages as often as the model did on validation."""
    model = metrics.episode_metrics(validation.service_codes, validation.target_minutes, validation.breach, validation.alert, horizon)
    return metrics.match_false_alarm_rate(
        validation.service_codes, validation.target_minutes, validation.breach, validation.persistence_score,
        model["false_alarm_episodes_per_service_day"] or 0.0,
    )


def _tradeoff_figure(test: pipeline.Evaluation, alerting: dict, target_fpr: float):
    curves = {
        "model": metrics.roc_points(test.score, test.breach),
        "persistence": metrics.roc_points(test.persistence_score, test.breach),
    }
    points = {"model (chosen)": (test.model_metrics["false_positive_rate"], test.model_metrics["true_positive_rate"])}
    for name in ("persistence", "persistence_at_target_fpr", "persistence_at_model_false_alarms"):
        if name in alerting:
            points[name.replace("_", " ")] = (alerting[name]["false_positive_rate"], alerting[name]["true_positive_rate"])
    return plots.alert_tradeoff(curves, points, target_fpr or None)


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
