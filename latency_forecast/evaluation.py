"""The model beside its baselines on exactly the same samples: contract metrics, the alerting
(ranking and episode) view, per-service metrics, and the sections of ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from latency_forecast import alerting, metrics
from latency_forecast.alerting import AlertRule
from latency_forecast.config import AlertConfig
from latency_forecast.forecaster import Forecaster, PreparedSeries


@dataclass
class Evaluation:
    """Forecasts, truth and alerts for one set of samples (in row order: by service, then minute).

    Baselines forecast the same target on the same samples; ``persistence`` (the latency at t)
    is always one of them, and alerts when the latency at t reaches the latency threshold.
    """

    ends: np.ndarray  # (n,) row index where each window ends (minute t)
    service_codes: np.ndarray  # (n,) codes into the table's services
    target_minutes: np.ndarray  # (n,) minute t+H that each sample forecasts
    actual: np.ndarray  # latency at t+H, ms
    forecast: np.ndarray  # model, ms
    latency_threshold: np.ndarray  # breach threshold of each sample's service, ms
    score: np.ndarray  # model alert score (forecast ratio or breach probability)
    alert_threshold: np.ndarray  # the model's alert threshold for each sample
    baselines: dict[str, np.ndarray]  # name -> forecast ms

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def persistence(self) -> np.ndarray:
        return self.baselines["persistence"]

    @property
    def breach(self) -> np.ndarray:
        return self.actual >= self.latency_threshold

    @property
    def alert(self) -> np.ndarray:
        return self.score >= self.alert_threshold

    @property
    def true_positive(self) -> np.ndarray:
        return self.alert & self.breach

    @property
    def persistence_score(self) -> np.ndarray:
        return self.persistence / self.latency_threshold

    @cached_property
    def model_metrics(self) -> dict:
        return metrics.forecast_metrics(self.actual, self.forecast, self.latency_threshold, self.alert_threshold, self.score)

    @cached_property
    def baseline_metrics(self) -> dict[str, dict]:
        """Each baseline's contract metrics, alerting when its forecast reaches the latency threshold."""
        return {name: metrics.forecast_metrics(self.actual, forecast, self.latency_threshold) for name, forecast in self.baselines.items()}

    @property
    def persistence_metrics(self) -> dict:
        return self.baseline_metrics["persistence"]

    def with_alert_rule(self, rule: AlertRule, services: Sequence[str]) -> "Evaluation":
        """The same forecasts judged by another alert rule (no new predictions)."""
        return dataclasses.replace(self, alert_threshold=rule.thresholds_for(services)[self.service_codes])


def evaluate(forecaster: Forecaster, prepared: PreparedSeries, ends: np.ndarray) -> Evaluation:
    """Model and baselines on exactly the same samples, each service at its own threshold,
    alerts by the forecaster's alert rule."""
    horizon = forecaster.data_config.horizon
    table = prepared.table
    threshold = prepared.latency_threshold(ends)
    forecast, probability = forecaster.predict(prepared, ends)
    return Evaluation(
        ends,
        table.service_codes[ends],
        table.minutes[ends] + horizon,
        table.target[ends + horizon].astype(np.float64),
        forecast,
        threshold,
        forecaster.alert.scores(forecast, probability, threshold),
        forecaster.alert.thresholds_for(table.services)[table.service_codes[ends]],
        {"persistence": table.target[ends].astype(np.float64)},
    )


def calibrated_evaluation(
    forecaster: Forecaster, prepared: PreparedSeries, ends: np.ndarray, alert_config: AlertConfig
) -> tuple[Evaluation, AlertRule]:
    """Evaluate on ``ends`` (never test samples), calibrate the alert rule there, and return that
    evaluation under the calibrated rule, with the rule (the forecaster is not changed)."""
    evaluation = evaluate(forecaster, prepared, ends)
    rule = alerting.calibrate(
        evaluation.score,
        evaluation.breach,
        evaluation.service_codes,
        prepared.table.services,
        AlertRule.uncalibrated(forecaster.model.multitask),
        alert_config,
    )
    return evaluation.with_alert_rule(rule, prepared.table.services), rule


def persistence_thresholds(validation: Evaluation, alert_config: AlertConfig, horizon: int) -> dict[str, float]:
    """Persistence's alert thresholds (on latency / latency threshold) to compare the model with,
    all chosen on validation: at the latency threshold, at the model's target FPR, and at the
    model's paging load (false-alarm episodes per service-day)."""
    thresholds = {"persistence": 1.0}
    if alert_config.target_fpr > 0:
        matched = metrics.calibrate_threshold(validation.persistence_score, validation.breach, alert_config.target_fpr)
        if matched is not None:
            thresholds["persistence_at_target_fpr"] = matched
    model = metrics.episode_metrics(validation.service_codes, validation.target_minutes, validation.breach, validation.alert, horizon)
    thresholds["persistence_at_model_false_alarms"] = metrics.match_false_alarm_rate(
        validation.service_codes, validation.target_minutes, validation.breach, validation.persistence_score,
        model["false_alarm_episodes_per_service_day"] or 0.0,
    )
    return thresholds


def alerting_report(evaluation: Evaluation, horizon: int, persistence_thresholds: dict[str, float]) -> dict[str, dict]:
    """ROC/PR-AUC and the episode view, for the model (its alert rule) and for persistence at
    each named threshold on latency / latency threshold (1.0: alert when the latency at t breaches)."""
    codes, minutes, breach = evaluation.service_codes, evaluation.target_minutes, evaluation.breach
    report = {
        "model": {
            **metrics.ranking_metrics(evaluation.score, breach),
            **metrics.episode_metrics(codes, minutes, breach, evaluation.alert, horizon),
        }
    }
    persistence_ranking = metrics.ranking_metrics(evaluation.persistence_score, breach)
    for name, threshold in persistence_thresholds.items():
        alert = evaluation.persistence_score >= threshold
        counts = metrics.forecast_metrics(
            evaluation.actual, evaluation.persistence, evaluation.latency_threshold, threshold, evaluation.persistence_score
        )
        report[name] = {
            "alert_threshold": threshold,
            **{key: counts[key] for key in ("true_positive_rate", "false_positive_rate", "precision")},
            **persistence_ranking,
            **metrics.episode_metrics(codes, minutes, breach, alert, horizon),
        }
    return report


def per_service(evaluation: Evaluation, services: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Contract metrics per service: ``{service: {"model": {...}, baseline name: {...}}}``."""
    result = {}
    for code in np.unique(evaluation.service_codes):
        mine = evaluation.service_codes == code
        threshold = evaluation.latency_threshold[mine]
        result[services[code]] = {
            "model": metrics.forecast_metrics(
                evaluation.actual[mine], evaluation.forecast[mine], threshold, evaluation.alert_threshold[mine], evaluation.score[mine]
            ),
            **{
                name: metrics.forecast_metrics(evaluation.actual[mine], forecast[mine], threshold)
                for name, forecast in evaluation.baselines.items()
            },
        }
    return result


def alert_thresholds_ms(forecaster: Forecaster, services: Sequence[str]) -> dict[str, float] | None:
    """Per service, the forecast (ms) at which an alert fires; None when alerts fire on a probability."""
    if forecaster.alert.score != "forecast_ratio":
        return None
    ratios = forecaster.alert.thresholds_for(services)
    latency = forecaster.latency_thresholds.for_services(services)
    return {name: float(r * ms) for name, r, ms in zip(services, ratios, latency)}


def metrics_report(
    forecaster: Forecaster, evaluations: dict[str, Evaluation], services: Sequence[str], alert_config: AlertConfig
) -> dict[str, Any]:
    """The evaluation sections of ``metrics.json`` (contract section 4) for the ``validation``
    (where the alert rule was calibrated) and ``test`` evaluations under the forecaster's rule."""
    validation, test = evaluations["validation"], evaluations["test"]
    horizon = forecaster.data_config.horizon
    thresholds = persistence_thresholds(validation, alert_config, horizon)
    return {
        "validation": validation.model_metrics,
        "test": test.model_metrics,
        "baseline": {
            name: {split: evaluations[split].baseline_metrics[name] for split in ("validation", "test")}
            for name in validation.baselines
        },
        "alerting": {
            "operating_point": {
                **forecaster.alert.as_dict(),
                "validation_false_positive_rate": validation.model_metrics["false_positive_rate"],
                "test_false_positive_rate": test.model_metrics["false_positive_rate"],
                "alert_threshold_ms": alert_thresholds_ms(forecaster, services),
            },
            **{split: alerting_report(evaluations[split], horizon, thresholds) for split in ("validation", "test")},
        },
        "per_service": {split: per_service(evaluations[split], services) for split in ("validation", "test")},
    }


def forecast_panels(evaluation: Evaluation, services: Sequence[str], n_services: int = 4) -> list[dict]:
    """For ``plots.forecast_vs_actual``: a six-hour stretch per service around its worst minute,
    for the services that breach most."""
    codes = evaluation.service_codes
    breaches = np.bincount(codes, weights=evaluation.breach, minlength=len(services))
    peaks = np.array([evaluation.actual[codes == c].max() if (codes == c).any() else -1 for c in range(len(services))])
    chosen = sorted(range(len(services)), key=lambda c: (-breaches[c], -peaks[c]))[:n_services]
    panels = []
    for code in chosen:
        mine = np.flatnonzero(codes == code)
        if not len(mine):
            continue
        target_minutes = evaluation.target_minutes[mine]
        near = mine[np.abs(target_minutes - target_minutes[np.argmax(evaluation.actual[mine])]) <= 180]
        panels.append(
            {
                "service": services[code],
                "minutes": evaluation.target_minutes[near].astype("datetime64[m]"),
                "actual": evaluation.actual[near],
                "forecast": evaluation.forecast[near],
                "persistence": evaluation.persistence[near],
                "latency_threshold": float(evaluation.latency_threshold[near][0]),
                "alert": evaluation.alert[near],
            }
        )
    return panels


def tradeoff_curves(test: Evaluation, alerting_view: dict) -> tuple[dict, dict]:
    """For ``plots.alert_tradeoff``: ROC curves of the model's and persistence's alert scores,
    and the operating points of the model and of persistence at each compared threshold."""
    curves = {
        "model": metrics.roc_points(test.score, test.breach),
        "persistence": metrics.roc_points(test.persistence_score, test.breach),
    }
    points = {"model (chosen)": (test.model_metrics["false_positive_rate"], test.model_metrics["true_positive_rate"])}
    for name in ("persistence", "persistence_at_target_fpr", "persistence_at_model_false_alarms"):
        if name in alerting_view:
            points[name.replace("_", " ")] = (alerting_view[name]["false_positive_rate"], alerting_view[name]["true_positive_rate"])
    return curves, points
