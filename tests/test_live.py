"""live.forecast_report on small real stores: an ``ok`` forecast is the model's forecast of the
window ending at the newest minute (``--at``), which needs no latency after it; each status at
its boundary (staleness, a gap in the window, a service missing, stale elsewhere or unknown); the
alert decision at its thresholds; causes only for the alerting services, from their own windows.
forecast.py around it is tested in tests/test_forecast_cli.py."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest

from latency_forecast import background, explain, live
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.config import TARGET_COLUMN, ExplainConfig
from latency_forecast.data import SeriesTable, format_minute, timestamp_of
from latency_forecast.errors import UserError
from latency_forecast.forecaster import Forecaster
from tests.helpers import HORIZON, SEQUENCE_LENGTH, Fitted, table_of

STALENESS = 5  # forecast.py's default; below L, so one bad minute can spoil every window within it
EXPLAINED = ExplainConfig(max_exact_features=4, coalition_samples=64)  # sampled, seeded: fast
HISTORY = 60  # minutes of the store each report reads (forecast.py reads L + staleness)
_names = itertools.count()  # of the one-file stores a test writes


@pytest.fixture(scope="module")
def trained(tiny_fit: Fitted) -> Forecaster:
    """The tiny forecaster (anchored on the latency's history, with a cause model), alerting when
    its point forecast reaches the 300 ms latency threshold, with a small explanation background."""
    forecaster = tiny_fit.forecaster
    summary = background.build_background(tiny_fit.prepared.tensors, tiny_fit.ends["train"], len(forecaster.services), 4, seed=0, pool=200)
    return dataclasses.replace(forecaster, alert=AlertRule(), background=summary)


@pytest.fixture(scope="module")
def at(tiny_fit: Fitted) -> int:
    """The last minute at which every service has a complete window with finite values ending at
    it and at each of the 2 L minutes before it (so each test below spoils only what it means to)."""
    table, ends = tiny_fit.prepared.table, tiny_fit.prepared.ends
    per_service = [set(table.minutes[ends[table.service_codes[ends] == code]].tolist()) for code in range(len(table.services))]
    complete = set.intersection(*per_service)
    return max(m for m in complete if all(m - k in complete for k in range(2 * SEQUENCE_LENGTH + 1)))


@pytest.fixture(scope="module")
def frame(tiny_frame) -> pd.DataFrame:
    return tiny_frame[0]


def _recent(frame: pd.DataFrame, at: int, history: int = HISTORY) -> pd.DataFrame:
    """The store's rows of the ``history`` minutes up to ``at``, as forecast.py reads them: none after."""
    stamps = frame["timestamp"]
    return frame[(stamps > timestamp_of(at - history)) & (stamps <= timestamp_of(at))].copy()


def _table(forecaster: Forecaster, frame: pd.DataFrame, directory) -> SeriesTable:
    """``frame`` as a one-file store, read back with the forecaster's columns."""
    return table_of(frame, directory, f"{next(_names)}.parquet", forecaster.feature_columns)


def _report(forecaster: Forecaster, frame: pd.DataFrame, at: int, directory, newest_elsewhere=None) -> dict:
    table = _table(forecaster, frame, directory)
    return live.forecast_report(forecaster, table, at, STALENESS, newest_elsewhere or {}, EXPLAINED)


def _by_service(report: dict) -> dict[str, dict]:
    return {entry["service"]: entry for entry in report["forecasts"]}


def _model_forecasts(forecaster: Forecaster, frame: pd.DataFrame, as_of: dict[str, int], directory) -> dict[str, tuple]:
    """Per service: the forecast (ms), current latency and quantile forecasts of the window ending
    at its ``as_of`` minute, predicted from the whole store (the rows after it included), as
    evaluation predicts them."""
    table = _table(forecaster, frame, directory)
    prepared = forecaster.prepare(table)
    rows = np.array([
        np.flatnonzero((table.service_codes == table.services.index(name)) & (table.minutes == minute))[0]
        for name, minute in as_of.items()
    ])
    forecast = forecaster.predict(prepared, rows)
    return {
        name: (forecast.ms[i], table.target[row], {level: values[i] for level, values in forecast.quantiles.items()})
        for i, (name, row) in enumerate(zip(as_of, rows))
    }


def test_an_ok_forecast_is_the_models_forecast_of_the_window_ending_at_the_newest_minute(trained, frame, at, tmp_path):
    recent = _recent(frame, at)
    report = _report(trained, recent, at, tmp_path)
    assert {key: report[key] for key in ("as_of", "horizon", "sequence_length", "max_staleness_minutes")} == {
        "as_of": format_minute(at), "horizon": HORIZON, "sequence_length": SEQUENCE_LENGTH, "max_staleness_minutes": STALENESS,
    }
    assert report["alert_rule"] == trained.alert.as_dict()
    entries = _by_service(report)
    assert list(entries) == sorted(trained.services)
    alerts = sum(entry["alert"] for entry in entries.values())
    assert report["summary"] == {"ok": 4, "stale": 0, "gap": 0, "unknown_service": 0, "missing": 0, "alerts": alerts}
    expected = _model_forecasts(trained, frame, {name: at for name in trained.services}, tmp_path)
    for name, entry in entries.items():
        forecast, current, quantiles = expected[name]
        assert entry["status"] == "ok"
        assert entry["as_of"] == format_minute(at) and entry["target_time"] == format_minute(at + HORIZON)
        # the latency at t+H is not in the table: the forecast needs none after t
        assert entry["forecast_ms"] == pytest.approx(forecast, rel=1e-6)
        assert entry["quantiles"] == pytest.approx(quantiles, rel=1e-6) and set(quantiles) == set(trained.model_config.quantile_names)
        assert entry["current_latency_ms"] == pytest.approx(current)
        assert entry["latency_threshold_ms"] == 300.0 and entry["threshold"] == 1.0
        assert entry["score"] == pytest.approx(entry["forecast_ms"] / 300.0)
        assert entry["alert"] == (entry["score"] >= 1.0)
    # forecast.py reads only the last L + staleness minutes: the same report
    assert _report(trained, _recent(frame, at, SEQUENCE_LENGTH + STALENESS), at, tmp_path) == report


def test_a_service_whose_latency_at_t_has_not_arrived_is_forecast_from_its_newest_window_that_has_it(trained, frame, at, tmp_path):
    late, other = trained.services[0], trained.services[1]
    recent = _recent(frame, at)
    # the anchored model starts from the latency at t, and reads it as an input
    recent.loc[(recent["service"] == late) & (recent["timestamp"] > timestamp_of(at - HORIZON)), TARGET_COLUMN] = np.nan
    entries = _by_service(_report(trained, recent, at, tmp_path))
    assert entries[late]["status"] == "ok" and entries[late]["as_of"] == format_minute(at - HORIZON)
    assert entries[late]["target_time"] == format_minute(at)
    assert entries[other]["as_of"] == format_minute(at), "each service its own newest window"
    forecast, current, _ = _model_forecasts(trained, frame, {late: at - HORIZON}, tmp_path)[late]
    assert entries[late]["forecast_ms"] == pytest.approx(forecast, rel=1e-6)
    assert entries[late]["current_latency_ms"] == pytest.approx(current)


@pytest.mark.parametrize(("lag", "status"), [(STALENESS, "ok"), (STALENESS + 1, "stale")])
def test_a_service_is_stale_once_its_newest_minute_is_more_than_the_staleness_before_at(trained, frame, at, tmp_path, lag, status):
    lagging = trained.services[2]
    recent = _recent(frame, at)
    recent = recent[~((recent["service"] == lagging) & (recent["timestamp"] > timestamp_of(at - lag)))]
    report = _report(trained, recent, at, tmp_path)
    entry = _by_service(report)[lagging]
    assert entry["status"] == status
    assert entry["as_of"] == format_minute(at - lag) and entry["target_time"] == format_minute(at - lag + HORIZON)
    assert (entry["forecast_ms"] is None) == (status == "stale")
    if status == "stale":
        assert entry["score"] is None and entry["alert"] is False and entry["causes"] == []
    assert report["summary"][status] == (4 if status == "ok" else 1)


@pytest.mark.parametrize("spoiled", ["nan_feature", "missing_minute"])
@pytest.mark.parametrize(("minute", "status"), [(STALENESS, "gap"), (STALENESS - 1, "ok")])
def test_a_service_with_no_complete_window_within_the_staleness_is_a_gap(trained, frame, at, tmp_path, spoiled, minute, status):
    broken = trained.services[3]
    recent = _recent(frame, at)
    where = (recent["service"] == broken) & (recent["timestamp"] == timestamp_of(at - minute))
    if spoiled == "nan_feature":
        recent.loc[where, trained.feature_columns[0]] = np.nan
    else:
        recent = recent[~where]
    entry = _by_service(_report(trained, recent, at, tmp_path))[broken]
    assert entry["status"] == status
    if status == "gap":
        # every window ending in [at - staleness, at] holds the spoiled minute; as_of is the newest minute
        assert entry["as_of"] == format_minute(at) and entry["forecast_ms"] is None and entry["alert"] is False
    else:  # the window ending at at - staleness is clear of it: the oldest one still forecast
        assert entry["as_of"] == format_minute(at - STALENESS) and entry["forecast_ms"] > 0


def test_missing_stale_elsewhere_and_unknown_services(trained, frame, at, tmp_path):
    missing, elsewhere, known, _ = trained.services
    recent = _recent(frame, at)
    newcomer = recent[recent["service"] == known].assign(service="zz-newcomer")
    recent = pd.concat([recent[~recent["service"].isin([missing, elsewhere])], newcomer], ignore_index=True)
    report = _report(trained, recent, at, tmp_path, newest_elsewhere={elsewhere: at - 100})
    entries = _by_service(report)
    assert list(entries) == sorted([*trained.services, "zz-newcomer"])
    assert entries[missing]["status"] == "missing" and entries[missing]["as_of"] is None and entries[missing]["target_time"] is None
    assert entries[elsewhere]["status"] == "stale"
    assert entries[elsewhere]["as_of"] == format_minute(at - 100) and entries[elsewhere]["target_time"] == format_minute(at - 100 + HORIZON)
    assert entries["zz-newcomer"]["status"] == "unknown_service" and entries["zz-newcomer"]["as_of"] == format_minute(at)
    for name in (missing, elsewhere, "zz-newcomer"):
        entry = entries[name]
        assert entry["forecast_ms"] is None and entry["current_latency_ms"] is None and entry["score"] is None
        assert entry["quantiles"] == {} and entry["alert"] is False and entry["causes"] == []
    assert entries[known]["status"] == "ok"
    alerts = sum(entry["alert"] for entry in entries.values())
    assert report["summary"] == {"ok": 2, "stale": 1, "gap": 0, "unknown_service": 1, "missing": 1, "alerts": alerts}


def test_an_alert_fires_when_the_score_reaches_the_services_threshold(trained, frame, at, tmp_path):
    recent = _recent(frame, at)
    first, second = trained.services[:2]
    # a lower latency threshold for one service: its score is its forecast over that
    lowered = dataclasses.replace(trained, latency_thresholds=LatencyThresholds(300.0, {first: 7.5}), alert=AlertRule(threshold=np.inf))
    entries = _by_service(_report(lowered, recent, at, tmp_path))
    assert entries[first]["latency_threshold_ms"] == 7.5 and entries[second]["latency_threshold_ms"] == 300.0
    assert entries[first]["score"] == pytest.approx(entries[first]["forecast_ms"] / 7.5)
    assert not any(entry["alert"] for entry in entries.values())

    score = entries[second]["score"]
    for threshold, fires in ((score, True), (np.nextafter(score, np.inf), False)):
        rule = AlertRule(threshold=np.inf, per_service={second: float(threshold)})
        report = _report(dataclasses.replace(lowered, alert=rule), recent, at, tmp_path)
        entries = _by_service(report)
        assert entries[second]["threshold"] == threshold and entries[second]["alert"] is fires
        assert entries[first]["threshold"] == np.inf and entries[first]["alert"] is False
        assert report["summary"]["alerts"] == int(fires)


def test_causes_are_the_top_shapley_values_of_each_alerting_services_own_window(trained, frame, at, tmp_path):
    recent = _recent(frame, at)
    quiet = trained.services[1::2]
    rule = AlertRule(threshold=0.0, per_service={name: np.inf for name in quiet})  # every other service alerts
    report = _report(dataclasses.replace(trained, alert=rule), recent, at, tmp_path)
    entries = _by_service(report)
    alerting = [name for name in trained.services if name not in quiet]
    assert [name for name, entry in entries.items() if entry["alert"]] == alerting
    assert all(entries[name]["causes"] == [] for name in quiet)

    table = _table(trained, recent, tmp_path)
    prepared = trained.prepare(table)
    rows = np.array([np.flatnonzero((table.service_codes == table.services.index(name)) & (table.minutes == at))[0] for name in alerting])
    attributions = explain.explain(trained, prepared.tensors, rows, trained.background, EXPLAINED, trained.training_config.seed)
    assert report["explanation_method"] == attributions.method
    for name, values in zip(alerting, attributions.values):
        causes = entries[name]["causes"]
        features = [cause["feature"] for cause in causes]
        assert len(causes) == live.TOP_CAUSES and len(set(features)) == len(features) and TARGET_COLUMN not in features
        for cause in causes:  # its own window's value of that feature
            assert cause["score"] == pytest.approx(values[trained.feature_columns.index(cause["feature"])])
        rankable = [value for feature, value in zip(trained.feature_columns, values) if feature != TARGET_COLUMN]
        assert [cause["score"] for cause in causes] == pytest.approx(sorted(rankable, reverse=True)[: live.TOP_CAUSES])
        # each a share of what every feature that can be a cause pushes, whichever way
        total = sum(abs(value) for value in rankable)
        assert [cause["share"] for cause in causes] == pytest.approx([cause["score"] / total for cause in causes])


def test_explanations_need_a_background_only_when_something_alerts(trained, frame, at, tmp_path):
    recent = _recent(frame, at)
    bare = dataclasses.replace(trained, background=None, alert=AlertRule(threshold=np.inf))
    report = _report(bare, recent, at, tmp_path)
    assert report["summary"]["alerts"] == 0 and report["explanation_method"] is None
    with pytest.raises(UserError, match="no explanation background"):
        _report(dataclasses.replace(bare, alert=AlertRule(threshold=0.0)), recent, at, tmp_path)
