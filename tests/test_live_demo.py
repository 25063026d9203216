"""tools/live.py (make live): a demo store ending now, a fitting checkpoint reused (or a small one
trained), forecast.py at the last finished minute into a textfile that a real node_exporter (Debian's
prometheus-node-exporter) on 127.0.0.1 serves with every series; and the demo store's --end."""

from __future__ import annotations

import json
import os
import subprocess

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from latency_forecast import store, synthetic
from latency_forecast.data import format_minute, to_minute
from tests.helpers import assert_one_line_error, debian_binary, free_port, stop_server, wait_until_serving
from tests.test_rules import CONTRACT_SERIES
from tools import live

def _minute_now() -> int:
    return to_minute(pd.Timestamp.now(tz="UTC"))


def test_the_demo_store_ends_at_end(tmp_path):
    path = str(tmp_path / "store")
    assert synthetic.main(["--output", path, "--days", "1", "--services", "2", "--end", "2024-06-05T10:03:30Z"]) == 0
    span = store.minute_span(path)
    assert (format_minute(span.start), format_minute(span.end - 1)) == ("2024-06-04T10:04:00Z", "2024-06-05T10:03:00Z")
    before = _minute_now()
    assert synthetic.main(["--output", path, "--days", "1", "--services", "2", "--end", "now"]) == 0
    assert before <= store.minute_span(path).end - 1 <= _minute_now()


@pytest.fixture(scope="module")
def live_run(trained_dir, tmp_path_factory) -> tuple[str, int]:
    """One forecast of the live demo with the tiny checkpoint; its directory and the minute it started."""
    directory = str(tmp_path_factory.mktemp("live"))
    started = _minute_now()
    assert live.main(["--directory", directory, "--model-dir", trained_dir, "--days", "1", "--runs", "1"]) == 0
    return directory, started


def test_live_forecasts_the_last_finished_minute_with_a_fitting_checkpoint(live_run):
    directory, started = live_run
    assert sorted(os.listdir(directory)) == ["feature_store", "forecasts.json", "textfile"], "reused: nothing trained"
    span = store.minute_span(f"{directory}/feature_store")
    assert span.end - 1 >= started + live.AHEAD_MINUTES and span.end - span.start == (1 + 1) * 24 * 60
    report = json.loads(open(f"{directory}/forecasts.json").read())
    assert started - 1 <= to_minute(pd.Timestamp(report["as_of"])) <= _minute_now() - 1
    # the tiny checkpoint knows 4 of the demo fleet's 8 services
    statuses = sorted(entry["status"] for entry in report["forecasts"])
    assert statuses == ["ok"] * 4 + ["unknown_service"] * 4
    assert os.listdir(f"{directory}/textfile") == [live.TEXTFILE]


def test_only_a_checkpoint_of_the_demo_fleet_is_reused(trained_dir, tmp_path):
    assert live.fits_the_fleet(trained_dir)
    assert not live.fits_the_fleet(str(tmp_path))


def test_days_below_one_is_a_user_error(tmp_path, capsys):
    code = live.main(["--directory", str(tmp_path), "--days", "0", "--runs", "1"])
    assert_one_line_error(capsys, code, "--days must be at least 1")


def test_a_real_node_exporter_serves_every_series_of_the_live_textfile(live_run, tmp_path):
    directory, _ = live_run
    port = free_port()
    log = tmp_path / "node_exporter.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                debian_binary("prometheus-node-exporter", "prometheus-node-exporter", "node_exporter"),
                f"--web.listen-address=127.0.0.1:{port}",
                f"--collector.textfile.directory={directory}/textfile",
                "--collector.disable-defaults",
                "--collector.textfile",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        text = wait_until_serving(process, f"http://127.0.0.1:{port}/metrics", log).decode()
    finally:
        stop_server(process)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    # causes are written for alerting forecasts only, and whether one alerts depends on the hour
    # of the day the store ends at (now)
    alerting = any(sample.value == 1 for sample in families["latency_forecast_alert"].samples)
    assert set(CONTRACT_SERIES) - ({"latency_forecast_cause_share"} if not alerting else set()) <= set(families)
    assert ("latency_forecast_cause_share" in families) == alerting
    assert families["node_textfile_scrape_error"].samples[0].value == 0
    ok = {sample.labels["service"] for sample in families["latency_forecast_p99_seconds"].samples}
    assert len(ok) == 4


@pytest.mark.slow
def test_without_a_fitting_checkpoint_a_small_model_is_trained_then_reused(tmp_path, capsys):
    directory = str(tmp_path / "live")
    argv = ["--directory", directory, "--model-dir", str(tmp_path / "nothing"), "--days", "1", "--runs", "1"]
    assert live.main(argv) == 0
    assert "training a small one" in capsys.readouterr().out
    assert live.fits_the_fleet(f"{directory}/artifacts")
    assert live.main(argv) == 0
    assert f"forecasting with the checkpoint in {directory}/artifacts/" in capsys.readouterr().out
    report = json.loads(open(f"{directory}/forecasts.json").read())
    assert {entry["status"] for entry in report["forecasts"]} == {"ok"}
