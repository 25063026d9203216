"""forecaster.py: the trained bundle's one checkpoint format (round trip under weights_only=True,
exact predictions, version and key checks), preparing a table for it, and building its networks."""

import dataclasses

import numpy as np
import pytest
import torch

from latency_forecast import data, fitting, forecaster, scaling, training
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.background import build_background
from latency_forecast.config import (
    DataConfig,
    ModelConfig,
    StoreConfig,
    TimeRangeConfig,
)
from latency_forecast.data import TimeRange
from latency_forecast.errors import UserError
from latency_forecast.forecaster import Forecaster
from tests.helpers import (
    TINY_DATA,
    TINY_MODEL,
    TINY_TRAINING_CONFIG,
    hand_frame,
    save_and_load,
    table_of,
)


def _with_background(fit):
    """The tiny forecaster, calibrated and carrying an explanation background, as train.py saves it."""
    background = build_background(fit.prepared.tensors, fit.ends["train"], len(fit.forecaster.services), 3, seed=0, pool=100)
    rule = AlertRule("forecast_ratio", 0.8, {"cache": 0.7}, 0.02)
    return dataclasses.replace(fit.forecaster, background=background, alert=rule, store_config=StoreConfig("somewhere"))


def _plain(value) -> bool:
    """Only what weights_only=True and the style guide allow: tensors, numbers, strings, lists, dicts."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str)) and not isinstance(value, np.generic)


def test_checkpoint_round_trip_under_weights_only_reproduces_predictions_exactly(tiny_fit, tmp_path):
    original = _with_background(tiny_fit)
    checkpoint, scaler = save_and_load(original, tmp_path)
    assert set(forecaster.CHECKPOINT_KEYS) <= set(checkpoint) and checkpoint["format_version"] == forecaster.FORMAT_VERSION
    assert _plain(checkpoint) and _plain(scaler)
    restored = Forecaster.from_checkpoint(checkpoint, scaler, torch.device("cpu"))
    assert restored.settings == original.settings
    assert (restored.services, restored.feature_columns) == (original.services, original.feature_columns)
    assert (restored.alert, restored.latency_thresholds) == (original.alert, original.latency_thresholds)
    assert restored.store_config == StoreConfig("somewhere") and restored.time_range_config == TimeRangeConfig()
    assert restored.model.anchored and restored.cause_model is not None

    prepared = restored.prepare(tiny_fit.table)
    torch.testing.assert_close(prepared.tensors.inputs, tiny_fit.prepared.tensors.inputs, rtol=0, atol=0, equal_nan=True)
    ends = tiny_fit.ends["test"]
    mine, theirs = restored.predict(prepared, ends), original.predict(tiny_fit.prepared, ends)
    np.testing.assert_array_equal(mine.ms, theirs.ms)
    assert mine.quantiles.keys() == theirs.quantiles.keys()
    for name in mine.quantiles:
        np.testing.assert_array_equal(mine.quantiles[name], theirs.quantiles[name])
    cause = training.predict(restored.cause_model, prepared.tensors, ends).forecast
    np.testing.assert_array_equal(cause, training.predict(original.cause_model, tiny_fit.prepared.tensors, ends).forecast)
    for name in ("windows", "weights", "service_codes"):
        np.testing.assert_array_equal(getattr(restored.background, name), getattr(original.background, name))
    assert restored.require_background("c.pt") is restored.background


def test_a_checkpoint_of_another_format_version_or_missing_a_key_is_a_user_error(tiny_fit):
    trained = tiny_fit.forecaster
    checkpoint, scaler = trained.checkpoint(), trained.scaler.state(trained.feature_columns)
    for version in (forecaster.FORMAT_VERSION - 1, forecaster.FORMAT_VERSION + 1, None):
        with pytest.raises(UserError) as raised:
            Forecaster.from_checkpoint({**checkpoint, "format_version": version}, scaler, torch.device("cpu"), "old.pt")
        assert str(raised.value) == (
            f"checkpoint old.pt has format_version {version}, this version reads {forecaster.FORMAT_VERSION}; retrain it with train.py"
        )
    for key in forecaster.CHECKPOINT_KEYS[1:]:
        partial = {name: value for name, value in checkpoint.items() if name != key}
        with pytest.raises(UserError, match=f"checkpoint c.pt lacks {key}; retrain it with train.py"):
            Forecaster.from_checkpoint(partial, scaler, torch.device("cpu"), "c.pt")


def test_a_checkpoint_that_does_not_match_its_scaler_or_config_is_a_user_error(tiny_fit):
    trained = tiny_fit.forecaster
    checkpoint, scaler = trained.checkpoint(), trained.scaler.state(trained.feature_columns)
    reversed_scaler = {**scaler, "feature_columns": list(reversed(scaler["feature_columns"]))}
    with pytest.raises(UserError, match="do not match the checkpoint's"):
        Forecaster.from_checkpoint(checkpoint, reversed_scaler, torch.device("cpu"))
    bigger = {**checkpoint["config"], "model": {**checkpoint["config"]["model"], "hidden_size": 16}}
    with pytest.raises(UserError, match="the checkpoint's weights do not match its saved config"):
        Forecaster.from_checkpoint({**checkpoint, "config": bigger}, scaler, torch.device("cpu"))


def test_load_errors_are_user_errors(tiny_fit, tmp_path):
    trained = tiny_fit.forecaster
    good_scaler = tmp_path / "scaler.pt"
    torch.save(trained.scaler.state(trained.feature_columns), good_scaler)
    with pytest.raises(UserError, match="checkpoint .*missing.pt does not exist; run train.py first or pass --model-checkpoint"):
        Forecaster.load(str(tmp_path / "missing.pt"), str(good_scaler), torch.device("cpu"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        Forecaster.load(str(garbage), str(good_scaler), torch.device("cpu"))
    old = tmp_path / "old.pt"
    torch.save({"format_version": 0, "state_dict": {}}, old)
    with pytest.raises(UserError, match="format_version 0"):
        Forecaster.load(str(old), str(good_scaler), torch.device("cpu"))
    scaler = tmp_path / "bad_scaler.pt"
    torch.save({"mean": torch.zeros(1)}, scaler)
    with pytest.raises(UserError, match="lacks scale, feature_columns"):
        Forecaster.load(str(old), str(scaler), torch.device("cpu"))
    with pytest.raises(UserError, match="scaler .*absent.pt does not exist; run train.py first or pass --scaler-path"):
        Forecaster.load(str(old), str(tmp_path / "absent.pt"), torch.device("cpu"))


def test_an_anchored_model_without_a_cause_model_cannot_be_explained(tiny_fit):
    assert tiny_fit.forecaster.explained_model is tiny_fit.forecaster.cause_model
    with pytest.raises(UserError, match="no cause model to explain"):
        dataclasses.replace(tiny_fit.forecaster, cause_model=None).explained_model


def test_background_must_exist_and_match_the_model(tiny_fit):
    with pytest.raises(UserError, match="c.pt carries no explanation background"):
        tiny_fit.forecaster.require_background("c.pt")
    background = _with_background(tiny_fit).background
    shorter = dataclasses.replace(background, windows=background.windows[:, 1:])
    with pytest.raises(UserError, match="its explanation background does not match its model"):
        dataclasses.replace(tiny_fit.forecaster, background=shorter).require_background("c.pt")


# ----------------------------------------------------------------------------- preparing a table


def test_samples_of_an_empty_split_is_a_user_error_naming_it(tiny_fit):
    last = int(tiny_fit.table.minutes.max())
    np.testing.assert_array_equal(tiny_fit.prepared.samples(tiny_fit.splits.test, "test"), tiny_fit.ends["test"])
    with pytest.raises(UserError) as raised:
        tiny_fit.prepared.samples(TimeRange(last - 3, last + 1), "test")
    message = str(raised.value)
    assert message.startswith(f"too little data: the test period {data.format_minute(last - 3)} to {data.format_minute(last + 1)}")
    assert "window of 8 minutes (sequence length + horizon)" in message
    with pytest.raises(UserError, match="the early-stopping period"):
        tiny_fit.prepared.samples(TimeRange(last + 10, last + 100), "early-stopping")


def test_prepare_leaves_unknown_services_out_and_checks_the_features(tmp_path, tiny_fit):
    table = table_of(hand_frame(services=("a", "b"), minutes=200), tmp_path)
    fit_range, stop_range = TimeRange(table.minutes.min(), table.minutes.min() + 120), TimeRange(table.minutes.min() + 130, table.minutes.max() + 1)
    trained = fitting.untrained_forecaster(table, fit_range, fitting.Settings(TINY_DATA, TINY_MODEL, TINY_TRAINING_CONFIG, latency_thresholds=LatencyThresholds(100.0, {"b": 80.0})))
    wider = table_of(hand_frame(services=("a", "b", "new"), minutes=50), tmp_path, "wider.parquet")
    prepared = trained.prepare(wider)
    assert prepared.unknown_services == ["new"]
    assert set(wider.service_codes[prepared.ends]) == {0, 1}, "no sample of a service the model does not know"
    assert len(prepared.ends) == 2 * (50 - TINY_DATA.window_minutes + 1)
    assert prepared.service_thresholds.tolist() == [100.0, 80.0, 100.0]
    assert prepared.latency_threshold(np.array([0, 60, 120])).tolist() == [100.0, 80.0, 100.0]
    with pytest.raises(UserError, match=r"the store's features \['cpu', 'queue', 'target_latency_p99'\] differ from the model's \['cpu', 'target_latency_p99'\]"):
        trained.prepare(table_of(hand_frame(features=("cpu", "queue")), tmp_path, "other.parquet"))
    assert stop_range.start > fit_range.end


# ----------------------------------------------------------------------------- building


def test_the_latency_history_decides_anchoring_and_the_cause_model():
    columns = ["cpu", "target_latency_p99", "queue"]
    assert forecaster.reads_latency_history(columns) and not forecaster.reads_latency_history(["cpu", "queue"])
    assert forecaster.cause_columns(columns) == [0, 2]
    normalizer = scaling.TargetNormalizer(np.zeros(2), np.ones(2))
    assert forecaster.build_model(columns, 2, ModelConfig(hidden_size=4), normalizer).anchored
    assert not forecaster.build_model(columns, 2, ModelConfig(hidden_size=4, anchor="none"), normalizer).anchored
    assert not forecaster.build_model(["cpu"], 2, ModelConfig(hidden_size=4), normalizer).anchored
    cause = forecaster.build_cause_model(columns, 2, ModelConfig(hidden_size=4, multitask=True), normalizer)
    assert cause.input_columns.tolist() == [0, 2] and not cause.anchored and not cause.multitask
    assert cause.rnn.input_size == 2


def test_settings_are_the_checkpoints_config(tiny_fit):
    trained = tiny_fit.forecaster
    assert list(trained.settings) == ["data", "model", "training"]
    assert trained.settings["data"] == dataclasses.asdict(TINY_DATA)
    assert DataConfig(**trained.settings["data"]) == trained.data_config
    with_store = dataclasses.replace(trained, store_config=StoreConfig("s"), time_range_config=TimeRangeConfig("2024-05-01"))
    assert list(with_store.settings)[0] == "store"
    assert with_store.settings["store"] == {"feature_store_path": "s", "start_ts": "2024-05-01", "end_ts": None}
