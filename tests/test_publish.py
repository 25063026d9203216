"""publish.py: the Prometheus textfile read back by prometheus_client's parser, alerts posted to a real
Alertmanager on 127.0.0.1 (Debian's prometheus-alertmanager) and read back from its API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from latency_forecast import publish
from latency_forecast.errors import UserError
from tests.helpers import stop_server

ALERTMANAGER_PACKAGE = "prometheus-alertmanager"
# the tests' own requests to Alertmanager ignore proxy variables: nothing leaves 127.0.0.1
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
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
        "forecasts": [
            ok("auth", 812.0, {"0.5": 790.0, "0.9": 1200.0}, 430.0, 1.624, 1.2, True,
               [{"feature": "cpu_rolling_avg", "score": 210.5}, {"feature": "queue_depth", "score": 40.25}]),
            # a calibrated threshold below 1 fires under the latency threshold; no quantile head
            ok("search", 480.0, {}, 300.0, 0.96, 0.9, True, [{"feature": "fan_out", "score": 95.0}]),
            ok("cache", 3.2, {"0.5": 3.1, "0.9": 4.0}, 2.9, 0.0064, 1.2, False, []),
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
    publish.write_prometheus_textfile(report, str(path))
    metrics = _samples(path)
    assert os.listdir(tmp_path) == ["latency_forecast.prom"]

    def by(**labels):
        return tuple(sorted(labels.items()))

    p99 = metrics["latency_forecast_p99_seconds"]
    assert p99 == pytest.approx({
        by(service="auth", horizon_minutes="3", quantile="point"): 0.812,
        by(service="auth", horizon_minutes="3", quantile="0.5"): 0.790,
        by(service="auth", horizon_minutes="3", quantile="0.9"): 1.2,
        by(service="search", horizon_minutes="3", quantile="point"): 0.480,
        by(service="cache", horizon_minutes="3", quantile="point"): 0.0032,
        by(service="cache", horizon_minutes="3", quantile="0.5"): 0.0031,
        by(service="cache", horizon_minutes="3", quantile="0.9"): 0.004,
    })
    ok = ("auth", "search", "cache")
    assert metrics["latency_forecast_current_p99_seconds"] == pytest.approx(
        {by(service="auth"): 0.43, by(service="search"): 0.3, by(service="cache"): 0.0029}
    )
    assert metrics["latency_forecast_latency_threshold_seconds"] == pytest.approx({by(service=s): 0.5 for s in ok})
    assert metrics["latency_forecast_alert"] == {
        by(service="auth", horizon_minutes="3"): 1.0,
        by(service="search", horizon_minutes="3"): 1.0,
        by(service="cache", horizon_minutes="3"): 0.0,
    }
    assert metrics["latency_forecast_alert_score"] == pytest.approx({
        by(service="auth", horizon_minutes="3"): 1.624,
        by(service="search", horizon_minutes="3"): 0.96,
        by(service="cache", horizon_minutes="3"): 0.0064,
    })
    assert metrics["latency_forecast_alert_score_threshold"] == pytest.approx({
        by(service="auth", horizon_minutes="3"): 1.2,
        by(service="search", horizon_minutes="3"): 0.9,
        by(service="cache", horizon_minutes="3"): 1.2,
    })
    as_of = datetime(2024, 6, 5, 10, 0, tzinfo=timezone.utc).timestamp()
    assert metrics["latency_forecast_as_of_timestamp_seconds"] == {
        **{by(service=s): as_of for s in (*ok, "pay", "ghost")},
        by(service="cart"): as_of - 20 * 60,  # stale: its newest minute; "legacy" has none
    }
    statuses = {forecast["service"]: forecast["status"] for forecast in report["forecasts"]}
    assert metrics["latency_forecast_status"] == {
        by(service=service, status=name): float(name == status)
        for service, status in statuses.items()
        for name in publish.STATUSES
    }
    forecast_gauges = [name for name in metrics if name not in ("latency_forecast_status", "latency_forecast_as_of_timestamp_seconds")]
    for name in forecast_gauges:
        assert {dict(labels)["service"] for labels in metrics[name]} <= set(ok), name


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
    assert auth["summary"] == "auth p99 forecast 812 ms at 10:03Z >= 500 ms threshold (in 3 min)"
    assert search["summary"] == "search p99 forecast 480 ms at 10:03Z, alert score 0.96 >= 0.90 (500 ms threshold, in 3 min)"
    assert "p50 790 ms, p90 1200 ms" in auth["description"]
    assert "Top cause: cpu_rolling_avg (+210.5 ms Shapley value)" in auth["description"]
    assert "Current p99: 430 ms" in auth["description"] and "Alert score 1.62 >= threshold 1.20" in auth["description"]
    assert {alert["endsAt"] for alert in alerts} == {"2024-06-05T10:05:40Z"}
    assert {alert["startsAt"] for alert in alerts} == {"2024-06-05T10:00:00Z"}
    assert "generatorURL" not in alerts[0]


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """post_alerts honours proxy variables (urllib's default); here it talks to 127.0.0.1 directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def _free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alertmanager_binary() -> str:
    binary = shutil.which(ALERTMANAGER_PACKAGE) or shutil.which("alertmanager")
    if binary is None:
        reason = f"the Alertmanager binary is not installed: apt-get install {ALERTMANAGER_PACKAGE} (Debian's package)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run must install it")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    """A real Alertmanager on 127.0.0.1 with a null receiver and no clustering; yields its base URL."""
    binary = _alertmanager_binary()
    directory = tmp_path_factory.mktemp("alertmanager")
    config = directory / "alertmanager.yml"
    config.write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n')
    port = _free_port()
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
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"Alertmanager exited with {process.returncode}: {(directory / 'alertmanager.log').read_text()[-2000:]}")
            try:
                with DIRECT.open(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Alertmanager not ready on {url} within 20 s: {(directory / 'alertmanager.log').read_text()[-2000:]}")
            time.sleep(0.05)
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
    target = (now.replace(second=0) + timedelta(minutes=3)).strftime("%H:%MZ")
    assert auth["annotations"]["summary"] == f"auth p99 forecast 812 ms at {target} >= 500 ms threshold (in 3 min)"
    assert "Top cause: cpu_rolling_avg (+210.5 ms Shapley value)" in auth["annotations"]["description"]
    assert alerts["search"]["annotations"]["summary"].startswith("search p99 forecast 480 ms")
    for alert in alerts.values():
        ends_at = datetime.strptime(alert["endsAt"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        assert ends_at == now + timedelta(minutes=5)
        assert alert["status"]["state"] in ("active", "unprocessed")
        assert not alert.get("generatorURL")


def test_http_error_from_alertmanager_is_a_user_error(alertmanager, report):
    with pytest.raises(UserError, match=r"at .*/wrong-prefix: HTTP 404 .*; check --alertmanager-url and that Alertmanager is running"):
        publish.post_alerts(alertmanager + "/wrong-prefix", report)


def test_closed_port_is_a_one_line_user_error(report):
    url = f"http://127.0.0.1:{_free_port()}"
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
    assert publish.post_alerts(f"http://127.0.0.1:{_free_port()}", report) == 0
