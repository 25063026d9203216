"""Hands a forecasts report (forecasts.json's dict) to Prometheus and Alertmanager.

The textfile for node_exporter's textfile collector, and the firing alerts posted to Alertmanager's v2 API.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import math
import os
import threading
import time
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


def _alert_on(report: dict) -> str | None:
    """What the alert rule compares with its threshold in latency terms: ``"forecast"`` (the point
    forecast) or a quantile level such as ``"0.9"``; None for a breach-probability rule."""
    rule = report.get("alert_rule") or {}
    if rule.get("score") == "quantile_ratio":
        return rule["quantile"]
    return None if rule.get("score") == "probability" else "forecast"


def _alert_threshold_ms(forecast: dict, alert_on: str | None) -> float | None:
    """The latency the alerted forecast must reach for the alert to fire: the calibrated threshold
    times the service's latency threshold (None for a breach-probability rule)."""
    if alert_on is None or forecast.get("threshold") is None:
        return None
    return forecast["threshold"] * forecast["latency_threshold_ms"]


def score_ratio(forecast: dict) -> float:
    """The alert score over the service's alert threshold: the alert fires at 1 or more.

    A service that never alerts (threshold +inf) is 0; a threshold of 0 or less, which every
    score reaches, gives +inf.
    """
    score, threshold = forecast["score"], forecast["threshold"]
    if math.isinf(threshold):
        return 0.0 if threshold > 0 else math.inf
    return score / threshold if threshold > 0 else math.inf


def _registry(report: dict, last_run_time: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    by_horizon = ("service", "horizon_minutes")

    def gauge(name: str, documentation: str, labels: tuple[str, ...] = by_horizon) -> Gauge:
        return Gauge(name, documentation, labels, registry=registry)

    point = gauge(
        "latency_forecast_p99_seconds",
        "Point forecast of the service's p99 latency horizon_minutes after its as_of minute.",
    )
    quantile = gauge(
        "latency_forecast_p99_quantile_seconds",
        "Forecast quantile, at probability level, of the service's p99 latency horizon_minutes after its as_of minute.",
        (*by_horizon, "level"),
    )
    current = gauge("latency_forecast_current_p99_seconds", "p99 latency observed in the service's as_of minute.")
    latency_threshold = gauge(
        "latency_forecast_latency_threshold_seconds", "p99 latency at or above which the service is in breach (its SLO)."
    )
    alert_threshold = gauge(
        "latency_forecast_alert_threshold_seconds",
        "Calibrated alert threshold: the alert fires when the forecast named by alert_on (forecast: the point "
        "forecast, a level: that quantile) reaches it; calibrated to a target false positive rate, it can sit below the SLO.",
        (*by_horizon, "alert_on"),
    )
    alert = gauge(
        "latency_forecast_alert",
        "1 when the forecast crossed the service's calibrated alert threshold (alert score ratio >= 1), else 0.",
    )
    ratio = gauge(
        "latency_forecast_alert_score_ratio",
        "Alert score over the service's calibrated alert threshold; the alert fires at 1 or more (0: the service never alerts).",
    )
    cause = gauge(
        "latency_forecast_cause_share",
        "Top causes of an alerting forecast (rank 1 first): the feature's Shapley value over the sum of the absolute "
        "Shapley values of every feature but the latency's own history.",
        (*by_horizon, "feature", "rank"),
    )
    as_of = gauge(
        "latency_forecast_as_of_timestamp_seconds",
        "Unix time of the newest minute of data the service's forecast is made from (for a stale or gap service, its newest minute).",
    )
    status = gauge(
        "latency_forecast_status",
        "1 for the service's forecast status, 0 for the others: ok, or why there is no forecast "
        "(stale, gap, unknown_service, missing).",
        (*by_horizon, "status"),
    )
    last_run = gauge(
        "latency_forecast_last_run_timestamp_seconds", "Unix time at which forecast.py wrote this file.", ("horizon_minutes",)
    )

    horizon = str(report["horizon"])
    last_run.labels(horizon).set(last_run_time)
    alert_on = _alert_on(report)
    for forecast in report["forecasts"]:
        labels = (forecast["service"], horizon)
        for name in dict.fromkeys((*STATUSES, forecast["status"])):
            status.labels(*labels, name).set(1.0 if name == forecast["status"] else 0.0)
        if forecast.get("as_of") is not None:
            as_of.labels(*labels).set(parse_timestamp(forecast["as_of"], "as_of").timestamp())
        if forecast["status"] != "ok":
            continue
        point.labels(*labels).set(_seconds(forecast["forecast_ms"]))
        for level, value in (forecast.get("quantiles") or {}).items():
            if value is not None:
                quantile.labels(*labels, level).set(_seconds(value))
        for metric, key in ((current, "current_latency_ms"), (latency_threshold, "latency_threshold_ms")):
            if forecast.get(key) is not None:
                metric.labels(*labels).set(_seconds(forecast[key]))
        threshold_ms = _alert_threshold_ms(forecast, alert_on)
        if threshold_ms is not None:
            alert_threshold.labels(*labels, alert_on).set(_seconds(threshold_ms))
        alert.labels(*labels).set(1.0 if forecast["alert"] else 0.0)
        ratio.labels(*labels).set(score_ratio(forecast))
        for rank, item in enumerate(forecast.get("causes") or [], start=1):
            cause.labels(*labels, item["feature"], str(rank)).set(item["share"])
    return registry


def write_prometheus_textfile(report: dict, path: str, last_run: float | None = None) -> None:
    """Write the report's gauges to ``path`` for node_exporter's textfile collector, atomically.

    Only ``ok`` forecasts get the forecast gauges; every service gets ``latency_forecast_status``
    (and ``latency_forecast_as_of_timestamp_seconds`` where it has an ``as_of``), and the file
    ``latency_forecast_last_run_timestamp_seconds``: ``last_run`` (Unix time, default now), so
    that rules can tell a fresh forecast from a file left behind. Latencies are in seconds.
    node_exporter reads only files whose name ends in ``.prom``.

    Raises
    ------
    UserError
        The file cannot be written (missing directory, no permission, a directory at ``path``).
    """
    registry = _registry(report, time.time() if last_run is None else last_run)
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


def _alerted(forecast: dict, alert_on: str | None) -> str:
    """``0.9 quantile 1200 ms >= 600 ms``: what crossed which threshold."""
    if alert_on is None:
        return f"breach probability {forecast['score']:.2f} >= {forecast['threshold']:.2f}"
    value = forecast["forecast_ms"] if alert_on == "forecast" else forecast["quantiles"][alert_on]
    name = "forecast" if alert_on == "forecast" else f"{alert_on} quantile"
    return f"{name} {_milliseconds(value)} ms >= {_milliseconds(_alert_threshold_ms(forecast, alert_on))} ms"


def _summary(forecast: dict, horizon: int, alert_on: str | None) -> str:
    """One line, the rule file's summary with numbers: ``auth: p99 latency forecast 3 min ahead
    crossed its calibrated alert threshold (0.9 quantile 1200 ms >= 600 ms; SLO 500 ms)``."""
    return (
        f"{forecast['service']}: p99 latency forecast {horizon} min ahead crossed its calibrated alert threshold "
        f"({_alerted(forecast, alert_on)}; SLO {_milliseconds(forecast['latency_threshold_ms'])} ms)"
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
        f"Alert score {score_ratio(forecast):.2f} times its threshold. The threshold is calibrated on validation to a "
        f"target false positive rate and can sit below the {_milliseconds(forecast['latency_threshold_ms'])} ms SLO: "
        "an early warning, not a breach yet."
    )
    causes = forecast.get("causes") or []
    if causes:
        top, *others = causes
        line = f"Top cause: {top['feature']} ({top['score']:+.1f} ms Shapley value, {top['share']:.0%})"
        if others:
            line += "; then " + ", ".join(f"{cause['feature']} ({cause['score']:+.1f} ms, {cause['share']:.0%})" for cause in others)
        lines.append(line + ".")
    return "\n".join(lines)


def alertmanager_alerts(report: dict, now: datetime, resolve_after: timedelta, severity: str) -> list[dict[str, Any]]:
    """The report's firing forecasts (``alert`` true, status ``ok``) as Alertmanager v2 postable alerts.

    Their labels are those of the rule file's ``LatencyBreachForecast`` (``alertname``, ``service``,
    ``horizon_minutes``, ``severity``), so Alertmanager takes both paths' alerts for one.

    ``endsAt`` is ``now + resolve_after``: an alert that is not posted again resolves by itself.
    """
    horizon, alert_on = int(report["horizon"]), _alert_on(report)
    ends_at = format_timestamp(now + resolve_after)
    return [
        {
            "labels": {
                "alertname": ALERT_NAME,
                "service": forecast["service"],
                "severity": severity,
                "horizon_minutes": str(horizon),
            },
            "annotations": {"summary": _summary(forecast, horizon, alert_on), "description": _description(forecast, horizon)},
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
