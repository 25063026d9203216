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
from latency_forecast.baselines import WINDOW_MEDIAN, GradientBoostingBaseline
from latency_forecast.config import AlertConfig, BaselineConfig
from latency_forecast.ensemble import MEMBERS, RECURRENT
from latency_forecast.forecaster import Forecast, Forecaster, PreparedSeries


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
    quantiles: dict[str, np.ndarray]  # model quantile level ("0.9") -> ms; empty without quantiles
    latency_threshold: np.ndarray  # breach threshold of each sample's service, ms
    score: np.ndarray  # model alert score (forecast ratio or breach probability)
    alert_threshold: np.ndarray  # the model's alert threshold for each sample
    baselines: dict[str, np.ndarray]  # name -> forecast ms
    recurrent: np.ndarray  # the recurrent networks' own forecast, ms (the shipped one is ``forecast``)

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

    def ratio(self, source: str) -> np.ndarray:
        """A forecast over the latency threshold, as an alert score: a baseline's name,
        ``forecast`` (the model's point forecast) or ``quantile_<level>`` (a model quantile)."""
        if source == "forecast":
            forecast = self.forecast
        elif source.startswith("quantile_"):
            forecast = self.quantiles[source[len("quantile_") :]]
        else:
            forecast = self.baselines[source]
        return forecast / self.latency_threshold

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

    @cached_property
    def member_metrics(self) -> dict[str, dict]:
        """Each ensemble member's contract metrics on its own point forecast at the latency threshold."""
        members = {name: block for name, block in self.baseline_metrics.items() if name in MEMBERS}
        return {RECURRENT: metrics.forecast_metrics(self.actual, self.recurrent, self.latency_threshold), **members}

    def with_alert_rule(self, rule: AlertRule, services: Sequence[str]) -> "Evaluation":
        """The same forecasts judged by another alert rule (no new predictions)."""
        return dataclasses.replace(self, alert_threshold=rule.thresholds_for(services)[self.service_codes])


def fit_baselines(
    forecaster: Forecaster, prepared: PreparedSeries, train_ends: np.ndarray, baseline_config: BaselineConfig
) -> dict[str, GradientBoostingBaseline]:
    """The baselines that learn, fitted on the training samples ``train_ends`` only
    (persistence needs no fitting). They read the same scaled inputs as the model."""
    fitted = {}
    if "gradient_boosting" in baseline_config.baseline_names:
        fitted["gradient_boosting"] = GradientBoostingBaseline.fit(
            prepared.tensors.inputs.cpu().numpy(),
            prepared.table.target,
            prepared.tensors.service_codes.cpu().numpy(),
            train_ends,
            forecaster.data_config.sequence_length,
            forecaster.data_config.horizon,
            len(forecaster.services),
            forecaster.training_config.seed,
            max_samples=baseline_config.gradient_boosting_max_samples,
        )
    return fitted


def evaluate(forecaster: Forecaster, prepared: PreparedSeries, ends: np.ndarray, members: Forecast | None = None) -> Evaluation:
    """Model and baselines (persistence and the forecaster's fitted ones) on exactly the same
    samples, each service at its own threshold, alerts by the forecaster's alert rule.
    ``members``: these samples' ``forecaster.predict_members`` when the caller has it already."""
    horizon = forecaster.data_config.horizon
    table = prepared.table
    threshold = prepared.latency_threshold(ends)
    forecast = forecaster.predict(prepared, ends) if members is None else forecaster.ship(members)
    baselines = {name: forecast.members[name] for name in ("persistence", WINDOW_MEDIAN, *forecaster.baselines)}
    return Evaluation(
        ends,
        table.service_codes[ends],
        table.minutes[ends] + horizon,
        table.target[ends + horizon].astype(np.float64),
        forecast.ms,
        forecast.quantiles,
        threshold,
        forecaster.alert.scores(forecast, threshold),
        forecaster.alert.thresholds_for(table.services)[table.service_codes[ends]],
        baselines,
        forecast.members[RECURRENT],
    )


def calibrated_evaluation(
    forecaster: Forecaster, prepared: PreparedSeries, ends: np.ndarray, alert_config: AlertConfig, members: Forecast | None = None
) -> tuple[Evaluation, AlertRule]:
    """Evaluate on ``ends`` (never test samples), calibrate the alert rule there, and return that
    evaluation under the calibrated rule, with the rule (the forecaster is not changed)."""
    uncalibrated = AlertRule.uncalibrated(forecaster.model_config, alert_config)
    evaluation = evaluate(dataclasses.replace(forecaster, alert=uncalibrated), prepared, ends, members)
    rule = alerting.calibrate(
        evaluation.score, evaluation.breach, evaluation.service_codes, prepared.table.services, uncalibrated, alert_config
    )
    return evaluation.with_alert_rule(rule, prepared.table.services), rule


def comparisons(validation: Evaluation, rule: AlertRule, alert_config: AlertConfig, horizon: int) -> dict[str, tuple[str, float]]:
    """The alerts the model's is compared with, each a (score source, threshold) chosen on
    validation: persistence at the latency threshold, at the target FPR and at the model's paging
    load (false-alarm episodes per service-day); every other baseline at the latency threshold
    and at the target FPR; the model's other forecasts (point or quantiles) at the target FPR."""
    chosen = {"persistence": ("persistence", 1.0)}

    def at_target(source: str) -> None:
        if alert_config.target_fpr > 0:
            threshold = metrics.calibrate_threshold(validation.ratio(source), validation.breach, alert_config.target_fpr)
            if threshold is not None:
                chosen[f"{source}_at_target_fpr" if source in validation.baselines else f"model_{source}_at_target_fpr"] = (source, threshold)

    at_target("persistence")
    model = metrics.episode_metrics(validation.service_codes, validation.target_minutes, validation.breach, validation.alert, horizon)
    chosen["persistence_at_model_false_alarms"] = (
        "persistence",
        metrics.match_false_alarm_rate(
            validation.service_codes, validation.target_minutes, validation.breach, validation.persistence_score,
            model["false_alarm_episodes_per_service_day"] or 0.0,
        ),
    )
    for name in validation.baselines:
        if name != "persistence":
            chosen[name] = (name, 1.0)
            at_target(name)
    own = _own_source(rule)
    for source in ["forecast", *(f"quantile_{name}" for name in validation.quantiles)]:
        if source != own:
            at_target(source)
    return chosen


def _own_source(rule: AlertRule) -> str | None:
    """The score source (see :meth:`Evaluation.ratio`) the rule alerts on; None for a probability."""
    return "forecast" if rule.score == "forecast_ratio" else f"quantile_{rule.quantile}" if rule.score == "quantile_ratio" else None


def alerting_report(evaluation: Evaluation, horizon: int, compared: dict[str, tuple[str, float]]) -> dict[str, dict]:
    """ROC/PR-AUC and the episode view, for the model (its alert rule) and for each compared
    alert: a score source (see :meth:`Evaluation.ratio`) at a threshold."""
    codes, minutes, breach = evaluation.service_codes, evaluation.target_minutes, evaluation.breach
    report = {
        "model": {
            **metrics.ranking_metrics(evaluation.score, breach),
            **metrics.episode_metrics(codes, minutes, breach, evaluation.alert, horizon),
        }
    }
    rankings: dict[str, dict] = {}
    for label, (source, threshold) in compared.items():
        score = evaluation.ratio(source)
        if source not in rankings:
            rankings[source] = metrics.ranking_metrics(score, breach)
        alert = score >= threshold
        counts = metrics.alert_counts(breach, alert)
        report[label] = {
            "source": source,
            "alert_threshold": threshold,
            **{key: counts[key] for key in ("true_positive_rate", "false_positive_rate", "precision")},
            **rankings[source],
            **metrics.episode_metrics(codes, minutes, breach, alert, horizon),
        }
    return report


def quantile_report(evaluation: Evaluation) -> dict[str, dict]:
    """Per quantile level: its empirical coverage (share of actual latencies at or below it,
    against the nominal level) and its mean pinball loss in ms."""
    report = {}
    for name, forecast in evaluation.quantiles.items():
        level, error = float(name), evaluation.actual - forecast
        report[name] = {
            "nominal": level,
            "coverage": float(np.mean(evaluation.actual <= forecast)) if len(forecast) else None,
            "pinball_loss_ms": float(np.mean(np.maximum(level * error, (level - 1) * error))) if len(forecast) else None,
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
            RECURRENT: metrics.forecast_metrics(evaluation.actual[mine], evaluation.recurrent[mine], threshold),
            **{
                name: metrics.forecast_metrics(evaluation.actual[mine], forecast[mine], threshold)
                for name, forecast in evaluation.baselines.items()
            },
        }
    return result


def alert_thresholds_ms(forecaster: Forecaster, services: Sequence[str]) -> dict[str, float] | None:
    """Per service, the forecast (ms) at which an alert fires (the point forecast, or the quantile
    alerts fire on); None when alerts fire on a probability."""
    if forecaster.alert.score not in ("forecast_ratio", "quantile_ratio"):
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
    compared = comparisons(validation, forecaster.alert, alert_config, horizon)
    return {
        "validation": validation.model_metrics,
        "test": test.model_metrics,
        "baseline": {
            name: {split: evaluations[split].baseline_metrics[name] for split in ("validation", "test")}
            for name in validation.baselines
        },
        "ensemble": {"weights": dict(forecaster.ensemble_weights)},
        "members": {name: {split: evaluations[split].member_metrics[name] for split in ("validation", "test")} for name in validation.member_metrics},
        "quantiles": {split: quantile_report(evaluations[split]) for split in ("validation", "test")},
        "alerting": {
            "operating_point": {
                **forecaster.alert.as_dict(),
                "validation_false_positive_rate": validation.model_metrics["false_positive_rate"],
                "test_false_positive_rate": test.model_metrics["false_positive_rate"],
                "alert_threshold_ms": alert_thresholds_ms(forecaster, services),
            },
            **{split: alerting_report(evaluations[split], horizon, compared) for split in ("validation", "test")},
            # every baseline at exactly the model's test FPR, its threshold set on test itself: thresholds
            # chosen on validation land at different test FPRs on a short store, so only this compares
            # the episodes anticipated at one FPR (a comparison, never an operating point)
            "test_at_model_test_fpr": alerting_report(test, horizon, matched_on_test(test, forecaster.alert)),
        },
        "per_service": {split: per_service(evaluations[split], services) for split in ("validation", "test")},
    }


def matched_on_test(test: Evaluation, rule: AlertRule) -> dict[str, tuple[str, float]]:
    """Each baseline's, and each of the model's other forecasts' (the point forecast or its
    quantiles, whichever the rule does not alert on), (score source, threshold) whose false
    positive rate on ``test`` is at most the model's there (see ``metrics.threshold_at_rate``)."""
    fpr = test.model_metrics["false_positive_rate"]
    if fpr is None:
        return {}
    own = _own_source(rule)
    sources = {name: name for name in test.baselines}
    sources.update({f"model_{source}": source for source in ["forecast", *(f"quantile_{name}" for name in test.quantiles)] if source != own})
    chosen = {}
    for label, source in sources.items():
        threshold = metrics.threshold_at_rate(test.ratio(source), test.breach, fpr)
        if threshold is not None:
            chosen[label] = (source, threshold)
    return chosen


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
                "quantiles": {name: values[near] for name, values in evaluation.quantiles.items()},
                "baselines": {name: values[near] for name, values in evaluation.baselines.items()},
                "persistence": evaluation.persistence[near],
                "latency_threshold": float(evaluation.latency_threshold[near][0]),
                "alert": evaluation.alert[near],
            }
        )
    return panels


def tradeoff_curves(test: Evaluation, alerting_view: dict) -> tuple[dict, dict]:
    """For ``plots.alert_tradeoff``: ROC curves of the model's and each baseline's alert score,
    and the operating points of the model and of each compared alert."""
    curves = {"model": metrics.roc_points(test.score, test.breach)}
    curves.update({name: metrics.roc_points(test.ratio(name), test.breach) for name in test.baselines})
    points = {"model (chosen)": (test.model_metrics["false_positive_rate"], test.model_metrics["true_positive_rate"])}
    for label, view in alerting_view.items():
        if label != "model" and view.get("source") in test.baselines:
            points[label.replace("_", " ")] = (view["false_positive_rate"], view["true_positive_rate"])
    return curves, points
