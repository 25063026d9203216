r"""Forecast live: at the newest minute of a store, which services will breach in H minutes, and why.

Writes forecasts.json, optionally a Prometheus textfile for node_exporter and the firing alerts
to Alertmanager. Run it every minute (cron, a Kubernetes CronJob); no future latency is needed.

Example:
    python forecast.py --model-checkpoint artifacts/latency_forecaster.pt --scaler-path artifacts/scaler.pt \
        --feature-store-path feature_store --output artifacts/forecasts.json \
        --prometheus-textfile artifacts/latency_forecast.prom
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Sequence

from latency_forecast import artifacts, data, flags, live, publish, store, training
from latency_forecast.config import ExplainConfig, StoreConfig
from latency_forecast.errors import UserError, cli_entrypoint, warn
from latency_forecast.forecaster import Forecaster
from latency_forecast.script_config import CheckpointConfig, ForecastConfig

CONFIGS = (CheckpointConfig, StoreConfig, ForecastConfig, ExplainConfig)


def build_parser() -> flags.ArgumentParser:
    return flags.build_parser(prog="forecast.py", description=__doc__, parents=[flags.parent_parser(*CONFIGS)])


def forecast_minute(settings: ForecastConfig, span: data.TimeRange) -> int:
    """``--at`` (checked against the store's minutes), or the store's newest minute."""
    if settings.at is None:
        return span.end - 1
    at = data.to_minute(store.parse_timestamp(settings.at, "--at"))
    if not span.start <= at < span.end:
        raise UserError(
            f"--at {settings.at} is outside the store, whose minutes run from {data.format_minute(span.start)} "
            f"to {data.format_minute(span.end - 1)}; pick a minute inside it or leave --at out for the newest"
        )
    return at


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    checkpoint, store_config, settings, explain_config = flags.from_args(build_parser().parse_args(argv), *CONFIGS)
    started = time.perf_counter()
    forecaster = Forecaster.load(checkpoint.model_checkpoint, checkpoint.scaler_path, training.resolve_device("auto"))
    path = store_config.feature_store_path
    at = forecast_minute(settings, store.minute_span(path))
    # only the minutes the windows need: L up to each service's newest minute, which may lag by the staleness
    start = at - (forecaster.data_config.sequence_length - 1) - settings.max_staleness_minutes
    table = store.load_feature_store(
        path, forecaster.feature_columns, data.timestamp_of(start), data.timestamp_of(at + 1), for_model=True, warn_invalid=True
    )
    absent = sorted(set(forecaster.services) - set(table.services))
    newest_elsewhere = store.newest_minutes(path, absent, data.timestamp_of(start)) if absent else {}
    if not set(forecaster.services) & (set(table.services) | set(newest_elsewhere)):
        raise UserError(
            f"the store {path} holds none of the checkpoint's services ({', '.join(forecaster.services[:5])}"
            f"{', ...' if len(forecaster.services) > 5 else ''}); forecast a store of the fleet the model was trained on"
        )
    report = live.forecast_report(forecaster, table, at, settings.max_staleness_minutes, newest_elsewhere, explain_config)
    report["model"] = {"checkpoint": os.path.abspath(checkpoint.model_checkpoint), "feature_columns": forecaster.feature_columns}

    # forecasts.json moves into place only once the textfile is written: a bad path changes neither file
    with artifacts.staged(os.path.dirname(os.path.abspath(settings.output))) as stage:
        stage.write_json(os.path.basename(settings.output), report)
        if settings.prometheus_textfile:
            publish.write_prometheus_textfile(report, settings.prometheus_textfile)
    _print_summary(report, settings, time.perf_counter() - started)
    if settings.alertmanager_url:  # last: the files above are written even when Alertmanager is down
        posted = publish.post_alerts(
            settings.alertmanager_url, report, settings.alertmanager_timeout,
            datetime.timedelta(minutes=settings.resolve_after_minutes), settings.severity,
        )
        print(f"posted {posted} firing alert(s) to {settings.alertmanager_url}")
    if report["summary"]["unknown_service"]:
        warn(f"not forecast (unknown to the model): {report['summary']['unknown_service']} service(s) of the store")
    return 0


def _number(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _print_summary(report: dict, settings: ForecastConfig, seconds: float) -> None:
    summary = report["summary"]
    print(
        f"forecasts at {report['as_of']} for {report['horizon']} minutes ahead: {summary['ok']} forecast, "
        f"{summary['alerts']} alerting; {summary['stale']} stale, {summary['gap']} with gaps, "
        f"{summary['missing']} missing, {summary['unknown_service']} unknown"
    )
    width = max([24, *(len(entry["service"]) + 2 for entry in report["forecasts"])])  # long names keep the columns apart
    print(f"{'service':<{width}}{'status':<16}{'now ms':>9}{'forecast ms':>13}{'threshold':>11}  alert  top cause")
    for entry in report["forecasts"]:
        cause = entry["causes"][0] if entry["causes"] else None
        top = "" if cause is None else f"{cause['feature']} ({cause['score']:+.0f} ms)"
        print(
            f"{entry['service']:<{width}}{entry['status']:<16}{_number(entry['current_latency_ms']):>9}"
            f"{_number(entry['forecast_ms']):>13}{_number(entry['latency_threshold_ms']):>11}  "
            f"{'ALERT' if entry['alert'] else '':<5}  {top}"
        )
    outputs = [settings.output] + ([settings.prometheus_textfile] if settings.prometheus_textfile else [])
    print(f"written to {', '.join(os.path.abspath(path) for path in outputs)} in {seconds:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
