"""Hands a forecasts report (forecasts.json's dict) to Prometheus and Alertmanager.

The textfile for node_exporter's textfile collector, and the firing alerts posted to Alertmanager's v2 API.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from latency_forecast.store import parse_timestamp
from latency_forecast.errors import UserError

ALERT_NAME = "LatencyBreachForecast"
STATUSES = ("ok", "stale", "gap", "unknown_service", "missing")


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with ``Z`` (``2024-06-05T10:00:00Z``), as the contract and Alertmanager write it.

    A naive datetime is taken as UTC; sub-second precision is dropped.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000.0


def _registry(report: dict) -> CollectorRegistry:
    registry = CollectorRegistry()
    by_service = ("service",)
    by_horizon = ("service", "horizon_minutes")

    def gauge(name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(name, documentation, labels, registry=registry)

    p99 = gauge(
        "latency_forecast_p99_seconds",
        "Forecast p99 latency of the service horizon_minutes after as_of; "
        'quantile="point" is the point forecast, a number is the forecast quantile at that level.',
        (*by_horizon, "quantile"),
    )
    current = gauge("latency_forecast_current_p99_seconds", "p99 latency observed in the service's newest minute (as_of).", by_service)
    latency_threshold = gauge(
        "latency_forecast_latency_threshold_seconds", "p99 latency at or above which the service is in breach.", by_service
    )
    alert = gauge(
        "latency_forecast_alert",
        "1 when a latency breach is forecast horizon_minutes ahead (alert score >= its threshold), else 0.",
        by_horizon,
    )
    score = gauge(
        "latency_forecast_alert_score",
        "Alert score of the forecast; the alert fires when it reaches latency_forecast_alert_score_threshold.",
        by_horizon,
    )
    score_threshold = gauge(
        "latency_forecast_alert_score_threshold", "Alert score at or above which the forecast alert fires.", by_horizon
    )
    as_of = gauge(
        "latency_forecast_as_of_timestamp_seconds",
        "Unix time of the newest minute the service's forecast is made from (for a stale service, its newest minute).",
        by_service,
    )
    status = gauge(
        "latency_forecast_status",
        "1 for the service's forecast status, 0 for the others: ok, or why there is no forecast "
        "(stale, gap, unknown_service, missing).",
        ("service", "status"),
    )

    horizon = str(report["horizon"])
    for forecast in report["forecasts"]:
        service = forecast["service"]
        for name in dict.fromkeys((*STATUSES, forecast["status"])):
            status.labels(service, name).set(1.0 if name == forecast["status"] else 0.0)
        if forecast.get("as_of") is not None:
            as_of.labels(service).set(parse_timestamp(forecast["as_of"], "as_of").timestamp())
        if forecast["status"] != "ok":
            continue
        levels = {"point": forecast.get("forecast_ms"), **(forecast.get("quantiles") or {})}
        for level, value in levels.items():
            if value is not None:
                p99.labels(service, horizon, level).set(_seconds(value))
        for metric, key, labels in (
            (current, "current_latency_ms", (service,)),
            (latency_threshold, "latency_threshold_ms", (service,)),
        ):
            if forecast.get(key) is not None:
                metric.labels(*labels).set(_seconds(forecast[key]))
        alert.labels(service, horizon).set(1.0 if forecast.get("alert") else 0.0)
        for metric, key in ((score, "score"), (score_threshold, "threshold")):
            if forecast.get(key) is not None:
                metric.labels(service, horizon).set(forecast[key])
    return registry


def write_prometheus_textfile(report: dict, path: str) -> None:
    """Write the report's gauges to ``path`` for node_exporter's textfile collector, atomically.

    Only ``ok`` forecasts get the forecast gauges; every service gets ``latency_forecast_status``
    (and ``latency_forecast_as_of_timestamp_seconds`` where it has an ``as_of``). Latencies are in
    seconds. node_exporter reads only files whose name ends in ``.prom``.

    Raises
    ------
    UserError
        The file cannot be written (missing directory, no permission, a directory at ``path``).
    """
    registry = _registry(report)
    try:
        write_to_textfile(path, registry)
    except OSError as error:
        # prometheus_client before 0.21 leaves its temporary file behind when the rename fails
        with contextlib.suppress(OSError):
            os.remove(f"{path}.{os.getpid()}.{threading.current_thread().ident}")
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            fix = "create its directory or choose another path"
        elif error.errno == errno.EISDIR:
            fix = "it is a directory; name a file in it such as latency_forecast.prom"
        else:
            fix = "choose a writable path"
        raise UserError(
            f"cannot write --prometheus-textfile {path}: {error.strerror or error}; {fix} "
            "(node_exporter's --collector.textfile.directory)"
        ) from error


def _milliseconds(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _summary(forecast: dict, horizon: int) -> str:
    """One line: ``auth p99 forecast 812 ms at 10:03Z >= 500 ms threshold (in 3 min)``."""
    target = parse_timestamp(forecast["target_time"], "target_time").strftime("%H:%MZ")
    head = f"{forecast['service']} p99 forecast {_milliseconds(forecast['forecast_ms'])} ms at {target}"
    threshold = forecast["latency_threshold_ms"]
    if forecast["forecast_ms"] >= threshold:
        return f"{head} >= {_milliseconds(threshold)} ms threshold (in {horizon} min)"
    # a calibrated alert threshold can fire below the latency threshold
    return (
        f"{head}, alert score {forecast['score']:.2f} >= {forecast['threshold']:.2f} "
        f"({_milliseconds(threshold)} ms threshold, in {horizon} min)"
    )


def _description(forecast: dict, horizon: int) -> str:
    quantiles = forecast.get("quantiles") or {}
    levels = ", ".join(f"p{float(level) * 100:g} {_milliseconds(value)} ms" for level, value in quantiles.items() if value is not None)
    lines = [
        f"Forecast p99 latency of {forecast['service']} at {forecast['target_time']} ({horizon} min after "
        f"{forecast['as_of']}): {_milliseconds(forecast['forecast_ms'])} ms" + (f" ({levels})." if levels else "."),
    ]
    if forecast.get("current_latency_ms") is not None:
        lines.append(f"Current p99: {_milliseconds(forecast['current_latency_ms'])} ms.")
    lines.append(
        f"Latency threshold: {_milliseconds(forecast['latency_threshold_ms'])} ms. "
        f"Alert score {forecast['score']:.2f} >= threshold {forecast['threshold']:.2f}."
    )
    causes = forecast.get("causes") or []
    if causes:
        top, *others = causes
        line = f"Top cause: {top['feature']} ({top['score']:+.1f} ms Shapley value)"
        if others:
            line += "; then " + ", ".join(f"{cause['feature']} ({cause['score']:+.1f} ms)" for cause in others)
        lines.append(line + ".")
    return "\n".join(lines)


def alertmanager_alerts(report: dict, now: datetime, resolve_after: timedelta, severity: str) -> list[dict[str, Any]]:
    """The report's firing forecasts (``alert`` true, status ``ok``) as Alertmanager v2 postable alerts.

    ``endsAt`` is ``now + resolve_after``: an alert that is not posted again resolves by itself.
    """
    horizon = int(report["horizon"])
    ends_at = format_timestamp(now + resolve_after)
    return [
        {
            "labels": {
                "alertname": ALERT_NAME,
                "service": forecast["service"],
                "severity": severity,
                "horizon_minutes": str(horizon),
            },
            "annotations": {"summary": _summary(forecast, horizon), "description": _description(forecast, horizon)},
            "startsAt": format_timestamp(parse_timestamp(forecast["as_of"], "as_of").to_pydatetime()),
            "endsAt": ends_at,
        }
        for forecast in report["forecasts"]
        if forecast["status"] == "ok" and forecast.get("alert")
    ]


def post_alerts(
    url: str,
    report: dict,
    timeout: float = 5.0,
    resolve_after: timedelta = timedelta(minutes=5),
    severity: str = "warning",
    now: datetime | None = None,
) -> int:
    """POST the report's firing alerts to Alertmanager (``{url}/api/v2/alerts``); returns how many.

    ``url`` is Alertmanager's base URL (a trailing slash or a path prefix is fine). No firing
    alert means no request. ``now`` defaults to the current time.

    Raises
    ------
    UserError
        Alertmanager is unreachable, times out or answers with an HTTP error.
    """
    now = datetime.now(timezone.utc) if now is None else now
    alerts = alertmanager_alerts(report, now, resolve_after, severity)
    if not alerts:
        return 0
    request = urllib.request.Request(
        url.rstrip("/") + "/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as error:
        body = " ".join(error.read(300).decode(errors="replace").split())
        reason = f"HTTP {error.code} {error.reason}" + (f" ({body})" if body else "")
        _unreachable(url, reason, error)
    except TimeoutError as error:
        _unreachable(url, f"no answer within {timeout:g} s", error)
    except urllib.error.URLError as error:
        cause = error.reason
        if isinstance(cause, TimeoutError):
            _unreachable(url, f"no answer within {timeout:g} s", error)
        _unreachable(url, getattr(cause, "strerror", None) or str(cause), error)
    except (OSError, http.client.HTTPException, ValueError) as error:  # ValueError: not an http(s) URL
        _unreachable(url, str(error) or type(error).__name__, error)
    return len(alerts)


def _unreachable(url: str, reason: str, error: BaseException) -> None:
    reason = " ".join(str(reason).split())
    raise UserError(
        f"cannot post alerts to Alertmanager at {url}: {reason}; check --alertmanager-url and that Alertmanager is running"
    ) from error
