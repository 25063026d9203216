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


def rate(numerator: int, denominator: int) -> float | None:
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
    n = len(actual)
    error = forecast - actual
    return {
        "rmse": float(np.sqrt(np.mean(error**2))) if n else None,
        "mae": float(np.mean(np.abs(error))) if n else None,
        **alert_counts(actual >= latency_threshold, score >= alert_at),
    }


def alert_counts(breach: np.ndarray, alert: np.ndarray) -> dict[str, float | int | None]:
    """The confusion counts and rates of alerts against breaches (the contract's alerting keys)."""
    tp = int(np.sum(breach & alert))
    fp = int(np.sum(~breach & alert))
    tn = int(np.sum(~breach & ~alert))
    fn = int(np.sum(breach & ~alert))
    n = len(breach)
    return {
        "breach_accuracy": rate(tp + tn, n),
        "true_positive_rate": rate(tp, tp + fn),
        "false_positive_rate": rate(fp, fp + tn),
        "false_negative_rate": rate(fn, tp + fn),
        "precision": rate(tp, tp + fp),
        "true_positives": tp,
        "false_positives": fp,
        "true_negatives": tn,
        "false_negatives": fn,
        "n_samples": n,
    }


# ---------------------------------------------------------------------------------------------
# Alert operating point


def calibrate_threshold(score: np.ndarray, breach: np.ndarray, target_fpr: float) -> float | None:
    """The most sensitive alert threshold whose false positive rate on new samples is at most
    ``target_fpr``; None when there are no negatives.

    Split-conformal, so that a short validation period does not overfit a handful of minutes:
    for ``n`` negative scores, a new negative (exchangeable with them) scores above the k-th
    smallest, ``k = ceil((n + 1) * (1 - target_fpr))``, with probability at most ``target_fpr``.
    Alerts fire at ``score >= threshold``, so the threshold sits just above that score, and ties
    never push the rate over the target. With fewer than ``1 / target_fpr - 1`` negatives no
    score guarantees it and the threshold is above all of them (alerts only beyond anything seen).
    """
    negatives = _sorted_negatives(score, breach)
    n = len(negatives)
    if n == 0:
        return None
    return _just_above(negatives, int(np.ceil((n + 1) * (1 - target_fpr) - 1e-9)))


def threshold_at_rate(score: np.ndarray, breach: np.ndarray, false_positive_rate: float) -> float | None:
    """The most sensitive threshold whose false positive rate on these very samples is at most
    ``false_positive_rate`` (in-sample: for comparing alerts at one FPR, never for choosing one)."""
    negatives = _sorted_negatives(score, breach)
    if len(negatives) == 0:
        return None
    return _just_above(negatives, len(negatives) - int(np.floor(false_positive_rate * len(negatives) + 1e-9)))


def _sorted_negatives(score: np.ndarray, breach: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(score, dtype=np.float64)[~np.asarray(breach, dtype=bool)])


def _just_above(negatives: np.ndarray, rank: int) -> float:
    """The threshold that lets through the negatives above the ``rank``-th smallest (alerts fire
    at ``score >= threshold``, so it sits just above it, and ties never add false positives);
    rank < 1: the smallest negative (every negative alerts)."""
    if rank < 1:
        return float(negatives[0])
    return float(np.nextafter(negatives[min(rank, len(negatives)) - 1], np.inf))


def ranking_metrics(score: np.ndarray, breach: np.ndarray) -> dict[str, float | None]:
    """ROC-AUC and PR-AUC (average precision) of an alert score; null with only one class."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    breach = np.asarray(breach, dtype=bool)
    if breach.all() or not breach.any():
        return {"roc_auc": None, "pr_auc": None}
    return {"roc_auc": float(roc_auc_score(breach, score)), "pr_auc": float(average_precision_score(breach, score))}


def roc_points(score: np.ndarray, breach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of every threshold, for plotting."""
    from sklearn.metrics import roc_curve

    breach = np.asarray(breach, dtype=bool)
    if breach.all() or not breach.any():
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = roc_curve(breach, score)
    return fpr, tpr


def _runs(codes: np.ndarray, minutes: np.ndarray, flag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end indices (inclusive) of runs of consecutive flagged minutes of one service.

    Inputs must be sorted by (code, minute); a missing minute or a new service ends a run.
    """
    flag = np.asarray(flag, dtype=bool)
    continues = np.zeros(len(flag), dtype=bool)
    continues[1:] = flag[1:] & flag[:-1] & (codes[1:] == codes[:-1]) & (minutes[1:] - minutes[:-1] == 1)
    starts = np.flatnonzero(flag & ~continues)
    ends_after = np.flatnonzero(flag & ~np.append(continues[1:], False))
    return starts, ends_after


def episode_metrics(
    service_codes: np.ndarray,
    target_minutes: np.ndarray,
    breach: np.ndarray,
    alert: np.ndarray,
    horizon: int,
) -> dict[str, float | int | None]:
    """The on-call view: breach episodes, how many were seen coming, and false-alarm episodes.

    Each sample is the alert made at minute ``t`` for minute ``t + horizon`` (``target_minutes``).
    An episode is a run of consecutive breach minutes of one service. It is *anticipated* when an
    alert was fired at least one minute before its first minute ``e`` and within the horizon,
    i.e. at ``t`` in ``[e - horizon, e - 1]``; the lead time is ``e - t`` for the earliest such ``t``.
    A false-alarm episode is a run of consecutive alerted minutes none of which breached.
    Rates are per service-day of samples (1440 samples = one service-day).
    """
    order = np.lexsort((target_minutes, service_codes))
    codes, minutes = np.asarray(service_codes)[order], np.asarray(target_minutes)[order]
    breach, alert = np.asarray(breach, dtype=bool)[order], np.asarray(alert, dtype=bool)[order]

    starts, _ = _runs(codes, minutes, breach)
    fired = {(int(c), int(m) - horizon) for c, m in zip(codes[alert], minutes[alert])}
    lead_times = []
    for start in starts:
        code, first = int(codes[start]), int(minutes[start])
        leads = [first - t for t in range(first - horizon, first) if (code, t) in fired]
        if leads:
            lead_times.append(max(leads))
    alarm_starts, alarm_ends = _runs(codes, minutes, alert)
    false_alarms = _false_alarms(breach, alarm_starts, alarm_ends)
    service_days = len(codes) / 1440.0
    return {
        "episodes": int(len(starts)),
        "anticipated_episodes": len(lead_times),
        "anticipated_share": float(len(lead_times) / len(starts)) if len(starts) else None,
        "median_lead_minutes": float(np.median(lead_times)) if lead_times else None,
        "alert_episodes": int(len(alarm_starts)),
        "false_alarm_episodes": false_alarms,
        "false_alarm_episodes_per_service_day": float(false_alarms / service_days) if service_days else None,
    }


def _false_alarms(breach: np.ndarray, alarm_starts: np.ndarray, alarm_ends: np.ndarray) -> int:
    """How many alert runs (start/end indices from :func:`_runs`) hold no breach minute."""
    breach_before = np.concatenate(([0], np.cumsum(breach)))
    return int(np.sum(breach_before[alarm_ends + 1] - breach_before[alarm_starts] == 0))


def match_false_alarm_rate(
    service_codes: np.ndarray, target_minutes: np.ndarray, breach: np.ndarray, score: np.ndarray, per_service_day: float
) -> float:
    """The most sensitive threshold on ``score`` whose false-alarm episodes per service-day are at
    most ``per_service_day``: a baseline held to the same paging load as the model.

    Equal minute-level FPR is not equal noise for an on-call engineer: a baseline whose false
    alarms come as many short blips pages far more often. The threshold is lowered from above all
    scores (no alarm) through 512 quantiles of the top decile of non-breach scores until the rate
    first exceeds the budget: the rate is not monotone (alerting always is one long episode), so
    a lower threshold that meets it again is not taken.
    """
    order = np.lexsort((target_minutes, service_codes))
    codes, minutes = np.asarray(service_codes)[order], np.asarray(target_minutes)[order]
    breach, score = np.asarray(breach, dtype=bool)[order], np.asarray(score, dtype=np.float64)[order]
    service_days = len(codes) / 1440.0
    negatives = score[~breach & np.isfinite(score)]
    candidates = np.unique(np.quantile(negatives, np.linspace(0.9, 1.0, 512))) if len(negatives) else np.array([])
    chosen = float(np.nextafter(np.nanmax(score), np.inf))
    for threshold in candidates[::-1]:
        if _false_alarms(breach, *_runs(codes, minutes, score >= threshold)) > per_service_day * service_days:
            break
        chosen = float(threshold)
    return chosen
