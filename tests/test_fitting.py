"""fitting.py: the one training step. Its networks' scalers see the fit range only and start
seeded, automatic sizes are resolved and recorded, and ``train`` returns a finished bundle."""

import dataclasses

import numpy as np
import pytest
import torch

from latency_forecast import config, data, evaluation, fitting, store, synthetic, training
from latency_forecast.alerting import AlertRule, LatencyThresholds
from latency_forecast.config import BaselineConfig, DataConfig, ImportanceConfig, ModelConfig, StoreConfig, TrainingConfig
from latency_forecast.data import TimeRange
from latency_forecast.errors import UserError
from latency_forecast.forecaster import Forecaster
from latency_forecast.model import Ensemble, LatencyForecaster
from tests.helpers import (
    TINY_DATA,
    TINY_MODEL,
    TINY_TRAINING_CONFIG,
    fit_tiny,
    hand_frame,
    quiet,
    save_and_load,
    table_of,
)

TINY_SETTINGS = fitting.Settings(TINY_DATA, TINY_MODEL, TINY_TRAINING_CONFIG)


def test_untrained_forecaster_fits_its_scalers_on_the_fit_range_only_and_is_seeded(tmp_path):
    table = table_of(hand_frame(services=("a", "b"), minutes=200), tmp_path)
    fit_range = TimeRange(int(table.minutes.min()), int(table.minutes.min()) + 100)
    first = fitting.untrained_forecaster(table, fit_range, TINY_SETTINGS)
    poisoned = dataclasses.replace(table, features=table.features.copy(), target=table.target.copy())
    outside = ~data.rows_in(table, fit_range)
    poisoned.features[outside], poisoned.target[outside] = 1e6, 1e6
    second = fitting.untrained_forecaster(poisoned, fit_range, TINY_SETTINGS)
    np.testing.assert_array_equal(first.scaler.scaler.mean_, second.scaler.scaler.mean_)
    np.testing.assert_array_equal(first.target_normalizer.location, second.target_normalizer.location)
    # the minutes 0..99 of the feature: signed log1p, then their mean
    assert first.scaler.scaler.mean_[0] == pytest.approx(np.mean(np.log1p(np.arange(100.0))))
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), f"{name}: the same seed, the same initial weights"
    assert first.alert == AlertRule() and first.latency_thresholds == LatencyThresholds(TINY_DATA.latency_threshold)


def test_too_little_data_for_one_window_is_a_user_error(tmp_path):
    table = table_of(hand_frame(services=("a",), minutes=6), tmp_path)
    whole = data.span(table)
    with pytest.raises(UserError, match="too little data for one window: none of the 6 rows starts 8 consecutive minutes"):
        fitting.fit_networks(table, whole, whole, TINY_SETTINGS, progress=False, log=quiet)


def test_a_cause_model_needs_telemetry_features(tmp_path):
    table = table_of(hand_frame(services=("a",), minutes=100), tmp_path, feature_columns=["target_latency_p99"])
    fit_range = TimeRange(int(table.minutes.min()), int(table.minutes.max()) + 1)
    trained = fitting.untrained_forecaster(table, fit_range, TINY_SETTINGS)
    prepared = trained.prepare(table)
    with pytest.raises(UserError, match="no telemetry features besides target_latency_p99"):
        fitting.fit_cause_model(trained, prepared, prepared.ends, prepared.ends, progress=False, log=quiet)


def test_an_ensemble_trains_and_round_trips_and_a_single_network_is_kept(tiny_store, tmp_path):
    tiny_table = store.load_feature_store(tiny_store, store.load_feature_store(tiny_store).feature_columns)
    many = dataclasses.replace(TINY_TRAINING_CONFIG, samples_per_epoch=10**7)
    fit = fit_tiny(tiny_table, dataclasses.replace(TINY_MODEL, ensemble_size=3), many)
    model = fit.forecaster.model
    assert isinstance(model, Ensemble) and len(model.members) == 3
    assert fit.forecaster.model_config.ensemble_size == 3
    weights = [member.rnn.weight_ih_l0 for member in model.members]
    assert not torch.equal(weights[0], weights[1]), "the networks start from different weights"
    single = fit_tiny(tiny_table, dataclasses.replace(TINY_MODEL, ensemble_size=1), many)
    assert isinstance(single.forecaster.model, LatencyForecaster)

    checkpoint, scaler = save_and_load(fit.forecaster, tmp_path)
    restored = Forecaster.from_checkpoint(checkpoint, scaler, torch.device("cpu"))
    assert isinstance(restored.model, Ensemble) and len(restored.model.members) == 3
    ends = fit.ends["test"]
    mine, theirs = restored.predict(restored.prepare(tiny_table), ends), fit.forecaster.predict(fit.prepared, ends)
    np.testing.assert_array_equal(mine.ms, theirs.ms)
    for name in theirs.quantiles:
        np.testing.assert_array_equal(mine.quantiles[name], theirs.quantiles[name])
    # the ensemble's forecast is its networks' mean in the standardised log space
    each = torch.stack([member(*fit.prepared.tensors.windows(torch.as_tensor(ends)), fit.prepared.tensors.current(torch.as_tensor(ends))) for member in model.members])
    np.testing.assert_allclose(training.predict(model, fit.prepared.tensors, ends).forecast, each.mean(0).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_auto_batch_size_takes_small_batches_unless_an_epoch_grows_past_its_step_budget():
    assert fitting.auto_batch_size(6_000, 100_000) == 64, "a two-day store: its whole epoch in 94 steps"
    assert fitting.auto_batch_size(51_200, 100_000) == 64  # 800 steps exactly
    assert fitting.auto_batch_size(60_000, 100_000) == 128
    assert fitting.auto_batch_size(2_000_000, 100_000) == 128, "a full epoch of 100,000: 782 steps of 128"
    assert fitting.auto_batch_size(2_000_000, 0) == 256, "--samples-per-epoch 0 on a huge store: the largest"
    assert fitting.auto_batch_size(120_000, 100_000, world_size=2) == 64, "each rank's share of the epoch"


def test_an_auto_batch_size_is_resolved_before_training_and_recorded(tiny_fit):
    fit = fit_tiny(tiny_fit.table, training_config=dataclasses.replace(TINY_TRAINING_CONFIG, batch_size=0))
    assert fit.forecaster.training_config.batch_size == 64, "at most 2,000 windows an epoch: 32 steps of 64"
    assert fit.forecaster.settings["training"]["batch_size"] == 64, "the checkpoint records the batch it trained with"


def test_train_returns_a_finished_bundle_that_data_after_validation_cannot_change(tiny_fit):
    table, splits = tiny_fit.table, tiny_fit.splits
    settings = fitting.Settings(
        TINY_DATA, TINY_MODEL, TINY_TRAINING_CONFIG, baseline=BaselineConfig(gradient_boosting_max_samples=200),
        importance=ImportanceConfig(background_size=3), store=StoreConfig("somewhere"), latency_thresholds=LatencyThresholds(300.0),
    )
    run = fitting.train(table, splits.train, splits.validation, settings, progress=False, log=quiet)
    trained = run.forecaster
    assert trained.alert.target_fpr == settings.alert.target_fpr and trained.alert != AlertRule(), "calibrated on validation"
    assert list(trained.baselines) == ["gradient_boosting"] and trained.background is not None
    assert trained.run_id and trained.settings["store"]["feature_store_path"] == "somewhere"
    assert trained.cause_model is not None, "it reads the latency's history: explained through its cause model"
    assert set(run.samples) == {"train", "validation"} and len(run.validation) == len(run.samples["validation"])

    poisoned = dataclasses.replace(table, features=table.features.copy(), target=table.target.copy())
    later = table.minutes >= splits.validation.end
    poisoned.features[later], poisoned.target[later] = 1e6, 1e6
    again = fitting.train(poisoned, splits.train, splits.validation, settings, progress=False, log=quiet).forecaster
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), f"{name}: the test split reached training"
    assert again.alert == trained.alert, "the test split reached the calibration"
    np.testing.assert_array_equal(again.background.windows, trained.background.windows)
    assert again.run_id != trained.run_id, "the run id covers the whole table"


@pytest.mark.slow
def test_a_service_whose_level_moved_after_training_is_forecast_from_where_it_is_now(tmp_path):
    # every service's own latency halves or doubles for good after 70% of the store (a deploy):
    # the test split sees levels that training never did
    frame, _ = synthetic.generate(days=6, n_services=4, seed=3, level_shift_at=0.7)
    table = table_of(frame, tmp_path)
    data_config = DataConfig(sequence_length=8, horizon=3)
    splits = data.fraction_splits(table, 0.15, 0.15, data_config.embargo)
    settings = fitting.Settings(
        data_config, ModelConfig(hidden_size=16), TrainingConfig(epochs=4, num_threads=1, seed=3),
        baseline=BaselineConfig(gradient_boosting_max_samples=20_000),
    )
    run = fitting.train(table, splits.train, splits.validation, settings, progress=False, log=quiet)
    test = evaluation.evaluate(run.forecaster, run.prepared, run.prepared.samples(splits.test, "test"))
    model = test.model_metrics["mae"]
    assert model <= test.baseline_metrics["persistence"]["mae"], "the recurrent model alone, behind persistence after the shift"
    assert model <= test.baseline_metrics["gradient_boosting"]["mae"], "the recurrent model alone, behind gradient boosting after the shift"


def test_sequence_training_round_trips_and_needs_a_history_that_does_not_depend_on_t(tiny_fit, tmp_path):
    sequences = dataclasses.replace(TINY_TRAINING_CONFIG, targets_per_sequence=4, batch_size=0)
    with pytest.raises(UserError, match="--latency-history difference"):
        fit_tiny(tiny_fit.table, dataclasses.replace(TINY_MODEL, latency_history="relative"), sequences)
    fit = fit_tiny(tiny_fit.table, dataclasses.replace(TINY_MODEL, latency_history="difference"), sequences)
    assert fit.forecaster.training_config.batch_size == fitting.sequences_per_batch(64, 4) == 32, "auto: twice the windows' targets"
    checkpoint, scaler = save_and_load(fit.forecaster, tmp_path)
    restored = Forecaster.from_checkpoint(checkpoint, scaler, torch.device("cpu"))
    networks = restored.model.members if isinstance(restored.model, Ensemble) else [restored.model]
    assert all(network.differenced and network.relative_column is not None for network in networks), "they read the differenced history"
    ends = fit.ends["test"]
    mine, theirs = restored.predict(restored.prepare(tiny_fit.table), ends), fit.forecaster.predict(fit.prepared, ends)
    np.testing.assert_array_equal(mine.ms, theirs.ms)
    assert np.isfinite(mine.ms).all()


def test_early_stopping_reads_a_spaced_subset_of_large_validation_splits():
    small = np.arange(100, 200)
    assert fitting.early_stopping_ends(small, limit=100) is small
    # three services of 1,000 validation windows each, rows ordered by service then minute
    ends = np.concatenate([np.arange(1000) + 5000 * code for code in range(3)])
    chosen = fitting.early_stopping_ends(ends, limit=300)
    assert len(chosen) == 300 and np.all(np.diff(chosen) > 0) and set(chosen) <= set(ends)
    for code in range(3):  # every service, from the start of its span to its end
        own = chosen[(chosen >= 5000 * code) & (chosen < 5000 * code + 1000)] - 5000 * code
        assert 95 <= len(own) <= 105 and own.min() < 20 and own.max() > 980


@pytest.mark.parametrize("history, steps", [("relative", 1), ("difference", 4)])
def test_a_median_anchored_forecaster_trains_and_round_trips(tiny_fit, tmp_path, history, steps):
    model_config = dataclasses.replace(TINY_MODEL, anchor_minutes=3, latency_history=history)
    fit = fit_tiny(tiny_fit.table, model_config, dataclasses.replace(TINY_TRAINING_CONFIG, targets_per_sequence=steps))
    checkpoint, scaler = save_and_load(fit.forecaster, tmp_path)
    restored = Forecaster.from_checkpoint(checkpoint, scaler, torch.device("cpu"))
    assert restored.model_config.anchor_minutes == 3 and restored.prepare(tiny_fit.table).tensors.anchor_minutes == 3
    ends = fit.ends["test"]
    mine, theirs = restored.predict(restored.prepare(tiny_fit.table), ends), fit.forecaster.predict(fit.prepared, ends)
    np.testing.assert_array_equal(mine.ms, theirs.ms)
    assert np.isfinite(mine.ms).all()
    with pytest.raises(UserError, match="--anchor-minutes 9 is longer than the window"):
        fit_tiny(tiny_fit.table, dataclasses.replace(TINY_MODEL, anchor_minutes=9))
