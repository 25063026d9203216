"""Train the latency forecaster on a feature store and write artifacts/.

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

from latency_forecast import artifacts, config, data, explain, pipeline, plots
from latency_forecast.config import (
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
                StoreConfig, DataConfig, ModelConfig, TrainingConfig, ImportanceConfig, ExplainConfig, OutputConfig
            )
        ],
    )


def _forecast_panels(evaluation: pipeline.Evaluation, table: data.SeriesTable, horizon: int, threshold: float, n_services: int = 4) -> list[dict]:
    """A six-hour test stretch per service around its worst minute, for the services that breach most."""
    codes = table.service_codes[evaluation.ends]
    breaches = np.bincount(codes, weights=evaluation.actual >= threshold, minlength=len(table.services))
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
    importance_config = config.from_args(ImportanceConfig, args)
    explain_config = config.from_args(ExplainConfig, args)
    output = config.from_args(OutputConfig, args)
    log = (lambda message: None) if output.quiet else print
    started = time.perf_counter()

    table = data.load_feature_store(
        store.feature_store_path,
        data_config.feature_columns,
        data.parse_timestamp(store.start_ts, "--start-ts"),
        data.parse_timestamp(store.end_ts, "--end-ts"),
    )
    splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo)
    log(
        f"loaded {len(table):,} rows: {len(table.services)} services, {len(table.feature_columns)} features "
        f"({', '.join(table.feature_columns)})"
    )
    forecaster, prepared, history = pipeline.fit_forecaster(
        table, splits.train, splits.validation, data_config, model_config, training_config, not output.quiet, log
    )
    L, H = data_config.sequence_length, data_config.horizon
    split_ends = {name: data.samples_in(prepared.ends, table, getattr(splits, name), L, H) for name in ("train", "validation", "test")}
    pipeline.require_samples(split_ends["test"], "test", splits.test, data_config)
    evaluations = {name: pipeline.evaluate(forecaster, prepared, split_ends[name]) for name in ("validation", "test")}
    threshold = data_config.latency_threshold
    report = {
        "validation": evaluations["validation"].model_metrics,
        "test": evaluations["test"].model_metrics,
        "baseline": {"persistence": {name: evaluations[name].persistence_metrics for name in ("validation", "test")}},
        "per_service": {name: pipeline.per_service(evaluations[name], table, threshold) for name in ("validation", "test")},
        "data": {
            "splits": splits.as_dict(),
            "windows": prepared.counts.as_dict(),
            "samples": {name: int(len(ends)) for name, ends in split_ends.items()},
            "services": table.services,
            "feature_columns": table.feature_columns,
        },
    }
    settings = {"store": config.to_dict(store), **forecaster.settings}
    forecaster.settings = settings
    background = explain.build_background(
        prepared.tensors, split_ends["train"], len(forecaster.services), importance_config.background_size, training_config.seed
    )
    importance = None
    if importance_config.shap_samples:
        explain_started = time.perf_counter()
        validation = evaluations["validation"]
        importance = explain.feature_importance(
            forecaster, prepared, validation.ends, validation.forecast, background,
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
        stage.save_figure(
            "forecast_vs_actual.png",
            plots.forecast_vs_actual(_forecast_panels(evaluations["test"], table, H, threshold), threshold, H),
        )
    _print_summary(report, output.output_dir, time.perf_counter() - started)
    if importance is not None:
        shares = sorted(importance["normalized"].items(), key=lambda item: -item[1])[:3]
        print("top features (share of mean |SHAP|): " + ", ".join(f"{name} {share:.0%}" for name, share in shares))
    return 0


def _print_summary(report: dict, output_dir: str, seconds: float) -> None:
    test, baseline = report["test"], report["baseline"]["persistence"]["test"]

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    print(f"\nartifacts written to {os.path.abspath(output_dir)}/ in {seconds:.0f}s")
    print(f"test period: {report['data']['splits']['test']['start']} to {report['data']['splits']['test']['end']}, {test['n_samples']:,} samples")
    print(f"{'':24}{'model':>12}{'persistence':>14}")
    for label, key, fmt in (("MAE (ms)", "mae", "{:.1f}"), ("RMSE (ms)", "rmse", "{:.1f}")):
        print(f"{label:24}{fmt.format(test[key]):>12}{fmt.format(baseline[key]):>14}")
    for label, key in (("breach TPR", "true_positive_rate"), ("false positive rate", "false_positive_rate"), ("precision", "precision")):
        print(f"{label:24}{rate(test[key]):>12}{rate(baseline[key]):>14}")
    print(
        f"{'confusion (TP/FP/TN/FN)':24}"
        f"{test['true_positives']}/{test['false_positives']}/{test['true_negatives']}/{test['false_negatives']}"
    )
    if test["mae"] is not None and baseline["mae"]:
        print(f"model MAE is {test['mae'] / baseline['mae']:.2f}x persistence's on the same samples")


if __name__ == "__main__":
    sys.exit(main())
