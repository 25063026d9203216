r"""Walk-forward backtest: a fresh forecaster per fold, trained on the past, judged on the window after it.

Example:
    python backtest.py --feature-store-path feature_store \
        --train-window-days 21 --val-window-days 7 --output artifacts/backtest.json
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from latency_forecast import alerting, artifacts, backtesting, config, cpus, data, fitting, flags, plots, ray_folds, store
from latency_forecast.config import AlertConfig, BaselineConfig, DataConfig, ModelConfig, ProgressConfig, StoreConfig, TimeRangeConfig, TrainingConfig
from latency_forecast.errors import UserError, cli_entrypoint
from latency_forecast.script_config import BacktestConfig


CONFIGS = (StoreConfig, TimeRangeConfig, DataConfig, ModelConfig, TrainingConfig, AlertConfig, BaselineConfig, BacktestConfig, ProgressConfig)


def build_parser() -> flags.ArgumentParser:
    return flags.build_parser(prog="backtest.py", description=__doc__, parents=[flags.parent_parser(*CONFIGS)])


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _progress_line(result: backtesting.FoldResult, n_folds: int) -> str:
    fold, model = result.fold, result.metrics
    baselines = ", ".join(f"{name} {block['mae']:.1f}" for name, block in result.baseline.items())
    return (
        f"fold {fold.number}/{n_folds}  train {data.format_minute(fold.train.start)} .. {data.format_minute(fold.train.end)}  "
        f"val {data.format_minute(fold.validation.start)} .. {data.format_minute(fold.validation.end)}  "
        f"MAE {model['mae']:.1f} ms ({baselines})  "
        f"FPR {_percent(model['false_positive_rate'])}  TPR {_percent(model['true_positive_rate'])}  {result.seconds:.0f}s"
    )


def _output_paths(output: str) -> tuple[str, str, str]:
    """(directory, JSON name, PNG name) of ``--output``; the figure sits beside the JSON."""
    if os.path.isdir(output) or output.endswith(os.sep):
        raise UserError(f"--output {output} is a directory; name the file, e.g. {os.path.join(output, 'backtest.json')}")
    directory, name = os.path.split(os.path.abspath(output))
    return directory, name, os.path.splitext(name)[0] + ".png"


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    store_config, time_range, data_config, model_config, training_config, alert_config, baseline_config, backtest_config, progress = flags.from_args(
        build_parser().parse_args(argv), *CONFIGS
    )
    thresholds = alerting.read_latency_thresholds(data_config)
    alerting.AlertRule.uncalibrated(model_config, alert_config)  # a bad --alert-on fails before training
    if backtest_config.executor == "ray":
        ray_folds.import_ray(local=backtest_config.ray_address is None)  # a missing Ray fails before the store is read
    directory, json_name, figure_name = _output_paths(backtest_config.output)
    with artifacts.output_lock(directory, "--output directory"):  # one backtest or train.py run at a time
        settings = fitting.Settings(
            data_config, model_config, training_config, alert_config, baseline_config, store=store_config, time_range=time_range,
            latency_thresholds=thresholds,
        )
        _backtest(settings, backtest_config, progress, directory, json_name, figure_name)
    return 0


def _backtest(
    settings: fitting.Settings, backtest_config: BacktestConfig, progress: ProgressConfig, directory: str, json_name: str, figure_name: str
) -> None:
    store_config, time_range, data_config = settings.store, settings.time_range, settings.data
    log = (lambda message: None) if progress.quiet else print
    started = time.perf_counter()

    table = store.load_feature_store(store_config.feature_store_path, data_config.feature_columns, *store.time_bounds(time_range), warn_invalid=True)
    span = data.span(table)
    folds = backtesting.plan_folds(span, backtest_config, data_config)
    backtesting.check_folds(table, folds, data_config)
    jobs = min(backtest_config.jobs, len(folds))
    threads = backtesting.threads_per_fold(jobs, settings.training.num_threads)
    log(
        f"loaded {len(table):,} rows: {len(table.services)} services, {len(table.feature_columns)} features, "
        f"{data.format_minute(span.start)} to {data.format_minute(span.end)}"
    )
    where = f" as Ray tasks on {backtest_config.ray_address or 'a local Ray instance'}" if backtest_config.executor == "ray" else ""
    log(
        f"{len(folds)} {backtest_config.window_mode} folds, {jobs} at a time{where} with {cpus.torch_threads(threads)} torch thread(s) each; "
        f"embargo {data_config.embargo} minutes"
    )
    results = backtesting.run_backtest(
        table, folds, settings, jobs, threads, on_result=lambda result: log(_progress_line(result, len(folds))),
        executor=backtest_config.executor, ray_address=backtest_config.ray_address,
    )
    run_config = {
        "store": {**config.to_dict(store_config), **config.to_dict(time_range)},
        "data": config.to_dict(data_config),
        "model": config.to_dict(settings.model),
        "training": config.to_dict(settings.training),
        "alert": config.to_dict(settings.alert),
        "baselines": config.to_dict(settings.baseline),
        "latency_thresholds": settings.thresholds.as_dict(),
        "backtest": {**config.to_dict(backtest_config), **config.to_dict(progress)},
        "resolved": {
            "data_start": data.format_minute(span.start),
            "data_end": data.format_minute(span.end),
            "embargo_minutes": data_config.embargo,
            "step_days": backtest_config.step_minutes / config.MINUTES_PER_DAY,
            "jobs": jobs,
            "threads_per_fold": cpus.torch_threads(threads),
        },
    }
    report = backtesting.report(results, run_config)
    with artifacts.staged(directory) as stage:
        stage.write_json(json_name, report)
        stage.save_figure(figure_name, plots.backtest_folds(report["folds"]))
    _print_summary(report, os.path.join(directory, json_name), time.perf_counter() - started)


def _print_summary(report: dict, path: str, seconds: float) -> None:
    names = list(report["baseline_summary"])
    print(f"\n{len(report['folds'])} folds written to {path} in {seconds:.0f}s")
    print(f"{'fold':<6}{'validation window':<44}{'MAE model':>10}" + "".join(f"{name[:18]:>20}" for name in names) + f"{'FPR':>8}{'TPR':>8}")
    for fold in report["folds"]:
        model = fold["metrics"]
        print(
            f"{fold['fold']:<6}{fold['val_start'] + ' .. ' + fold['val_end']:<44}{model['mae']:>10.1f}"
            + "".join(f"{fold['baseline'][name]['mae']:>20.1f}" for name in names)
            + f"{_percent(model['false_positive_rate']):>8}{_percent(model['true_positive_rate']):>8}"
        )
    summary = report["summary"]

    def spread(block: dict, percent: bool = False) -> str:
        if block["mean"] is None:
            return "n/a"
        scale, unit = (100, "%") if percent else (1, "")
        std = "" if block["std"] is None else f" ± {block['std'] * scale:.1f}{unit}"
        return f"{block['mean'] * scale:.1f}{unit}{std}"

    baselines = ", ".join(f"{name} {spread(report['baseline_summary'][name]['mae'])}" for name in names)
    print(f"mean ± std over folds: MAE {spread(summary['mae'])} ms ({baselines}), "
          f"FPR {spread(summary['false_positive_rate'], True)}, TPR {spread(summary['true_positive_rate'], True)}")
    for name in names:
        beaten = sum(1 for fold in report["folds"] if fold["metrics"]["mae"] < fold["baseline"][name]["mae"])
        print(f"the model beat {name} on MAE in {beaten} of {len(report['folds'])} folds")


if __name__ == "__main__":
    sys.exit(main())
