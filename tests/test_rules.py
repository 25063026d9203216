"""deploy/prometheus/latency-forecast.rules.yml with Debian's promtool: Prometheus loads it (check rules),
its alerts fire and stay silent as its unit tests say (test rules), the direct Alertmanager post carries
the rule's labels, and a textfile forecast.py wrote passes check metrics with every series the rules read."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import forecast
from latency_forecast import data, publish
from latency_forecast.script_config import ForecastConfig
from tests.helpers import debian_binary
from tests.test_publish import make_report

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "latency-forecast.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "latency-forecast.rules.test.yml"
ALERTS = ("LatencyBreachForecast", "LatencyForecasterStale", "LatencyForecastAbsent", "LatencyTelemetryStale")
# the contract's series (docs/contract.md, Prometheus textfile)
CONTRACT_SERIES = (
    "latency_forecast_p99_seconds",
    "latency_forecast_p99_quantile_seconds",
    "latency_forecast_alert",
    "latency_forecast_alert_score_ratio",
    "latency_forecast_as_of_timestamp_seconds",
    "latency_forecast_last_run_timestamp_seconds",
    "latency_forecast_cause_share",
)


def _promtool_run(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([debian_binary("prometheus", "promtool"), *arguments], input=stdin, capture_output=True, text=True, timeout=120)


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_prometheus_loads_the_rules_file():
    result = _promtool_run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout
    assert sorted(_rules()) == sorted(ALERTS)


def test_the_rules_unit_tests_pass():
    # firing after for:, silence when the forecaster or the telemetry is stale, the stale alerts, absent()
    result = _promtool_run("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_see_every_alert_fire_and_stay_silent():
    fired, silent = set(), set()
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    assert fired == silent == set(ALERTS)


def test_posted_alerts_carry_the_rule_files_labels():
    """Alertmanager takes an alert posted by forecast.py --alertmanager-url and the rule's for one."""
    rule = _rules()[publish.ALERT_NAME]
    grouped = re.match(r"\s*max by \(([^)]*)\)", rule["expr"]).group(1)
    now = datetime(2024, 6, 5, 10, 0, tzinfo=timezone.utc)
    posted, *_ = publish.alertmanager_alerts(make_report(now), now, timedelta(minutes=5), ForecastConfig.severity)
    assert set(posted["labels"]) == {"alertname", *(name.strip() for name in grouped.split(",")), *rule["labels"]}
    assert posted["labels"]["severity"] == rule["labels"]["severity"]


def _families(text: str) -> dict[str, dict[tuple, float]]:
    return {
        family.name: {tuple(sorted(sample.labels.items())): sample.value for sample in family.samples}
        for family in text_string_to_metric_families(text)
    }


def _alerting_report(directory: str, store_path: str, output: pathlib.Path, textfile: pathlib.Path) -> tuple[dict, int]:
    """forecast.py at the end of the store's injected faults until one forecast alerts (its causes
    are written only then); returns its report and minute."""
    manifest = json.loads(open(f"{store_path}/chaos_manifest.json").read())
    for fault in manifest[:6]:
        at = data.to_minute(pd.Timestamp(fault["end"]))
        argv = [
            "--model-checkpoint", f"{directory}/latency_forecaster.pt", "--scaler-path", f"{directory}/scaler.pt",
            "--feature-store-path", store_path, "--output", str(output), "--prometheus-textfile", str(textfile),
            "--at", data.format_minute(at),
        ]
        assert forecast.main(argv) == 0
        report = json.loads(output.read_text())
        if report["summary"]["alerts"]:
            return report, at
    pytest.fail("no forecast at the end of the first faults alerts")


def test_a_textfile_forecast_py_wrote_passes_promtool_check_metrics(trained_dir, tiny_store, tmp_path):
    textfile = tmp_path / "latency_forecast.prom"
    started = time.time()
    report, at = _alerting_report(trained_dir, tiny_store, tmp_path / "forecasts.json", textfile)
    text = textfile.read_text()
    result = _promtool_run("check", "metrics", stdin=text)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr

    families = _families(text)
    assert set(CONTRACT_SERIES) <= set(families)
    read_by_rules = set(re.findall(r"latency_forecast_\w+", RULES.read_text()))
    assert read_by_rules <= set(families), f"the rules read series forecast.py does not write: {read_by_rules - set(families)}"
    horizon = str(report["horizon"])
    (last_run,) = families["latency_forecast_last_run_timestamp_seconds"].items()
    assert last_run[0] == (("horizon_minutes", horizon),) and started <= last_run[1] <= time.time()
    as_of = data.timestamp_of(at).timestamp()
    assert set(families["latency_forecast_as_of_timestamp_seconds"].values()) == {as_of}
    alerting = {entry["service"]: entry for entry in report["forecasts"] if entry["alert"]}
    causes = families["latency_forecast_cause_share"]
    assert {dict(labels)["service"] for labels in causes} == set(alerting)
    for service, entry in alerting.items():
        mine = [(dict(labels), value) for labels, value in causes.items() if dict(labels)["service"] == service]
        written = {int(labels["rank"]): (labels["feature"], value) for labels, value in mine}
        assert written == {rank: (cause["feature"], pytest.approx(cause["share"])) for rank, cause in enumerate(entry["causes"], 1)}
        shares = [share for _, share in (written[rank] for rank in sorted(written))]
        assert shares == sorted(shares, reverse=True) and all(-1 <= share <= 1 for share in shares)
