"""Why a breach was predicted: true-positive events, their per-feature Shapley scores, and scoring
against a chaos manifest (AC@1 / AC@3 of the root-cause feature per injected fault, AC@1 / AC@3 /
Avg@5 of the root-cause service, as root-cause benchmarks report them), beside a rule-based ranking.

Everything here is pure: arrays and dicts in, a report dict out. A minute in this module is the
*forecast* minute t+H (the minute whose latency the alert is about), unless it says otherwise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from latency_forecast import data, explain, metrics
from latency_forecast.background import Background
from latency_forecast.config import TARGET_COLUMN, ExplainConfig
from latency_forecast.data import TimeRange, format_minute
from latency_forecast.errors import UserError
from latency_forecast.evaluation import Evaluation, evaluate
from latency_forecast.forecaster import Forecaster, PreparedSeries
from latency_forecast.graph import CallGraph
from latency_forecast.script_config import CausalityConfig

MANIFEST_KEYS = ("service", "start", "end", "fault")


# ---------------------------------------------------------------------------------------------
# The chaos manifest


@dataclass(frozen=True)
class Fault:
    """One injected fault (contract section 2); ``start`` and ``end`` are minutes since the epoch."""

    service: str
    start: int
    end: int
    fault: str
    root_cause_feature: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "start": format_minute(self.start),
            "end": format_minute(self.end),
            "fault": self.fault,
            "root_cause_feature": self.root_cause_feature,
        }


def parse_manifest(entries: Any, source: str) -> list[Fault]:
    """Validate a chaos manifest (a JSON list of faults); extra keys are ignored."""
    if not isinstance(entries, list):
        raise UserError(f"chaos manifest {source} is not a JSON list of faults; see the contract, section 2")
    faults = []
    for index, entry in enumerate(entries):
        where = f"chaos manifest {source}, fault {index}"
        if not isinstance(entry, dict) or any(key not in entry for key in MANIFEST_KEYS):
            raise UserError(f"{where} is not an object with {', '.join(MANIFEST_KEYS)} and root_cause_feature; fix the manifest")
        root_cause = entry.get("root_cause_feature")
        if root_cause is not None and not isinstance(root_cause, str):
            raise UserError(f"{where}: root_cause_feature must be a column name or null, got {root_cause!r}")
        start = data.to_minute(data.parse_timestamp(str(entry["start"]), f"{where}: start"))
        end = data.to_minute(data.parse_timestamp(str(entry["end"]), f"{where}: end"))
        if end < start:
            raise UserError(f"{where} ends ({entry['end']}) before it starts ({entry['start']}); fix the manifest")
        faults.append(Fault(str(entry["service"]), start, end, str(entry["fault"]), root_cause))
    return faults


# ---------------------------------------------------------------------------------------------
# True-positive events


@dataclass
class Event:
    """Consecutive true-positive minutes of one service; ``position`` indexes its first minute."""

    position: int
    n_minutes: int
    fault: int | None = None  # index into the manifest's faults


def true_positive_events(service_codes: np.ndarray, minutes: np.ndarray, true_positive: np.ndarray) -> list[Event]:
    """Group consecutive true-positive forecast minutes of one service into events.

    The arrays are in row order (service, then minute); a minute that is not a true positive,
    or is missing, ends an event.
    """
    positions = np.flatnonzero(true_positive)
    if not len(positions):
        return []
    codes, stamps = service_codes[positions], minutes[positions]
    starts = np.flatnonzero(np.concatenate(([True], (codes[1:] != codes[:-1]) | (np.diff(stamps) != 1))))
    lengths = np.diff(np.append(starts, len(positions)))
    return [Event(int(positions[first]), int(length)) for first, length in zip(starts, lengths)]


def fault_of(service: str, minute: int, faults: Sequence[Fault], horizon: int) -> int | None:
    """Index of the fault whose span [start, end + H] on ``service`` holds ``minute`` (the latest one)."""
    found = None
    for index, fault in enumerate(faults):
        if fault.service == service and fault.start <= minute <= fault.end + horizon:
            if found is None or fault.start >= faults[found].start:
                found = index
    return found


# ---------------------------------------------------------------------------------------------
# Scoring against the manifest


@dataclass
class FaultCase:
    """How one fault is scored: unscorable (with the reason), or the forecast that is explained."""

    fault: Fault
    reason: str | None = None
    detected: bool = False
    position: int | None = None  # index into the evaluated samples of the explained forecast
    ranking: list[str] = field(default_factory=list)
    rule_ranking: list[str] = field(default_factory=list)  # the rule-based baseline's, same forecast minute

    @property
    def scorable(self) -> bool:
        return self.reason is None


def match_faults(
    faults: Sequence[Fault],
    forecasts: Evaluation,
    services: Sequence[str],
    model_services: Sequence[str],
    rankable: Sequence[str],
    horizon: int,
) -> list[FaultCase]:
    """Decide, per fault, whether it can be scored and which forecast explains it.

    A fault is scorable when its root cause is a rankable model input and its service has
    forecasts for minutes in [start, end + H]. It is *detected* when one of them is a true
    positive; the explained forecast is the first true positive, else the highest forecast.

    Parameters
    ----------
    services : the table's service names (``forecasts.service_codes`` index them)
    model_services : services the model was trained on
    rankable : the model's inputs that may be named as a cause (never the latency itself)
    """
    cases = []
    for fault in faults:
        case = FaultCase(fault)
        cause = fault.root_cause_feature
        if cause is None:
            case.reason = "the manifest names no root-cause feature (a fault without a metric signal)"
        elif cause == TARGET_COLUMN:
            case.reason = f"the root cause is {TARGET_COLUMN} itself, which is never ranked as a cause"
        elif cause not in rankable:
            case.reason = f"root cause {cause!r} is not an input of the model (inputs that can be causes: {', '.join(rankable)})"
        elif fault.service not in model_services:
            case.reason = f"service {fault.service!r} was not in the model's training data, so it is not forecast"
        else:
            code = list(services).index(fault.service) if fault.service in services else -1
            mine = np.flatnonzero(
                (forecasts.service_codes == code)
                & (forecasts.target_minutes >= fault.start)
                & (forecasts.target_minutes <= fault.end + horizon)
            )
            if not len(mine):
                case.reason = (
                    f"no complete window of {fault.service} forecasts a minute of the fault's span "
                    f"[start, end + {horizon} min] (gaps, NaNs or the edge of the analysed range)"
                )
            else:
                hits = mine[forecasts.true_positive[mine]]
                case.detected = bool(len(hits))
                case.position = int(hits[0]) if len(hits) else int(mine[np.argmax(forecasts.forecast[mine])])
        cases.append(case)
    return cases


def rank_features(scores: np.ndarray, feature_columns: Sequence[str]) -> list[str]:
    """Causes by descending Shapley value (the push towards the spike); never the latency itself."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [feature_columns[i] for i in order if feature_columns[i] != TARGET_COLUMN]


def _accuracy(cases: Sequence[FaultCase], rankings: str = "ranking") -> dict[str, Any]:
    cause = [case.fault.root_cause_feature for case in cases]
    ranked = [getattr(case, rankings) for case in cases]
    top1 = sum(ranking[:1] == [c] for ranking, c in zip(ranked, cause))
    top3 = sum(c in ranking[:3] for ranking, c in zip(ranked, cause))
    return {"n_faults": len(cases), "top1_accuracy": metrics.rate(top1, len(cases)), "top3_accuracy": metrics.rate(top3, len(cases))}


def _scores(cases: Sequence[FaultCase]) -> dict[str, Any]:
    scorable = [case for case in cases if case.scorable]
    detected = [case for case in scorable if case.detected]
    return {
        **_accuracy(scorable),
        "detection_rate": metrics.rate(len(detected), len(scorable)),
        "detected": _accuracy(detected),
        "n_unscorable": len(cases) - len(scorable),
    }


def validation_summary(cases: Sequence[FaultCase], forecasts: Evaluation, n_rankable: int, n_outside: int) -> dict[str, Any]:
    """The report's ``validation`` block: AC@1/AC@3 over scorable and detected faults, the
    detection rate, the random baseline, per fault type, and every fault's outcome."""
    by_type: dict[str, list[FaultCase]] = {}
    for case in cases:
        by_type.setdefault(case.fault.fault, []).append(case)
    faults = []
    for case in cases:
        if not case.scorable:
            continue
        cause, position = case.fault.root_cause_feature, case.position
        faults.append(
            {
                **case.fault.as_dict(),
                "detected": case.detected,
                "explained_minute": format_minute(forecasts.target_minutes[position]),
                "predicted": float(forecasts.forecast[position]),
                "actual": float(forecasts.actual[position]),
                "top_feature": case.ranking[0] if case.ranking else None,
                "top3": case.ranking[:3],
                "hit_at_1": case.ranking[:1] == [cause],
                "hit_at_3": cause in case.ranking[:3],
                "rule_top3": case.rule_ranking[:3],
            }
        )
    scorable = [case for case in cases if case.scorable]
    return {
        **_scores(cases),
        "rule_baseline": {
            **_accuracy(scorable, "rule_ranking"),
            "detected": _accuracy([case for case in scorable if case.detected], "rule_ranking"),
        },
        "random_top1": metrics.rate(1, n_rankable),
        "random_top3": metrics.rate(min(3, n_rankable), n_rankable),
        "by_fault": {name: _scores(group) for name, group in sorted(by_type.items())},
        "faults": faults,
        "unscorable": [{**case.fault.as_dict(), "reason": case.reason} for case in cases if not case.scorable],
        "n_outside_range": n_outside,
    }


# ---------------------------------------------------------------------------------------------
# The whole analysis


@dataclass
class Analysis:
    report: dict[str, Any]
    figure_events: list[dict[str, Any]]  # per explained event: label, scores, cause (for the plot)


def forecasts_in(forecaster: Forecaster, prepared: PreparedSeries, time_range: TimeRange) -> Evaluation:
    """Forecast, alert and breach (the checkpoint's alert rule and thresholds) for every sample
    whose forecast minute t+H lies in the range."""
    target_minutes = prepared.table.minutes[prepared.ends] + forecaster.data_config.horizon
    return evaluate(forecaster, prepared, prepared.ends[(target_minutes >= time_range.start) & (target_minutes < time_range.end)])


def analyze(
    forecaster: Forecaster,
    prepared: PreparedSeries,
    time_range: TimeRange,
    background: Background,
    faults: Sequence[Fault] | None,
    config: CausalityConfig,
    explain_config: ExplainConfig,
    seed: int = 0,
    call_graph: CallGraph | None = None,
) -> Analysis:
    """Find true-positive events in ``time_range``, explain them, and score the manifest's faults
    (root-cause feature and service), beside the rule-based baseline; ``call_graph`` (optional)
    informs the model's service ranking.

    Raises
    ------
    UserError : when the range holds no complete window to forecast, or none of the given faults.
    """
    horizon = forecaster.data_config.horizon
    table = prepared.table
    forecasts = _forecasts_to_analyze(forecaster, prepared, time_range)
    rankable = [name for name in forecaster.feature_columns if name != TARGET_COLUMN]
    inside = _faults_in_range(faults, time_range, horizon)
    events = true_positive_events(forecasts.service_codes, forecasts.target_minutes, forecasts.true_positive)
    for event in events:
        event.fault = fault_of(table.services[forecasts.service_codes[event.position]], int(forecasts.target_minutes[event.position]), inside, horizon)
    chosen = _chosen_events(events, forecasts, config)
    cases = match_faults(inside, forecasts, table.services, forecaster.services, rankable, horizon)

    positions = sorted({e.position for e in chosen} | {c.position for c in cases if c.position is not None})
    explained: dict[int, int] = {position: i for i, position in enumerate(positions)}
    ends = forecasts.ends[positions] if positions else np.zeros(0, dtype=np.int64)
    attributions = explain.explain(forecaster, prepared.tensors, ends, background, explain_config, seed)
    rankings = {p: rank_features(attributions.values[i], forecaster.feature_columns) for p, i in explained.items()}
    baseline = RuleBaseline(table, prepared.tensors.inputs, forecaster.feature_columns)
    for case in cases:
        if case.position is not None:
            case.ranking = rankings[case.position]
            alert_minute = int(forecasts.target_minutes[case.position]) - horizon
            case.rule_ranking = baseline.rank_features(int(forecasts.service_codes[case.position]), alert_minute)

    report_events, figure_events = _describe_events(
        chosen, forecasts, table.services, inside, attributions, explained, rankings, forecaster.feature_columns, horizon
    )
    ranker = ServiceRanker(forecasts, table.services, forecaster.services, horizon, call_graph)
    for event, described in zip(chosen, report_events):  # where each predicted spike came from
        described["root_cause_services"] = ranker.rank(int(forecasts.target_minutes[event.position]) - horizon)[:3]
    report = _analysis_report(forecaster, time_range, forecasts, attributions.method, events, config.event_order, report_events)
    if faults is not None:
        report["validation"] = validation_summary(cases, forecasts, len(rankable), len(faults) - len(inside))
        report["validation"]["service_level"] = service_level_summary(
            inside, forecasts, table.services, ranker, baseline, horizon
        )
    return Analysis(report, figure_events)


def _forecasts_to_analyze(forecaster: Forecaster, prepared: PreparedSeries, time_range: TimeRange) -> Evaluation:
    """:func:`forecasts_in`, or a user error when the range holds no complete window to forecast."""
    settings = forecaster.data_config
    forecasts = forecasts_in(forecaster, prepared, time_range)
    if not len(forecasts):
        raise UserError(
            f"no complete window forecasts a minute between {format_minute(time_range.start)} and "
            f"{format_minute(time_range.end)}: each needs {settings.sequence_length} minutes of finite inputs and a "
            f"finite latency {settings.horizon} minutes later; widen --start-ts/--end-ts"
        )
    return forecasts


def _faults_in_range(faults: Sequence[Fault] | None, time_range: TimeRange, horizon: int) -> list[Fault]:
    """The faults whose span [start, end + H] meets the range; a user error when faults are given
    but none does."""
    inside = [f for f in faults or [] if f.start < time_range.end and f.end + horizon >= time_range.start]
    if faults and not inside:  # nothing to score: the manifest of another run, or the wrong range
        raise UserError(
            f"none of the {len(faults)} faults of the chaos manifest falls in the analysed window "
            f"{format_minute(time_range.start)} to {format_minute(time_range.end)}; pass the manifest of the chaos run "
            "this store holds, or widen --start-ts/--end-ts"
        )
    return inside


def _chosen_events(events: Sequence[Event], forecasts: Evaluation, config: CausalityConfig) -> list[Event]:
    """The events to explain: at most ``max_samples``, the earliest or the highest predicted first."""
    if config.event_order == "predicted":
        chosen = sorted(events, key=lambda e: (-forecasts.forecast[e.position], forecasts.target_minutes[e.position]))
    else:
        chosen = sorted(events, key=lambda e: (forecasts.target_minutes[e.position], e.position))
    return chosen[: config.max_samples]


def _describe_events(
    chosen: Sequence[Event],
    forecasts: Evaluation,
    services: Sequence[str],
    inside: Sequence[Fault],
    attributions: explain.Attributions,
    explained: dict[int, int],
    rankings: dict[int, list[str]],
    feature_columns: Sequence[str],
    horizon: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The report's ``events`` and the figure's, one each per chosen event (``explained`` maps a
    forecast position to its row of ``attributions``)."""
    report_events, figure_events = [], []
    for event in chosen:
        i, position = explained[event.position], event.position
        fault = inside[event.fault] if event.fault is not None else None
        service = services[forecasts.service_codes[position]]
        scores = dict(zip(feature_columns, attributions.values[i].tolist()))
        report_events.append(
            {
                "service": service,
                "timestamp": format_minute(forecasts.target_minutes[position]),
                "alert_timestamp": format_minute(forecasts.target_minutes[position] - horizon),
                "minutes": event.n_minutes,
                "predicted": float(forecasts.forecast[position]),
                "actual": float(forecasts.actual[position]),
                "base_value": float(attributions.base_values[i]),
                "explained_forecast": float(attributions.outputs[i]),  # = base_value + sum(scores)
                "top_feature": rankings[position][0] if rankings[position] else None,
                "top3": rankings[position][:3],
                "scores": scores,
                "fault": fault.as_dict() if fault else None,
            }
        )
        figure_events.append(
            {
                "label": f"{service}\n{format_minute(forecasts.target_minutes[position])[5:16].replace('T', ' ')}",
                "scores": scores,
                "cause": fault.root_cause_feature if fault else None,
                "fault": fault.fault if fault else None,
            }
        )
    return report_events, figure_events


def _analysis_report(
    forecaster: Forecaster,
    time_range: TimeRange,
    forecasts: Evaluation,
    method: str,
    events: Sequence[Event],
    event_order: str,
    report_events: list[dict[str, Any]],
) -> dict[str, Any]:
    """The causality report without its ``validation`` block."""
    settings = forecaster.data_config
    n_tp = int(forecasts.true_positive.sum())
    report: dict[str, Any] = {
        "window": time_range.as_dict(),
        "model": {
            "feature_columns": list(forecaster.feature_columns),
            "sequence_length": settings.sequence_length,
            "horizon": settings.horizon,
            "latency_thresholds": forecaster.latency_thresholds.as_dict(),
            "alert": forecaster.alert.as_dict(),
        },
        "method": method,
        "n_samples": len(forecasts),
        "n_true_positives": n_tp,
        "n_events": len(events),
        "event_order": event_order,
        "events": report_events,
    }
    if not events:
        report["message"] = (
            f"no true positive in the range: no forecast minute both alerted and breached its service's "
            f"latency threshold ({int(forecasts.alert.sum())} alerts, {int(forecasts.breach.sum())} breaches "
            f"in {len(forecasts):,} forecasts), so there is no predicted spike to explain"
        )
    return report


# ---------------------------------------------------------------------------------------------
# Service-level scoring, and the rule-based baseline beside the model

TRAILING_MINUTES = 60  # the normal a change is judged against
RECENT_MINUTES = 5  # the minutes up to the event whose mean is judged
ANOMALY_Z = 3.0  # robust z from which a service's forecast counts as anomalous (the call-graph rule)
MIN_LOG_SPREAD = 0.05  # floor of a spread of log latency: a 5% wobble is noise, however flat the normal
MIN_SCALED_SPREAD = 0.05  # floor of a spread of a model input, in training standard deviations
_MAD_TO_SD = 1.4826  # median absolute deviation to standard deviation, for normal noise
_MEAN_AD_TO_SD = 1.2533  # mean absolute deviation to standard deviation (sqrt(pi / 2))


def robust_z(recent: np.ndarray, trailing: np.ndarray, floor: float) -> np.ndarray:
    """Per column, (mean of ``recent`` - median of ``trailing``) / the spread of ``trailing``:
    max(1.4826 MAD, 1.2533 mean absolute deviation from the median, ``floor``); NaN ignored, NaN
    where either window has no finite value.

    recent : (n_recent, n_columns); trailing : (n_trailing, n_columns)
    """
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN or empty columns give NaN, as meant
        median = np.nanmedian(trailing, axis=0) if len(trailing) else np.full(trailing.shape[1], np.nan)
        deviation = np.abs(trailing - median)
        # the mean absolute deviation backs the MAD up: a count that is mostly 0 (a queue) has MAD 0
        spread = np.maximum(_MAD_TO_SD * np.nanmedian(deviation, axis=0), _MEAN_AD_TO_SD * np.nanmean(deviation, axis=0)) if len(trailing) else median
        mean = np.nanmean(recent, axis=0) if len(recent) else np.full(recent.shape[1], np.nan)
        return (mean - median) / np.maximum(spread, floor)


def service_accuracy(rankings: Sequence[Sequence[str]], truths: Sequence[str]) -> dict[str, Any]:
    """AC@1, AC@3 and Avg@5 (the mean of AC@1 ... AC@5) of ranked services, as RCAEval scores them:
    AC@k is the share of faults whose true root service is among the first k ranked."""
    n = len(truths)
    at_k = [metrics.rate(sum(truth in list(ranking[:k]) for ranking, truth in zip(rankings, truths)), n) for k in range(1, 6)]
    return {
        "n_faults": n,
        "top1_accuracy": at_k[0],
        "top3_accuracy": at_k[2],
        "avg5": float(np.mean(at_k)) if n else None,
    }


def rank_services(scores: dict[str, float], call_graph: CallGraph | None = None) -> list[str]:
    """Services by descending score (NaN: not ranked). With a call graph, the anomalous services
    (score >= ``ANOMALY_Z``) none of whose callees is anomalous come first: a fault spreads to
    the callers, so the deepest anomalous callee is the likeliest root."""
    scored = {name: float(score) for name, score in scores.items() if np.isfinite(score)}
    order = sorted(scored, key=lambda name: (-scored[name], name))
    if call_graph is None:
        return order
    anomalous = {name for name in order if scored[name] >= ANOMALY_Z}
    deepest = [name for name in order if name in anomalous and not any(c in anomalous for c in call_graph.callees(name))]
    return deepest + [name for name in order if name not in deepest]


class _Rows:
    """Rows of arrays sorted by (code, minute): those of one code within a range of minutes."""

    def __init__(self, codes: np.ndarray, minutes: np.ndarray, n_codes: int):
        self.bounds = np.searchsorted(codes, np.arange(n_codes + 1))
        self.minutes = minutes

    def between(self, code: int, first: int, last: int) -> slice:
        low, high = int(self.bounds[code]), int(self.bounds[code + 1])
        block = self.minutes[low:high]
        return slice(low + int(np.searchsorted(block, first)), low + int(np.searchsorted(block, last, side="right")))

    def recent_and_trailing(self, code: int, minute: int) -> tuple[slice, slice]:
        """The ``RECENT_MINUTES`` up to ``minute`` and the ``TRAILING_MINUTES`` before them."""
        return (
            self.between(code, minute - RECENT_MINUTES + 1, minute),
            self.between(code, minute - RECENT_MINUTES - TRAILING_MINUTES + 1, minute - RECENT_MINUTES),
        )


def _log_ms(values: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-3))


class RuleBaseline:
    """The rule-based ranking: each service's and feature's robust z of its change before the
    event (the mean of the last ``RECENT_MINUTES`` against the median and spread of the
    ``TRAILING_MINUTES`` before them, :func:`robust_z`), on the telemetry as the model reads it (its inputs after
    the model's scaler, so spreads are in training standard deviations) and the log latency.
    A service scores its largest absolute z, the latency's included; features are ranked by
    their absolute z, never the latency itself. No model and no call graph involved."""

    def __init__(self, table: data.SeriesTable, inputs: Any, feature_columns: Sequence[str]):
        """``inputs``: (n_rows, n_features) the table's rows as the model reads them (a tensor on
        any device, or an array), columns ``feature_columns``."""
        self.table = table
        self.inputs = inputs
        self.columns = [i for i, name in enumerate(feature_columns) if name != TARGET_COLUMN]
        self.names = [feature_columns[i] for i in self.columns]
        self.rows = _Rows(table.service_codes, table.minutes, len(table.services))

    def _features(self, rows: slice) -> np.ndarray:
        block = self.inputs[rows]
        block = block.float().cpu().numpy() if hasattr(block, "cpu") else np.asarray(block)
        return block[:, self.columns].astype(np.float64)

    def z(self, code: int, minute: int) -> tuple[np.ndarray, float]:
        """(n_rankable,) robust z of each feature, and the log latency's, of service ``code`` (a
        table code) at ``minute``, a minute of data (an alert minute t, not t+H)."""
        recent, trailing = self.rows.recent_and_trailing(code, minute)
        feature_z = robust_z(self._features(recent), self._features(trailing), MIN_SCALED_SPREAD)
        target = self.table.target
        latency_z = robust_z(_log_ms(target[recent])[:, None], _log_ms(target[trailing])[:, None], MIN_LOG_SPREAD)[0]
        return feature_z, float(latency_z)

    def service_score(self, code: int, minute: int) -> float:
        feature_z, latency_z = self.z(code, minute)
        values = np.abs(np.append(feature_z, latency_z))
        return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")

    def rank_features(self, code: int, minute: int) -> list[str]:
        feature_z = np.abs(self.z(code, minute)[0])
        order = np.argsort(-np.nan_to_num(feature_z, nan=-1.0), kind="stable")
        return [self.names[i] for i in order if np.isfinite(feature_z[i])]


def model_service_scores(log_forecast: np.ndarray, rows: _Rows, codes: Sequence[int], minute: int) -> np.ndarray:
    """Per service code, the robust z of the model's log forecast (``log_forecast``, per evaluated
    sample) over the ``RECENT_MINUTES`` of alerts up to ``minute`` against the ``TRAILING_MINUTES``
    before them: how far the forecast left that service's normal. NaN where a service has no
    forecast in either window.

    ``rows`` indexes the samples by (service code, alert minute t = forecast minute - H).
    """
    scores = np.full(len(codes), np.nan)
    for i, code in enumerate(codes):
        recent, trailing = rows.recent_and_trailing(code, minute)
        scores[i] = robust_z(log_forecast[recent][:, None], log_forecast[trailing][:, None], MIN_LOG_SPREAD)[0]
    return scores


def event_minute(fault: Fault, forecasts: Evaluation, horizon: int) -> tuple[int, bool]:
    """The minute of data at which a fault's services are ranked, and whether the model detected
    it: the alert minute t of the earliest true positive (of any service) that forecasts a minute
    of [start, end + H]; without one, the fault's last minute."""
    hits = (forecasts.target_minutes >= fault.start) & (forecasts.target_minutes <= fault.end + horizon) & forecasts.true_positive
    if hits.any():
        return int(forecasts.target_minutes[hits].min()) - horizon, True
    return fault.end, False


class ServiceRanker:
    """The model's ranking of root-cause services at a minute of data: the services the model
    forecasts, by how far their forecast left its normal (:func:`model_service_scores`), the
    deepest anomalous callee first when there is a call graph (:func:`rank_services`)."""

    def __init__(self, forecasts: Evaluation, services: Sequence[str], model_services: Sequence[str], horizon: int, call_graph: CallGraph | None):
        forecast_services = set(model_services)
        self.codes = [code for code, name in enumerate(services) if name in forecast_services]
        self.names = [services[code] for code in self.codes]
        self.rows = _Rows(forecasts.service_codes, forecasts.target_minutes - horizon, len(services))
        self.log_forecast = _log_ms(forecasts.forecast)  # once, not per fault or event
        self.call_graph = call_graph

    def rank(self, minute: int) -> list[str]:
        scores = model_service_scores(self.log_forecast, self.rows, self.codes, minute)
        return rank_services(dict(zip(self.names, scores)), self.call_graph)


def service_level_summary(
    faults: Sequence[Fault],
    forecasts: Evaluation,
    services: Sequence[str],
    ranker: ServiceRanker,
    baseline: RuleBaseline,
    horizon: int,
) -> dict[str, Any]:
    """The report's ``validation.service_level`` block: AC@1, AC@3 and Avg@5 of the root-cause
    service over every fault, for the model and the rule-based baseline on the same events.

    The model ranks the services the model forecasts by how far their forecast left its normal
    (:func:`model_service_scores`), the deepest anomalous callee first when there is a call graph
    (:func:`rank_services`); the baseline by :class:`RuleBaseline`'s service score.
    """
    candidates = ranker.codes
    outcomes, model_rankings, rule_rankings = [], [], []
    for fault in faults:
        minute, detected = event_minute(fault, forecasts, horizon)
        model = ranker.rank(minute)
        rule = rank_services({services[code]: baseline.service_score(code, minute) for code in candidates})
        model_rankings.append(model)
        rule_rankings.append(rule)
        outcomes.append(
            {
                **fault.as_dict(),
                "ranked_at": format_minute(minute),
                "detected": detected,
                "top5": model[:5],
                "rank": model.index(fault.service) + 1 if fault.service in model else None,
                "rule_top5": rule[:5],
                "rule_rank": rule.index(fault.service) + 1 if fault.service in rule else None,
            }
        )
    truths = [fault.service for fault in faults]
    n = len(candidates)
    return {
        **service_accuracy(model_rankings, truths),
        "random_top1": metrics.rate(1, n),
        "random_top3": metrics.rate(min(3, n), n),
        "n_services": n,
        "call_graph_edges": len(ranker.call_graph.edges) if ranker.call_graph is not None else None,
        "rule_baseline": service_accuracy(rule_rankings, truths),
        "faults": outcomes,
    }
