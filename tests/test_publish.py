"""publish.py: the Prometheus textfile read back by prometheus_client's parser, alerts posted to a real
Alertmanager on 127.0.0.1 (Debian's prometheus-alertmanager) and read back from its API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from latency_forecast import publish
from latency_forecast.errors import UserError
from tests.helpers import DIRECT, debian_binary, free_port, stop_server, wait_until_serving

ALERTMANAGER_PACKAGE = "prometheus-alertmanager"
NO_NUMBERS = dict.fromkeys(
    ("target_time", "forecast_ms", "current_latency_ms", "latency_threshold_ms", "score", "threshold")
)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_report(as_of: datetime) -> dict:
    """Two alerting services, one quiet one, and one service of every other status."""
    horizon = 3
    at, target = _iso(as_of), _iso(as_of + timedelta(minutes=horizon))

    def ok(service, forecast_ms, quantiles, current, score, threshold, alert, causes):
        return {
            "service": service, "as_of": at, "target_time": target, "forecast_ms": forecast_ms,
            "quantiles": quantiles, "current_latency_ms": current, "latency_threshold_ms": 500.0,
            "score": score, "threshold": threshold, "alert": alert, "causes": causes, "status": "ok",
        }

    def without(service, status, as_of_text):
        return {"service": service, "as_of": as_of_text, **NO_NUMBERS, "quantiles": {}, "alert": False, "causes": [], "status": status}

    return {
        "as_of": at,
        "horizon": horizon,
        "sequence_length": 8,
        "alert_rule": {"score": "quantile_ratio", "threshold": 1.2, "per_service": {"search": 0.9}, "quantile": "0.9"},
        "forecasts": [
            ok("auth", 812.0, {"0.5": 790.0, "0.9": 1200.0}, 430.0, 2.4, 1.2, True,
               [{"feature": "cpu_rolling_avg", "score": 210.5, "share": 0.62}, {"feature": "queue_depth", "score": 40.25, "share": 0.12}]),
            # a calibrated threshold below 1 fires under the latency threshold
            ok("search", 400.0, {"0.9": 480.0}, 300.0, 0.96, 0.9, True, [{"feature": "fan_out", "score": 95.0, "share": 0.4}]),
            ok("cache", 3.2, {"0.5": 3.1, "0.9": 4.0}, 2.9, 0.008, 1.2, False, []),
            without("cart", "stale", _iso(as_of - timedelta(minutes=20))),
            without("pay", "gap", at),
            without("ghost", "unknown_service", at),
            without("legacy", "missing", None),
        ],
    }


@pytest.fixture
def report() -> dict:
    return make_report(datetime(2024, 6, 5, 10, 0, tzinfo=timezone.utc))


def _samples(path) -> dict[str, dict[tuple, float]]:
    """{metric name: {sorted label items: value}} from prometheus_client's own parser."""
    families = {}
    for family in text_string_to_metric_families(open(path).read()):
        assert family.type == "gauge" and family.documentation
        families[family.name] = {tuple(sorted(sample.labels.items())): sample.value for sample in family.samples}
    return families


def test_textfile_parses_back_with_every_services_gauges(tmp_path, report):
    path = tmp_path / "latency_forecast.prom"
    publish.write_prometheus_textfile(report, str(path), last_run=1717581642.5)
    metrics = _samples(path)
    assert os.listdir(tmp_path) == ["latency_forecast.prom"]

    def by(service, **labels):
        return tuple(sorted({"service": service, "horizon_minutes": "3", **labels}.items()))

    ok = ("auth", "search", "cache")
    assert metrics["latency_forecast_p99_seconds"] == pytest.approx({by("auth"): 0.812, by("search"): 0.4, by("cache"): 0.0032})
    assert metrics["latency_forecast_p99_quantile_seconds"] == pytest.approx({
        by("auth", level="0.5"): 0.790,
        by("auth", level="0.9"): 1.2,
        by("search", level="0.9"): 0.48,
        by("cache", level="0.5"): 0.0031,
        by("cache", level="0.9"): 0.004,
    })
    assert metrics["latency_forecast_current_p99_seconds"] == pytest.approx({by("auth"): 0.43, by("search"): 0.3, by("cache"): 0.0029})
    assert metrics["latency_forecast_latency_threshold_seconds"] == pytest.approx({by(s): 0.5 for s in ok})
    # the rule alerts on the 0.9 quantile: its threshold in seconds is the calibrated one times the SLO
    assert metrics["latency_forecast_alert_threshold_seconds"] == pytest.approx({
        by("auth", alert_on="0.9"): 0.6, by("search", alert_on="0.9"): 0.45, by("cache", alert_on="0.9"): 0.6,
    })
    assert metrics["latency_forecast_alert"] == {by("auth"): 1.0, by("search"): 1.0, by("cache"): 0.0}
    assert metrics["latency_forecast_alert_score_ratio"] == pytest.approx(
        {by("auth"): 2.0, by("search"): 0.96 / 0.9, by("cache"): 0.008 / 1.2}
    )
    assert metrics["latency_forecast_cause_share"] == pytest.approx({
        by("auth", feature="cpu_rolling_avg", rank="1"): 0.62,
        by("auth", feature="queue_depth", rank="2"): 0.12,
        by("search", feature="fan_out", rank="1"): 0.4,
    })
    as_of = datetime(2024, 6, 5, 10, 0, tzinfo=timezone.utc).timestamp()
    assert metrics["latency_forecast_as_of_timestamp_seconds"] == {
        **{by(s): as_of for s in (*ok, "pay", "ghost")},
        by("cart"): as_of - 20 * 60,  # stale: its newest minute; "legacy" has none
    }
    assert metrics["latency_forecast_last_run_timestamp_seconds"] == {(("horizon_minutes", "3"),): 1717581642.5}
    statuses = {forecast["service"]: forecast["status"] for forecast in report["forecasts"]}
    assert metrics["latency_forecast_status"] == {
        by(service, status=name): float(name == status)
        for service, status in statuses.items()
        for name in publish.STATUSES
    }
    everyone = ("latency_forecast_status", "latency_forecast_as_of_timestamp_seconds", "latency_forecast_last_run_timestamp_seconds")
    for name in set(metrics) - set(everyone):
        assert {dict(labels)["service"] for labels in metrics[name]} <= set(ok), name
    assert not any("quantile" in dict(labels) for samples in metrics.values() for labels in samples), "a reserved label"


@pytest.mark.parametrize(
    ("rule", "written"),
    [
        ({"score": "forecast_ratio", "quantile": None}, {"forecast": 0.6}),
        ({"score": "probability", "quantile": None}, {}),
    ],
    ids=["point-forecast", "breach-probability"],
)
def test_the_alert_threshold_in_seconds_follows_what_the_rule_alerts_on(tmp_path, report, rule, written):
    report["alert_rule"].update(rule)
    path = tmp_path / "latency_forecast.prom"
    publish.write_prometheus_textfile(report, str(path))
    thresholds = _samples(path).get("latency_forecast_alert_threshold_seconds", {})
    auth = {dict(labels)["alert_on"]: value for labels, value in thresholds.items() if dict(labels)["service"] == "auth"}
    assert auth == pytest.approx(written)


def test_last_run_defaults_to_the_time_of_writing(tmp_path, report):
    path = tmp_path / "latency_forecast.prom"
    before = time.time()
    publish.write_prometheus_textfile(report, str(path))
    (written,) = _samples(path)["latency_forecast_last_run_timestamp_seconds"].values()
    assert before <= written <= time.time()


def test_score_ratio_is_one_where_the_alert_starts():
    assert publish.score_ratio({"score": 1.2, "threshold": 1.2}) == 1.0
    assert publish.score_ratio({"score": 0.3, "threshold": 0.6}) == 0.5
    assert publish.score_ratio({"score": 5.0, "threshold": float("inf")}) == 0.0  # a service that never alerts
    assert publish.score_ratio({"score": 0.0, "threshold": 0.0}) == float("inf")  # every score alerts


def test_textfile_replaces_an_earlier_one(tmp_path, report):
    path = tmp_path / "latency_forecast.prom"
    path.write_text("stale content\n")
    publish.write_prometheus_textfile(report, str(path))
    assert "latency_forecast_status" in _samples(path)
    assert os.listdir(tmp_path) == ["latency_forecast.prom"]


def test_unwritable_textfile_path_is_a_user_error_and_leaves_nothing(tmp_path, report):
    missing = tmp_path / "no-such-dir" / "latency_forecast.prom"
    with pytest.raises(UserError, match=r"cannot write --prometheus-textfile .*no-such-dir.*create its directory") as caught:
        publish.write_prometheus_textfile(report, str(missing))
    assert "\n" not in str(caught.value) and "--collector.textfile.directory" in str(caught.value)
    assert os.listdir(tmp_path) == []

    directory = tmp_path / "textfiles"
    directory.mkdir()
    with pytest.raises(UserError, match=r"cannot write --prometheus-textfile .*textfiles: .*it is a directory") as caught:
        publish.write_prometheus_textfile(report, str(directory))
    assert "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == ["textfiles"] and os.listdir(directory) == []


def test_format_timestamp_is_rfc3339_utc_with_z():
    assert publish.format_timestamp(datetime(2024, 6, 5, 10, 3, 7, 999)) == "2024-06-05T10:03:07Z"
    plus_two = timezone(timedelta(hours=2))
    assert publish.format_timestamp(datetime(2024, 6, 5, 12, 3, tzinfo=plus_two)) == "2024-06-05T10:03:00Z"


def test_alerts_are_the_firing_ok_forecasts_with_one_line_summaries(report):
    now = datetime(2024, 6, 5, 10, 0, 40, tzinfo=timezone.utc)
    alerts = publish.alertmanager_alerts(report, now, timedelta(minutes=5), "warning")
    assert [alert["labels"]["service"] for alert in alerts] == ["auth", "search"]
    auth, search = (alert["annotations"] for alert in alerts)
    # what crossed which threshold: the calibrated one, here below the SLO for search
    assert auth["summary"] == (
        "auth: p99 latency forecast 3 min ahead crossed its calibrated alert threshold (0.9 quantile 1200 ms >= 600 ms; SLO 500 ms)"
    )
    assert search["summary"] == (
        "search: p99 latency forecast 3 min ahead crossed its calibrated alert threshold (0.9 quantile 480 ms >= 450 ms; SLO 500 ms)"
    )
    assert "812 ms (p50 790 ms, p90 1200 ms)" in auth["description"]
    assert "Top cause: cpu_rolling_avg (+210.5 ms Shapley value, 62%); then queue_depth (+40.2 ms, 12%)." in auth["description"]
    assert "Current p99: 430 ms" in auth["description"] and "Alert score 2.00 times its threshold" in auth["description"]
    assert "can sit below the 500 ms SLO: an early warning, not a breach yet" in auth["description"]
    assert {alert["endsAt"] for alert in alerts} == {"2024-06-05T10:05:40Z"}
    assert {alert["startsAt"] for alert in alerts} == {"2024-06-05T10:00:00Z"}
    assert "generatorURL" not in alerts[0]


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """post_alerts honours proxy variables (urllib's default); here it talks to 127.0.0.1 directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    """A real Alertmanager on 127.0.0.1 with a null receiver and no clustering; yields its base URL."""
    binary = debian_binary(ALERTMANAGER_PACKAGE, ALERTMANAGER_PACKAGE, "alertmanager")
    directory = tmp_path_factory.mktemp("alertmanager")
    config = directory / "alertmanager.yml"
    config.write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(directory / "alertmanager.log", "wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port: it binds nothing but the API
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(process, f"{url}/-/ready", directory / "alertmanager.log")
        yield url
    finally:
        stop_server(process)
        log.close()


def _posted(url: str) -> dict[str, dict]:
    with DIRECT.open(f"{url}/api/v2/alerts", timeout=5) as response:
        return {alert["labels"]["service"]: alert for alert in json.load(response)}


def test_alerts_posted_to_a_real_alertmanager_read_back(alertmanager):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    report = make_report(now.replace(second=0))
    # a trailing slash is allowed
    assert publish.post_alerts(alertmanager + "/", report, resolve_after=timedelta(minutes=5), severity="critical", now=now) == 2
    alerts = _posted(alertmanager)
    assert sorted(alerts) == ["auth", "search"]
    auth = alerts["auth"]
    assert auth["labels"] == {"alertname": "LatencyBreachForecast", "service": "auth", "severity": "critical", "horizon_minutes": "3"}
    format_target = _iso(now.replace(second=0) + timedelta(minutes=3))
    assert auth["annotations"]["summary"] == publish.alertmanager_alerts(report, now, timedelta(minutes=5), "critical")[0]["annotations"]["summary"]
    assert f"at {format_target}" in auth["annotations"]["description"]
    assert "Top cause: cpu_rolling_avg (+210.5 ms Shapley value, 62%)" in auth["annotations"]["description"]
    assert alerts["search"]["annotations"]["summary"].startswith("search: p99 latency forecast 3 min ahead")
    for alert in alerts.values():
        ends_at = datetime.strptime(alert["endsAt"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        assert ends_at == now + timedelta(minutes=5)
        assert alert["status"]["state"] in ("active", "unprocessed")
        assert not alert.get("generatorURL")


def test_http_error_from_alertmanager_is_a_user_error(alertmanager, report):
    with pytest.raises(UserError, match=r"at .*/wrong-prefix: HTTP 404 .*; check --alertmanager-url and that Alertmanager is running"):
        publish.post_alerts(alertmanager + "/wrong-prefix", report)


def test_closed_port_is_a_one_line_user_error(report):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        publish.post_alerts(url, report, timeout=2)
    assert str(caught.value) == (
        f"cannot post alerts to Alertmanager at {url}: Connection refused; "
        "check --alertmanager-url and that Alertmanager is running"
    )
    assert time.monotonic() - started < 2


def test_silent_alertmanager_times_out(report):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(UserError, match=r"no answer within 0.2 s; check --alertmanager-url"):
            publish.post_alerts(url, report, timeout=0.2)


def test_no_firing_alert_makes_no_request(report):
    for forecast in report["forecasts"]:
        forecast["alert"] = False
    # a closed port: any request would raise
    assert publish.post_alerts(f"http://127.0.0.1:{free_port()}", report) == 0
