"""forecast.py end to end: the same forecast and alert as evaluation for the same window (no
train/serve skew), each status, and a store whose newest minutes have no latency yet."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import forecast
from latency_forecast import data, evaluation, store
from latency_forecast.data import format_minute
from tests.helpers import HORIZON, reload, split_range


def _forecast(directory: str, store_path: str, output, *extra: str) -> dict:
    argv = [
        "--model-checkpoint", f"{directory}/latency_forecaster.pt", "--scaler-path", f"{directory}/scaler.pt",
        "--feature-store-path", store_path, "--output", str(output), *extra,
    ]
    assert forecast.main(argv) == 0
    return json.loads(open(output).read())


def _by_service(report: dict) -> dict[str, dict]:
    return {entry["service"]: entry for entry in report["forecasts"]}


@pytest.mark.parametrize("fixture", ["history_dir", "trained_dir"], ids=["anchored-history-model", "telemetry-model"])
def test_forecast_equals_what_evaluation_computed_for_the_window_ending_at_t(request, fixture, tiny_store, tmp_path):
    directory = request.getfixturevalue(fixture)
    trained = reload(directory)
    prepared = trained.prepare(store.load_feature_store(tiny_store, trained.feature_columns))
    metrics = json.loads(open(f"{directory}/metrics.json").read())
    ends = prepared.samples(split_range(metrics["data"]["splits"]["test"]), "test")
    judged = evaluation.evaluate(trained, prepared, ends)
    table = prepared.table
    # a few minutes of the test split, each at a minute where every service has a sample
    minutes, counts = np.unique(table.minutes[ends], return_counts=True)
    complete = minutes[counts == len(trained.services)]
    checked = 0
    for minute in complete[:: max(len(complete) // 3, 1)][:3]:
        report = _forecast(directory, tiny_store, tmp_path / f"{minute}.json", "--at", format_minute(int(minute)))
        for i in np.flatnonzero(table.minutes[ends] == minute):
            entry = _by_service(report)[table.services[table.service_codes[ends[i]]]]
            assert entry["status"] == "ok" and entry["as_of"] == format_minute(int(minute))
            assert entry["target_time"] == format_minute(int(minute) + HORIZON)
            assert entry["forecast_ms"] == pytest.approx(judged.forecast[i], rel=1e-5)
            assert entry["score"] == pytest.approx(judged.score[i], rel=1e-5)
            assert entry["threshold"] == pytest.approx(judged.alert_threshold[i])
            assert entry["alert"] == bool(judged.alert[i])
            for level, values in judged.quantiles.items():
                assert entry["quantiles"][level] == pytest.approx(values[i], rel=1e-5)
            checked += 1
    assert checked >= 2 * len(trained.services)


@pytest.fixture(scope="module")
def frame(tiny_frame) -> pd.DataFrame:
    return tiny_frame[0].copy()


def test_each_status_from_one_store(history_dir, frame, tmp_path):
    newest = frame["timestamp"].max()
    minute = pd.Timedelta(minutes=1)
    services = sorted(frame["service"].unique())  # auth, cache, inventory, payment
    stale, gap, missing, ok = services
    frame = frame[~((frame["service"] == stale) & (frame["timestamp"] > newest - 10 * minute))]
    # a NaN input in every window that ends within the staleness limit (5 minutes)
    frame.loc[(frame["service"] == gap) & (frame["timestamp"] == newest - 5 * minute), "cpu_rolling_avg"] = np.nan
    frame = frame[frame["service"] != missing]
    newcomer = frame[frame["service"] == ok].assign(service="search")
    path = str(tmp_path / "store")
    store.write_feature_store(pd.concat([frame, newcomer], ignore_index=True), path)

    report = _forecast(history_dir, path, tmp_path / "forecasts.json")
    entries = _by_service(report)
    assert {name: entry["status"] for name, entry in entries.items()} == {
        stale: "stale", gap: "gap", missing: "missing", ok: "ok", "search": "unknown_service"
    }
    assert report["summary"] == {"ok": 1, "stale": 1, "gap": 1, "missing": 1, "unknown_service": 1, "alerts": int(entries[ok]["alert"])}
    assert entries[stale]["as_of"] == format_minute(data.to_minute(newest - 10 * minute))
    for name in (stale, gap, missing, "search"):
        assert entries[name]["forecast_ms"] is None and entries[name]["alert"] is False


def test_a_store_whose_newest_minutes_have_no_latency_yet_is_forecast(history_dir, trained_dir, frame, tmp_path):
    newest = frame["timestamp"].max()
    # the latency of the last H minutes is still being aggregated; the telemetry is there
    frame.loc[frame["timestamp"] > newest - pd.Timedelta(minutes=HORIZON), "target_latency_p99"] = np.nan
    path = str(tmp_path / "store")
    store.write_feature_store(frame, path)

    telemetry = _by_service(_forecast(trained_dir, path, tmp_path / "telemetry.json"))
    assert {entry["status"] for entry in telemetry.values()} == {"ok"}
    assert {entry["as_of"] for entry in telemetry.values()} == {format_minute(data.to_minute(newest))}
    assert all(entry["current_latency_ms"] is None and entry["forecast_ms"] > 0 for entry in telemetry.values())

    # the latency is an input of the history model: it forecasts from the newest window that has it
    history = _by_service(_forecast(history_dir, path, tmp_path / "history.json"))
    as_of = data.to_minute(newest) - HORIZON
    assert {entry["status"] for entry in history.values()} == {"ok"}
    assert {entry["as_of"] for entry in history.values()} == {format_minute(as_of)}
    assert {entry["target_time"] for entry in history.values()} == {format_minute(as_of + HORIZON)}
