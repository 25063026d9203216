"""Forecasts at the newest minute (forecast.py): per service a status, the p99 forecast at t+H from
the window ending at its newest minute, the checkpoint's alert decision and, for alerts, the top
causes. Nothing here needs a latency after t.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latency_forecast import data, explain
from latency_forecast.causality import rank_features
from latency_forecast.config import TARGET_COLUMN, ExplainConfig
from latency_forecast.data import SeriesTable, format_minute
from latency_forecast.forecaster import Forecaster, PreparedSeries

STATUSES = ("ok", "stale", "gap", "unknown_service", "missing")
TOP_CAUSES = 3


def _entry(service: str, status: str, as_of: int | None, horizon: int) -> dict[str, Any]:
    return {
        "service": service,
        "as_of": None if as_of is None else format_minute(as_of),
        "target_time": None if as_of is None else format_minute(as_of + horizon),
        "forecast_ms": None,
        "quantiles": {},
        "current_latency_ms": None,
        "latency_threshold_ms": None,
        "score": None,
        "threshold": None,
        "alert": False,
        "causes": [],
        "status": status,
    }


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def forecast_report(
    forecaster: Forecaster,
    table: SeriesTable,
    at: int,
    max_staleness_minutes: int,
    newest_elsewhere: dict[str, int],
    explain_config: ExplainConfig,
) -> dict[str, Any]:
    """The ``forecasts.json`` report (contract section 4) at minute ``at``.

    Parameters
    ----------
    table : the store's rows up to ``at`` (the last L + staleness minutes are enough)
    newest_elsewhere : the newest minute, before the rows of ``table``, of checkpoint services
        that have no row in it (they are stale); a service in neither is ``missing``

    A service is forecast from the newest window of L minutes ending at a minute ``t <= at``
    (``as_of``) that is complete with finite inputs (for a model anchored at the latency at t,
    with that latency too) and at most ``max_staleness_minutes`` before ``at``: newest minutes
    whose latency or telemetry has not arrived yet are skipped. ``stale`` when the service's
    newest minute is older than that, ``gap`` when no window in those minutes can be forecast.
    """
    length = forecaster.data_config.sequence_length
    prepared = forecaster.prepare(table, inplace=True)
    latest = data.latest_windows(table, length, at - max_staleness_minutes, latency_at_end=forecaster.model.anchored)
    code_of = {name: code for code, name in enumerate(table.services)}
    entries = _status_entries(forecaster, prepared, latest, code_of, at, max_staleness_minutes, newest_elsewhere)
    ok = [service for service in forecaster.services if entries[service]["status"] == "ok"]
    ends = np.array([latest.row[code_of[service]] for service in ok], dtype=np.int64)
    method = None
    if len(ends):
        alert = _add_forecasts(forecaster, prepared, ok, ends, entries)
        if alert.any():
            method = _add_causes(forecaster, prepared, ok, ends, alert, entries, explain_config)
    forecasts = [entries[service] for service in sorted(entries)]
    counts = {status: sum(entry["status"] == status for entry in forecasts) for status in STATUSES}
    return {
        "as_of": format_minute(at),
        "horizon": forecaster.data_config.horizon,
        "sequence_length": length,
        "max_staleness_minutes": max_staleness_minutes,
        "alert_rule": forecaster.alert.as_dict(),
        "explanation_method": method,
        "summary": {**counts, "alerts": sum(entry["alert"] for entry in forecasts)},
        "forecasts": forecasts,
    }


def _status_entries(
    forecaster: Forecaster,
    prepared: PreparedSeries,
    latest: data.LatestWindows,
    code_of: dict[str, int],
    at: int,
    max_staleness_minutes: int,
    newest_elsewhere: dict[str, int],
) -> dict[str, dict[str, Any]]:
    """Each checkpoint service's entry with its status and ``as_of`` (an ``ok`` one also with its
    current latency), and each store service unknown to the checkpoint's; no forecast yet."""
    table, horizon = prepared.table, forecaster.data_config.horizon
    entries: dict[str, dict[str, Any]] = {}
    for service in forecaster.services:
        if service not in code_of:
            stale_at = newest_elsewhere.get(service)
            entries[service] = _entry(service, "missing" if stale_at is None else "stale", stale_at, horizon)
            continue
        code = code_of[service]
        newest, row = int(latest.newest[code]), int(latest.row[code])
        if at - int(table.minutes[newest]) > max_staleness_minutes:
            entries[service] = _entry(service, "stale", int(table.minutes[newest]), horizon)
        elif row < 0:
            entries[service] = _entry(service, "gap", int(table.minutes[newest]), horizon)
        else:
            entries[service] = _entry(service, "ok", int(table.minutes[row]), horizon)
            entries[service]["current_latency_ms"] = _finite(table.target[row])
    for service in prepared.unknown_services:
        entries[service] = _entry(service, "unknown_service", int(table.minutes[latest.newest[code_of[service]]]), horizon)
    return entries


def _add_forecasts(
    forecaster: Forecaster, prepared: PreparedSeries, ok: list[str], ends: np.ndarray, entries: dict[str, dict[str, Any]]
) -> np.ndarray:
    """Fill the ``ok`` services' entries with the forecast of the windows ending at ``ends`` and the
    checkpoint's alert decision; returns (len(ok),) bool, which of them alert."""
    forecast = forecaster.predict(prepared, ends)
    latency_threshold = prepared.latency_threshold(ends)
    score = forecaster.alert.scores(forecast, latency_threshold)
    threshold = forecaster.alert.thresholds_for(ok)
    alert = score >= threshold
    for i, service in enumerate(ok):
        entries[service].update(
            forecast_ms=float(forecast.ms[i]),
            quantiles={name: float(values[i]) for name, values in forecast.quantiles.items()},
            latency_threshold_ms=float(latency_threshold[i]),
            score=float(score[i]),
            threshold=float(threshold[i]),
            alert=bool(alert[i]),
        )
    return alert


def _add_causes(
    forecaster: Forecaster,
    prepared: PreparedSeries,
    ok: list[str],
    ends: np.ndarray,
    alert: np.ndarray,
    entries: dict[str, dict[str, Any]],
    explain_config: ExplainConfig,
) -> str:
    """Fill each alerting service's entry with its top causes (Shapley values of its window);
    returns the explanation method."""
    background = forecaster.require_background("the checkpoint")
    attributions = explain.explain(
        forecaster, prepared.tensors, ends[alert], background, explain_config, forecaster.training_config.seed
    )
    for values, i in zip(attributions.values, np.flatnonzero(alert)):
        scores = dict(zip(forecaster.feature_columns, values.tolist()))
        # a share of what the features that can be a cause (not the latency's own history) push in all
        total = sum(abs(score) for name, score in scores.items() if name != TARGET_COLUMN)
        entries[ok[i]]["causes"] = [
            {"feature": name, "score": scores[name], "share": scores[name] / total if total > 0 else 0.0}
            for name in rank_features(values, forecaster.feature_columns)[:TOP_CAUSES]
        ]
    return attributions.method
