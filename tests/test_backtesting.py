"""Fold arithmetic, the no-lookahead guarantees of a fold, and the summary across folds."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from latency_forecast import backtesting, data, fitting, store
from latency_forecast.alerting import LatencyThresholds
from latency_forecast.config import AlertConfig, BaselineConfig, DataConfig, ModelConfig, TrainingConfig
from latency_forecast.data import TimeRange
from latency_forecast.errors import UserError
from latency_forecast.script_config import BacktestConfig

DAY = 1440
START = data.to_minute(pd.Timestamp("2024-05-01T00:00:00Z"))


def _iso(time_range: TimeRange) -> tuple[str, str]:
    return data.format_minute(time_range.start), data.format_minute(time_range.end)


def _plan(days=10.0, mode="sliding", step=None, **data_values):
    data_config = DataConfig(**{"validation_fraction": 0.25, **data_values})
    backtest_config = BacktestConfig(train_window_days=4, val_window_days=2, step_days=step, window_mode=mode)
    return backtesting.plan_folds(TimeRange(START, START + round(days * DAY)), backtest_config, data_config)


# ----------------------------------------------------------------------------- fold arithmetic


@pytest.fixture(scope="module")
def tiny_table(tiny_store):
    return store.load_feature_store(tiny_store)


def test_sliding_folds_by_hand():
    # 10 days, train 4, validate 2, step 2 (= validation), L+H = 21 minutes of embargo,
    # early stopping on the last quarter of each training window
    folds = _plan()
    assert [
        (_iso(f.train), _iso(f.fit), _iso(f.early_stopping), _iso(f.validation)) for f in folds
    ] == [
        (
            ("2024-05-01T00:00:00Z", "2024-05-05T00:00:00Z"),
            ("2024-05-01T00:00:00Z", "2024-05-04T00:00:00Z"),
            ("2024-05-04T00:21:00Z", "2024-05-05T00:00:00Z"),
            ("2024-05-05T00:21:00Z", "2024-05-07T00:00:00Z"),
        ),
        (
            ("2024-05-03T00:00:00Z", "2024-05-07T00:00:00Z"),
            ("2024-05-03T00:00:00Z", "2024-05-06T00:00:00Z"),
            ("2024-05-06T00:21:00Z", "2024-05-07T00:00:00Z"),
            ("2024-05-07T00:21:00Z", "2024-05-09T00:00:00Z"),
        ),
        (
            ("2024-05-05T00:00:00Z", "2024-05-09T00:00:00Z"),
            ("2024-05-05T00:00:00Z", "2024-05-08T00:00:00Z"),
            ("2024-05-08T00:21:00Z", "2024-05-09T00:00:00Z"),
            ("2024-05-09T00:21:00Z", "2024-05-11T00:00:00Z"),
        ),
    ]
    assert [f.number for f in folds] == [1, 2, 3]


def test_expanding_folds_by_hand():
    folds = _plan(mode="expanding")
    assert [(_iso(f.train), _iso(f.fit), _iso(f.early_stopping), _iso(f.validation)) for f in folds] == [
        (
            ("2024-05-01T00:00:00Z", "2024-05-05T00:00:00Z"),
            ("2024-05-01T00:00:00Z", "2024-05-04T00:00:00Z"),
            ("2024-05-04T00:21:00Z", "2024-05-05T00:00:00Z"),
            ("2024-05-05T00:21:00Z", "2024-05-07T00:00:00Z"),
        ),
        (  # 6 days: the last 1.5 for early stopping
            ("2024-05-01T00:00:00Z", "2024-05-07T00:00:00Z"),
            ("2024-05-01T00:00:00Z", "2024-05-05T12:00:00Z"),
            ("2024-05-05T12:21:00Z", "2024-05-07T00:00:00Z"),
            ("2024-05-07T00:21:00Z", "2024-05-09T00:00:00Z"),
        ),
        (
            ("2024-05-01T00:00:00Z", "2024-05-09T00:00:00Z"),
            ("2024-05-01T00:00:00Z", "2024-05-07T00:00:00Z"),
            ("2024-05-07T00:21:00Z", "2024-05-09T00:00:00Z"),
            ("2024-05-09T00:21:00Z", "2024-05-11T00:00:00Z"),
        ),
    ]


def test_step_embargo_and_last_fold_within_the_data():
    # step 3 days over 10.5 days: validation windows end on May 7 and May 10; May 13 is past the end
    folds = _plan(days=10.5, step=3, embargo_minutes=60)
    assert [_iso(f.validation) for f in folds] == [
        ("2024-05-05T01:00:00Z", "2024-05-07T00:00:00Z"),
        ("2024-05-08T01:00:00Z", "2024-05-10T00:00:00Z"),
    ]
    assert [_iso(f.early_stopping)[0] for f in folds] == ["2024-05-04T01:00:00Z", "2024-05-07T01:00:00Z"]
    # exactly one fold when the data is exactly train + validation long
    assert len(_plan(days=6)) == 1 and _plan(days=6)[0].validation.end == START + 6 * DAY


@pytest.mark.parametrize("mode", ["sliding", "expanding"])
@pytest.mark.parametrize("step", [None, 0.5, 1.7])
@pytest.mark.parametrize("embargo", [0, 45])
def test_every_fold_keeps_its_embargoes(mode, step, embargo):
    span = TimeRange(START, START + 13 * DAY + 77)
    data_config = DataConfig(embargo_minutes=embargo)
    folds = backtesting.plan_folds(span, BacktestConfig(3.3, 1.1, step, mode), data_config)
    assert len(folds) >= 2
    for fold in folds:
        assert fold.fit.start == fold.train.start and fold.early_stopping.end == fold.train.end
        assert fold.early_stopping.start - fold.fit.end == data_config.embargo >= data_config.window_minutes
        assert fold.validation.start - fold.train.end == data_config.embargo
        assert fold.validation.end == fold.train.end + round(1.1 * DAY) <= span.end
        assert fold.train.start == (span.start if mode == "expanding" else fold.train.end - round(3.3 * DAY))
    # no room for another fold after the last one
    step_minutes = round(step * DAY) if step else round(1.1 * DAY)
    assert folds[-1].validation.end + step_minutes > span.end


def test_no_validation_minute_in_any_training_window_or_target(tiny_table):
    table = tiny_table
    data_config = DataConfig(sequence_length=6, horizon=2)
    L, H = data_config.sequence_length, data_config.horizon
    for mode in ("sliding", "expanding"):
        folds = backtesting.plan_folds(data.span(table), BacktestConfig(1.2, 0.4, 0.3, mode), data_config)
        assert len(folds) >= 4
        ends, _ = data.window_ends(table, L, H)
        for fold in folds:
            learned = np.concatenate([data.samples_in(ends, table, r, L, H) for r in (fold.fit, fold.early_stopping)])
            judged = data.samples_in(ends, table, fold.validation, L, H)
            assert len(learned) and len(judged)
            last_learned = table.minutes[learned].max() + H  # the latest target any training sample sees
            first_judged = table.minutes[judged].min() - (L - 1)  # the earliest input any validation sample reads
            assert last_learned < fold.train.end
            assert first_judged - last_learned > data_config.embargo
            assert table.minutes[judged].max() + H < fold.validation.end <= table.minutes.max() + 1


@pytest.mark.parametrize(
    "days, values, message",
    [
        (5, {}, "the data spans 5 days (2024-05-01T00:00:00Z to 2024-05-06T00:00:00Z) but one fold needs"),
        (10, {"sequence_length": 2000}, "--val-window-days 2 is 2880 minutes"),
        (10, {"validation_fraction": 0.001}, "lengthen --train-window-days"),
    ],
)
def test_too_little_time_is_a_user_error(days, values, message):
    with pytest.raises(UserError) as raised:
        _plan(days=days, **values)
    assert message in str(raised.value)
    if days == 5:
        assert "= 6 days" in str(raised.value)


@pytest.mark.parametrize(
    "values, flag",
    [
        ({"train_window_days": 0}, "--train-window-days"),
        ({"val_window_days": -1}, "--val-window-days"),
        ({"step_days": 0.0001}, "--step-days"),
        ({"train_window_days": float("nan")}, "--train-window-days"),
        ({"jobs": 0}, "--jobs"),
    ],
)
def test_non_positive_settings_are_user_errors(values, flag):
    with pytest.raises(UserError, match=flag):
        BacktestConfig(**values)


def test_folds_side_by_side_take_one_thread_each():
    assert backtesting.threads_per_fold(1, 0) == 0  # auto: one torch thread, native pools on every CPU
    assert backtesting.threads_per_fold(2, 0) == 1
    assert backtesting.threads_per_fold(3, 0) == 1
    assert backtesting.threads_per_fold(2, 3) == 3  # --num-threads wins


# ----------------------------------------------------------------------------- leakage

TINY = fitting.Settings(
    DataConfig(sequence_length=6, horizon=2),
    ModelConfig(hidden_size=8),
    TrainingConfig(epochs=2, samples_per_epoch=2000, batch_size=256, num_threads=1),
    AlertConfig(target_fpr=0.05),
    BaselineConfig(gradient_boosting_max_samples=200),
    latency_thresholds=LatencyThresholds(300.0),
)


def _fold(table):
    folds = backtesting.plan_folds(data.span(table), BacktestConfig(1.5, 0.5), TINY.data)
    return folds[0]


def _corrupt(table, from_minute, how):
    corrupted = dataclasses.replace(table, features=table.features.copy(), target=table.target.copy())
    later = table.minutes >= from_minute
    corrupted.features[later] = np.nan if how == "nan" else 1e30
    corrupted.target[later] = 1e9
    return corrupted


def _fitted_state(table, fold):
    task = backtesting.FoldTask(fold, table, TINY)
    trained = backtesting.train_fold(task)
    forecaster, history, samples = trained.forecaster, trained.history, trained.samples
    return {
        "alert": trained.operating_point,
        "compared": trained.compared,  # the baselines' alert thresholds, chosen on early stopping
        "weights": forecaster.model.state_dict(),
        "scaler": (forecaster.scaler.scaler.mean_, forecaster.scaler.scaler.scale_),
        "target": (forecaster.target_normalizer.location, forecaster.target_normalizer.scale, forecaster.target_normalizer.ceiling),
        "history": [(row["train_loss"], row["val_loss"]) for row in history],
        "samples": samples,
    }


@pytest.fixture(scope="module")
def clean_state(tiny_table):
    return _fitted_state(tiny_table, _fold(tiny_table))


@pytest.mark.parametrize("how", ["nan", "huge"])
def test_data_after_the_training_end_cannot_change_the_fold(tiny_table, clean_state, how):
    fold = _fold(tiny_table)
    corrupted = _fitted_state(_corrupt(tiny_table, fold.train.end, how), fold)
    assert corrupted["weights"].keys() == clean_state["weights"].keys()
    for name, tensor in clean_state["weights"].items():
        assert torch.equal(corrupted["weights"][name], tensor), f"{name} changed: the fold saw data after its training end"
    for mine, theirs in zip(corrupted["scaler"] + corrupted["target"], clean_state["scaler"] + clean_state["target"]):
        np.testing.assert_array_equal(mine, theirs)
    assert corrupted["history"] == clean_state["history"]
    assert corrupted["samples"] == clean_state["samples"]
    assert corrupted["alert"] == clean_state["alert"], "the alert threshold saw the validation window"
    assert corrupted["compared"] == clean_state["compared"], "a baseline saw the validation window"
    assert "gradient_boosting" in clean_state["compared"]
    assert clean_state["alert"]["target_fpr"] == 0.05


def test_the_leakage_check_would_notice_one_minute_of_lookahead(tiny_table, clean_state):
    # the control: corrupt from one minute earlier, the last target of the early-stopping slice
    fold = _fold(tiny_table)
    seen = _fitted_state(_corrupt(tiny_table, fold.train.end - 1, "huge"), fold)
    assert seen["history"] != clean_state["history"]


# ----------------------------------------------------------------------------- summary


def test_summary_is_mean_and_sample_std_skipping_null_rates():
    blocks = [
        {key: 1.0 for key in backtesting.METRIC_KEYS} | {"mae": 2.0, "true_positive_rate": None},
        {key: 3.0 for key in backtesting.METRIC_KEYS} | {"mae": 4.0, "true_positive_rate": 0.5},
    ]
    summary = backtesting.summarize(blocks)
    assert tuple(summary) == backtesting.METRIC_KEYS
    assert summary["mae"] == {"mean": 3.0, "std": pytest.approx(np.sqrt(2.0))}
    assert summary["true_positive_rate"] == {"mean": 0.5, "std": None}
    assert backtesting.summarize(blocks[:1])["rmse"] == {"mean": 1.0, "std": None}


def test_a_fold_without_samples_fails_before_any_training(tiny_table):
    data_config = DataConfig(sequence_length=6, horizon=2)
    fold = backtesting.plan_folds(data.span(tiny_table), BacktestConfig(1.5, 0.5), data_config)[0]
    backtesting.check_folds(tiny_table, [fold], data_config)
    beyond = int(tiny_table.minutes.max()) + 10
    empty = dataclasses.replace(fold, number=7, validation=TimeRange(beyond, beyond + 100))
    with pytest.raises(UserError, match="too little data: the fold 7 validation period"):
        backtesting.check_folds(tiny_table, [fold, empty], data_config)
