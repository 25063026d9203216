"""When an alert fires: per-service latency thresholds (and their file), the alert rule and its
score, and the rule's calibration to a target false positive rate on validation samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from latency_forecast import metrics
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig, quantile_name
from latency_forecast.errors import UserError

if TYPE_CHECKING:  # the forecaster holds an AlertRule: import for annotations only
    from latency_forecast.forecaster import Forecast

# Per-service calibration needs enough validation negatives for the target rate to mean
# something: at least this many allowed false alarms, else the service uses the global threshold.
MIN_ALLOWED_FALSE_ALARMS = 10


@dataclass
class LatencyThresholds:
    """Breach threshold (ms) per service: one default, overridden per service name."""

    default: float
    per_service: dict[str, float] = field(default_factory=dict)

    def for_services(self, services: Sequence[str]) -> np.ndarray:
        """(len(services),) float64 thresholds in the given order."""
        return np.array([self.per_service.get(name, self.default) for name in services], dtype=np.float64)

    def as_dict(self) -> dict[str, Any]:
        return {"default": self.default, "per_service": dict(self.per_service)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LatencyThresholds":
        return cls(float(values["default"]), {str(k): float(v) for k, v in values.get("per_service", {}).items()})


def read_latency_thresholds(data_config: DataConfig) -> LatencyThresholds:
    """The thresholds of a run: ``--latency-threshold``, overridden by ``--latency-thresholds FILE``."""
    path = data_config.latency_thresholds
    if path is None:
        return LatencyThresholds(data_config.latency_threshold)
    try:
        with open(path) as stream:
            text = stream.read()
    except OSError as error:
        raise UserError(f"cannot read --latency-thresholds {path}: {error.strerror}; pass a JSON or YAML file") from error
    import yaml  # YAML is a superset of JSON: one parser reads both

    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"--latency-thresholds {path} is not valid JSON or YAML; write a mapping of service -> ms") from error
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"--latency-thresholds {path} must map service names to milliseconds, e.g. {{default: 500, cache: 50}}")
    values: dict[str, float] = {}
    for name, value in mapping.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"--latency-thresholds {path}: {name!r} must be a positive number of milliseconds, got {value!r}")
        values[str(name)] = float(value)
    default = values.pop("default", data_config.latency_threshold)
    return LatencyThresholds(default, values)


@dataclass
class AlertRule:
    """When an alert fires: ``score >= threshold`` (per service where calibrated per service).

    The score is the forecast divided by the service's latency threshold (``forecast_ratio``),
    or a quantile forecast divided by it (``quantile_ratio``, the upper bound crossing the SLO),
    so threshold 1.0 is the uncalibrated rule "the forecast reaches the threshold"; for a
    multitask model it is the predicted breach probability (``probability``, uncalibrated 0.5).
    ``validation_negatives`` is how many non-breach samples the calibration had.
    """

    score: str = "forecast_ratio"
    threshold: float = 1.0
    per_service: dict[str, float] = field(default_factory=dict)
    target_fpr: float | None = None
    quantile: str | None = None  # the quantile level a quantile_ratio score divides
    validation_negatives: int | None = None

    def thresholds_for(self, services: Sequence[str]) -> np.ndarray:
        return np.array([self.per_service.get(name, self.threshold) for name in services], dtype=np.float64)

    def scores(self, forecast: Forecast, latency_threshold: np.ndarray) -> np.ndarray:
        """The number this rule thresholds, for each forecast sample."""
        if self.score == "probability":
            if forecast.probability is None:
                raise UserError("this checkpoint alerts on a breach probability but has no breach head; retrain it")
            return forecast.probability.astype(np.float64)
        if self.score == "quantile_ratio":
            return forecast.quantiles[self.quantile] / latency_threshold
        return forecast.ms / latency_threshold

    @property
    def negatives_needed(self) -> int | None:
        """Non-breach validation samples a target FPR needs to mean something: enough for
        ``MIN_ALLOWED_FALSE_ALARMS`` allowed false alarms."""
        return None if not self.target_fpr else int(np.ceil(MIN_ALLOWED_FALSE_ALARMS / self.target_fpr))

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": self.threshold,
            "per_service": dict(self.per_service),
            "target_fpr": self.target_fpr,
            "quantile": self.quantile,
            "validation_negatives": self.validation_negatives,
            "negatives_needed": self.negatives_needed,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AlertRule":
        return cls(
            values["score"],
            float(values["threshold"]),
            dict(values.get("per_service", {})),
            values.get("target_fpr"),
            values.get("quantile"),
            values.get("validation_negatives"),
        )

    @classmethod
    def uncalibrated(cls, model_config: ModelConfig, alert_config: AlertConfig | None = None) -> "AlertRule":
        """The rule before calibration: the breach probability of a multitask model at 0.5, else
        the forecast (or the ``--alert-on`` quantile) reaching the latency threshold.

        ``--alert-on auto`` takes the model's highest quantile above the median, its upper bound:
        on TrainTicket, thresholded on validation to the same FPR, the 0.9 quantile anticipated more
        breach episodes than the point forecast in 12 of 14 runs, and as many (or one fewer) with
        fewer false alarms on the synthetic stores (docs/results.md)."""
        if model_config.multitask:
            return cls("probability", 0.5)
        choice = "forecast" if alert_config is None else alert_config.alert_on
        if choice == "auto":
            upper = [level for level in model_config.quantile_levels if level > 0.5]
            return cls("quantile_ratio", 1.0, quantile=quantile_name(max(upper))) if upper else cls()
        if choice == "forecast":
            return cls()
        name = quantile_name(float(choice))
        if name not in model_config.quantile_names:
            raise UserError(
                f"--alert-on {choice} is not one of the model's --quantiles ({model_config.quantiles}); "
                "add it there or alert on forecast"
            )
        return cls("quantile_ratio", 1.0, quantile=name)


def calibrate(
    score: np.ndarray,
    breach: np.ndarray,
    service_codes: np.ndarray,
    services: Sequence[str],
    uncalibrated: AlertRule,
    alert_config: AlertConfig,
) -> AlertRule:
    """The alert rule for validation samples' scores: as few false alarms as --target-fpr allows.

    The most sensitive threshold whose false positive rate on new samples is at most
    ``target_fpr`` (a conformal quantile of the validation negatives' scores, see
    :func:`metrics.calibrate_threshold`); per service when asked and the service has enough
    negatives (``services[code]`` names ``service_codes``). With ``target_fpr`` 0 the
    uncalibrated rule is kept.
    """
    target = alert_config.target_fpr
    if target <= 0:
        return uncalibrated
    threshold = metrics.calibrate_threshold(score, breach, target)
    rule = dataclasses.replace(
        uncalibrated,
        threshold=uncalibrated.threshold if threshold is None else threshold,
        per_service={},
        target_fpr=target,
        validation_negatives=int(np.sum(~breach)),
    )
    if alert_config.calibrate_per_service:
        for code in np.unique(service_codes):
            mine = service_codes == code
            negatives = int(np.sum(mine & ~breach))
            if negatives * target >= MIN_ALLOWED_FALSE_ALARMS:
                rule.per_service[services[code]] = metrics.calibrate_threshold(score[mine], breach[mine], target)
    return rule
