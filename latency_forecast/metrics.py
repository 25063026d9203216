"""Pure numpy metrics: forecast error, breach confusion counts and alert rates (contract section 4)."""

from __future__ import annotations

import numpy as np

METRIC_KEYS = (
    "rmse",
    "mae",
    "breach_accuracy",
    "true_positive_rate",
    "false_positive_rate",
    "false_negative_rate",
    "precision",
    "true_positives",
    "false_positives",
    "true_negatives",
    "false_negatives",
    "n_samples",
)


def _rate(numerator: int, denominator: int) -> float | None:
    """A rate, or None (JSON null) when it has no denominator."""
    return float(numerator / denominator) if denominator else None


def forecast_metrics(
    actual: np.ndarray,
    forecast: np.ndarray,
    latency_threshold: float | np.ndarray,
    alert_threshold: float | np.ndarray | None = None,
    alert_score: np.ndarray | None = None,
) -> dict[str, float | int | None]:
    """Every contract metric for one set of samples.

    Parameters
    ----------
    actual, forecast : (n_samples,) latency in ms at t+H, observed and forecast
    latency_threshold : breach when ``actual >= latency_threshold`` (scalar or per sample)
    alert_threshold : alert when ``alert_score >= alert_threshold``; default the latency threshold
    alert_score : what alerts are fired on; default the forecast
    """
    actual = np.asarray(actual, dtype=np.float64)
    forecast = np.asarray(forecast, dtype=np.float64)
    score = forecast if alert_score is None else np.asarray(alert_score, dtype=np.float64)
    alert_at = latency_threshold if alert_threshold is None else alert_threshold
    breach = actual >= latency_threshold
    alert = score >= alert_at
    tp = int(np.sum(breach & alert))
    fp = int(np.sum(~breach & alert))
    tn = int(np.sum(~breach & ~alert))
    fn = int(np.sum(breach & ~alert))
    n = len(actual)
    error = forecast - actual
    return {
        "rmse": float(np.sqrt(np.mean(error**2))) if n else None,
        "mae": float(np.mean(np.abs(error))) if n else None,
        "breach_accuracy": _rate(tp + tn, n),
        "true_positive_rate": _rate(tp, tp + fn),
        "false_positive_rate": _rate(fp, fp + tn),
        "false_negative_rate": _rate(fn, tp + fn),
        "precision": _rate(tp, tp + fp),
        "true_positives": tp,
        "false_positives": fp,
        "true_negatives": tn,
        "false_negatives": fn,
        "n_samples": n,
    }
