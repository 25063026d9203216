"""Object storage: the scripts read ``s3://bucket/prefix`` from a real S3-compatible server (moto's,
on 127.0.0.1, found through AWS_ENDPOINT_URL) exactly as they read the same store from disk, time
pushdown included; a missing bucket, rejected credentials and an unreachable endpoint are one-line
user errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import boto3
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

import analyze_causality
import backtest
import forecast
import train
from latency_forecast import store
from tests.helpers import TINY_TRAINING, assert_one_line_error, stop_server

BUCKET, PREFIX = "telemetry", "fleet/feature_store"
URI = f"s3://{BUCKET}/{PREFIX}"
REGION = "us-east-1"
QUICK = ["--shap-samples", "0", "--baselines", "persistence"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free port of 127.0.0.1: (its URL, its request log)."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "requests.log"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}  # it needs none
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=environment,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's server did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def s3_store(s3_server, tiny_store, tmp_path_factory):
    """The tiny store (and its chaos manifest, a non-Parquet file beside the data) uploaded to
    ``URI``; from then on the server checks credentials, and the AWS_* variables hold a reader's."""
    url, _ = s3_server
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("AWS_") or name.lower().endswith("_proxy")]:
            patch.delenv(name)
        patch.setenv("NO_PROXY", "127.0.0.1")  # curl, botocore and urllib: straight to the local server
        patch.setenv("no_proxy", "127.0.0.1")
        home = tmp_path_factory.mktemp("aws")  # no ~/.aws of this machine
        patch.setenv("AWS_CONFIG_FILE", str(home / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")

        uploader = pafs.S3FileSystem(
            access_key="setup", secret_key="setup", region=REGION, endpoint_override=url, allow_bucket_creation=True
        )
        uploader.create_dir(BUCKET)
        pafs.copy_files(tiny_store, f"{BUCKET}/{PREFIX}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=uploader)
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", region_name=REGION, endpoint_url=url)
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="read-telemetry", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        # every request from now on must be signed by a known key
        request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

        patch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        patch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_ENDPOINT_URL", url)
        yield URI


@pytest.fixture(scope="module")
def runs(s3_store, tiny_store, tmp_path_factory):
    """train.py on the disk store and on the S3 store, then forecast.py and analyze_causality.py
    (with the chaos manifest, a local file) of the S3-trained model on both: {"disk": directory,
    "s3": directory}, each with metrics.json, forecasts.json and causality_report.json."""
    directories = {}
    for name, path in (("disk", tiny_store), ("s3", s3_store)):
        directory = str(tmp_path_factory.mktemp(f"trained_{name}"))
        assert train.main(["--feature-store-path", path, "--output-dir", directory, *TINY_TRAINING, *QUICK]) == 0
        directories[name] = directory
    checkpoint = directories["s3"]
    for name, path in (("disk", tiny_store), ("s3", s3_store)):
        argv = [
            "--model-checkpoint", f"{checkpoint}/latency_forecaster.pt", "--scaler-path", f"{checkpoint}/scaler.pt",
            "--feature-store-path", path, "--output", f"{directories[name]}/forecasts.json",
        ]
        assert forecast.main(argv) == 0
        argv[-1] = f"{directories[name]}/causality_report.json"
        assert analyze_causality.main([*argv, "--max-samples", "3", "--chaos-manifest", f"{tiny_store}/chaos_manifest.json"]) == 0
    return directories


def _json(directory: str, name: str):
    return json.loads(open(os.path.join(directory, name)).read())


def test_train_on_s3_gives_the_metrics_of_the_same_store_on_disk(runs):
    disk, s3 = _json(runs["disk"], "metrics.json"), _json(runs["s3"], "metrics.json")
    assert s3["test"]["n_samples"] > 0
    assert s3["test"] == disk["test"]
    assert s3["validation"] == disk["validation"]
    assert s3["data"]["splits"] == disk["data"]["splits"]


def test_forecast_on_s3_gives_the_forecasts_of_the_same_store_on_disk(runs):
    disk, s3 = _json(runs["disk"], "forecasts.json"), _json(runs["s3"], "forecasts.json")
    assert s3["forecasts"] and s3["as_of"] == disk["as_of"]
    assert s3["forecasts"] == disk["forecasts"]
    assert s3["summary"] == disk["summary"]


def test_analyze_causality_on_s3_explains_the_events_of_the_same_store_on_disk(runs):
    disk, s3 = _json(runs["disk"], "causality_report.json"), _json(runs["s3"], "causality_report.json")
    assert s3["events"] and s3["validation"]["faults"]
    assert s3["events"] == disk["events"]
    assert s3["validation"] == disk["validation"]


def test_time_range_is_pushed_down_to_the_s3_partitions(s3_store, tiny_store, s3_server):
    _, log_path = s3_server
    start, end = pd.Timestamp("2024-05-02T00:00:00Z"), pd.Timestamp("2024-05-02T06:00:00Z")
    before = len(log_path.read_text().splitlines())
    table = store.load_feature_store(s3_store, ["cpu_rolling_avg", "fan_out"], start, end)
    requests = log_path.read_text().splitlines()[before:]
    expected = store.load_feature_store(tiny_store, ["cpu_rolling_avg", "fan_out"], start, end)
    assert table.services == expected.services and table.feature_columns == expected.feature_columns
    for name in ("minutes", "service_codes", "features", "target"):
        np.testing.assert_array_equal(getattr(table, name), getattr(expected, name))
    reads = [line for line in requests if "GET /" in line and ".parquet" in line]  # byte ranges of objects
    assert any("date=2024-05-02" in line for line in reads), requests
    assert not any("date=2024-05-03" in line for line in reads), "a pruned day was read"
    assert store.minute_span(s3_store) == store.minute_span(tiny_store)


def _argv(script, path: str, directory: str, checkpoint: str) -> list[str]:
    """The smallest command line of ``script`` that reads the store at ``path``."""
    if script is train:
        return ["--feature-store-path", path, "--output-dir", directory, *TINY_TRAINING, *QUICK]
    if script is backtest:
        return ["--feature-store-path", path, "--output", f"{directory}/backtest.json", *TINY_TRAINING]
    model = ["--model-checkpoint", f"{checkpoint}/latency_forecaster.pt", "--scaler-path", f"{checkpoint}/scaler.pt"]
    name = "forecasts.json" if script is forecast else "causality_report.json"
    return [*model, "--feature-store-path", path, "--output", f"{directory}/{name}"]


SCRIPTS = pytest.mark.parametrize("script", [train, backtest, analyze_causality, forecast], ids=lambda script: script.__name__)


@SCRIPTS
def test_a_missing_bucket_exits_2_with_one_line(script, runs, capsys, tmp_path):
    code = script.main(_argv(script, f"s3://no-such-bucket/{PREFIX}", str(tmp_path), runs["s3"]))
    assert_one_line_error(capsys, code, "bucket 'no-such-bucket' does not exist", "AWS_ENDPOINT_URL=http://127.0.0.1:")
    assert not os.listdir(tmp_path)


def test_a_missing_prefix_exits_2_with_one_line(s3_store, capsys, tmp_path):
    code = train.main(_argv(train, f"s3://{BUCKET}/no/such/prefix", str(tmp_path), ""))
    assert_one_line_error(capsys, code, f"s3://{BUCKET}/no/such/prefix does not exist", "check the prefix")


@SCRIPTS
def test_rejected_credentials_exit_2_with_one_line(script, runs, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    code = script.main(_argv(script, URI, str(tmp_path), runs["s3"]))
    assert_one_line_error(capsys, code, f"access to the feature store {URI} was denied", "AWS_SECRET_ACCESS_KEY")
    assert not os.listdir(tmp_path)


def test_an_unreachable_endpoint_exits_2_with_one_line_soon(s3_store, capsys, tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    started = time.monotonic()
    code = train.main(_argv(train, URI, str(tmp_path), ""))
    assert_one_line_error(capsys, code, "cannot reach the object store", f"AWS_ENDPOINT_URL={endpoint}")
    assert time.monotonic() - started < 30, "the SDK's retries must not hang the run"
