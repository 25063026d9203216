"""train.py's explanation outputs and analyze_causality.py end to end through main(argv), with
every bad input it must turn into exit status 2."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import analyze_causality
import train
from latency_forecast.background import Background, build_background
from latency_forecast import artifacts, causality, data, store, synthetic
from latency_forecast.alerting import AlertRule
from latency_forecast.forecaster import GRADIENT_BOOSTING_FILE
from tests.helpers import TINY_TRAINING, hand_frame, reload, write_frame

HORIZON = 2  # TINY_TRAINING's


@pytest.fixture(scope="module", params=["telemetry", "latency_history"])
def trained(request, tmp_path_factory, tiny_store):
    """A forecaster of the telemetry alone (explained directly), and one that also reads the
    latency's own history (explained through its cause model)."""
    out = tmp_path_factory.mktemp("explained")
    argv = ["--feature-store-path", tiny_store, "--output-dir", str(out), *TINY_TRAINING, "--shap-samples", "24", "--background-size", "4"]
    if request.param == "latency_history":
        argv += ["--feature-columns", ",".join([*synthetic.FEATURE_COLUMNS, "target_latency_p99"])]
    assert train.main(argv) == 0
    return str(out)


@pytest.fixture(scope="module")
def alerting(trained, tmp_path_factory, tiny_store):
    """The trained model with its latency threshold at payment's median forecast, so that the tiny
    model's alerts and breaches overlap (the threshold does not touch the weights)."""
    checkpoint = torch.load(f"{trained}/latency_forecaster.pt", weights_only=True)
    forecaster = reload(trained)
    table = store.load_feature_store(tiny_store, forecaster.feature_columns)
    prepared = forecaster.prepare(table)
    payment = prepared.ends[table.service_codes[prepared.ends] == table.services.index("payment")]
    median = float(np.median(forecaster.predict(prepared, payment).ms))
    checkpoint["latency_thresholds"] = {"default": median, "per_service": {}}
    checkpoint["alert"] = AlertRule().as_dict()  # alert when the forecast reaches the threshold
    out = tmp_path_factory.mktemp("alerting")
    torch.save(checkpoint, out / "latency_forecaster.pt")
    torch.save(torch.load(f"{trained}/scaler.pt", weights_only=True), out / "scaler.pt")
    shutil.copy(f"{trained}/{GRADIENT_BOOSTING_FILE}", out)  # the ensemble's trees travel with the checkpoint
    return str(out)


def _analyze(model_dir, store, output, *extra):
    return analyze_causality.main(
        [
            "--model-checkpoint", f"{model_dir}/latency_forecaster.pt", "--scaler-path", f"{model_dir}/scaler.pt",
            "--feature-store-path", store, "--output", str(output), *extra,
        ]
    )


def _no_nan(value):
    if isinstance(value, dict):
        return all(_no_nan(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_nan(v) for v in value)
    return not (isinstance(value, float) and not math.isfinite(value))


# ----------------------------------------------------------------------------- train.py


def test_train_writes_feature_importance(trained):
    report = json.loads(open(f"{trained}/feature_importance.json").read())
    assert {"method", "n_windows", "importance", "normalized", "predicted_breach"} <= set(report)
    assert report["n_windows"] == 24
    features = torch.load(f"{trained}/latency_forecaster.pt", weights_only=True)["feature_columns"]
    assert list(report["importance"]) == features == list(report["normalized"])
    assert sum(report["normalized"].values()) == pytest.approx(1.0)
    assert report["importance"]["node_cpu_cores"] == 0.0, "constant everywhere: exactly no attribution"
    assert "exact" in report["method"] and "ms" in report["method"]
    assert os.path.getsize(f"{trained}/feature_importance.png") > 0
    assert _no_nan(report)


def test_checkpoint_background_is_the_training_split_summary(trained, tiny_store):
    checkpoint = artifacts.load_torch(f"{trained}/latency_forecaster.pt", "checkpoint", "--model-checkpoint")
    saved = Background.from_state(checkpoint["explain_background"])
    forecaster = reload(trained)
    table = store.load_feature_store(tiny_store, forecaster.feature_columns)
    settings = forecaster.data_config
    splits = data.fraction_splits(table, settings.validation_fraction, settings.test_fraction, settings.embargo)
    prepared = forecaster.prepare(table)
    train_ends = data.samples_in(prepared.ends, table, splits.train, settings.sequence_length, settings.horizon)
    rebuilt = build_background(prepared.tensors, train_ends, len(forecaster.services), 4, checkpoint["config"]["training"]["seed"])
    np.testing.assert_array_equal(saved.windows, rebuilt.windows)
    np.testing.assert_array_equal(saved.weights, rebuilt.weights)


def test_shap_samples_0_skips_the_explanation(tiny_store, tmp_path):
    argv = ["--feature-store-path", tiny_store, "--output-dir", str(tmp_path), *TINY_TRAINING, "--shap-samples", "0", "--epochs", "1"]
    assert train.main(argv) == 0
    assert not any(name.startswith("feature_importance") for name in os.listdir(tmp_path))
    assert "explain_background" in torch.load(tmp_path / "latency_forecaster.pt", weights_only=True)


# ----------------------------------------------------------------------------- analyze_causality.py


def test_analyze_end_to_end_with_a_chaos_manifest(alerting, tiny_store, tmp_path, capsys):
    output = tmp_path / "out" / "causality_report.json"
    manifest = f"{tiny_store}/chaos_manifest.json"
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(synthetic.call_graph(4)))
    code = _analyze(alerting, tiny_store, output, "--chaos-manifest", manifest, "--max-samples", "4", "--call-graph", str(graph))
    assert code == 0, capsys.readouterr().err
    report = json.loads(output.read_text())
    assert _no_nan(report)
    assert {"window", "events", "validation", "method"} <= set(report)
    assert report["n_events"] > 0 and len(report["events"]) == min(4, report["n_events"])
    minutes = [event["timestamp"] for event in report["events"]]
    assert minutes == sorted(minutes), "earliest first"
    features = report["model"]["feature_columns"]
    for event in report["events"]:
        assert {"service", "timestamp", "predicted", "actual", "top_feature", "scores", "fault"} <= set(event)
        assert 1 <= len(event["root_cause_services"]) <= 3 and len(set(event["root_cause_services"])) == len(event["root_cause_services"])
        assert event["timestamp"].endswith("Z") and list(event["scores"]) == features
        assert event["predicted"] >= report["model"]["latency_thresholds"]["default"] <= event["actual"]
        causes = {name: score for name, score in event["scores"].items() if name != "target_latency_p99"}
        assert event["top_feature"] == max(causes, key=causes.get), "the latency's own history is never a cause"
        assert event["base_value"] + sum(event["scores"].values()) == pytest.approx(event["explained_forecast"], rel=1e-5)
        if "target_latency_p99" in features:
            assert event["scores"]["target_latency_p99"] == 0.0, "the cause model does not read the latency history"
            assert event["explained_forecast"] != event["predicted"], "the cause model's forecast, not the alert's"
        else:
            assert event["explained_forecast"] == pytest.approx(event["predicted"], rel=1e-6)
    validation = report["validation"]
    for key in ("top1_accuracy", "top3_accuracy", "detection_rate", "random_top1", "random_top3", "detected", "by_fault", "faults", "unscorable"):
        assert key in validation
    assert validation["random_top1"] == pytest.approx(1 / len(causes))
    assert validation["n_faults"] + validation["n_unscorable"] == len(json.loads(open(manifest).read()))
    assert len(validation["faults"]) == validation["n_faults"]
    for fault in validation["faults"]:
        assert fault["hit_at_1"] == (fault["top_feature"] == fault["root_cause_feature"])
    assert {"n_faults", "top1_accuracy", "top3_accuracy", "detected"} <= set(validation["rule_baseline"])
    assert all(len(fault["rule_top3"]) == 3 for fault in validation["faults"])
    services = validation["service_level"]
    n_faults = len(json.loads(open(manifest).read()))
    assert services["n_faults"] == n_faults == len(services["faults"]), "every fault is scored at service level"
    assert services["call_graph_edges"] == len(synthetic.call_graph(4)["edges"]) and services["n_services"] == 4
    for block in (services, services["rule_baseline"]):
        assert {"top1_accuracy", "top3_accuracy", "avg5"} <= set(block)
        assert 0 <= block["top1_accuracy"] <= block["top3_accuracy"] <= 1 and 0 <= block["avg5"] <= 1
    for fault in services["faults"]:
        assert (fault["rank"] == 1) == (fault["top5"][:1] == [fault["service"]])
        assert (fault["rule_rank"] == 1) == (fault["rule_top5"][:1] == [fault["service"]])
    assert os.path.getsize(output.with_suffix(".png")) > 0
    out = capsys.readouterr().out
    assert "chaos validation" in out and "AC@1" in out and "random" in out
    assert "root-cause service" in out and "Avg@5" in out and "rule-based baseline" in out


def test_malformed_call_graph_exits_2(capsys, trained, tiny_store, tmp_path):
    graph = tmp_path / "graph.json"
    graph.write_text('{"edges": [{"caller": "auth"}]}')
    _one_line_error(capsys, _analyze(trained, tiny_store, tmp_path / "r.json", "--call-graph", str(graph)), "edge 0 is not an object")
    assert not (tmp_path / "r.json").exists()


def test_event_order_predicted_explains_the_highest_forecasts(alerting, tiny_store, tmp_path):
    output = tmp_path / "p.json"
    assert _analyze(alerting, tiny_store, output, "--max-samples", "2", "--event-order", "predicted") == 0
    report = json.loads(output.read_text())
    assert "validation" not in report, "no manifest, no scoring"
    # every event's first minute, computed independently of the script
    forecaster = reload(alerting)
    prepared = forecaster.prepare(store.load_feature_store(tiny_store, forecaster.feature_columns))
    everything = data.TimeRange(int(prepared.table.minutes.min()), int(prepared.table.minutes.max()) + 1)
    forecasts = causality.forecasts_in(forecaster, prepared, everything)
    events = causality.true_positive_events(forecasts.service_codes, forecasts.target_minutes, forecasts.true_positive)
    assert report["n_events"] == len(events) > 2
    highest = sorted((forecasts.forecast[e.position] for e in events), reverse=True)[:2]
    assert [e["predicted"] for e in report["events"]] == pytest.approx(highest)


def test_no_true_positive_is_an_empty_report_with_a_message(trained, tiny_store, tmp_path, capsys):
    output = tmp_path / "r.json"
    assert _analyze(trained, tiny_store, output, "--start-ts", "2024-05-02T00:00:00Z", "--end-ts", "2024-05-02T01:00:00Z") == 0
    report = json.loads(output.read_text())
    assert report["events"] == [] and report["n_events"] == 0
    assert "no true positive" in report["message"]
    assert report["window"] == {"start": "2024-05-02T00:00:00Z", "end": "2024-05-02T01:00:00Z"}
    assert 0 < report["n_samples"] <= 60 * 4, "forecasts for the range only (the history before it is loaded, not reported)"
    assert "no true positive" in capsys.readouterr().out


def _one_line_error(capsys, code, message):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--start-ts", "2024-05-03", "--end-ts", "2024-05-02"], "is not before"),
        (["--start-ts", "2031-01-01"], "has no rows"),
        (["--start-ts", "2024-05-01T00:00:00Z", "--end-ts", "2024-05-01T00:05:00Z"], "no complete window"),
        (["--chaos-manifest", "/nonexistent/chaos.json"], "does not exist"),
        (["--output", "report.txt"], "--output must name a .json file"),
    ],
)
def test_bad_range_and_flags_exit_2(capsys, trained, tiny_store, tmp_path, extra, message):
    _one_line_error(capsys, _analyze(trained, tiny_store, tmp_path / "r.json", *extra), message)


def test_bad_artifacts_exit_2(capsys, trained, tiny_store, tmp_path):
    checkpoint = torch.load(f"{trained}/latency_forecaster.pt", weights_only=True)
    scaler = torch.load(f"{trained}/scaler.pt", weights_only=True)

    def save(name, value):
        torch.save(value, tmp_path / name)
        return str(tmp_path / name)

    shutil.copy(f"{trained}/{GRADIENT_BOOSTING_FILE}", tmp_path)  # beside every checkpoint saved here

    def run(checkpoint_path, scaler_path, store=tiny_store):
        return analyze_causality.main(
            ["--model-checkpoint", checkpoint_path, "--scaler-path", scaler_path, "--feature-store-path", store, "--output", str(tmp_path / "r.json")]
        )

    scaler_path = f"{trained}/scaler.pt"
    old = save("old.pt", {**checkpoint, "format_version": 0})
    _one_line_error(capsys, run(old, scaler_path), "format_version 0")
    other = save("other_scaler.pt", {**scaler, "feature_columns": list(reversed(scaler["feature_columns"]))})
    _one_line_error(capsys, run(f"{trained}/latency_forecaster.pt", other), "do not match the checkpoint")
    bare = save("bare.pt", {key: value for key, value in checkpoint.items() if key != "explain_background"})
    _one_line_error(capsys, run(bare, scaler_path), "no explanation background")
    store = write_frame(hand_frame(features=("cpu_rolling_avg",)), tmp_path / "small.parquet")
    _one_line_error(capsys, run(f"{trained}/latency_forecaster.pt", scaler_path, store), "does not hold the model's features")
    _one_line_error(capsys, run(str(tmp_path / "missing.pt"), scaler_path), "does not exist")
    assert not (tmp_path / "r.json").exists()
